//! `server.work_stealing`, in both its values: tollgate's default is off
//! (each proxy thread runs its own connections); either way concurrent
//! requests are each answered, cached and charged once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_answered_and_charged_once_with_or_without_work_stealing() {
    for server in ["", "  work_stealing: true\n", "  work_stealing: false\n"] {
        let origin = Origin::json("o", true, 0).await;
        let keys = "keys:\n  - {key: \"k\", name: t, credits: 1000, rate_per_second: 1000000}\n";
        let gw = Gateway::start_with_server(
            &[route(
                "t",
                "/api/",
                &[&origin],
                "    cache: {ttl_seconds: 60}\n",
            )],
            "",
            keys,
            server,
        )
        .await;
        // 64 requests at once over 8 paths: 8 misses, 56 hits or waits.
        let urls = (0..64)
            .map(|i| gw.url(&format!("/api/p{}", i % 8)))
            .collect();
        let statuses = statuses_at_once(urls, "k").await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{server:?}: {statuses:?}"
        );
        let last = get_with_key(gw.url("/api/p0"), "k").await;
        assert_eq!(last.headers()["x-cache"], "HIT", "{server:?}");
        assert_eq!(last.headers()["x-credits-remaining"], "935", "{server:?}");
        assert_eq!(origin.hits(), 8, "{server:?}: one race per path");
    }
}
