//! The race against real backends: winner, cancellation, success rule,
//! no-winner statuses, timeouts, hedge timing, failover order, body cap,
//! connection reuse, and what the backends receive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

async fn get_json(url: &str) -> (u16, reqwest::header::HeaderMap, Value, Duration) {
    let started = Instant::now();
    let resp = client().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, body, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastest_success_wins_and_is_logged() {
    // The winner takes 150 ms so that every request is surely sent before it wins.
    let fast = Origin::json("fast", true, 150).await;
    let mid = Origin::json("mid", true, 900).await;
    let slow = Origin::json("slow", true, 1500).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&slow, &mid, &fast], "")], "").await;

    let (status, headers, body, took) = get_json(&gw.url("/api/eod/AAPL")).await;
    assert_eq!(status, 200);
    assert_eq!(body["from"], "fast");
    assert_eq!(headers["content-type"], "application/json");
    // The route has no cache: X-Cache says so.
    assert_eq!(headers["x-cache"], "BYPASS");
    assert!(took < Duration::from_millis(800), "answered after {took:?}");
    // Every backend got the request at once.
    assert_eq!((fast.hits(), mid.hits(), slow.hits()), (1, 1, 1));
    let logs = gw.wait_log("\"winner\":").await;
    assert!(
        logs.contains(&format!("\"winner\":\"{}\"", fast.addr)),
        "winner not in the access log:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losers_are_cancelled_with_their_connections_closed() {
    // The winner takes 100 ms so that the loser's request is surely in flight.
    let fast = Origin::json("fast", true, 100).await;
    let slow = Origin::json("slow", true, 10_000).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&fast, &slow], "")], "").await;

    let (status, _, body, _) = get_json(&gw.url("/api/x")).await;
    assert_eq!((status, body["from"].as_str()), (200, Some("fast")));
    assert_eq!(slow.hits(), 1, "the slow backend never got the request");
    // The slow backend sees its connection closed long before its 10 s delay ends.
    wait_until(
        "the slow backend's connection to be closed",
        Duration::from_secs(3),
        || !slow.closed_early().is_empty(),
    )
    .await;
    let (req, closed_at) = slow.closed_early().remove(0);
    assert!(closed_at.duration_since(req.received_at) < Duration::from_secs(2));
    gw.wait_log("\"winner\":").await;
    let metrics = gw.metrics().await;
    let cancelled = format!(
        "tollgate_backend_requests_total{{backend=\"{}\",outcome=\"cancelled\",route=\"t\"}}",
        slow.addr
    );
    assert_eq!(sample(&metrics, &cancelled), 1.0, "{metrics}");
}

