//! What the gateway refuses before any backend is asked: methods, malformed
//! or oversized requests, unknown routes. Each answer is the JSON error shape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

async fn gateway() -> (Gateway, Origin) {
    let only = Origin::json("only", true, 0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&only], "")], "").await;
    (gw, only)
}

fn assert_error(answer: &str, status: u16, code: &str) {
    let (got, body) = status_and_json(answer);
    assert_eq!(got, status, "{answer}");
    assert_eq!(body["status"], false, "{answer}");
    assert_eq!(body["error"], code, "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_other_than_get_and_head_are_405_with_allow() {
    let (gw, only) = gateway().await;
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let req = format!(
            "{method} /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let answer = raw(gw.addr, req.into_bytes()).await;
        assert_error(&answer, 405, "method_not_allowed");
        assert!(answer.contains("Allow: GET, HEAD"), "{answer}");
    }
    assert_eq!(only.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_escapes_and_bad_percent_encoding_are_400() {
    let (gw, only) = gateway().await;
    for target in [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/%2E%2e/admin",
        "/api/..%2fadmin",
        "/api/%zz",
        "/api/x%4",
        "/api/x?q=%g0",
        "/api/%00",
    ] {
        let answer = raw(gw.addr, get(target, "")).await;
        assert_error(&answer, 400, "bad_request");
    }
    assert_eq!(only.hits(), 0);
    // Dots inside a segment are fine.
    let answer = raw(gw.addr, get("/api/a..b/v1.2", "")).await;
    assert_eq!(status_and_json(&answer).0, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_targets_are_414_and_large_headers_431() {
    let (gw, only) = gateway().await;
    let long = format!("/api/{}", "a".repeat(8 * 1024));
    assert_error(&raw(gw.addr, get(&long, "")).await, 414, "uri_too_long");
    let header = format!("X-Big: {}\r\n", "b".repeat(8 * 1024));
    assert_error(
        &raw(gw.addr, get("/api/x", &header.repeat(5))).await,
        431,
        "headers_too_large",
    );
    assert_eq!(only.hits(), 0);
    // Just under both limits is served.
    let under = format!("/api/{}", "a".repeat(8 * 1024 - 100));
    let answer = raw(gw.addr, get(&under, &header.repeat(3))).await;
    assert_eq!(status_and_json(&answer).0, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_no_route() {
    let (gw, only) = gateway().await;
    assert_error(&raw(gw.addr, get("/other/x", "")).await, 404, "no_route");
    // The prefix is matched as written: "/api" is not under "/api/".
    assert_error(&raw(gw.addr, get("/api", "")).await, 404, "no_route");
    assert_eq!(only.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_serves_health_and_metrics() {
    let (gw, _only) = gateway().await;
    let health = reqwest::get(format!("http://{}/healthz", gw.admin))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let m = gw.metrics().await;
    // Per-backend series exist (at 0) before any traffic.
    let series = format!(
        "tollgate_backend_requests_total{{backend=\"{}\",outcome=\"timeout\",route=\"t\"}} 0",
        _only.addr
    );
    assert!(m.contains(&series), "{m}");
    assert!(m.contains("# TYPE tollgate_race_wins_total counter"), "{m}");
    let other = reqwest::get(format!("http://{}/other", gw.admin))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
}
