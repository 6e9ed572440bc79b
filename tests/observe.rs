//! Observability: every metric family, counters that match the traffic, the
//! failure webhook (one post per interval with the suppressed count, a
//! recovery notice, a dead webhook never slowing requests), the JSON access
//! log without keys, and the shipped alert rules and dashboard.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Every family the SPEC lists.
const FAMILIES: &[&str] = &[
    "tollgate_requests_total",
    "tollgate_request_duration_seconds",
    "tollgate_cache_total",
    "tollgate_backend_requests_total",
    "tollgate_backend_duration_seconds",
    "tollgate_race_wins_total",
    "tollgate_rejections_total",
    "tollgate_credits_charged_total",
    "tollgate_credits_refunded_total",
    "tollgate_all_backends_failed_total",
    "tollgate_notifications_total",
    "tollgate_store_errors_total",
    "tollgate_hedges_total",
    "tollgate_hedge_delay_seconds",
];

/// The metric families a running gateway exports.
fn families(metrics: &str) -> HashSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_is_exported_and_counts_the_traffic() {
    let ok = Origin::json("ok", true, 0).await;
    let bad = Origin::status(500, 0).await;
    let gw = Gateway::start(
        &[
            route("ok", "/ok/", &[&ok], "cache: {ttl_seconds: 60}"),
            route("bad", "/bad/", &[&bad], ""),
        ],
        "",
    )
    .await;
    let m = gw.metrics().await;
    let exported = families(&m);
    for family in FAMILIES {
        assert!(
            exported.contains(*family),
            "{family} missing before traffic:\n{m}"
        );
    }
    let c = client();
    for path in ["/ok/a", "/ok/a", "/ok/b", "/bad/x", "/nowhere"] {
        c.get(gw.url(path)).send().await.unwrap();
    }
    reqwest::get(gw.url("/ok/a")).await.unwrap(); // no key
    gw.wait_log("\"error\":\"missing_api_key\"").await;
    let m = gw.metrics().await;
    let b = |o: &Origin| o.addr.to_string();
    for (series, want) in [
        (
            "tollgate_requests_total{route=\"ok\",status=\"200\"}".to_string(),
            3.0,
        ),
        (
            "tollgate_requests_total{route=\"ok\",status=\"401\"}".to_string(),
            1.0,
        ),
        (
            "tollgate_requests_total{route=\"bad\",status=\"502\"}".to_string(),
            1.0,
        ),
        (
            "tollgate_requests_total{route=\"unmatched\",status=\"404\"}".to_string(),
            1.0,
        ),
        (
            "tollgate_request_duration_seconds_count{route=\"ok\"}".to_string(),
            4.0,
        ),
        ("tollgate_cache_total{result=\"hit\"}".to_string(), 1.0),
        ("tollgate_cache_total{result=\"miss\"}".to_string(), 2.0),
        (
            format!(
                "tollgate_race_wins_total{{backend=\"{}\",route=\"ok\"}}",
                b(&ok)
            ),
            2.0,
        ),
        (
            format!(
                "tollgate_backend_requests_total{{backend=\"{}\",outcome=\"error\",route=\"bad\"}}",
                b(&bad)
            ),
            1.0,
        ),
        (
            format!(
                "tollgate_backend_duration_seconds_count{{backend=\"{}\",route=\"bad\"}}",
                b(&bad)
            ),
            1.0,
        ),
        (
            "tollgate_credits_charged_total{route=\"ok\"}".to_string(),
            3.0,
        ),
        (
            "tollgate_credits_charged_total{route=\"bad\"}".to_string(),
            1.0,
        ),
        (
            "tollgate_credits_refunded_total{route=\"bad\"}".to_string(),
            1.0,
        ),
        (
            "tollgate_rejections_total{reason=\"missing_api_key\"}".to_string(),
            1.0,
        ),
        (
            "tollgate_rejections_total{reason=\"no_route\"}".to_string(),
            1.0,
        ),
        (
            "tollgate_all_backends_failed_total{reason=\"upstream_failed\",route=\"bad\"}"
                .to_string(),
            1.0,
        ),
        (
            "tollgate_notifications_total{outcome=\"sent\"}".to_string(),
            0.0,
        ),
    ] {
        assert_eq!(sample(&m, &series), want, "{series}\n{m}");
    }
    // Histograms resolve 100 µs to 300 s.
    assert!(
        m.contains("tollgate_request_duration_seconds_bucket{route=\"ok\",le=\"0.0001\"}"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_request_duration_seconds_bucket{route=\"ok\",le=\"300\"}"),
        "{m}"
    );
}

/// A webhook receiver: an origin that records the JSON it is sent.
async fn webhook() -> Origin {
    Origin::start(|_| Reply::json(200, "{}")).await
}

fn posts(hook: &Origin) -> Vec<Value> {
    hook.requests()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

async fn wait_posts(hook: &Origin, n: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let p = posts(hook);
        if p.len() >= n {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "{} post(s), wanted {n}: {p:?}",
            p.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_one_post_per_interval_with_the_suppressed_count() {
    let (backend, broken) = Origin::switchable(true).await;
    let hook = webhook().await;
    let top = format!(
        "notify:\n  webhook_url: {}/hook\n  min_interval_seconds: 1",
        hook.url()
    );
    let gw = Gateway::start(&[route("t", "/api/", &[&backend], "")], &top).await;
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(status(&gw, "/api/x").await, 502);
    }
    let p = wait_posts(&hook, 2, Duration::from_secs(5)).await;
    let second_at = Instant::now();
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        second_at.duration_since(started) >= Duration::from_millis(900),
        "summary came too early"
    );
    let first = &p[0];
    assert_eq!(first["route"], "t");
    assert_eq!(first["reason"], "upstream_failed");
    assert_eq!(first["suppressed"], 0);
    assert!(
        first["request_id"].as_str().is_some_and(|s| s.len() == 32),
        "{first}"
    );
    assert_eq!(first["backends"][0]["backend"], backend.addr.to_string());
    assert_eq!(first["backends"][0]["outcome"], "error");
    assert!(first["backends"][0]["latency_ms"].is_number());
    assert_eq!(p[1]["suppressed"], 4, "{p:?}");
    assert!(p[1]["first_seen"].as_u64() <= p[1]["last_seen"].as_u64());
    let got = hook.requests();
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].target, "/hook");
    assert_eq!(got[0].header("content-type"), Some("application/json"));

    // The route recovers: one recovery notice.
    broken.store(false, Ordering::Relaxed);
    assert_eq!(status(&gw, "/api/x").await, 200);
    let p = wait_posts(&hook, 3, Duration::from_secs(5)).await;
    assert_eq!(
        (p[2]["route"].as_str(), p[2]["reason"].as_str()),
        (Some("t"), Some("recovered"))
    );
    // The notifier counts a post as sent once the webhook's answer is back,
    // which can be just after the hook recorded it.
    let sent = "tollgate_notifications_total{outcome=\"sent\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut m = gw.metrics().await;
    while sample(&m, sent) < 3.0 {
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = gw.metrics().await;
    }
    assert_eq!(sample(&m, sent), 3.0, "{m}");
    assert_eq!(
        sample(&m, "tollgate_notifications_total{outcome=\"suppressed\"}"),
        4.0,
        "{m}"
    );
    // Each post is also a WARN line.
    let logs = gw.wait_log("tollgate::notify").await;
    assert!(
        logs.lines()
            .any(|l| l.contains(" WARN ") && l.contains("\"suppressed\":4")),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_webhook_does_not_slow_requests() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hang = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let broken = Origin::status(500, 0).await;
    let top = format!("notify:\n  webhook_url: http://{addr}/hook\n  min_interval_seconds: 0\n  timeout_ms: 10000");
    let gw = Gateway::start(&[route("t", "/api/", &[&broken], "")], &top).await;
    let c = client();
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let started = Instant::now();
        assert_eq!(c.get(gw.url("/api/x")).send().await.unwrap().status(), 502);
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?}"
    );
    hang.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_json_lines_without_keys() {
    let ok = Origin::json("ok", true, 0).await;
    let keys = "keys:\n  - {key: \"sk-very-secret\", name: a, credits: 100}\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let top = format!("access_log: {}", path.display());
    let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&ok], "")], &top, keys).await;
    let c = reqwest::Client::new();
    c.get(gw.url("/api/a?api_key=sk-very-secret"))
        .send()
        .await
        .unwrap();
    c.get(gw.url("/api/b"))
        .header("X-API-Key", "sk-very-secret")
        .send()
        .await
        .unwrap();
    c.get(gw.url("/api/c"))
        .header("Authorization", "Bearer sk-very-secret")
        .send()
        .await
        .unwrap();
    c.get(gw.url("/api/d?api_key=sk-wrong-secret"))
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= 4 {
            break text;
        }
        assert!(Instant::now() < deadline, "access log has:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let id = tollgate::key::KeyHash::of("sk-very-secret").id();
    for (i, line) in text.lines().enumerate() {
        assert!(!line.contains("secret"), "a key in the access log: {line}");
        let v: Value = serde_json::from_str(line).unwrap();
        for field in [
            "time",
            "request_id",
            "route",
            "status",
            "latency_ms",
            "cache",
            "winner",
            "credits",
            "key_id",
        ] {
            assert!(v.get(field).is_some(), "{field} missing: {line}");
        }
        if i < 3 {
            assert_eq!(
                (v["status"].as_u64(), v["key_id"].as_str()),
                (Some(200), Some(id.as_str())),
                "{line}"
            );
            assert_eq!(v["credits"], 1);
            assert_eq!(v["winner"], ok.addr.to_string());
        }
    }
    assert!(
        text.lines().next().unwrap().contains("\"time\":\"20"),
        "{text}"
    );
    assert!(!gw.logs().contains("secret"), "a key in the error log");
}

