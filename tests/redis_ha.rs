//! The Redis store on Redis Cluster and on Sentinel, with real processes:
//! a three-master cluster (keys spread over the masters, exact credits from
//! two gateways, the Redis cache tier, the keys commands) and a master with
//! a replica and three sentinels (the master killed under traffic: served
//! again soon after the promotion, never a hang).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis_ha::{Cluster, Sentinels};
use common::*;

/// A config for the keys commands on `store`.
fn keys_conf_for(dir: &std::path::Path, store: &str) -> std::path::PathBuf {
    let path = dir.join("keys-cli.yaml");
    std::fs::write(
        &path,
        format!("{store}routes:\n  - {{name: t, prefix: /, backends: [\"http://127.0.0.1:1\"]}}\n"),
    )
    .unwrap();
    path
}

fn import(conf: &std::path::Path, keys: &str) {
    let file = conf.with_file_name("import.yaml");
    std::fs::write(&file, keys).unwrap();
    let (code, out, err) = tollgate(&["keys", "import", "--init", file.to_str().unwrap()], conf);
    assert_eq!(code, 0, "import failed: {out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_spreads_keys_and_keeps_credits_exact_across_two_gateways() {
    let cluster = Cluster::start();
    let store = cluster.store_yaml();
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf_for(dir.path(), &store);
    let mut keys = String::from(
        "keys:\n  - {key: fifty, name: fifty, credits: 50, rate_per_second: 100000}\n",
    );
    for i in 0..20 {
        keys.push_str(&format!("  - {{key: k{i}, name: k{i}, credits: 1000}}\n"));
    }
    import(&conf, &keys);
    let holding = cluster.sizes().iter().filter(|&&n| n > 0).count();
    assert!(
        holding >= 2,
        "keys on {holding} master(s): {:?}",
        cluster.sizes()
    );

    // The keys commands on the cluster.
    let (code, list, err) = tollgate(&["keys", "list"], &conf);
    assert_eq!(code, 0, "{err}");
    assert_eq!(list.lines().count(), 1 + 21, "{list}");
    let (code, out, err) = tollgate(&["keys", "topup", "k3", "--credits", "5"], &conf);
    assert_eq!(
        (code, out.trim_end().ends_with("credits 1005")),
        (0, true),
        "{out}{err}"
    );

    let ok = Origin::json("ok", true, 5).await;
    let routes = [route("t", "/api/", &[&ok], "cache: {ttl_seconds: 60}")];
    let a = Gateway::start_with_keys(&routes, &store, "").await;
    let b = Gateway::start_with_keys(&routes, &store, "").await;
    // 80 requests at once, half on each gateway: 50 credits buy exactly 50.
    let urls = (0..80)
        .map(|i| [&a, &b][i % 2].url(&format!("/api/{i}")))
        .collect();
    let statuses = statuses_at_once(urls, "fifty").await;
    let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
    assert_eq!((count(200), count(402)), (50, 30), "{statuses:?}");

    // The cache tier is shared: a miss on one gateway is a hit on the other.
    let first = get_with_key(a.url("/api/shared"), "k1").await;
    assert_eq!(first.headers()["x-cache"], "MISS");
    let second = get_with_key(b.url("/api/shared"), "k1").await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-cache"], "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_failover_serves_again_soon_after_the_promotion() {
    let mut ha = Sentinels::start();
    let store = ha.store_yaml();
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf_for(dir.path(), &store);
    import(
        &conf,
        "keys:\n  - {key: payer, name: payer, credits: 1000000, rate_per_second: 100000}\n",
    );
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&ok], "")], &store, "").await;
    assert_eq!(get_with_key(gw.url("/api/x"), "payer").await.status(), 200);

    let old = ha.master.port;
    ha.master.kill();
    let killed = Instant::now();
    let client = reqwest::Client::new();
    let mut promoted = None;
    let mut slowest = Duration::ZERO;
    let served_again = loop {
        let t = Instant::now();
        let status = client
            .get(gw.url("/api/x"))
            .header("X-API-Key", "payer")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        slowest = slowest.max(t.elapsed());
        assert!([200, 503].contains(&status), "{status}");
        if promoted.is_none() && ha.master_port().is_some_and(|p| p != old) {
            promoted = Some(Instant::now());
        }
        if let (Some(p), 200) = (promoted, status) {
            break p.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "not served again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let promotion = promoted.unwrap() - killed;
    eprintln!("sentinel failover: promoted {promotion:?} after the kill, served again {served_again:?} after that; slowest answer {slowest:?}");
    assert!(served_again < Duration::from_secs(5), "{served_again:?}");
    assert_eq!(ha.master_port(), Some(ha.replica.port));
    // timeout_ms is 500: no answer waited much longer than one store call.
    assert!(slowest < Duration::from_secs(3), "{slowest:?}");
}
