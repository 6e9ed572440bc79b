//! The response cache against the real gateway: HIT after MISS, what is not
//! stored, expiry, the cache key, coalescing, stale-if-error, the shared
//! Redis tier, Redis outages, HEAD, and credits for hits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::header::HeaderMap;

const CACHED: &str = "cache: {ttl_seconds: 60, stale_if_error_seconds: 60, max_body_bytes: 1024}";

struct Got {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Got {
    fn x_cache(&self) -> &str {
        self.headers
            .get("x-cache")
            .map_or("", |v| v.to_str().unwrap())
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn fetch(gw: &Gateway, path: &str) -> Got {
    let resp = client().get(gw.url(path)).send().await.unwrap();
    Got {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap(),
    }
}

/// An origin whose answers carry `cache_control` (if any) and count.
async fn origin_with(
    cache_control: Option<&'static str>,
    body: &'static str,
    delay_ms: u64,
) -> Origin {
    Origin::start(move |_| {
        let mut r = Reply::json(200, body).after(Duration::from_millis(delay_ms));
        if let Some(cc) = cache_control {
            r = r.header("Cache-Control", cc);
        }
        r
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_after_miss_with_age_and_head_from_the_same_entry() {
    let o = origin_with(None, r#"{"status": true, "n": 1}"#, 0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&o], CACHED)], "").await;
    let first = fetch(&gw, "/api/eod/AAPL").await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"));
    assert!(first.header("age").is_none());
    let second = fetch(&gw, "/api/eod/AAPL").await;
    assert_eq!((second.status, second.x_cache()), (200, "HIT"));
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("content-type"), Some("application/json"));
    let age: u64 = second.header("age").unwrap().parse().unwrap();
    assert!(age <= 2, "{age}");
    assert_eq!(o.hits(), 1);

    let head = format!(
        "HEAD /api/eod/AAPL HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw(gw.addr, head.into_bytes()).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("X-Cache: HIT"), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {}", first.body.len())),
        "{head}"
    );
    assert_eq!(body, "");
    assert_eq!(o.hits(), 1);

    gw.wait_log("\"cache\":\"HIT\"").await;
    let m = gw.metrics().await;
    assert_eq!(
        sample(&m, "tollgate_cache_total{result=\"miss\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "tollgate_cache_total{result=\"hit\"}"),
        2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_private_and_oversized_answers_are_not_stored() {
    let no_store = origin_with(Some("no-store"), r#"{"status": true}"#, 0).await;
    let private = origin_with(Some("private, max-age=60"), r#"{"status": true}"#, 0).await;
    let big = origin_with(None, r#"{"status": true, "pad": "0123456789abcdef"}"#, 0).await;
    let gw = Gateway::start(
        &[
            route("a", "/a/", &[&no_store], CACHED),
            route("b", "/b/", &[&private], CACHED),
            route(
                "c",
                "/c/",
                &[&big],
                "cache: {ttl_seconds: 60, max_body_bytes: 16}",
            ),
        ],
        "",
    )
    .await;
    for (path, origin) in [("/a/x", &no_store), ("/b/x", &private), ("/c/x", &big)] {
        for _ in 0..2 {
            let got = fetch(&gw, path).await;
            assert_eq!((got.status, got.x_cache()), (200, "MISS"), "{path}");
        }
        assert_eq!(origin.hits(), 2, "{path} was cached");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_shortens_the_ttl() {
    let o = origin_with(Some("max-age=1"), r#"{"status": true}"#, 0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&o], CACHED)], "").await;
    assert_eq!(fetch(&gw, "/api/x").await.x_cache(), "MISS");
    let stored = Instant::now();
    assert_eq!(fetch(&gw, "/api/x").await.x_cache(), "HIT");
    // After a second it expires (the route's 60 s does not apply).
    loop {
        let got = fetch(&gw, "/api/x").await;
        if got.x_cache() == "MISS" {
            assert!(
                stored.elapsed() >= Duration::from_millis(900),
                "{:?}",
                stored.elapsed()
            );
            break;
        }
        assert!(stored.elapsed() < Duration::from_secs(3), "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(o.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_key_ignores_the_api_key_and_query_order() {
    let o = origin_with(None, r#"{"status": true}"#, 0).await;
    let keys = "keys:\n  - {key: \"alice\", name: a, credits: 100}\n  - {key: \"bob\", name: b, credits: 100}\n";
    let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&o], CACHED)], "", keys).await;
    let get = |path: &'static str| {
        let url = gw.url(path);
        async move {
            let resp = reqwest::get(url).await.unwrap();
            resp.headers()["x-cache"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(get("/api/eod?from=1&to=2&api_key=alice").await, "MISS");
    // Another customer, parameters in another order and spelling: one entry.
    assert_eq!(get("/api/eod?api_key=bob&to=2&from=1").await, "HIT");
    assert_eq!(get("/api/%65od?to=%32&from=1&api_key=bob").await, "HIT");
    assert_eq!(get("/api/eod?from=1&to=3&api_key=bob").await, "MISS");
    assert_eq!(o.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_requests_make_one_race() {
    let a = origin_with(None, r#"{"status": true, "from": "a"}"#, 300).await;
    let b = origin_with(None, r#"{"status": true, "from": "b"}"#, 350).await;
    let c = origin_with(None, r#"{"status": true, "from": "c"}"#, 400).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&a, &b, &c], CACHED)], "").await;
    let client = client();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let req = client.get(gw.url("/api/cold"));
            tokio::spawn(async move {
                let r = req.send().await.unwrap();
                (
                    r.status().as_u16(),
                    r.headers()["x-cache"].to_str().unwrap().to_string(),
                )
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    assert_eq!(
        results.iter().filter(|(_, c)| c == "MISS").count(),
        1,
        "{results:?}"
    );
    assert_eq!((a.hits(), b.hits(), c.hits()), (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entry_is_served_when_every_backend_fails() {
    let broken = Arc::new(AtomicBool::new(false));
    let flag = broken.clone();
    let o = Origin::start(move |_| {
        if flag.load(Ordering::Relaxed) {
            Reply::json(500, r#"{"status": false}"#)
        } else {
            Reply::json(200, r#"{"status": true, "v": "good"}"#)
                .header("Cache-Control", "max-age=1")
        }
    })
    .await;
    let gw = Gateway::start(&[route("t", "/api/", &[&o], CACHED)], "").await;
    let first = fetch(&gw, "/api/x").await;
    assert_eq!(first.x_cache(), "MISS");
    broken.store(true, Ordering::Relaxed);
    let since = Instant::now();
    loop {
        let got = fetch(&gw, "/api/x").await;
        assert_eq!(got.status, 200, "{}", got.body);
        if got.x_cache() == "STALE" {
            assert_eq!(got.body, first.body);
            assert!(got.header("age").is_some());
            break;
        }
        assert_eq!(got.x_cache(), "HIT");
        assert!(since.elapsed() < Duration::from_secs(3), "never stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Without an entry, the failure shows.
    assert_eq!(fetch(&gw, "/api/other").await.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_redis_hits_at_once() {
    let redis = RedisServer::start();
    import_keys(&redis, &default_keys());
    let o = origin_with(None, r#"{"status": true}"#, 0).await;
    let top = format!("store:\n  redis_url: {}", redis.url());
    let routes = [route("t", "/api/", &[&o], CACHED)];
    let a = Gateway::start(&routes, &top).await;
    assert_eq!(fetch(&a, "/api/shared").await.x_cache(), "MISS");
    // The Redis write happens off the request path: wait until it landed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !redis
        .dump()
        .await
        .iter()
        .any(|(k, _)| k.starts_with("tollgate:cache:"))
    {
        assert!(Instant::now() < deadline, "no cache entry in Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = Gateway::start(&routes, &top).await;
    let got = fetch(&b, "/api/shared").await;
    assert_eq!((got.status, got.x_cache()), (200, "HIT"));
    assert_eq!(o.hits(), 1);
    // A corrupt entry is a miss, counted as an error, not a failed request.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("tollgate:cache:*")
        .query_async(&mut c)
        .await
        .unwrap();
    let () = redis::cmd("SET")
        .arg(&names[0])
        .arg("garbage")
        .query_async(&mut c)
        .await
        .unwrap();
    let fresh = Gateway::start(&routes, &top).await;
    let got = fetch(&fresh, "/api/shared").await;
    assert_eq!((got.status, got.x_cache()), (200, "MISS"));
    let m = fresh.metrics().await;
    assert_eq!(
        sample(&m, "tollgate_cache_total{result=\"error\"}"),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_allow_still_serves_from_memory_or_backends() {
    let mut redis = RedisServer::start();
    import_keys(&redis, &default_keys());
    let o = origin_with(None, r#"{"status": true}"#, 0).await;
    let top = format!("store:\n  redis_url: {}\n  on_error: allow", redis.url());
    let gw = Gateway::start(&[route("t", "/api/", &[&o], CACHED)], &top).await;
    assert_eq!(fetch(&gw, "/api/a").await.x_cache(), "MISS");
    redis.stop();
    let got = fetch(&gw, "/api/a").await;
    assert_eq!((got.status, got.x_cache()), (200, "HIT"));
    let got = fetch(&gw, "/api/b").await;
    assert_eq!((got.status, got.x_cache()), (200, "MISS"));
    assert_eq!(o.hits(), 2);
    gw.wait_log("/api/b").await;
    let m = gw.metrics().await;
    assert!(
        sample(&m, "tollgate_cache_total{result=\"error\"}") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_are_charged_or_free_as_configured() {
    let o = origin_with(None, r#"{"status": true}"#, 0).await;
    let keys = "keys:\n  - {key: \"k\", name: k, credits: 100}\n";
    for (top, hit_cost) in [("", "1"), ("credits:\n  charge_cache_hits: false", "0")] {
        let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&o], CACHED)], top, keys).await;
        let get = || {
            reqwest::Client::new()
                .get(gw.url("/api/x"))
                .header("X-API-Key", "k")
                .send()
        };
        let miss = get().await.unwrap();
        assert_eq!(miss.headers()["x-credits-cost"], "1");
        let hit = get().await.unwrap();
        assert_eq!(hit.headers()["x-cache"], "HIT");
        assert_eq!(hit.headers()["x-credits-cost"], hit_cost, "{top}");
        let expected_left = if hit_cost == "1" { "98" } else { "99" };
        assert_eq!(hit.headers()["x-credits-remaining"], expected_left, "{top}");
    }
}
