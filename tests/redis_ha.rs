//! The Redis store on Redis Cluster and on Sentinel, with real processes:
//! a three-master cluster (keys spread over the masters, exact credits from
//! two gateways, the Redis cache tier, the keys commands, a master killed or
//! stalled with `on_error` deny and allow, a `key_prefix`) and a master with
//! a replica and three sentinels (the master killed under traffic: served
//! again soon after the promotion, never an answer slower than `timeout_ms`
//! and a margin, the failover window measured).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pki;
use common::redis_ha::{
    cli, credits_on, holds, key_name, scan, Cluster, Sentinels, TlsFiles, SENTINEL_TIMEOUT_MS,
};
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

/// What an answer may take beyond the store's budget for it. The budget is
/// `timeout_ms` for the key lookup and the charge together (one deadline in
/// `proxy/steps.rs`; `charge_wait` adds nothing without leases, and with
/// them only for a charge that waits for other nodes to give credits back,
/// which no test here makes). Beyond it: the proxy's own work and a
/// loopback origin that answers at once, on a busy two-core machine.
const MARGIN: Duration = Duration::from_millis(250);

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

    // A shard down fails only the keys on it.
    let mut cluster = cluster;
    let on = |key: &str, port: u16| holds(port, &key_name("tollgate:", key));
    let down = cluster.nodes[0].port;
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let lost: Vec<&String> = keys.iter().filter(|k| on(k, down)).collect();
    let kept: Vec<&String> = keys.iter().filter(|k| !on(k, down)).collect();
    assert!(!lost.is_empty() && !kept.is_empty(), "{lost:?} {kept:?}");
    cluster.nodes[0].kill();
    for k in &kept {
        let r = get_with_key(a.url(&format!("/api/after/{k}")), k).await;
        assert_eq!(r.status(), 200, "{k} lives on a shard that is up");
    }
    for k in &lost {
        let r = get_with_key(a.url(&format!("/api/after/{k}")), k).await;
        assert_eq!(r.status(), 503, "{k} lives on the shard that is down");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "store_unavailable", "{k}: {body}");
    }
}

/// Keys `k0`…`k{n-1}` with `credits` each, imported on `conf`'s store.
fn import_numbered(conf: &std::path::Path, n: usize, credits: u64) {
    let mut keys = String::from("keys:\n");
    for i in 0..n {
        keys.push_str(&format!(
            "  - {{key: k{i}, name: k{i}, credits: {credits}}}\n"
        ));
    }
    import(conf, &keys);
}

/// `k0`…`k{n-1}` split by whether the master on `port` holds them (under
/// the default prefix); both parts must be there.
fn split_by_master(port: u16, n: usize) -> (Vec<String>, Vec<String>) {
    let (on, off): (Vec<String>, Vec<String>) = (0..n)
        .map(|i| format!("k{i}"))
        .partition(|k| holds(port, &key_name("tollgate:", k)));
    assert!(!on.is_empty() && !off.is_empty(), "{on:?} {off:?}");
    (on, off)
}

/// With `on_error: allow` a shard down costs its keys' callers nothing
/// visible: they are served, uncharged (no `X-Credits-Remaining`), while
/// the keys on the shards that are up are charged as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shard_down_with_on_error_allow_serves_its_keys_uncharged() {
    let mut cluster = Cluster::start();
    let store = format!("{}  on_error: allow\n", cluster.store_yaml());
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf_for(dir.path(), &store);
    import_numbered(&conf, 20, 100);
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&ok], "")], &store, "").await;
    let (lost, kept) = split_by_master(cluster.nodes[0].port, 20);
    for k in lost.iter().chain(&kept) {
        let r = get_with_key(gw.url("/api/before"), k).await;
        assert_eq!(r.headers()["x-credits-remaining"], "99", "{k}");
    }
    cluster.nodes[0].kill();
    for k in &kept {
        let r = get_with_key(gw.url("/api/after"), k).await;
        assert_eq!(r.status(), 200, "{k} lives on a shard that is up");
        assert_eq!(r.headers()["x-credits-remaining"], "98", "{k}");
    }
    for k in &kept {
        let port = cluster.nodes[cluster.holder(&key_name("tollgate:", k))].port;
        assert_eq!(credits_on(port, &key_name("tollgate:", k)), 98, "{k}");
    }
    for k in &lost {
        let r = get_with_key(gw.url("/api/after"), k).await;
        assert_eq!(r.status(), 200, "{k} lives on the shard that is down");
        let remaining = r.headers().get("x-credits-remaining");
        assert!(remaining.is_none(), "{k} charged: {remaining:?}");
    }
    assert_eq!(ok.hits(), 40);
}