/// Metric names an expression uses, without histogram suffixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tollgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_alert_rules_and_dashboard_load_and_use_real_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&ok], "")], "").await;
    let exported = families(&gw.metrics().await);

    // Alert rules: promtool (Debian's prometheus package) accepts them.
    let rules = format!("{root}/conf/prometheus-alerts.yaml");
    promtool(&["check", "rules", &rules]);
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&rules).unwrap()).unwrap();
    let mut alert_exprs = 0;
    for rule in yaml["groups"][0]["rules"].as_sequence().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        for name in metric_names(expr) {
            assert!(exported.contains(&name), "alert uses unknown {name}");
        }
        alert_exprs += 1;
    }
    assert!(alert_exprs >= 4);

    // Dashboard: the structure Grafana needs, and only real metrics.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/conf/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    assert!(dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["type"] == "datasource"));
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = HashSet::new();
    let mut used = HashSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        assert!(p["type"].is_string() && p["title"].is_string(), "{p}");
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "{p}");
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{p}");
        for t in targets {
            assert!(t["refId"].is_string());
            for name in metric_names(t["expr"].as_str().unwrap()) {
                assert!(exported.contains(&name), "panel uses unknown {name}");
                used.insert(name);
            }
        }
    }
    for needed in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds",
        "tollgate_race_wins_total",
        "tollgate_cache_total",
        "tollgate_credits_charged_total",
        "tollgate_rejections_total",
        "tollgate_hedges_total",
        "tollgate_hedge_delay_seconds",
    ] {
        assert!(used.contains(needed), "no panel for {needed}");
    }
}
