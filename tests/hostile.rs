//! Hostile clients: keys in logs when a client goes away, near-miss spellings
//! of the auth parameter, HTTP/1 framing nginx refuses, pipelining, and the
//! errors Pingora would have made itself. Malformed requests go over raw TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// Echoes the target it received, so a test can see what reached it.
async fn echo(delay_ms: u64) -> Origin {
    Origin::start(move |req| {
        Reply::json(
            200,
            format!(r#"{{"status": true, "target": "{}"}}"#, req.target),
        )
        .after(Duration::from_millis(delay_ms))
    })
    .await
}

fn assert_json_error(answer: &str, status: u16, code: &str) {
    let (got, body) = status_and_json(answer);
    assert_eq!(got, status, "{answer}");
    assert_eq!(body["status"], false, "{answer}");
    assert_eq!(body["error"], code, "{answer}");
    assert_no_server_header(answer);
}

fn assert_no_server_header(answer: &str) {
    let head = answer.split("\r\n\r\n").next().unwrap_or("");
    assert!(
        !head.to_ascii_lowercase().contains("\r\nserver:"),
        "a Server header: {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_mid_race_leaves_no_key_in_the_error_log() {
    let slow = echo(2_000).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&slow], "")], "").await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!("GET /api/eod/X?x=1&api_key={KEY} HTTP/1.1\r\nHost: t\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    wait_until("the race to start", Duration::from_secs(10), || {
        slow.hits() >= 1
    })
    .await;
    // Reset, not close: the answer finds the connection gone.
    s.set_zero_linger().unwrap();
    drop(s);
    let logs = gw.wait_log("Fail to filter request").await;
    let line = logs
        .lines()
        .find(|l| l.contains("Fail to filter request"))
        .unwrap();
    assert!(line.contains("GET /api/eod/X?x=1"), "{line}");
    assert!(!logs.contains(KEY), "the key is in the error log:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_miss_spellings_of_the_auth_param_are_the_key_or_refused() {
    let only = echo(0).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let top = format!("access_log: {}", path.display());
    let gw = Gateway::start(&[route("t", "/api/", &[&only], "")], &top).await;
    let c = reqwest::Client::new();

    // Another case or an encoded name: the auth parameter itself.
    for name in ["API_KEY", "Api_Key", "api%5Fkey"] {
        let r = c
            .get(gw.url(&format!("/api/a?x=1&{name}={KEY}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let wrong = c
            .get(gw.url(&format!("/api/a?{name}=leak-wrong-key")))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{name}");
    }
    // Names that only look like it: 400, even next to a valid key.
    let near = [
        "api%255Fkey=leak-1",
        "api_key[]=leak-2",
        "api_key%00=leak-3",
        "x=1;api_key=leak-4",
        "API_KEY[]=leak-5",
    ];
    for pair in near {
        let r = c
            .get(gw.url(&format!("/api/b?{pair}")))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{pair}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "bad_request", "{pair}");
    }
    let targets: Vec<String> = only.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/api/a?x=1"; 3], "what reached the backend");

    let expected = 3 + 3 + near.len();
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= expected {
            break text;
        }
        assert!(Instant::now() < deadline, "access log has:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!text.contains("leak"), "a key in the access log:\n{text}");
    assert!(!text.contains(KEY), "a key in the access log:\n{text}");
    assert!(!gw.logs().contains("leak"), "a key in the error log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_that_nginx_refuses_is_400_and_closes() {
    let only = echo(0).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let top = format!("access_log: {}", path.display());
    let gw = Gateway::start(&[route("t", "/api/", &[&only], "")], &top).await;
    let cases = [
        // RFC 9112 §6.1: both framings. No `Connection: close`: the gateway
        // must close by itself (raw() reads until it does).
        format!(
            "GET /api/x HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        // HTTP/1.1 without Host.
        format!("GET /api/x HTTP/1.1\r\nX-API-Key: {KEY}\r\n\r\n"),
        // A raw space (and a raw tab) in the target.
        format!("GET /api/x y HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\r\n"),
        format!("GET /api/x?q=a\tb HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\r\n"),
        // Two Host headers, two different lengths.
        format!("GET /api/x HTTP/1.1\r\nHost: t\r\nHost: u\r\nX-API-Key: {KEY}\r\n\r\n"),
        format!(
            "GET /api/x HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
        ),
    ];
    for req in cases {
        let answer = raw(gw.addr, req.clone().into_bytes()).await;
        assert_json_error(&answer, 400, "bad_request");
        assert!(answer.contains("Connection: close"), "{req:?}: {answer}");
    }
    // Control characters encoded in the query.
    for target in ["/api/x?q=%0D%0AX-Injected:%201", "/api/x?q=a%00b"] {
        let answer = raw(gw.addr, get(target, "")).await;
        assert_json_error(&answer, 400, "bad_request");
    }
    assert_eq!(only.hits(), 0, "a refused request reached the backend");
    // Each refusal is in the access log, without a path.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let refused: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("\"error\":\"bad_request\""))
            .collect();
        if refused.len() >= 8 {
            assert!(
                refused.iter().all(|l| l.contains("\"status\":400")),
                "{text}"
            );
            assert!(!text.contains(KEY), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "access log has:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // HTTP/1.0 may leave out Host.
    let answer = raw(
        gw.addr,
        format!("GET /api/ok HTTP/1.0\r\nX-API-Key: {KEY}\r\n\r\n").into_bytes(),
    )
    .await;
    assert_eq!(status_and_json(&answer).0, 200, "{answer}");
}

/// Send `bytes` on one connection, read until the gateway closes it.
async fn pipelined(gw: &Gateway, bytes: String) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(bytes.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the gateway did not close the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let only = echo(0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&only], "")], "").await;
    let one = |path: &str, last: bool| {
        let close = if last { "Connection: close\r\n" } else { "" };
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n{close}\r\n")
    };
    let answer = pipelined(
        &gw,
        format!(
            "{}{}{}",
            one("/api/p1", false),
            one("/api/p2", false),
            one("/api/p3", true)
        ),
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200 ").count(), 3, "{answer}");
    let at = |p: &str| answer.find(&format!("\"target\": \"{p}\"")).unwrap();
    assert!(at("/api/p1") < at("/api/p2") && at("/api/p2") < at("/api/p3"));

    // A bad request in the pipeline is answered in its turn, then the
    // connection closes: what follows it is not served.
    let answer = pipelined(
        &gw,
        format!(
            "{}GET /api/bad x HTTP/1.1\r\nHost: t\r\n\r\n{}",
            one("/api/p4", false),
            one("/api/p5", true)
        ),
    )
    .await;
    let first = answer.find("HTTP/1.1 200 ").expect("first answered");
    let second = answer.find("HTTP/1.1 400 ").expect("then the 400");
    assert!(first < second, "{answer}");
    assert!(!answer.contains("/api/p5"), "{answer}");
    let targets: Vec<String> = only.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/api/p1", "/api/p2", "/api/p3", "/api/p4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_pingora_would_make_are_json_without_a_server_header() {
    let only = echo(0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&only], "")], "").await;
    // Not HTTP at all.
    let answer = raw(gw.addr, b"HELLO THERE\r\n\r\n".to_vec()).await;
    assert_json_error(&answer, 400, "bad_request");
    // A Content-Length that is not a number.
    let answer = raw(
        gw.addr,
        format!(
            "GET /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\nX-API-Key: {KEY}\r\n\r\n"
        )
        .into_bytes(),
    )
    .await;
    assert_json_error(&answer, 400, "bad_request");
    // CONNECT, which Pingora refuses before any hook.
    let answer = raw(
        gw.addr,
        b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n".to_vec(),
    )
    .await;
    assert_json_error(&answer, 405, "method_not_allowed");
    assert!(answer.contains("Allow: GET, HEAD"), "{answer}");
    // A head that never ends: refused once it passes the limits.
    let mut endless = b"GET /api/x HTTP/1.1\r\nHost: t\r\n".to_vec();
    for _ in 0..2_000 {
        endless.extend_from_slice(format!("X-Filler: {}\r\n", "f".repeat(40)).as_bytes());
    }
    let answer = raw(gw.addr, endless).await;
    assert_json_error(&answer, 431, "headers_too_large");
    let endless = format!("GET /api/{} HTTP/1.1\r\n", "a".repeat(60 * 1024));
    let answer = raw(gw.addr, endless.into_bytes()).await;
    assert_json_error(&answer, 414, "uri_too_long");
    assert_eq!(only.hits(), 0);
    // And no Server header on what the gateway makes or passes on.
    assert_no_server_header(&raw(gw.addr, get("/api/fine", "")).await);
    assert_no_server_header(&raw(gw.addr, get("/nowhere", "")).await);
    let m = gw.metrics().await;
    assert!(
        sample(
            &m,
            "tollgate_rejections_total{reason=\"headers_too_large\"}"
        ) >= 1.0,
        "{m}"
    );
}