/// A master that stalls (SIGSTOP: its connections stay open, nothing is
/// answered) holds a request for one of its keys no longer than the
/// store's budget, `timeout_ms` for lookup and charge together: 503
/// `store_unavailable` with `on_error: deny`. Meanwhile the keys on the
/// other masters are served within the same bound, although the stalled
/// master holds the store marker. Let go (SIGCONT), its keys are served
/// again, each charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_stalled_shard_answers_its_keys_within_timeout_ms() {
    const TIMEOUT_MS: u64 = 300;
    let budget = Duration::from_millis(TIMEOUT_MS) + MARGIN;
    let cluster = Cluster::start();
    let store = cluster.store_yaml_timeout(TIMEOUT_MS);
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf_for(dir.path(), &store);
    import_numbered(&conf, 20, 100);
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&ok], "")], &store, "").await;
    let stalled = cluster.holder("tollgate:store");
    let (held, free) = split_by_master(cluster.nodes[stalled].port, 20);

    // The gateway connects to every master, as one that has served a while
    // has. A master it never reached is another case: the redis crate then
    // rebuilds its slot map at each request for that master's keys, which
    // holds every request meanwhile (README, Stores).
    let r = get_with_key(gw.url("/api/warm"), &free[0]).await;
    assert_eq!(r.status(), 200);
    cluster.nodes[stalled].pause();
    // Every key at once, twice: the second round after the metadata cache's
    // second, so that each key is read from Redis again.
    let client = reqwest::Client::new();
    for round in 0..2 {
        let started = Instant::now();
        let tasks = held.iter().chain(&free).map(|k| {
            let (client, url, k) = (client.clone(), gw.url("/api/stalled"), k.clone());
            tokio::spawn(async move { (seen(&client, &url, &k).await, k) })
        });
        for task in futures::future::join_all(tasks).await {
            let (seen, k) = task.unwrap();
            let on_stalled = held.contains(&k);
            let want = if on_stalled {
                (503, Some("store_unavailable"))
            } else {
                (200, None)
            };
            let took = seen.took();
            assert_eq!(
                (seen.status, seen.error.as_deref()),
                want,
                "round {round}: {k} took {took:?}"
            );
            assert!(
                took < budget,
                "round {round}: {k} (stalled: {on_stalled}) took {took:?}"
            );
        }
        eprintln!(
            "round {round}: every key answered within {:?}",
            started.elapsed()
        );
        if round == 0 {
            tokio::time::sleep(tollgate::store::redis::META_TTL).await;
        }
    }

    cluster.nodes[stalled].resume();
    for k in &held {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = get_with_key(gw.url("/api/resumed"), k).await;
            if r.status() == 200 {
                assert_eq!(r.headers()["x-credits-remaining"], "99", "{k}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{k} not served again: {}",
                r.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `store.key_prefix: "acme:"` on a Cluster, with every keys command: the
/// gateway sees what each did, and every name on every master is under the
/// prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_keys_commands_under_a_key_prefix() {
    let cluster = Cluster::start();
    let store = format!("{}  key_prefix: \"acme:\"\n", cluster.store_yaml());
    let masters: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    keys_commands_under_a_key_prefix(&store, &masters).await;
}

/// The same through Sentinel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_keys_commands_under_a_key_prefix() {
    let ha = Sentinels::start();
    let store = format!("{}  key_prefix: \"acme:\"\n", ha.store_yaml());
    keys_commands_under_a_key_prefix(&store, &[ha.master.port]).await;
}

/// On `store` (its `key_prefix` `acme:`; its masters on `masters`):
/// `import`, `create`, `topup`, `update`, `show` and `revoke`, each seen by
/// a running gateway with a cached route; then every name tollgate wrote,
/// of each kind, is under the prefix.
async fn keys_commands_under_a_key_prefix(store: &str, masters: &[u16]) {
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf_for(dir.path(), store);
    import_numbered(&conf, 10, 100);
    let ok = Origin::json("ok", true, 0).await;
    let routes = [route("t", "/api/", &[&ok], "cache: {ttl_seconds: 60}")];
    let gw = Gateway::start_with_keys(&routes, store, "").await;
    for i in 0..10 {
        let r = get_with_key(gw.url(&format!("/api/k{i}")), &format!("k{i}")).await;
        assert_eq!(r.status(), 200, "k{i}");
        assert_eq!(r.headers()["x-credits-remaining"], "99", "k{i}");
    }

    let (code, out, err) = tollgate(
        &[
            "keys",
            "create",
            "--name",
            "made",
            "--credits",
            "1",
            "--rate",
            "50",
        ],
        &conf,
    );
    assert_eq!(code, 0, "{err}");
    let key = out.lines().next().unwrap().to_string();
    let id = tollgate::key::KeyHash::of(&key).id();
    let spend = |n: usize| get_with_key(gw.url(&format!("/api/made/{n}")), &key);
    let r = spend(0).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credits-remaining"], "0");
    assert_eq!(spend(1).await.status(), 402);

    // A top-up is spendable at once.
    let (code, out, err) = tollgate(&["keys", "topup", &id, "--credits", "100"], &conf);
    assert_eq!(
        (code, out.trim()),
        (0, format!("id {id} credits 100").as_str()),
        "{err}"
    );
    let r = spend(2).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credits-remaining"], "99");

    // An update shows in `show`, and on the gateway within the metadata
    // cache's second.
    let (code, _, err) = tollgate(
        &["keys", "update", &id, "--name", "renamed", "--rate", "7"],
        &conf,
    );
    assert_eq!(code, 0, "{err}");
    let show = |arg: &str| {
        let (code, out, err) = tollgate(&["keys", "show", arg], &conf);
        assert_eq!(code, 0, "{err}");
        let row: Vec<String> = out
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .take(5)
            .map(String::from)
            .collect();
        row
    };
    assert_eq!(show(&id), [id.as_str(), "renamed", "99", "7", "active"]);
    assert_eq!(show(&key), show(&id));
    let updated = Instant::now();
    let mut n = 3;
    loop {
        let r = spend(n).await;
        n += 1;
        assert_eq!(r.status(), 200);
        if r.headers()["x-ratelimit-limit"] == "7" {
            break;
        }
        assert!(
            updated.elapsed() < Duration::from_millis(1_500),
            "rate not updated"
        );
        // Under the new rate: a 429 would not say whether the rate changed.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A revocation shows within the metadata cache's second.
    let (code, out, err) = tollgate(&["keys", "revoke", &id], &conf);
    assert_eq!(
        (code, out.trim()),
        (0, format!("id {id} revoked").as_str()),
        "{err}"
    );
    assert_eq!(show(&id)[4], "revoked");
    let revoked = Instant::now();
    loop {
        let seen = seen(&reqwest::Client::new(), &gw.url("/api/made/revoked"), &key).await;
        if seen.status == 403 {
            assert_eq!(seen.error.as_deref(), Some("revoked_api_key"));
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_millis(1_500),
            "still served: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every name is under the prefix: keys, their operation markers and
    // ledger rows, the cache entries (written off the request path) and the
    // store marker.
    let names = || -> Vec<String> { masters.iter().flat_map(|&p| scan(p)).collect() };
    wait_until("a cache entry in Redis", Duration::from_secs(5), || {
        names().iter().any(|n| n.starts_with("acme:cache:"))
    })
    .await;
    let names = names();
    for name in &names {
        assert!(name.starts_with("acme:"), "{name} is outside the prefix");
    }
    for kind in ["acme:key:{", "acme:usage:{", "acme:cache:", "acme:store"] {
        assert!(
            names.iter().any(|n| n.starts_with(kind)),
            "no {kind}…: {names:?}"
        );
    }
    assert!(
        names.iter().any(|n| n.contains("}:op:")),
        "no operation marker: {names:?}"
    );
    let keys = names
        .iter()
        .filter(|n| n.starts_with("acme:key:{") && n.ends_with('}'));
    assert_eq!(keys.count(), 11, "{names:?}");
    if masters.len() > 1 {
        let holding = masters
            .iter()
            .filter(|&&p| scan(p).iter().any(|n| n.starts_with("acme:key:{")))
            .count();
        assert!(holding >= 2, "keys on {holding} master(s)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_failover_under_load_serves_again_soon_after_the_promotion() {
    failover_under_load("deny", "", &[200, 503]).await;
}

/// With `on_error: allow` the gap costs the customer nothing visible: every
/// answer is a 200 (those the store could not decide are served uncharged).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_failover_with_on_error_allow_answers_every_request() {
    failover_under_load("allow", "", &[200]).await;
}

/// With credit leases (and `on_error: deny`) the gap costs nothing
/// visible: the node serves from the lease it holds while there is no
/// master, reports its spending to the promoted one, and gives its lease
/// back there when it stops; the balance is never charged more than was
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_failover_with_leases_held_serves_from_them() {
    let leases = "  leases: {max_credits: 10000, ttl_seconds: 10}\n";
    failover_under_load("deny", leases, &[200]).await;
}

/// Kill the master of a Sentinel setup under eight clients (`extra`: more
/// store settings); the answers in the gap may only be `expected` statuses,
/// none slower than `timeout_ms` and [`MARGIN`]. Measures the failover
/// window: the charges acknowledged before the kill against those the
/// replica holds once its master is gone, which it keeps when promoted.
async fn failover_under_load(on_error: &str, extra: &str, expected: &[u16]) {
    let mut ha = Sentinels::start();
    let store = format!("{}  on_error: {on_error}\n{extra}", ha.store_yaml());
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf_for(dir.path(), &store);
    import(
        &conf,
        "keys:\n  - {key: payer, name: payer, credits: 1000000, rate_per_second: 100000}\n",
    );
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&ok], "")], &store, "").await;
    assert_eq!(get_with_key(gw.url("/api/x"), "payer").await.status(), 200);
    let urls = (0..200).map(|i| gw.url(&format!("/api/{i}"))).collect();
    let statuses = statuses_at_once(urls, "payer").await;
    let mut charged = 1 + statuses.iter().filter(|&&s| s == 200).count() as u64;
    assert_eq!(charged, 201, "{statuses:?}");
    let name = key_name("tollgate:", "payer");

    // Eight clients send all along, so that the kill lands among charges
    // acknowledged just before it and charges in flight.
    let answers = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let halt = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (answers, halt, url) =
                (answers.clone(), halt.clone(), gw.url(&format!("/api/c{i}")));
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !halt.load(Ordering::Relaxed) {
                    let seen = seen(&client, &url, "payer").await;
                    answers.lock().unwrap().push(seen);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    wait_until(
        "the clients' first answers",
        Duration::from_secs(10),
        || answers.lock().unwrap().len() >= 40,
    )
    .await;
    let old = ha.master.port;
    let killed = Instant::now();
    ha.master.kill();
    let dead = Instant::now();
    // What the replica holds once it has applied all its master sent (the
    // link goes down at the end of the stream), read before its promotion.
    let replication = |port: u16| cli(port, &["INFO", "replication"]).unwrap_or_default();
    wait_until(
        "the replica to lose its master",
        Duration::from_secs(10),
        || replication(ha.replica.port).contains("master_link_status:down"),
    )
    .await;
    let on_replica = 1_000_000 - credits_on(ha.replica.port, &name);
    assert!(
        replication(ha.replica.port).contains("role:slave"),
        "the replica was promoted before it was read"
    );

    let mut promoted = None;
    let served_again = loop {
        if promoted.is_none() && ha.master_port().is_some_and(|p| p != old) {
            promoted = Some(Instant::now());
        }
        if let Some(p) = promoted {
            let first_ok = answers
                .lock()
                .unwrap()
                .iter()
                .find(|a| a.at >= p && a.status == 200)
                .map(|a| a.at - p);
            if let Some(after) = first_ok {
                break after;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "not served again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    halt.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    for a in &answers {
        assert!(
            expected.contains(&a.status),
            "on_error {on_error}: {} {:?}",
            a.status,
            a.error
        );
        if a.status == 503 {
            assert_eq!(a.error.as_deref(), Some("store_unavailable"));
        }
    }
    let during: Vec<&Seen> = answers.iter().filter(|a| a.at >= killed).collect();
    let refused = during.iter().filter(|a| a.status == 503).count();
    // The answers in the gap (a client's first answers, before the kill,
    // also wait for its connection to be made).
    let slowest = during.iter().map(|a| a.took()).max().unwrap();
    eprintln!(
        "on_error {on_error}: {} answers during the failover, {refused} of them 503",
        during.len()
    );
    let promoted = promoted.unwrap();
    let promotion = promoted - killed;
    eprintln!("sentinel failover: promoted {promotion:?} after the kill, served again {served_again:?} after that; slowest answer {slowest:?}");
    assert!(served_again < Duration::from_secs(5), "{served_again:?}");
    assert_eq!(ha.master_port(), Some(ha.replica.port));
    // Never a hang longer than one store budget.
    let budget = Duration::from_millis(SENTINEL_TIMEOUT_MS);
    assert!(slowest < budget + MARGIN, "{slowest:?}");

    // The old master can have charged only the requests sent before it
    // died: those answered 200 (acknowledged), and those answered otherwise
    // whose charge may have run unseen (cancelled once Redis answers again).
    assert!(
        answers
            .iter()
            .filter(|a| a.at < killed)
            .all(|a| a.status == 200),
        "refused before the kill"
    );
    let old_masters: Vec<&Seen> = answers.iter().filter(|a| a.sent < dead).collect();
    assert!(
        old_masters.iter().all(|a| a.at < promoted),
        "a request sent before the kill was answered after the promotion"
    );
    let acked = charged + old_masters.iter().filter(|a| a.status == 200).count() as u64;
    let unseen = old_masters.iter().filter(|a| a.status != 200).count() as u64;
    assert!(
        on_replica <= acked + unseen,
        "the replica holds {on_replica} charges: more than the {acked} acknowledged and {unseen} unconfirmed"
    );
    charged += answers.iter().filter(|a| a.status == 200).count() as u64;

    // Once the charges answered as not charged are settled (cancelled on
    // the promoted master), what it holds is exact.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&gw.metrics().await, "tollgate_store_unsettled") != 0.0 {
        assert!(Instant::now() < deadline, "charges left unsettled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !extra.is_empty() {
        // Leases: the node reports what it spent to the promoted master
        // and, stopping, gives its lease back there.
        signal(gw.pid(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        let leased = || {
            cli(ha.replica.port, &["HGET", &name, "leased"])
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        while leased() != "0" {
            assert!(
                Instant::now() < deadline,
                "lease not given back: {}",
                leased()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let recorded = 1_000_000 - credits_on(ha.replica.port, &name);
    assert!(
        recorded <= charged,
        "more charged than answered: {recorded} > {charged}"
    );
    eprintln!(
        "failover (on_error {on_error}): {charged} answers, {recorded} charges on the promoted replica, {} not recorded",
        charged - recorded
    );
    if on_error != "deny" || !extra.is_empty() {
        // With `allow` the answers the store could not decide went
        // uncharged; with leases the node charges from its lease and
        // reports later: only `deny` without leases measures the window.
        return;
    }
    // The failover window: each 200 was one charge on a master, so those
    // not recorded are acknowledged charges that the old master made and
    // the replica never got. Beside the acknowledged charges it got, the
    // replica held none to all of the unconfirmed ones: that bounds them.
    let lost = charged - recorded;
    let (least, most) = (
        acked.saturating_sub(on_replica),
        acked.min(acked + unseen - on_replica),
    );
    eprintln!(
        "failover window: {acked} charges acknowledged before the master died ({unseen} more \
         unconfirmed), {on_replica} on the replica when it was promoted; {lost} acknowledged \
         charges lost"
    );
    assert!(
        (least..=most).contains(&lost),
        "{lost} lost, but the replica's {on_replica} charges say {least}..={most}"
    );
}

/// `rediss://` with `store.redis_ca`: the keys commands and the gateway
/// speak TLS to Redis; without the CA (the system's roots) they refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path());
    let files = TlsPaths::new(&pki, 5);
    let redis = common::redis_ha::tls_redis(&dir, &files.files());
    let url = format!("rediss://localhost:{}/0", redis.port);
    // A first call over TLS from a debug build shakes hands inside the
    // store's budget: 250 ms by default, which a busy 2-core machine missed.
    let store = format!(
        "store:\n  redis_url: {url}\n  redis_ca: \"{}\"\n  timeout_ms: 2000\n",
        files.ca
    );
    charges_once_on(&store, dir.path()).await;

    // The system's roots do not know the test CA.
    let untrusted = keys_conf_for(dir.path(), &format!("store:\n  redis_url: {url}\n"));
    let (code, _, err) = tollgate(&["keys", "list"], &untrusted);
    assert_ne!(code, 0, "listed over an unverified TLS connection");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

/// A store written by a tollgate before the hash tag (`key:<sha256>`, the
/// marker holding a time): the gateway does not call its keys unknown (a
/// store error, 503 with `on_error: deny`, and a log line naming the fix),
/// the keys commands refuse it, and `tollgate keys migrate` moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_in_the_old_layout_is_refused_until_migrated() {
    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let hex = tollgate::key::KeyHash::of("payer").hex();
    let () = redis::cmd("HSET")
        .arg(format!("tollgate:key:{hex}"))
        .arg(&["name", "payer", "credits", "7", "state", "active"])
        .query_async(&mut c)
        .await
        .unwrap();
    let () = redis::cmd("SET")
        .arg("tollgate:store")
        .arg("1764000000")
        .query_async(&mut c)
        .await
        .unwrap();
    let store = format!("store:\n  redis_url: {}\n", redis.url());
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&ok], "")], &store, "").await;
    let r = get_with_key(gw.url("/api/x"), "payer").await;
    assert_eq!(
        r.status(),
        503,
        "an old-layout key must not be called unknown"
    );
    gw.wait_log("tollgate keys migrate").await;

    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf_for(dir.path(), &store);
    let (code, _, err) = tollgate(&["keys", "list"], &conf);
    assert_eq!(code, 1);
    assert!(err.contains("keys migrate"), "{err}");
    let (code, out, err) = tollgate(&["keys", "migrate"], &conf);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("moved 1 key(s)"), "{out}");
    let (code, list, _) = tollgate(&["keys", "list"], &conf);
    assert!(code == 0 && list.contains("payer"), "{list}");

    let r = get_with_key(gw.url("/api/x"), "payer").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credits-remaining"], "6");
}

/// Slots moved between masters while a gateway runs (`redis-cli --cluster
/// reshard`): the gateway follows MOVED/ASK and charges the moved keys on
/// their new master, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slots_moved_under_a_running_gateway_are_followed() {
    let cluster = Cluster::start();
    let store = cluster.store_yaml();
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf_for(dir.path(), &store);
    let mut keys = String::from("keys:\n");
    for i in 0..20 {
        keys.push_str(&format!("  - {{key: k{i}, name: k{i}, credits: 100}}\n"));
    }
    import(&conf, &keys);
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&ok], "")], &store, "").await;
    for i in 0..20 {
        let r = get_with_key(gw.url("/api/before"), &format!("k{i}")).await;
        assert_eq!(r.headers()["x-credits-remaining"], "99");
    }
    let (from, to) = (cluster.nodes[0].port, cluster.nodes[1].port);
    let id = |port: u16| cli(port, &["CLUSTER", "MYID"]).unwrap().trim().to_string();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
        .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
        .args(["--cluster-slots", "16384", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(cluster.sizes()[0], 0, "keys left on the emptied master");
    for i in 0..20 {
        let r = get_with_key(gw.url("/api/after"), &format!("k{i}")).await;
        assert_eq!(r.status(), 200, "k{i}");
        assert_eq!(r.headers()["x-credits-remaining"], "98", "k{i}");
    }
}

/// A Cluster that speaks only TLS (`rediss://` seed nodes, `redis_ca`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_cluster_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path());
    let files = TlsPaths::new(&pki, 6);
    let cluster = Cluster::start_tls(files.files());
    charges_once_on(&cluster.store_yaml(), dir.path()).await;
}

