//! Keys, credits and rate limits against the real gateway, each test run on
//! the embedded store and on a real Redis: each status, each key source,
//! costs, refunds, exact-N under concurrency, the rate limit tripping and
//! recovering, and the key never reaching a backend or a log line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::header::HeaderMap;
use serde_json::Value;

const KEYS: &str = "keys:
  - {key: \"rich\", name: rich, credits: 1000, rate_per_second: 100000}
  - {key: \"poor\", name: poor, credits: 0, rate_per_second: 100000}
  - {key: \"gone\", name: gone, credits: 1000, state: revoked}
  - {key: \"slow\", name: slow, credits: 1000, rate_per_second: 5}
  - {key: \"fifty\", name: fifty, credits: 50, rate_per_second: 100000}
  - {key: \"plain\", name: plain, credits: 100}
";

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn number(&self, name: &str) -> u64 {
        let value = self.header(name).unwrap_or_else(|| {
            panic!(
                "no {name}: {} {:?} {}",
                self.status, self.headers, self.body
            )
        });
        value.parse().unwrap()
    }
    fn remaining(&self) -> u64 {
        self.number("x-credits-remaining")
    }
    fn cost(&self) -> u64 {
        self.number("x-credits-cost")
    }
}

async fn call(gw: &Gateway, path: &str, key: Option<&str>) -> Answer {
    let mut req = reqwest::Client::new().get(gw.url(path));
    if let Some(k) = key {
        req = req.header("X-API-Key", k);
    }
    let resp = req.send().await.unwrap();
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.json().await.unwrap_or(Value::Null),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Embedded,
    Redis,
}

/// A gateway on one kind of store (and the Redis it uses, kept alive).
struct Env {
    gw: Gateway,
    _redis: Option<RedisServer>,
}

impl std::ops::Deref for Env {
    type Target = Gateway;
    fn deref(&self) -> &Gateway {
        &self.gw
    }
}

async fn start(kind: Kind, routes: &[String], top: &str) -> Env {
    match kind {
        Kind::Embedded => Env {
            gw: Gateway::start_with_keys(routes, top, KEYS).await,
            _redis: None,
        },
        Kind::Redis => {
            let redis = RedisServer::start();
            import_keys(&redis, KEYS);
            let top = format!("store:\n  redis_url: {}\n{top}", redis.url());
            Env {
                gw: Gateway::start_with_keys(routes, &top, KEYS).await,
                _redis: Some(redis),
            }
        }
    }
}

/// Each named test, once per store.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Kind::Embedded).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Kind::Redis).await
                }
            )*
        }
    };
}

on_both_stores!(
    each_refusal_has_its_status_and_costs_nothing,
    key_is_accepted_from_each_source_and_never_forwarded_or_logged,
    route_cost_and_longest_prefix_cost,
    failures_are_refunded_unless_configured_otherwise,
    n_credits_buy_exactly_n_answers_under_concurrency,
    rate_limit_trips_with_headers_and_recovers,
);

