//! What of a backend's answer reaches the client and the cache, against the
//! real gateway: `Content-Encoding` is passed on with its bytes (fresh, from
//! the in-process tier and from the Redis tier); an answer that sets a
//! cookie is neither stored nor passes its cookie on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// `{"status": true, "data": [1, 2, 3]}`, gzipped.
const GZIPPED: [u8; 53] = [
    0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0xab, 0x56, 0x2a, 0x2e, 0x49, 0x2c,
    0x29, 0x2d, 0x56, 0xb2, 0x52, 0x28, 0x29, 0x2a, 0x4d, 0xd5, 0x51, 0x50, 0x4a, 0x49, 0x2c, 0x49,
    0x04, 0xf2, 0xa2, 0x0d, 0x75, 0x14, 0x8c, 0x74, 0x14, 0x8c, 0x63, 0x6b, 0x01, 0x06, 0x93, 0x4a,
    0x72, 0x23, 0x00, 0x00, 0x00,
];

/// A gzip body is judged by status only: its bytes are not JSON.
const GZIP_ROUTE: &str = "success: http_2xx\ncache: {ttl_seconds: 60}";

async fn gzip_origin() -> Origin {
    Origin::start(|_| Reply::json(200, GZIPPED.to_vec()).header("Content-Encoding", "gzip")).await
}

/// Status, `X-Cache`, `Content-Encoding` and the body's bytes.
async fn fetch(gw: &Gateway, path: &str) -> (u16, String, Option<String>, Vec<u8>) {
    let resp = client().get(gw.url(path)).send().await.unwrap();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (x_cache, encoding) = (
        header("x-cache").unwrap_or_default(),
        header("content-encoding"),
    );
    (
        resp.status().as_u16(),
        x_cache,
        encoding,
        resp.bytes().await.unwrap().to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_encoding_is_passed_on_fresh_and_from_the_in_process_tier() {
    let o = gzip_origin().await;
    let gw = Gateway::start(&[route("t", "/api/", &[&o], GZIP_ROUTE)], "").await;
    let gzip = Some("gzip".to_string());
    assert_eq!(
        fetch(&gw, "/api/eod/AAPL").await,
        (200, "MISS".into(), gzip.clone(), GZIPPED.to_vec())
    );
    assert_eq!(
        fetch(&gw, "/api/eod/AAPL").await,
        (200, "HIT".into(), gzip, GZIPPED.to_vec())
    );
    assert_eq!(o.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_encoding_is_kept_in_the_redis_tier() {
    let redis = RedisServer::start();
    import_keys(&redis, &default_keys());
    let o = gzip_origin().await;
    let routes = [route("t", "/api/", &[&o], GZIP_ROUTE)];
    let top = format!("store:\n  redis_url: {}\n", redis.url());
    let a = Gateway::start_with_keys(&routes, &top, "").await;
    let b = Gateway::start_with_keys(&routes, &top, "").await;
    let gzip = Some("gzip".to_string());
    assert_eq!(
        fetch(&a, "/api/eod/AAPL").await,
        (200, "MISS".into(), gzip.clone(), GZIPPED.to_vec())
    );
    // `b` has nothing in process: its hit comes from Redis (written off the
    // request path, so wait for it).
    let stored = || {
        let redis = &redis;
        async move {
            redis
                .dump()
                .await
                .iter()
                .any(|(name, _)| name.contains("cache:"))
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !stored().await {
        assert!(
            std::time::Instant::now() < deadline,
            "no cache entry in Redis"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        fetch(&b, "/api/eod/AAPL").await,
        (200, "HIT".into(), gzip, GZIPPED.to_vec())
    );
    assert_eq!(o.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_sets_a_cookie_is_not_stored_and_the_cookie_not_passed_on() {
    let o = Origin::start(|req| {
        // Each caller gets its own session: the body names it.
        let n = req.connection;
        Reply::json(200, format!(r#"{{"status": true, "session": {n}}}"#))
            .header("Set-Cookie", &format!("session={n}; HttpOnly"))
    })
    .await;
    let gw = Gateway::start(
        &[route("t", "/api/", &[&o], "cache: {ttl_seconds: 60}")],
        "",
    )
    .await;
    for _ in 0..2 {
        let resp = client().get(gw.url("/api/me")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-cache"], "MISS");
        assert!(resp.headers().get("set-cookie").is_none());
    }
    assert_eq!(
        o.hits(),
        2,
        "an answer with Set-Cookie was served from cache"
    );
}