/// Sentinels, master and replica that speak only TLS (`rediss://`
/// sentinels, `redis_ca`): the master is found and charged over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_sentinel_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path());
    let files = TlsPaths::new(&pki, 7);
    let ha = Sentinels::start_tls(files.files());
    charges_once_on(&ha.store_yaml(), dir.path()).await;
}

/// A Redis server's certificate from the test CA, and the CA, as paths.
struct TlsPaths {
    cert: String,
    key: String,
    ca: String,
}

impl TlsPaths {
    fn new(pki: &pki::Pki, serial: u32) -> TlsPaths {
        let leaf = pki.leaf("redis", serial, 30);
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        TlsPaths {
            cert: path(&leaf.cert),
            key: path(&leaf.key),
            ca: path(&pki.ca_path()),
        }
    }

    fn files(&self) -> TlsFiles<'_> {
        TlsFiles {
            cert: &self.cert,
            key: &self.key,
            ca: &self.ca,
        }
    }
}

/// On `store`: a key imported with the keys command is charged once by a
/// gateway's request.
async fn charges_once_on(store: &str, dir: &std::path::Path) {
    let conf = keys_conf_for(dir, store);
    import(&conf, "keys:\n  - {key: payer, name: payer, credits: 10}\n");
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&ok], "")], store, "").await;
    let r = get_with_key(gw.url("/api/x"), "payer").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credits-remaining"], "9");
}

