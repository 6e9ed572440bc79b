//! Passive health (`routes[].health`): a hung backend (one that takes the
//! request and never answers, as a SIGSTOPped replica does) stops costing
//! hedge requests their `hedge_after_ms` and stops getting race attempts;
//! failing backends are skipped but tried when nothing else is left, never
//! all skipped; `tollgate_backend_healthy` follows; `failures: 0` turns it off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const OK: u8 = 0;
const HUNG: u8 = 1;
const ERROR: u8 = 2;
const NO_DATA: u8 = 3;

/// A backend whose behaviour the test switches: answers, never answers
/// (10 minutes), 500, or 404.
async fn switchable(name: &'static str, mode: u8) -> (Origin, Arc<AtomicU8>) {
    let m = Arc::new(AtomicU8::new(mode));
    let mode = m.clone();
    let origin = Origin::start(move |_| match mode.load(Ordering::SeqCst) {
        HUNG => Reply::json(200, format!(r#"{{"status": true, "from": "{name}"}}"#))
            .after(Duration::from_secs(600)),
        ERROR => Reply::json(500, r#"{"status": false}"#),
        NO_DATA => Reply::json(404, r#"{"status": false}"#),
        _ => Reply::json(200, format!(r#"{{"status": true, "from": "{name}"}}"#)),
    })
    .await;
    (origin, m)
}

/// Status and time taken of one request.
async fn get(url: &str) -> (u16, Duration) {
    let started = Instant::now();
    let resp = client().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    (status, started.elapsed())
}

/// `tollgate_backend_healthy` of a backend; `None` when the series is absent.
async fn healthy(gw: &Gateway, route: &str, o: &Origin) -> Option<f64> {
    let m = gw.metrics().await;
    let series = format!(
        "tollgate_backend_healthy{{backend=\"{}\",route=\"{route}\"}}",
        o.addr
    );
    m.lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
}

async fn wait_healthy(gw: &Gateway, route: &str, o: &Origin, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while healthy(gw, route, o).await != Some(want) {
        assert!(
            Instant::now() < deadline,
            "tollgate_backend_healthy of {} never became {want}:\n{}",
            o.addr,
            gw.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Send `n` requests, each answered 200, waiting each time until `o` got
/// its attempt (a race's loser may reach its backend after the winner
/// answered); then wait until passive health skips `o`.
async fn answer_until_skipped(gw: &Gateway, route: &str, o: &Origin, n: usize) {
    for i in 1..=n {
        assert_eq!(get(&gw.url("/api/x")).await.0, 200);
        wait_until(
            "the backend to get the request",
            Duration::from_secs(5),
            || o.hits() == i,
        )
        .await;
    }
    wait_healthy(gw, route, o, 0.0).await;
}

/// Attempts the gateway counted on a backend, all outcomes together.
async fn attempts(gw: &Gateway, route: &str, o: &Origin) -> f64 {
    let m = gw.metrics().await;
    ["success", "no_data", "error", "timeout", "cancelled"]
        .iter()
        .map(|outcome| {
            sample(
                &m,
                &format!(
                    "tollgate_backend_requests_total{{backend=\"{}\",outcome=\"{outcome}\",route=\"{route}\"}}",
                    o.addr
                ),
            )
        })
        .sum()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedge_stops_waiting_for_a_hung_backend_and_takes_it_back_when_it_answers() {
    let (hung, mode) = switchable("hung", HUNG).await;
    let a = Origin::json("a", true, 0).await;
    let b = Origin::json("b", true, 0).await;
    let gw = Gateway::start(
        &[route(
            "h",
            "/api/",
            &[&hung, &a, &b],
            "strategy: hedge\nhedge_after_ms: 300\nhealth: {failures: 3, skip_seconds: 3}",
        )],
        "",
    )
    .await;
    assert_eq!(healthy(&gw, "h", &hung).await, Some(1.0));

    // Each request first waits hedge_after_ms for the hung one; three such
    // stalls in a row and it is skipped.
    let mut before = Vec::new();
    for i in 1..=3 {
        let (status, took) = get(&gw.url("/api/x")).await;
        assert_eq!(status, 200);
        before.push(took);
        wait_until(
            "the hung backend to get the request",
            Duration::from_secs(5),
            || hung.hits() == i,
        )
        .await;
    }
    wait_healthy(&gw, "h", &hung, 0.0).await;

    let mut after = Vec::new();
    for _ in 0..9 {
        let (status, took) = get(&gw.url("/api/x")).await;
        assert_eq!(status, 200);
        after.push(took);
    }
    let (p50_before, p50_after) = (median(before), median(after));
    assert!(p50_before >= Duration::from_millis(300), "{p50_before:?}");
    assert!(
        p50_after < Duration::from_millis(150),
        "still waiting for the hung backend: p50 {p50_after:?}"
    );
    assert_eq!(hung.hits(), 3, "the skipped backend got requests");
    println!("hedge p50: {p50_before:?} with the hung backend tried, {p50_after:?} skipped");

    // It answers again: after skip_seconds one request tries it, and its
    // answer makes it healthy.
    mode.store(OK, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    while healthy(&gw, "h", &hung).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "never taken back:\n{}",
            gw.logs()
        );
        assert_eq!(get(&gw.url("/api/x")).await.0, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hung.hits(), 4, "one probe, then healthy");
    // Healthy again: first in the hedge order, it wins.
    let resp = client().get(gw.url("/api/x")).send().await.unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["from"], "hung");
    gw.wait_log("answers again: healthy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_of_a_hung_backend_makes_no_request_wait() {
    let (hung, _) = switchable("hung", HUNG).await;
    let a = Origin::json("a", true, 0).await;
    let gw = Gateway::start(
        &[route(
            "h",
            "/api/",
            &[&hung, &a],
            "strategy: hedge\nhedge_after_ms: 300\nhealth: {failures: 2, skip_seconds: 1}",
        )],
        "",
    )
    .await;
    answer_until_skipped(&gw, "h", &hung, 2).await;
    // Two skip periods: two probes, each started beside the schedule.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut slowest = Duration::ZERO;
    while hung.hits() < 4 {
        assert!(Instant::now() < deadline, "no probes:\n{}", gw.logs());
        let (status, took) = get(&gw.url("/api/x")).await;
        assert_eq!(status, 200);
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        slowest < Duration::from_millis(250),
        "a request waited for a probe: {slowest:?}"
    );
    // Each probe stalled: still skipped.
    assert_eq!(healthy(&gw, "h", &hung).await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_backend_late_in_failover_order_is_probed_and_taken_back() {
    let (first, first_mode) = switchable("first", ERROR).await;
    let (second, second_mode) = switchable("second", ERROR).await;
    let gw = Gateway::start(
        &[route(
            "f",
            "/api/",
            &[&first, &second],
            "strategy: failover\nhealth: {failures: 2, skip_seconds: 1}",
        )],
        "",
    )
    .await;
    for _ in 0..2 {
        assert_eq!(get(&gw.url("/api/x")).await.0, 502);
    }
    wait_healthy(&gw, "f", &first, 0.0).await;
    wait_healthy(&gw, "f", &second, 0.0).await;
    first_mode.store(OK, Ordering::SeqCst);
    second_mode.store(OK, Ordering::SeqCst);
    // Failover never needs the second now that the first answers; its
    // probe is what brings it back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while healthy(&gw, "f", &second).await != Some(1.0) {
        assert!(Instant::now() < deadline, "never probed:\n{}", gw.logs());
        assert_eq!(get(&gw.url("/api/x")).await.0, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(healthy(&gw, "f", &first).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_stops_starting_a_hung_backend_during_the_skip_period() {
    let (hung, _) = switchable("hung", HUNG).await;
    let (a, a_mode) = switchable("a", OK).await;
    let (b, b_mode) = switchable("b", OK).await;
    let gw = Gateway::start(
        &[route(
            "r",
            "/api/",
            &[&hung, &a, &b],
            "strategy: race\nhealth: {failures: 3, skip_seconds: 60}",
        )],
        "",
    )
    .await;
    answer_until_skipped(&gw, "r", &hung, 3).await;
    let logs = gw
        .wait_log("3 failed attempts in a row (last: stalled), skipped for 60 s")
        .await;
    assert!(logs.contains(&hung.addr.to_string()), "{logs}");

    for _ in 0..10 {
        assert_eq!(get(&gw.url("/api/x")).await.0, 200);
    }
    // Every race of the 13 is counted once the healthy ones' are.
    let deadline = Instant::now() + Duration::from_secs(5);
    while attempts(&gw, "r", &a).await < 13.0 {
        assert!(Instant::now() < deadline, "{}", gw.metrics().await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(hung.hits(), 3, "the skipped backend still gets requests");
    assert_eq!(attempts(&gw, "r", &hung).await, 3.0);

    // "No data" from the others is the answer: the hung one is not waited for.
    a_mode.store(NO_DATA, Ordering::SeqCst);
    b_mode.store(NO_DATA, Ordering::SeqCst);
    let (status, took) = get(&gw.url("/api/x")).await;
    assert_eq!(status, 404);
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(hung.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_merely_loses_races_stays_healthy() {
    // It answers 15 ms after the winner: within the drain, or, without one,
    // cancelled before it had run much longer than the winner.
    let fast = Origin::json("fast", true, 0).await;
    let slower = Origin::json("slower", true, 15).await;
    for drain in [50, 0] {
        let gw = Gateway::start(
            &[route(
                "r",
                "/api/",
                &[&fast, &slower],
                &format!("drain_losers_ms: {drain}\nhealth: {{failures: 2, skip_seconds: 60}}"),
            )],
            "",
        )
        .await;
        for _ in 0..8 {
            assert_eq!(get(&gw.url("/api/x")).await.0, 200);
        }
        // Every race started it (with no drain, a request cancelled at once
        // may never reach it: the gateway's count is the one to read).
        let deadline = Instant::now() + Duration::from_secs(5);
        while attempts(&gw, "r", &slower).await < 8.0 {
            assert!(
                Instant::now() < deadline,
                "drain {drain}:\n{}",
                gw.metrics().await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(healthy(&gw, "r", &slower).await, Some(1.0), "drain {drain}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_backend_is_tried_when_every_other_one_failed() {
    let (flaky, flaky_mode) = switchable("flaky", ERROR).await;
    let (good, good_mode) = switchable("good", OK).await;
    let gw = Gateway::start(
        &[route(
            "r",
            "/api/",
            &[&flaky, &good],
            "health: {failures: 2, skip_seconds: 60}",
        )],
        "",
    )
    .await;
    answer_until_skipped(&gw, "r", &flaky, 2).await;
    assert_eq!(get(&gw.url("/api/x")).await.0, 200);
    assert_eq!((flaky.hits(), good.hits()), (2, 3));

    // The healthy one fails now, the skipped one works: it is tried last,
    // answers, and is healthy again.
    good_mode.store(ERROR, Ordering::SeqCst);
    flaky_mode.store(OK, Ordering::SeqCst);
    let resp = client().get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["from"], "flaky");
    assert_eq!((flaky.hits(), good.hits()), (3, 4));
    wait_healthy(&gw, "r", &flaky, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_fails_all_are_still_tried() {
    let backends = [
        Origin::status(500, 0).await,
        Origin::status(502, 0).await,
        Origin::status(503, 0).await,
    ];
    let refs: Vec<&Origin> = backends.iter().collect();
    for strategy in ["race", "hedge", "failover"] {
        let gw = Gateway::start(
            &[route(
                "r",
                "/api/",
                &refs,
                &format!("strategy: {strategy}\nhealth: {{failures: 2, skip_seconds: 60}}"),
            )],
            "",
        )
        .await;
        let hits: Vec<usize> = backends.iter().map(Origin::hits).collect();
        for i in 1..=5 {
            assert_eq!(get(&gw.url("/api/x")).await.0, 502, "{strategy}");
            wait_until(
                "every backend to get the request",
                Duration::from_secs(5),
                || backends.iter().zip(&hits).all(|(o, h)| o.hits() == h + i),
            )
            .await;
        }
        for o in &backends {
            wait_healthy(&gw, "r", o, 0.0).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_0_never_skips() {
    let (hung, _) = switchable("hung", HUNG).await;
    let (bad, _) = switchable("bad", ERROR).await;
    let a = Origin::json("a", true, 0).await;
    let gw = Gateway::start(
        &[route(
            "r",
            "/api/",
            &[&hung, &bad, &a],
            "strategy: race\nhealth: {failures: 0}",
        )],
        "",
    )
    .await;
    for i in 1..=8 {
        assert_eq!(get(&gw.url("/api/x")).await.0, 200);
        wait_until(
            "every backend to get the request",
            Duration::from_secs(5),
            || hung.hits() == i && bad.hits() == i,
        )
        .await;
    }
    assert_eq!(healthy(&gw, "r", &hung).await, Some(1.0));
    assert_eq!(healthy(&gw, "r", &bad).await, Some(1.0));
}

/// The shipped alert fires for a backend skipped for 10 minutes, not for one
/// that a probe took back in between (promtool's rule unit tests).
#[test]
fn alert_fires_for_a_backend_skipped_10_minutes() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prometheus-alerts.yaml");
    let shipped: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(rules).unwrap()).unwrap();
    let rule = shipped["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "TollgateBackendNotAnswering")
        .expect("the alert is shipped");
    let (route, backend) = ("v1", "10.0.0.1:9001");
    let summary = rule["annotations"]["summary"]
        .as_str()
        .unwrap()
        .replace("{{ $labels.backend }}", backend)
        .replace("{{ $labels.route }}", route);
    let series = |b: &str| format!("tollgate_backend_healthy{{route=\"{route}\",backend=\"{b}\"}}");
    // JSON is YAML: promtool reads it as a test file.
    let test = serde_json::json!({
        "rule_files": [rules],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": series(backend), "values": "1 0x14"},
                // Taken back by a probe at 5 m, skipped again at 6 m.
                {"series": series("10.0.0.2:9001"), "values": "1 0 0 0 0 1 0x9"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "TollgateBackendNotAnswering", "exp_alerts": []},
                {"eval_time": "14m", "alertname": "TollgateBackendNotAnswering", "exp_alerts": [{
                    "exp_labels": {"severity": "ticket", "route": route, "backend": backend},
                    "exp_annotations": {
                        "summary": summary,
                        "description": rule["annotations"]["description"].as_str().unwrap(),
                    },
                }]},
            ],
        }],
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alert-test.yaml");
    std::fs::write(&path, test.to_string()).unwrap();
    promtool(&["test", "rules", path.to_str().unwrap()]);
}