/// `late` answers its first request after 400 ms and later ones at once.
async fn late_first_time() -> Origin {
    let n = std::sync::atomic::AtomicUsize::new(0);
    Origin::start(move |_| {
        let first = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        Reply::json(200, r#"{"status": true, "from": "late"}"#)
            .after(Duration::from_millis(if first { 400 } else { 0 }))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loser_that_answers_within_the_drain_keeps_its_connection() {
    let fast = Origin::json("fast", true, 0).await;
    let late = late_first_time().await;
    let routes = [route(
        "t",
        "/api/",
        &[&fast, &late],
        "drain_losers_ms: 2000",
    )];
    let gw = Gateway::start(&routes, "").await;

    let (status, _, body, took) = get_json(&gw.url("/api/x")).await;
    // The answer does not wait for the loser.
    assert_eq!((status, body["from"].as_str()), (200, Some("fast")));
    assert!(took < Duration::from_millis(350), "answered after {took:?}");
    // The loser answers 400 ms in, within its drain window.
    wait_until("the loser to answer", Duration::from_secs(5), || {
        *late.rec.answered.lock().unwrap() > 0
    })
    .await;
    // Give the gateway a moment to read that answer and pool the connection
    // (microseconds; nothing is waiting for a server to start here).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(late.closed_early().is_empty());
    // The next request reaches the loser on that same connection.
    assert_eq!(get_json(&gw.url("/api/x")).await.0, 200);
    let seen = late.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].connection, seen[0].connection, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_losers_ms_0_closes_losers_at_once() {
    let fast = Origin::json("fast", true, 0).await;
    let late = late_first_time().await;
    let routes = [route("t", "/api/", &[&fast, &late], "drain_losers_ms: 0")];
    let gw = Gateway::start(&routes, "").await;

    assert_eq!(get_json(&gw.url("/api/x")).await.0, 200);
    wait_until(
        "the loser's connection to be closed",
        Duration::from_secs(3),
        || !late.closed_early().is_empty(),
    )
    .await;
    let (req, closed_at) = late.closed_early().remove(0);
    assert!(closed_at.duration_since(req.received_at) < Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_status_false_loses_to_slower_status_true() {
    let fast_false = Origin::json("fast", false, 0).await;
    let slow_true = Origin::json("slow", true, 300).await;
    let gw = Gateway::start(
        &[
            route("j", "/json/", &[&fast_false, &slow_true], ""),
            route(
                "h",
                "/http/",
                &[&fast_false, &slow_true],
                "success: http_2xx",
            ),
        ],
        "",
    )
    .await;
    let (status, _, body, took) = get_json(&gw.url("/json/x")).await;
    assert_eq!((status, body["from"].as_str()), (200, Some("slow")));
    assert!(took >= Duration::from_millis(290), "{took:?}");
    // With http_2xx any 2xx wins, whatever its body says.
    let (status, _, body, _) = get_json(&gw.url("/http/x")).await;
    assert_eq!((status, body["from"].as_str()), (200, Some("fast")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_without_data_is_404_no_data() {
    let a = Origin::json("a", false, 0).await;
    let b = Origin::status(404, 20).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&a, &b], "")], "").await;
    let (status, headers, body, _) = get_json(&gw.url("/api/nothing")).await;
    assert_eq!(status, 404);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["status"], false);
    assert_eq!(body["error"], "no_data");
    assert_eq!(
        body["message"],
        "All API Servers failed to respond - Or there is no Data for the requested resource and parameters"
    );
    // The structured warning names each backend's outcome.
    let logs = gw.wait_log("all_backends_failed").await;
    let line = logs
        .lines()
        .find(|l| l.contains("all_backends_failed"))
        .unwrap();
    assert!(line.contains(" WARN "), "{line}");
    let json: Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
    assert_eq!(json["reason"], "no_data");
    assert_eq!(json["route"], "t");
    let outcomes: Vec<&str> = json["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["no_data", "no_data"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_failed_backend_makes_502() {
    let no_data = Origin::json("a", false, 0).await;
    let broken = Origin::status(500, 0).await;
    let refused = free_port();
    let gw = Gateway::start(
        &[
            route("t", "/api/", &[&no_data, &broken], ""),
            format!(
                "  - name: dead\n    prefix: /dead/\n    backends: [\"http://127.0.0.1:{refused}\"]\n"
            ),
        ],
        "",
    )
    .await;
    let (status, _, body, _) = get_json(&gw.url("/api/x")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_failed"))
    );
    // Connection refused is a failure too.
    let (status, _, body, _) = get_json(&gw.url("/dead/x")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_failed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_timeouts_make_504_at_the_timeout() {
    let a = Origin::json("a", true, 5_000).await;
    let b = Origin::json("b", true, 5_000).await;
    let c = Origin::json("c", false, 0).await;
    let gw = Gateway::start(
        &[
            route("t", "/api/", &[&a, &b], "timeout_ms: 300"),
            route("m", "/mixed/", &[&a, &c], "timeout_ms: 300"),
        ],
        "",
    )
    .await;
    let (status, _, body, took) = get_json(&gw.url("/api/x")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (504, Some("upstream_timeout"))
    );
    assert!(took >= Duration::from_millis(290), "{took:?}");
    assert!(
        took < Duration::from_millis(2_000),
        "answer later than the timeout: {took:?}"
    );
    // One timeout plus one "no data" is a failure, not "no data".
    let (status, _, body, took) = get_json(&gw.url("/mixed/x")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_failed"))
    );
    assert!(took < Duration::from_millis(2_000), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedge_starts_the_next_backend_after_the_delay() {
    let slow = Origin::json("slow", true, 3_000).await;
    let fast = Origin::json("fast", true, 0).await;
    let gw = Gateway::start(
        &[route(
            "t",
            "/api/",
            &[&slow, &fast],
            "strategy: hedge\nhedge_after_ms: 400",
        )],
        "",
    )
    .await;
    let (status, _, body, took) = get_json(&gw.url("/api/x")).await;
    assert_eq!((status, body["from"].as_str()), (200, Some("fast")));
    let gap = fast.requests()[0]
        .received_at
        .duration_since(slow.requests()[0].received_at);
    assert!(
        gap >= Duration::from_millis(380),
        "second backend started after {gap:?}"
    );
    assert!(
        gap < Duration::from_millis(1_500),
        "second backend started after {gap:?}"
    );
    assert!(took < Duration::from_millis(2_000), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedge_does_not_start_backends_once_there_is_a_winner() {
    let first = Origin::json("first", true, 0).await;
    let second = Origin::json("second", true, 0).await;
    let gw = Gateway::start(
        &[route(
            "t",
            "/api/",
            &[&first, &second],
            "strategy: hedge\nhedge_after_ms: 500",
        )],
        "",
    )
    .await;
    let (status, _, body, _) = get_json(&gw.url("/api/x")).await;
    assert_eq!((status, body["from"].as_str()), (200, Some("first")));
    // The race is over when the answer arrives: the hedge was never started.
    assert_eq!(second.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedge_starts_at_once_when_everything_started_has_failed() {
    let broken = Origin::status(500, 0).await;
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start(
        &[route(
            "t",
            "/api/",
            &[&broken, &ok],
            "strategy: hedge\nhedge_after_ms: 3000",
        )],
        "",
    )
    .await;
    let (status, _, body, took) = get_json(&gw.url("/api/x")).await;
    assert_eq!((status, body["from"].as_str()), (200, Some("ok")));
    assert!(
        took < Duration::from_millis(1_500),
        "waited for the hedge timer: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_tries_one_backend_at_a_time_in_order() {
    let broken = Origin::status(500, 100).await;
    let empty = Origin::json("empty", false, 100).await;
    let good = Origin::json("good", true, 0).await;
    let spare = Origin::json("spare", true, 0).await;
    let gw = Gateway::start(
        &[route(
            "t",
            "/api/",
            &[&broken, &empty, &good, &spare],
            "strategy: failover",
        )],
        "",
    )
    .await;
    let (status, _, body, _) = get_json(&gw.url("/api/x")).await;
    assert_eq!((status, body["from"].as_str()), (200, Some("good")));
    let t = |o: &Origin| o.requests()[0].received_at;
    // Each starts only after the previous one answered (100 ms each).
    assert!(t(&empty).duration_since(t(&broken)) >= Duration::from_millis(90));
    assert!(t(&good).duration_since(t(&empty)) >= Duration::from_millis(90));
    assert_eq!(spare.hits(), 0, "failover went past the winner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_answer_fails_only_that_backend() {
    let big = Origin::start(|_| {
        Reply::json(
            200,
            format!(r#"{{"status": true, "pad": "{}"}}"#, "x".repeat(4096)),
        )
    })
    .await;
    let small = Origin::json("small", true, 200).await;
    let gw = Gateway::start(
        &[
            route("t", "/api/", &[&big, &small], "max_response_bytes: 1024"),
            route("b", "/big/", &[&big], "max_response_bytes: 1024"),
        ],
        "",
    )
    .await;
    let (status, _, body, _) = get_json(&gw.url("/api/x")).await;
    assert_eq!((status, body["from"].as_str()), (200, Some("small")));
    let (status, _, body, _) = get_json(&gw.url("/big/x")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_failed"))
    );
    gw.wait_log("byte cap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let only = Origin::json("only", true, 0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&only], "")], "").await;
    for _ in 0..5 {
        let (status, _, _, _) = get_json(&gw.url("/api/x")).await;
        assert_eq!(status, 200);
    }
    let conns: HashSet<u64> = only.requests().iter().map(|r| r.connection).collect();
    assert_eq!(only.hits(), 5);
    assert_eq!(
        conns.len(),
        1,
        "5 requests used {} connections",
        conns.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_the_backend_wrote_to_or_closed_are_not_reused() {
    // Every answer is followed, 50 ms later, by an unasked 408 and a hang-up:
    // what some servers do when their keep-alive timeout ends.
    let odd = Origin::start(|_| {
        Reply::json(200, r#"{"status": true}"#).then_send(
            Duration::from_millis(50),
            b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n",
        )
    })
    .await;
    let gw = Gateway::start(&[route("t", "/api/", &[&odd], "")], "").await;
    for i in 1..=3 {
        assert_eq!(get_json(&gw.url("/api/x")).await.0, 200, "request {i}");
        // The connection it came on is now in the pool; wait for the 408.
        wait_until("the origin's 408", Duration::from_secs(5), || {
            *odd.rec.sent_unasked.lock().unwrap() >= i
        })
        .await;
    }
    let connections: HashSet<u64> = odd.requests().iter().map(|r| r.connection).collect();
    assert_eq!(connections.len(), 3, "a dead connection was reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_get_path_and_query_without_the_key() {
    let only = Origin::json("only", true, 0).await;
    let based = format!("\"{}/base/\"", only.url());
    let gw = Gateway::start(
        &[format!(
            "  - name: t\n    prefix: /api/v1/\n    backends: [{based}]\n"
        )],
        "",
    )
    .await;
    let resp = reqwest::Client::new()
        .get(gw.url(&format!("/api/v1/eod/AAPL?from=2020&api_key={KEY}&to=2021")))
        .header("X-Request-Id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-42");
    let got = &only.requests()[0];
    assert_eq!(got.method, "GET");
    assert_eq!(got.target, "/base/api/v1/eod/AAPL?from=2020&to=2021");
    assert_eq!(got.header("host"), Some(only.addr.to_string().as_str()));
    assert_eq!(got.header("x-request-id"), Some("req-42"));
    let logs = gw.wait_log("req-42").await;
    assert!(!logs.contains(KEY), "key in the log:\n{logs}");

    // Without one, a request id is made.
    let resp = client().get(gw.url("/api/v1/x")).send().await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(only.requests()[1].header("x-request-id"), Some(id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_raced_as_get_and_answered_without_body() {
    let only = Origin::json("only", true, 0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&only], "")], "").await;
    let head =
        format!("HEAD /api/x HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nConnection: close\r\n\r\n");
    let answer = raw(gw.addr, head.into_bytes()).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let expected_len = r#"{"status": true, "from": "only"}"#.len();
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {expected_len}")),
        "{head}"
    );
    assert_eq!(body, "");
    assert_eq!(only.requests()[0].method, "GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_outcomes_and_wins() {
    let fast = Origin::json("fast", true, 0).await;
    let slow = Origin::json("slow", true, 2_000).await;
    let empty = Origin::json("empty", false, 0).await;
    let gw = Gateway::start(
        &[
            route("t", "/api/", &[&fast, &slow], ""),
            route("e", "/empty/", &[&empty], ""),
        ],
        "",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(get_json(&gw.url("/api/x")).await.0, 200);
    }
    assert_eq!(get_json(&gw.url("/empty/x")).await.0, 404);
    assert_eq!(get_json(&gw.url("/nowhere")).await.0, 404);
    gw.wait_log("\"route\":\"unmatched\"").await;
    let m = gw.metrics().await;
    let b = |o: &Origin| o.addr.to_string();
    for (series, want) in [
        ("tollgate_requests_total{route=\"t\",status=\"200\"}".to_string(), 3.0),
        ("tollgate_requests_total{route=\"e\",status=\"404\"}".to_string(), 1.0),
        ("tollgate_requests_total{route=\"unmatched\",status=\"404\"}".to_string(), 1.0),
        (format!("tollgate_race_wins_total{{backend=\"{}\",route=\"t\"}}", b(&fast)), 3.0),
        (format!("tollgate_backend_requests_total{{backend=\"{}\",outcome=\"success\",route=\"t\"}}", b(&fast)), 3.0),
        (format!("tollgate_backend_requests_total{{backend=\"{}\",outcome=\"cancelled\",route=\"t\"}}", b(&slow)), 3.0),
        (format!("tollgate_backend_requests_total{{backend=\"{}\",outcome=\"no_data\",route=\"e\"}}", b(&empty)), 1.0),
        ("tollgate_all_backends_failed_total{reason=\"no_data\",route=\"e\"}".to_string(), 1.0),
    ] {
        assert_eq!(sample(&m, &series), want, "{series}\n{m}");
    }
    assert!(
        m.contains("tollgate_request_duration_seconds_bucket"),
        "{m}"
    );
}
