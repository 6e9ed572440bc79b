//! TLS and HTTP/2 against the real binary: a TLS listener (certificate from a
//! throwaway CA made in the test) serves every feature alike over HTTP/1.1 and
//! HTTP/2, handles each of many HTTP/2 streams on one connection on its own,
//! speaks HTTP/1.1 only where `h2: false`; https backends are verified
//! against `routes[].backend_ca` (or the system's roots, which refuse the
//! test CA) and their connections pooled; failed handshakes are counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::pki::{self, Pki};
use common::*;
use reqwest::{Method, Version};
use tempfile::TempDir;

/// Keys: the shared one, one with no credits, one with 50, one limited to 10/s.
fn keys() -> String {
    format!(
        "{}  - {{key: poor, name: poor, credits: 0, rate_per_second: 1000}}\n  \
         - {{key: fifty, name: fifty, credits: 50, rate_per_second: 1000}}\n  \
         - {{key: slow, name: slow, credits: 1000, rate_per_second: 10}}\n",
        default_keys()
    )
}

/// The gateway with a TLS listener beside its plain one.
struct TlsGateway {
    gw: Gateway,
    port: u16,
    pki: Pki,
    _dir: TempDir,
}

impl TlsGateway {
    /// `top`: more top-level YAML; `listener_extra`: more fields of the TLS
    /// listener's map (`, h2: false`).
    async fn start(routes: &[String], top: &str, listener_extra: &str) -> TlsGateway {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let leaf = pki.leaf("gateway", 7, 90);
        let port = free_port();
        let listener = format!(
            "{{addr: \"127.0.0.1:{port}\", tls: {{cert: \"{}\", key: \"{}\"}}{listener_extra}}}",
            leaf.cert.display(),
            leaf.key.display()
        );
        let gw = Gateway::start_listening(routes, top, &keys(), "", &[listener]).await;
        TlsGateway {
            gw,
            port,
            pki,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
}

/// An answer read whole.
struct Answer {
    status: u16,
    version: Version,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    async fn from(r: reqwest::Response) -> Answer {
        Answer {
            status: r.status().as_u16(),
            version: r.version(),
            headers: r.headers().clone(),
            body: r.text().await.unwrap(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn error(&self) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body));
        assert_eq!(v["status"], false, "{}", self.body);
        v["error"].as_str().unwrap_or_default().to_string()
    }
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    Answer::from(req.send().await.unwrap()).await
}

fn version(h2: bool) -> Version {
    if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    }
}

/// Auth by all three sources, cache, credit and rate headers, and every
/// gateway-made error, on one TLS client (HTTP/2 or HTTP/1.1 by ALPN).
async fn every_feature_alike(h2: bool) {
    let ok = Origin::json("ok", true, 0).await;
    let broken = Origin::status(500, 0).await;
    let t = TlsGateway::start(
        &[
            route("t", "/api/", &[&ok], "cache: {ttl_seconds: 60}"),
            route("bad", "/bad/", &[&broken], ""),
        ],
        "",
        "",
    )
    .await;
    let c = pki::client(&t.pki, h2);
    let want = version(h2);

    // The three key sources; the key never reaches the backend.
    let by_header = send(c.get(t.url("/api/a")).header("X-API-Key", KEY)).await;
    let by_bearer = send(c.get(t.url("/api/b")).bearer_auth(KEY)).await;
    let by_query = send(c.get(t.url(&format!("/api/c?api_key={KEY}&x=1")))).await;
    for a in [&by_header, &by_bearer, &by_query] {
        assert_eq!((a.status, a.version), (200, want), "{}", a.body);
        assert!(a.body.contains("\"from\": \"ok\""), "{}", a.body);
    }
    for r in ok.requests() {
        assert!(r.header("x-api-key").is_none() && r.header("authorization").is_none());
        assert!(!r.target.contains("api_key"), "{}", r.target);
    }

    // Miss, then hit, with every header of a proxied answer.
    let miss = send(c.get(t.url("/api/cached")).header("X-API-Key", KEY)).await;
    let hit = send(c.get(t.url("/api/cached")).header("X-API-Key", KEY)).await;
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert!(hit.header("age").is_some());
    for name in [
        "x-credits-cost",
        "x-credits-remaining",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-request-id",
        "content-type",
    ] {
        assert!(hit.header(name).is_some(), "{name} missing over {want:?}");
    }
    let before: u64 = miss.header("x-credits-remaining").unwrap().parse().unwrap();
    let after: u64 = hit.header("x-credits-remaining").unwrap().parse().unwrap();
    assert_eq!(before - after, 1, "a hit is charged once");
    assert_eq!(ok.hits(), 4, "the hit reached the backend");

    // Every gateway-made error, as JSON, with its headers.
    let none = send(c.get(t.url("/api/x"))).await;
    assert_eq!((none.status, none.error()), (401, "missing_api_key".into()));
    assert!(none.header("www-authenticate").is_some());
    let unknown = send(c.get(t.url("/api/x")).header("X-API-Key", "nope")).await;
    assert_eq!(
        (unknown.status, unknown.error()),
        (401, "invalid_api_key".into())
    );
    let nowhere = send(c.get(t.url("/elsewhere")).header("X-API-Key", KEY)).await;
    assert_eq!((nowhere.status, nowhere.error()), (404, "no_route".into()));
    let post = send(
        c.request(Method::POST, t.url("/api/x"))
            .header("X-API-Key", KEY),
    )
    .await;
    assert_eq!(
        (post.status, post.error()),
        (405, "method_not_allowed".into())
    );
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    let escape = send(c.get(t.url("/api/%zz")).header("X-API-Key", KEY)).await;
    assert_eq!((escape.status, escape.error()), (400, "bad_request".into()));
    let poor = send(c.get(t.url("/api/x")).header("X-API-Key", "poor")).await;
    assert_eq!(
        (poor.status, poor.error()),
        (402, "insufficient_credits".into())
    );
    let failed = send(c.get(t.url("/bad/x")).header("X-API-Key", KEY)).await;
    assert_eq!(
        (failed.status, failed.error()),
        (502, "upstream_failed".into())
    );
    let long = format!("/api/{}", "a".repeat(9 * 1024));
    let too_long = send(c.get(t.url(&long)).header("X-API-Key", KEY)).await;
    assert_eq!(
        (too_long.status, too_long.error()),
        (414, "uri_too_long".into())
    );
    let mut big = c.get(t.url("/api/x")).header("X-API-Key", KEY);
    for i in 0..5 {
        big = big.header(format!("x-filler-{i}"), "f".repeat(7 * 1024));
    }
    let too_big = send(big).await;
    assert_eq!(
        (too_big.status, too_big.error()),
        (431, "headers_too_large".into())
    );
    for a in [
        &none, &unknown, &nowhere, &post, &escape, &poor, &failed, &too_long, &too_big,
    ] {
        assert_eq!(a.version, want);
    }
    let mut limited = None;
    for _ in 0..30 {
        let a = send(c.get(t.url("/api/cached")).header("X-API-Key", "slow")).await;
        if a.status == 429 {
            limited = Some(a);
            break;
        }
    }
    let limited = limited.expect("30 requests at 10/s never limited");
    assert_eq!(limited.error(), "rate_limited");
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(limited.header("x-ratelimit-limit"), Some("10"));

    // HEAD is answered without a body.
    let head = send(c.head(t.url("/api/cached")).header("X-API-Key", KEY)).await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(head.header("x-cache"), Some("HIT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_feature_works_over_tls_http1() {
    every_feature_alike(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_feature_works_over_http2() {
    every_feature_alike(true).await;
}

/// Requests at once on one HTTP/2 connection: each is charged and limited
/// on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_on_one_http2_connection_are_each_charged_and_limited() {
    let ok = Origin::json("ok", true, 20).await;
    let t = TlsGateway::start(&[route("t", "/api/", &[&ok], "")], "", "").await;
    let c = pki::client(&t.pki, true);
    // One connection first, so that every stream below shares it.
    let first = send(c.get(t.url("/api/warm")).header("X-API-Key", KEY)).await;
    assert_eq!(first.version, Version::HTTP_2);

    let at_once = |key: &'static str, n: usize| {
        let c = c.clone();
        let urls: Vec<String> = (0..n).map(|i| t.url(&format!("/api/{key}/{i}"))).collect();
        async move {
            let tasks = urls.into_iter().map(|u| {
                let req = c.get(u).header("X-API-Key", key);
                tokio::spawn(async move { send(req).await })
            });
            futures::future::join_all(tasks)
                .await
                .into_iter()
                .map(|a| a.unwrap())
                .collect::<Vec<Answer>>()
        }
    };
    let count =
        |answers: &[Answer], status: u16| answers.iter().filter(|a| a.status == status).count();

    // 50 credits buy exactly 50 of 80 answers.
    let answers = at_once("fifty", 80).await;
    assert!(answers.iter().all(|a| a.version == Version::HTTP_2));
    assert_eq!((count(&answers, 200), count(&answers, 402)), (50, 30));
    // 10 a second: 10 (11 when the window flips mid-burst) of 20 get through.
    let answers = at_once("slow", 20).await;
    let allowed = count(&answers, 200);
    assert!((10..=11).contains(&allowed), "{allowed} allowed");
    assert_eq!(count(&answers, 429), 20 - allowed);
    // Every answer reached the backend once, on its own stream.
    wait_until(
        "the backend saw every answer",
        std::time::Duration::from_secs(5),
        || ok.hits() == 1 + 50 + allowed,
    )
    .await;
    let m = t.gw.metrics().await;
    let charged = sample(&m, "tollgate_credits_charged_total{route=\"t\"}");
    assert_eq!(charged as usize, 1 + 50 + allowed, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_with_h2_false_speaks_http1_only() {
    let ok = Origin::json("ok", true, 0).await;
    let t = TlsGateway::start(&[route("t", "/api/", &[&ok], "")], "", ", h2: false").await;
    let c = pki::client(&t.pki, true);
    let a = send(c.get(t.url("/api/x")).header("X-API-Key", KEY)).await;
    assert_eq!((a.status, a.version), (200, Version::HTTP_11));
    assert!(a.header("X-Credits-Remaining").is_some());
}

/// An https backend verified against `backend_ca`, its connection reused;
/// the same backend without the CA fails verification: 502, and the reason
/// in the failure warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_are_verified_and_pooled() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let origin = Origin::start_tls(&pki, |_| Reply::json(200, r#"{"status": true}"#)).await;
    let ca = format!("backend_ca: \"{}\"", pki.ca_path().display());
    let gw = Gateway::start(
        &[
            route("verified", "/v/", &[&origin], &ca),
            route("system", "/s/", &[&origin], ""),
        ],
        "",
    )
    .await;
    for i in 0..5 {
        assert_eq!(status(&gw, &format!("/v/{i}")).await, 200);
    }
    let conns: Vec<u64> = origin.requests().iter().map(|r| r.connection).collect();
    assert_eq!(conns.len(), 5);
    assert!(
        conns.iter().all(|&c| c == conns[0]),
        "one pooled connection expected: {conns:?}"
    );
    assert_eq!(
        origin.requests()[0].header("host"),
        Some(&*format!("localhost:{}", origin.addr.port()))
    );

    let r = client().get(gw.url("/s/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(origin.hits(), 5, "an unverified backend got a request");
    let needle = "\"event\":\"all_backends_failed\",\"route\":\"system\"";
    let logs = gw.wait_log(needle).await;
    let line = logs.lines().find(|l| l.contains(needle)).unwrap();
    assert!(
        line.contains("certificate verify failed"),
        "no verification reason in: {line}"
    );
}

/// A connection that does not speak TLS to a TLS listener is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted() {
    let ok = Origin::json("ok", true, 0).await;
    let t = TlsGateway::start(&[route("t", "/api/", &[&ok], "")], "", "").await;
    let tls_addr = std::net::SocketAddr::from(([127, 0, 0, 1], t.port));
    let answer = raw(tls_addr, get("/api/x", "")).await;
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    let series = "tollgate_tls_handshake_errors_total";
    let m = t.gw.metrics().await;
    assert_eq!(sample(&m, series), 1.0, "{m}");
    assert_eq!(ok.hits(), 0);
    // A good client still gets through.
    let c = pki::client(&t.pki, true);
    let a = send(c.get(t.url("/api/x")).header("X-API-Key", KEY)).await;
    assert_eq!(a.status, 200);
    assert_eq!(sample(&t.gw.metrics().await, series), 1.0);
}

/// `check` and `serve -t` name each certificate problem by its field; a
/// certificate that expires within 14 days is a warning only.
#[test]
fn check_names_each_certificate_problem_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d);
    let good = pki.leaf("good", 2, 90);
    let other = pki.leaf("other", 3, 90);
    let expired = pki.leaf("expired", 4, -1);
    let soon = pki.leaf("soon", 5, 7);
    let garbage = d.join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n").unwrap();
    let missing = d.join("missing.pem");
    let ca = pki.ca_path();
    let conf = |cert: &std::path::Path, key: &std::path::Path, backend_ca: &std::path::Path| {
        let path = d.join("t.yaml");
        std::fs::write(
            &path,
            format!(
                "server:\n  pid_file: {d}/p.pid\n  upgrade_sock: {d}/u.sock\n\
                 listen: [\"127.0.0.1:0\", {{addr: \"127.0.0.1:0\", tls: {{cert: \"{}\", key: \"{}\"}}}}]\n\
                 routes:\n  - {{name: t, prefix: /, backends: [\"https://localhost:9\"], backend_ca: \"{}\"}}\n",
                cert.display(),
                key.display(),
                backend_ca.display(),
                d = d.display()
            ),
        )
        .unwrap();
        path
    };
    let cases: [(&std::path::Path, &std::path::Path, &std::path::Path, &str); 8] = [
        (&missing, &good.key, &ca, "listen[1].tls.cert: cannot read"),
        (&garbage, &good.key, &ca, "listen[1].tls.cert: "),
        (&good.cert, &missing, &ca, "listen[1].tls.key: cannot read"),
        (&good.cert, &garbage, &ca, "listen[1].tls.key: "),
        (&good.cert, &other.key, &ca, "listen[1].tls.key: "),
        (&expired.cert, &expired.key, &ca, "listen[1].tls.cert: "),
        (&good.cert, &good.key, &garbage, "routes[0].backend_ca: "),
        (
            &good.cert,
            &good.key,
            &missing,
            "routes[0].backend_ca: cannot read",
        ),
    ];
    let why = [
        "",
        "is not a PEM certificate chain",
        "",
        "is not a PEM private key",
        "is not the private key of the certificate",
        "expired on",
        "is not a PEM bundle of CA certificates",
        "",
    ];
    for ((cert, key, backend_ca, field), why) in cases.into_iter().zip(why) {
        let path = conf(cert, key, backend_ca);
        for args in [&["check"][..], &["serve", "-t"][..]] {
            let (code, out, err) = tollgate(args, &path);
            assert_eq!(code, 1, "{args:?} accepted {field}: {out}{err}");
            assert!(
                err.contains(field) && err.contains(why),
                "{args:?}: want {field:?} {why:?} in:\n{err}"
            );
        }
    }
    let path = conf(&good.cert, &good.key, &ca);
    let (code, _, err) = tollgate(&["check"], &path);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");

    let path = conf(&soon.cert, &soon.key, &ca);
    let (code, _, err) = tollgate(&["check"], &path);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: listen[1].tls.cert: ") && err.contains("within 14 days"),
        "{err}"
    );
    let (code, _, err) = tollgate(&["serve", "-t"], &path);
    assert_eq!(code, 0, "{err}");
}

/// HTTP/1.1 over TLS goes through the same front door as plain HTTP/1.1:
/// framing nginx refuses gets the JSON 400 and a close, pipelined requests
/// are answered in order, and a head that never completes is closed at
/// `limits.request_header_timeout_ms` and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_gets_the_front_doors_checks() {
    let echo = Origin::start(|r| {
        Reply::json(
            200,
            format!(r#"{{"status": true, "target": "{}"}}"#, r.target),
        )
    })
    .await;
    let t = TlsGateway::start(
        &[route("t", "/api/", &[&echo], "")],
        "limits:\n  request_header_timeout_ms: 500\n",
        "",
    )
    .await;
    let within = Duration::from_secs(10);
    for bad in [
        format!("GET /api/x HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        format!("GET /api/x y HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\r\n"),
        "HELLO THERE\r\n\r\n".to_string(),
    ] {
        let (answer, _) = pki::raw_tls(&t.pki, t.port, bad.as_bytes(), within).await;
        let (status, body) = status_and_json(&answer);
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{bad:?}: {answer}");
        assert!(answer.contains("Connection: close"), "{answer}");
    }
    assert_eq!(echo.hits(), 0, "a refused request reached the backend");

    let one = |path: &str, last: bool| {
        let close = if last { "Connection: close\r\n" } else { "" };
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n{close}\r\n")
    };
    let three = format!(
        "{}{}{}",
        one("/api/p1", false),
        one("/api/p2", false),
        one("/api/p3", true)
    );
    let (answer, _) = pki::raw_tls(&t.pki, t.port, three.as_bytes(), within).await;
    assert_eq!(answer.matches("HTTP/1.1 200 ").count(), 3, "{answer}");
    let at = |p: &str| answer.find(&format!("\"target\": \"{p}\"")).unwrap();
    assert!(at("/api/p1") < at("/api/p2") && at("/api/p2") < at("/api/p3"));

    let (answer, took) = pki::raw_tls(
        &t.pki,
        t.port,
        b"GET /api/slow HTTP/1.1\r\nHost: t\r\n",
        within,
    )
    .await;
    assert!(answer.is_empty(), "{answer}");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    let series = "tollgate_request_header_timeouts_total";
    assert_eq!(sample(&t.gw.metrics().await, series), 1.0);
}
