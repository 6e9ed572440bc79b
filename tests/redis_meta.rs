//! The Redis store's key-metadata cache (pingora-memory-cache with a TTL):
//! a key's rate changed in Redis reaches a running gateway within
//! `META_TTL`, and until then the cached metadata is what serves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tollgate::store::redis::META_TTL;

async fn rate_limit_of(gw: &Gateway) -> String {
    let resp = get_with_key(gw.url("/api/x"), "meta-key").await;
    // 429 answers carry the limit too.
    assert!([200, 429].contains(&resp.status().as_u16()), "{resp:?}");
    resp.headers()["x-ratelimit-limit"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_changed_in_redis_shows_within_the_metadata_ttl() {
    let redis = RedisServer::start();
    import_keys(
        &redis,
        "keys:\n  - {key: \"meta-key\", name: m, credits: 1000, rate_per_second: 1000}\n",
    );
    let origin = Origin::json("a", true, 0).await;
    let gw = Gateway::start_with_keys(
        &[route("t", "/api/", &[&origin], "")],
        &format!("store:\n  redis_url: {}\n", redis.url()),
        "",
    )
    .await;
    let cached_at = Instant::now();
    assert_eq!(rate_limit_of(&gw).await, "1000");

    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let name = format!(
        "tollgate:key:{{{}}}",
        tollgate::key::KeyHash::of("meta-key").hex()
    );
    let () = redis::cmd("HSET")
        .arg(&name)
        .arg("rate_per_second")
        .arg(7)
        .query_async(&mut c)
        .await
        .unwrap();
    let changed_at = Instant::now();

    // Right after the change, the cached metadata still serves (this
    // request is well within META_TTL of the one that cached it).
    let old = rate_limit_of(&gw).await;
    if cached_at.elapsed() < META_TTL / 2 {
        assert_eq!(old, "1000", "the metadata was read from Redis again");
    }
    loop {
        if rate_limit_of(&gw).await == "7" {
            break;
        }
        assert!(
            changed_at.elapsed() < META_TTL + Duration::from_millis(500),
            "the new rate did not show within {META_TTL:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
