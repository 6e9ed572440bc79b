//! Failure notifications end to end (issue 13, items 3–5): no failure summary
//! after a recovery, a slow webhook holding no other route's posts, floods
//! deduplicated before any queue, a post that reached the webhook but got no
//! answer counted as `timeout`, and `no_data` answers warning by their share
//! only. The webhook is a real HTTP server in this process; the gateway is
//! the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn posts(hook: &Origin) -> Vec<Value> {
    hook.requests()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

/// Wait (bounded) for a post that `matches`; return every post so far.
async fn wait_post(
    hook: &Origin,
    what: &str,
    within: Duration,
    matches: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let p = posts(hook);
        if p.iter().any(&matches) {
            return p;
        }
        assert!(Instant::now() < deadline, "no post {what}: {p:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait (bounded) until `series` reads `want`; return the metrics text.
async fn wait_sample(gw: &Gateway, series: &str, want: f64, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let m = gw.metrics().await;
        if sample(&m, series) == want {
            return m;
        }
        assert!(Instant::now() < deadline, "{series} is not {want}:\n{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn outcome(o: &str) -> String {
    format!("tollgate_notifications_total{{outcome=\"{o}\"}}")
}

async fn get_with_id(c: &reqwest::Client, gw: &Gateway, path: &str, id: &str) -> u16 {
    c.get(gw.url(path))
        .header("X-Request-Id", id)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failure_summary_follows_a_recovery() {
    let (backend, broken) = Origin::switchable(true).await;
    let hook = Origin::start(|_| Reply::json(200, "{}")).await;
    let top = format!(
        "notify:\n  webhook_url: {}/hook\n  min_interval_seconds: 2",
        hook.url()
    );
    let gw = Gateway::start(&[route("t", "/api/", &[&backend], "")], &top).await;
    let c = client();

    // Failing until the first post and one summary are out.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    while posts(&hook).len() < 2 {
        assert!(Instant::now() < deadline, "{:?}", posts(&hook));
        i += 1;
        assert_eq!(
            get_with_id(&c, &gw, "/api/x", &format!("pre-{i}")).await,
            502
        );
    }
    // Three more, held back (the next summary is due 2 s after the last).
    for j in 1..=3 {
        assert_eq!(
            get_with_id(&c, &gw, "/api/x", &format!("pre-{}", i + j)).await,
            502
        );
    }
    broken.store(false, Ordering::Relaxed);
    assert_eq!(get_with_id(&c, &gw, "/api/x", "rec").await, 200);
    let p = wait_post(&hook, "recovered", Duration::from_secs(5), |p| {
        p["reason"] == "recovered"
    })
    .await;
    let last = p.last().unwrap();
    assert_eq!(
        (last["reason"].as_str(), last["request_id"].as_str()),
        (Some("recovered"), Some("rec")),
        "{p:?}"
    );
    let folded = last["suppressed_failures"]["upstream_failed"].as_u64();
    assert!(
        folded >= Some(3),
        "the recovery carries the held failures: {p:?}"
    );

    // The route fails again, once: the next post is about that failure alone,
    // never the summary from before the recovery.
    broken.store(true, Ordering::Relaxed);
    assert_eq!(get_with_id(&c, &gw, "/api/x", "post-1").await, 502);
    let n = p.len();
    // Waits on the snapshot it returns (a fresh read here could be longer
    // than that snapshot, and `p[n]` out of its bounds).
    let p = wait_post(&hook, "after the recovery", Duration::from_secs(5), |v| {
        v["request_id"] == "post-1"
    })
    .await;
    let next = &p[n];
    assert_eq!(next["reason"], "upstream_failed", "{p:?}");
    assert_eq!(next["request_id"], "post-1", "{p:?}");
    assert!(next["suppressed"].as_u64() <= Some(1), "{p:?}");

    // Every held-back event is reported exactly once, in a post's counts.
    let m = wait_sample(
        &gw,
        &outcome("sent"),
        p.len() as f64,
        Duration::from_secs(5),
    )
    .await;
    let reported: u64 = p
        .iter()
        .map(|p| {
            p["suppressed"].as_u64().unwrap()
                + p["suppressed_failures"]["upstream_failed"]
                    .as_u64()
                    .unwrap_or(0)
        })
        .sum();
    assert_eq!(
        sample(&m, &outcome("suppressed")),
        reported as f64,
        "{p:?}\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_holds_no_other_route_and_a_flood_is_only_counted() {
    const FLOOD: usize = 1100; // more than the old shared queue held
    let bad = Origin::status(500, 0).await;
    // Takes route a's post and never answers within the gateway's timeout.
    let hook = Origin::start(|r| {
        let reply = Reply::json(200, "{}");
        if String::from_utf8_lossy(&r.body).contains("\"route\":\"a\"") {
            reply.after(Duration::from_secs(30))
        } else {
            reply
        }
    })
    .await;
    let top = format!(
        "notify:\n  webhook_url: {}/hook\n  min_interval_seconds: 60\n  timeout_ms: 2500",
        hook.url()
    );
    let gw = Gateway::start(
        &[
            route("a", "/a/", &[&bad], ""),
            route("b", "/b/", &[&bad], ""),
        ],
        &top,
    )
    .await;
    // Route a's first post hangs at the webhook; route b's goes meanwhile.
    assert_eq!(status(&gw, "/a/x").await, 502);
    wait_post(&hook, "for route a", Duration::from_secs(5), |p| {
        p["route"] == "a"
    })
    .await;
    let b_at = Instant::now();
    assert_eq!(status(&gw, "/b/x").await, 502);
    wait_post(&hook, "for route b", Duration::from_secs(10), |p| {
        p["route"] == "b"
    })
    .await;
    let b_took = b_at.elapsed();
    eprintln!("route b's post arrived {b_took:?} after its failure");
    assert!(
        b_took < Duration::from_millis(1500),
        "route b's post took {b_took:?}, behind route a's"
    );
    // A flood on route a while its post hangs.
    let started = Instant::now();
    for chunk in (1..FLOOD).collect::<Vec<_>>().chunks(50) {
        let urls = chunk.iter().map(|_| gw.url("/a/x")).collect();
        assert!(statuses_at_once(urls, KEY).await.iter().all(|s| *s == 502));
    }
    eprintln!(
        "{} failures on route a in {:?}",
        FLOOD - 1,
        started.elapsed()
    );
    // Every flood event but the posted one was held back and counted; no
    // post was lost to a full queue.
    let m = wait_sample(
        &gw,
        &outcome("suppressed"),
        (FLOOD - 1) as f64,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(sample(&m, &outcome("dropped")), 0.0, "{m}");
    // Route a's post reached the webhook and got no answer: `timeout`, once,
    // not retried; b's was answered: `sent`.
    let m = wait_sample(&gw, &outcome("timeout"), 1.0, Duration::from_secs(10)).await;
    assert_eq!(sample(&m, &outcome("sent")), 1.0, "{m}");
    assert_eq!(sample(&m, &outcome("failed")), 0.0, "{m}");
    let to_a = posts(&hook).iter().filter(|p| p["route"] == "a").count();
    assert_eq!(to_a, 1, "route a's post was sent again");
    assert_eq!(
        sample(
            &m,
            "tollgate_all_backends_failed_total{reason=\"upstream_failed\",route=\"a\"}"
        ),
        FLOOD as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_data_answers_warn_by_their_share_and_end_no_outage() {
    // Unknown symbols get the data API's 404.
    let api = Origin::start(|r| {
        if r.target.contains("unknown") {
            Reply::json(404, r#"{"status": false}"#)
        } else {
            Reply::json(200, r#"{"status": true}"#)
        }
    })
    .await;
    let hook = Origin::start(|_| Reply::json(200, "{}")).await;
    let top = format!(
        "notify:\n  webhook_url: {}/hook\n  min_interval_seconds: 60\n  no_data_ratio: 0.5\n  no_data_window_seconds: 30",
        hook.url()
    );
    let gw = Gateway::start(
        &[
            route("quiet", "/q/", &[&api], ""),
            route("loud", "/l/", &[&api], ""),
        ],
        &top,
    )
    .await;
    // A healthy route: 10% of its answers are no_data.
    for i in 0..20 {
        let path = if i % 10 == 4 {
            "/q/unknown"
        } else {
            "/q/known"
        };
        status(&gw, path).await;
    }
    wait_sample(
        &gw,
        "tollgate_all_backends_failed_total{reason=\"no_data\",route=\"quiet\"}",
        2.0,
        Duration::from_secs(5),
    )
    .await;
    wait_sample(
        &gw,
        "tollgate_requests_total{route=\"quiet\",status=\"200\"}",
        18.0,
        Duration::from_secs(5),
    )
    .await;
    // A route where 60% are no_data: one warning.
    for i in 0..20 {
        let path = if i % 5 < 3 { "/l/unknown" } else { "/l/known" };
        status(&gw, path).await;
    }
    let p = wait_post(&hook, "for loud", Duration::from_secs(5), |p| {
        p["route"] == "loud"
    })
    .await;
    // The tick that judged loud judged quiet, with all its answers, first:
    // quiet posted nothing, neither a no_data nor a recovery.
    assert!(p.iter().all(|p| p["route"] == "loud"), "{p:?}");
    let logs = gw.wait_log("\"route\":\"loud\",\"reason\"").await;
    let notices: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("tollgate::notify"))
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    let warning = &p[0];
    assert_eq!(warning["reason"], "no_data", "{p:?}");
    assert!(
        warning["no_data_share"].as_f64().unwrap() >= 0.5,
        "{warning}"
    );
    assert!(
        warning["window_requests"].as_u64().unwrap() >= 10,
        "{warning}"
    );
    assert_eq!(warning["window_seconds"], 30);
}

#[test]
fn alert_rules_page_only_on_outages() {
    let root = env!("CARGO_MANIFEST_DIR");
    promtool(&[
        "test",
        "rules",
        &format!("{root}/conf/prometheus-alerts.test.yaml"),
    ]);
}