/// Credit leases and the usage ledger on a Redis Cluster: every lease
/// script touches one slot (the key, its leases and its ledger rows share
/// the hash tag); two gateways sell exactly the balance, then give their
/// leases back at stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_leases_sell_exactly_the_balance() {
    let cluster = Cluster::start();
    leases_sell_exactly_the_balance(&cluster.store_yaml()).await;
}

/// The same through Sentinel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_leases_sell_exactly_the_balance() {
    let ha = Sentinels::start();
    leases_sell_exactly_the_balance(&ha.store_yaml()).await;
}

async fn leases_sell_exactly_the_balance(redis_store: &str) {
    let store = format!("{redis_store}  leases: {{max_credits: 10, ttl_seconds: 10}}\n");
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf_for(dir.path(), &store);
    import(
        &conf,
        "keys:\n  - {key: leased, name: leased, credits: 60, rate_per_second: 100000}\n",
    );
    let ok = Origin::json("ok", true, 0).await;
    let routes = [route("t", "/api/", &[&ok], "")];
    let one = Gateway::start_with_keys(&routes, &store, "").await;
    let two = Gateway::start_with_keys(&routes, &store, "").await;
    let urls = (0..90)
        .map(|i| (if i % 2 == 0 { &one } else { &two }).url(&format!("/api/{i}")))
        .collect();
    let statuses = statuses_at_once(urls, "leased").await;
    let served = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(served, 60, "{statuses:?}");
    for gw in [&one, &two] {
        signal(gw.pid(), "-TERM");
    }
    // Once both have reported and stopped: the balance is spent, the
    // ledger holds all 60.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, show, err) = tollgate(&["keys", "show", "leased"], &conf);
        assert_eq!(code, 0, "{err}");
        let (_, usage, _) = tollgate(&["usage", "--key", "leased"], &conf);
        let credits = show
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(2));
        if credits == Some("0") && usage.contains("\"credits\":60") {
            break;
        }
        assert!(Instant::now() < deadline, "{show}{usage}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