async fn each_refusal_has_its_status_and_costs_nothing(kind: Kind) {
    let ok = Origin::json("ok", true, 0).await;
    let gw = start(kind, &[route("t", "/api/", &[&ok], "")], "").await;

    let a = call(&gw, "/api/x", None).await;
    assert_eq!(
        (a.status, a.body["error"].as_str()),
        (401, Some("missing_api_key"))
    );
    assert_eq!(
        a.header("www-authenticate"),
        Some("Bearer realm=\"tollgate\"")
    );

    let a = call(&gw, "/api/x", Some("nobody")).await;
    assert_eq!(
        (a.status, a.body["error"].as_str()),
        (401, Some("invalid_api_key"))
    );
    assert!(a.header("www-authenticate").is_some());

    let a = call(&gw, "/api/x", Some("gone")).await;
    assert_eq!(
        (a.status, a.body["error"].as_str()),
        (403, Some("revoked_api_key"))
    );

    let a = call(&gw, "/api/x", Some("poor")).await;
    assert_eq!(
        (a.status, a.body["error"].as_str()),
        (402, Some("insufficient_credits"))
    );
    assert_eq!(ok.hits(), 0, "a refused request reached a backend");

    // A malformed request with a good key is refused before any charge.
    let a = call(&gw, "/api/%zz", Some("rich")).await;
    assert_eq!(a.status, 400);
    let a = call(&gw, "/api/x", Some("rich")).await;
    assert_eq!((a.status, a.cost(), a.remaining()), (200, 1, 999));
    assert!(a.header("x-ratelimit-limit").is_some());
    assert!(a.header("x-ratelimit-remaining").is_some());
    assert!(a.header("x-ratelimit-reset").is_some());

    gw.wait_log("\"key_id\"").await;
    let m = gw.metrics().await;
    for (reason, n) in [
        ("missing_api_key", 1.0),
        ("invalid_api_key", 1.0),
        ("revoked_api_key", 1.0),
        ("insufficient_credits", 1.0),
        ("bad_request", 1.0),
    ] {
        let series = format!("tollgate_rejections_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&m, &series), n, "{series}\n{m}");
    }
}

async fn key_is_accepted_from_each_source_and_never_forwarded_or_logged(kind: Kind) {
    let ok = Origin::json("ok", true, 0).await;
    let gw = start(kind, &[route("t", "/api/", &[&ok], "")], "").await;
    let secret = "rich";
    let c = reqwest::Client::new();
    let sources = [
        c.get(gw.url(&format!("/api/a?x=1&api_key={secret}"))),
        c.get(gw.url("/api/b")).header("X-API-Key", secret),
        c.get(gw.url("/api/c"))
            .header("Authorization", format!("Bearer {secret}")),
    ];
    for req in sources {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    // Two sources that disagree: 400.
    let resp = c
        .get(gw.url("/api/d?api_key=poor"))
        .header("X-API-Key", secret)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let received = ok.requests();
    assert_eq!(received.len(), 3);
    assert_eq!(received[0].target, "/api/a?x=1");
    for r in &received {
        assert!(!r.target.contains(secret), "{}", r.target);
        for (name, value) in &r.headers {
            assert!(!value.contains(secret), "{name}: {value}");
            assert!(
                name != "x-api-key" && name != "authorization",
                "{name} forwarded"
            );
        }
    }
    let logs = gw.wait_log("/api/c").await;
    // The log names the key by id (hash prefix) only.
    assert!(logs.contains(&tollgate::key::KeyHash::of(secret).id()));
    for line in logs.lines() {
        assert!(
            !line.contains("\"rich\"") && !line.contains("=rich"),
            "{line}"
        );
    }
}

async fn route_cost_and_longest_prefix_cost(kind: Kind) {
    let ok = Origin::json("ok", true, 0).await;
    let gw = start(
        kind,
        &[route(
            "t",
            "/api/",
            &[&ok],
            "cost: 2\ncosts: {\"/api/fundamentals/\": 5, \"/api/fundamentals/free/\": 0}",
        )],
        "",
    )
    .await;
    let a = call(&gw, "/api/eod/AAPL", Some("rich")).await;
    assert_eq!((a.cost(), a.remaining()), (2, 998));
    let a = call(&gw, "/api/fundamentals/AAPL", Some("rich")).await;
    assert_eq!((a.cost(), a.remaining()), (5, 993));
    let a = call(&gw, "/api/fundamentals/free/AAPL", Some("rich")).await;
    assert_eq!((a.status, a.cost(), a.remaining()), (200, 0, 993));
    gw.wait_log("/api/fundamentals/free/AAPL").await;
    let m = gw.metrics().await;
    assert_eq!(
        sample(&m, "tollgate_credits_charged_total{route=\"t\"}"),
        7.0,
        "{m}"
    );
}

async fn failures_are_refunded_unless_configured_otherwise(kind: Kind) {
    let empty = Origin::json("empty", false, 0).await;
    let broken = Origin::status(500, 0).await;
    let stuck = Origin::json("stuck", true, 5_000).await;
    let routes = [
        route("nodata", "/nodata/", &[&empty], ""),
        route("failed", "/failed/", &[&broken], ""),
        route("timeout", "/timeout/", &[&stuck], "timeout_ms: 200"),
    ];
    let gw = start(kind, &routes, "").await;
    for (path, status) in [("/nodata/x", 404), ("/failed/x", 502), ("/timeout/x", 504)] {
        let a = call(&gw, path, Some("rich")).await;
        assert_eq!(a.status, status, "{path}");
        assert_eq!(
            (a.cost(), a.remaining()),
            (0, 1000),
            "{path} kept the charge"
        );
    }
    gw.wait_log("/timeout/x").await;
    let m = gw.metrics().await;
    for route in ["nodata", "failed", "timeout"] {
        let charged = format!("tollgate_credits_charged_total{{route=\"{route}\"}}");
        let refunded = format!("tollgate_credits_refunded_total{{route=\"{route}\"}}");
        assert_eq!(
            (sample(&m, &charged), sample(&m, &refunded)),
            (1.0, 1.0),
            "{route}\n{m}"
        );
    }

    // With `false`, each failure costs the route's price, and the charge
    // stays after the request ended (nothing refunds it when it is dropped).
    let gw = start(kind, &routes, "credits:\n  refund_on_failure: false").await;
    let mut balance = 1000;
    for (path, status) in [("/nodata/x", 404), ("/failed/x", 502), ("/timeout/x", 504)] {
        balance -= 1;
        let a = call(&gw, path, Some("rich")).await;
        assert_eq!((a.status, a.cost(), a.remaining()), (status, 1, balance));
        gw.wait_log(&format!("\"path\":\"{path}\"")).await;
    }
    // Once the requests are over, a fourth charge sees what they left.
    let a = call(&gw, "/nodata/y", Some("rich")).await;
    assert_eq!((a.status, a.remaining()), (404, balance - 1), "refunded");
    gw.wait_log("/nodata/y").await;
    let m = gw.metrics().await;
    for route in ["nodata", "failed", "timeout"] {
        let refunded = format!("tollgate_credits_refunded_total{{route=\"{route}\"}}");
        assert_eq!(sample(&m, &refunded), 0.0, "{route}\n{m}");
    }
}

async fn n_credits_buy_exactly_n_answers_under_concurrency(kind: Kind) {
    let ok = Origin::json("ok", true, 5).await;
    let gw = start(kind, &[route("t", "/api/", &[&ok], "")], "").await;
    let urls = (0..80).map(|i| gw.url(&format!("/api/{i}"))).collect();
    let statuses = statuses_at_once(urls, "fifty").await;
    let ok_count = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 402).count();
    assert_eq!((ok_count, refused), (50, 30), "{statuses:?}");
    assert_eq!(ok.hits(), 50);
    let a = call(&gw, "/api/after", Some("fifty")).await;
    assert_eq!(a.status, 402);
}

async fn rate_limit_trips_with_headers_and_recovers(kind: Kind) {
    let ok = Origin::json("ok", true, 0).await;
    let gw = start(kind, &[route("t", "/api/", &[&ok], "")], "").await;
    let mut allowed = 0;
    let mut refusal = None;
    // A burst of 10 at once, well inside one window.
    let burst = futures::future::join_all((0..10).map(|_| call(&gw, "/api/x", Some("slow")))).await;
    for a in burst {
        match a.status {
            200 => {
                allowed += 1;
                assert_eq!(a.header("x-ratelimit-limit"), Some("5"));
            }
            429 => refusal = refusal.or(Some((a, Instant::now()))),
            other => panic!("unexpected {other}"),
        }
    }
    // The key's own rate (5/s) applies; the window may flip once mid-burst.
    assert!((5..=6).contains(&allowed), "{allowed} allowed");
    let (a, refused_at) = refusal.expect("never limited");
    assert_eq!(a.body["error"], "rate_limited");
    assert_eq!(a.header("retry-after"), Some("1"));
    assert_eq!(a.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(a.header("x-ratelimit-remaining"), Some("0"));
    assert!(a.header("x-ratelimit-reset").is_some());
    assert!(a.header("x-credits-cost").is_none(), "a 429 charged");
    let balance_before = 1000 - allowed;

    // A client that pauses gets through again within about two seconds.
    loop {
        let a = call(&gw, "/api/x", Some("slow")).await;
        if a.status == 200 {
            assert_eq!(a.remaining(), balance_before - 1, "429s were charged");
            break;
        }
        assert!(
            refused_at.elapsed() < Duration::from_millis(2_500),
            "still limited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The default rate applies to keys without their own.
    let gw = start(
        kind,
        &[route("t", "/api/", &[&ok], "")],
        "rate_limit:\n  per_second: 2",
    )
    .await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(call(&gw, "/api/x", Some("plain")).await.status);
        }
        v
    };
    assert_eq!(statuses[..2], [200, 200], "{statuses:?}");
    assert!(statuses[2..].contains(&429), "{statuses:?}");
}
