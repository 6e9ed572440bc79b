//! Credit leases (issue 19) with several real gateway processes on one real
//! Redis: exactness, nodes that stop or die, Redis that stalls, refunds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use tollgate::key::KeyHash;
use tollgate::store::Usage;

const PAYER: &str = "k_lease_payer";

/// A store on `redis` with leases; `timeout_ms` 1000, so that a loaded
/// machine does not turn a slow take into `on_error`.
fn store(redis: &RedisServer, max: u64, ttl: u64, on_error: &str) -> String {
    store_timing_out(redis, max, ttl, on_error, 1000)
}

fn store_timing_out(redis: &RedisServer, max: u64, ttl: u64, on_error: &str, ms: u64) -> String {
    format!(
        "store:\n  redis_url: {}\n  on_error: {on_error}\n  timeout_ms: {ms}\n  leases: {{max_credits: {max}, ttl_seconds: {ttl}}}\n",
        redis.url()
    )
}

fn hget(redis: &RedisServer, field: &str) -> i64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let name = format!("tollgate:key:{{{}}}", KeyHash::of(PAYER).hex());
    let v: Option<i64> = redis::cmd("HGET")
        .arg(name)
        .arg(field)
        .query(&mut c)
        .unwrap();
    v.unwrap_or(0)
}

/// The key's usage ledger today: field → value, summed over routes.
fn ledger(redis: &RedisServer) -> HashMap<String, i64> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let name = format!(
        "tollgate:usage:{{{}}}:{}",
        KeyHash::of(PAYER).hex(),
        Usage::now("").date()
    );
    let fields: HashMap<String, i64> = redis::cmd("HGETALL").arg(name).query(&mut c).unwrap();
    let mut sums = HashMap::new();
    for (field, v) in fields {
        let what = field.rsplit_once(':').unwrap().1.to_string();
        *sums.entry(what).or_insert(0) += v;
    }
    sums
}

/// Wait until every lease is back with its key (no node holds one).
async fn until_settled(redis: &RedisServer, within: Duration) {
    let start = Instant::now();
    while hget(redis, "leased") != 0 {
        assert!(
            start.elapsed() < within,
            "leases still held: {}",
            hget(redis, "leased")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn gateways(n: usize, store: &str, routes: &[String]) -> Vec<Gateway> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(Gateway::start_with_keys(routes, store, "").await);
    }
    all
}

/// A Redis with [`PAYER`] holding `credits`, and `n` gateways with leases
/// of `max` credits for `ttl` s (`on_error: deny`) on one route, `/api/`,
/// served by the returned origin.
async fn payer_on_nodes(
    credits: u64,
    n: usize,
    max: u64,
    ttl: u64,
) -> (RedisServer, Origin, Vec<Gateway>) {
    let redis = RedisServer::start();
    import_keys(
        &redis,
        &format!("keys:\n  - {{key: {PAYER}, name: p, credits: {credits}}}\n"),
    );
    let ok = Origin::json("ok", true, 0).await;
    let routes = [route("t", "/api/", &[&ok], "")];
    let nodes = gateways(n, &store(&redis, max, ttl, "deny"), &routes).await;
    (redis, ok, nodes)
}

/// The balance is spent: `node` answers 402, and once every lease is back
/// the key holds nothing.
async fn sold_out(redis: &RedisServer, node: &Gateway) {
    assert_eq!(
        get_with_key(node.url("/api/last"), PAYER).await.status(),
        402
    );
    until_settled(redis, Duration::from_secs(6)).await;
    assert_eq!(hget(redis, "credits"), 0);
}

/// 500 credits, three nodes, 120 clients at once: the answers cost exactly
/// the balance, for a route costing 1 and one costing 3; the usage ledger
/// agrees once the nodes have reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_never_overspend_and_strand_nothing() {
    for cost in [1u64, 3] {
        let redis = RedisServer::start();
        import_keys(
            &redis,
            &format!(
                "keys:\n  - {{key: {PAYER}, name: p, credits: 500, rate_per_second: 1000000}}\n"
            ),
        );
        let ok = Origin::json("ok", true, 0).await;
        let routes = [route("t", "/api/", &[&ok], &format!("cost: {cost}"))];
        let nodes = gateways(3, &store(&redis, 40, 10, "deny"), &routes).await;
        let urls: Vec<String> = (0..120 * 5)
            .map(|i| nodes[i % 3].url(&format!("/api/{i}")))
            .collect();
        let mut served = 0u64;
        for batch in urls.chunks(120) {
            let statuses = statuses_at_once(batch.to_vec(), PAYER).await;
            assert!(
                statuses.iter().all(|s| [200, 402].contains(s)),
                "{statuses:?}"
            );
            served += statuses.iter().filter(|&&s| s == 200).count() as u64;
        }
        assert_eq!(served, 500 / cost, "cost {cost}: answers sold");
        until_settled(&redis, Duration::from_secs(6)).await;
        assert_eq!(hget(&redis, "credits"), (500 % cost) as i64, "cost {cost}");
        let l = ledger(&redis);
        assert_eq!(l["credits"], i64::try_from(served * cost).unwrap(), "{l:?}");
        assert_eq!(l["requests"], i64::try_from(served).unwrap(), "{l:?}");
    }
}

/// Traffic moves from one node to another: the second gets everything the
/// first did not spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_moving_between_nodes_strands_nothing() {
    let (redis, _origin, nodes) = payer_on_nodes(100, 2, 50, 10).await;
    for i in 0..10 {
        assert_eq!(
            get_with_key(nodes[0].url(&format!("/api/{i}")), PAYER)
                .await
                .status(),
            200
        );
    }
    assert!(hget(&redis, "leased") > 0, "the first node holds a lease");
    for i in 0..90 {
        let status = get_with_key(nodes[1].url(&format!("/api/b{i}")), PAYER)
            .await
            .status();
        assert_eq!(status, 200, "request {i} on the second node");
    }
    sold_out(&redis, &nodes[1]).await;
}

/// The balance runs out while another node holds an idle lease: the
/// requests that find nothing free wait for that lease, and get it within
/// about a report (1 s) and a look (0.25 s), before the holder's idle
/// timeout (2 s) would have returned it: their take marked the key wanted,
/// and the holder ends its unused lease at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_node_gets_an_idle_lease_back_soon() {
    let (redis, _origin, nodes) = payer_on_nodes(20, 2, 50, 10).await;
    let start = Instant::now();
    let first = get_with_key(nodes[0].url("/api/a"), PAYER).await;
    assert_eq!(first.status(), 200);
    let held = hget(&redis, "leased");
    assert!(held > 1, "the first node holds more than it spent: {held}");
    let urls = (0..19)
        .map(|i| nodes[1].url(&format!("/api/b{i}")))
        .collect();
    let statuses = statuses_at_once(urls, PAYER).await;
    let took = start.elapsed();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert!(
        took < Duration::from_millis(1700),
        "the second node's requests waited until {took:?} for the first node's lease"
    );
    sold_out(&redis, &nodes[1]).await;
}

/// A node stopped (SIGTERM) gives its unspent credits back; one killed
/// (SIGKILL) loses them only until `ttl_seconds` pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_nodes_give_back_and_dead_ones_expire() {
    let (redis, origin, nodes) = payer_on_nodes(1000, 2, 100, 5).await;
    for i in 0..5 {
        assert_eq!(
            get_with_key(nodes[0].url(&format!("/api/{i}")), PAYER)
                .await
                .status(),
            200
        );
        assert_eq!(
            get_with_key(nodes[1].url(&format!("/api/{i}")), PAYER)
                .await
                .status(),
            200
        );
    }
    assert_eq!(leases_held(&redis), 2);
    // SIGTERM: a graceful stop ends the node's lease at once.
    signal(nodes[0].pid(), "-TERM");
    let start = Instant::now();
    while leases_held(&redis) != 1 {
        // Sooner than the other, idle node ends its own (IDLE, 2 s after its
        // last request).
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "the stopped node kept its lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "the stopped node gave its lease back after {:?}",
        start.elapsed()
    );
    // SIGKILL: the other's lease stays until its TTL (5 s), then goes back
    // to the key at the next script on it (a third node's requests).
    signal(nodes[1].pid(), "-KILL");
    let killed = Instant::now();
    let routes = [route("t", "/api/", &[&origin], "")];
    let third = Gateway::start_with_keys(&routes, &store(&redis, 1, 5, "deny"), "").await;
    loop {
        assert_eq!(
            get_with_key(third.url("/api/touch"), PAYER).await.status(),
            200
        );
        // Only the third node's own lease is left.
        if leases_held(&redis) == 1 && hget(&redis, "leased") <= 1 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(12),
            "the dead node's lease stayed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let back = killed.elapsed();
    assert!(
        back >= Duration::from_secs(4),
        "taken back before its TTL: {back:?}"
    );
    eprintln!("the dead node's lease went back {back:?} after the kill");
    // Whatever the dead node had not reported is forgiven, never lost to
    // the key: the balance is at least 1000 less what was served.
    let served = 10 + third_served(&third).await;
    let credits = hget(&redis, "credits") + hget(&redis, "leased");
    assert!(
        credits >= 1000 - served && credits <= 1000 - 5,
        "{credits}, {served} served"
    );
}

/// How many answers a node served (its request counter).
async fn third_served(gw: &Gateway) -> i64 {
    sample(
        &gw.metrics().await,
        "tollgate_requests_total{route=\"t\",status=\"200\"}",
    ) as i64
}

/// How many nodes hold a lease of the key.
fn leases_held(redis: &RedisServer) -> i64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let name = format!("tollgate:key:{{{}}}:leases", KeyHash::of(PAYER).hex());
    redis::cmd("HLEN").arg(name).query(&mut c).unwrap()
}

/// Redis stalls: a node keeps serving from the lease it holds; when it runs
/// out, `on_error` applies. After Redis is back the ledger never holds more
/// than was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_is_served_from_leases_then_on_error() {
    let redis = RedisServer::start();
    let (gw, _origin) = one_node_holding_a_lease(&redis).await;
    redis.pause();
    let served_stalled = served_from_the_lease_then_503(&gw).await;
    let m = gw.metrics().await;
    assert!(
        sample(&m, "tollgate_lease_requests_total{outcome=\"error\"}") >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, "tollgate_lease_requests_total{outcome=\"granted\"}") >= 1.0,
        "{m}"
    );
    redis.resume();
    drop(gw);
    // The killed gateway could not give back; its reports before that
    // settle the rest once its TTL passes: check what it reported.
    let served = 1 + served_stalled as i64;
    let reported = ledger(&redis).get("credits").copied().unwrap_or(0);
    assert!(reported <= served, "{reported} > {served}");
}

/// A gateway with leases of 20 credits that has served one request of
/// [`PAYER`] and had time to take its lease to size.
async fn one_node_holding_a_lease(redis: &RedisServer) -> (Gateway, Origin) {
    import_keys(
        redis,
        &format!("keys:\n  - {{key: {PAYER}, name: p, credits: 1000, rate_per_second: 100000}}\n"),
    );
    let ok = Origin::json("ok", true, 0).await;
    let routes = [route("t", "/api/", &[&ok], "")];
    // A stalled Redis costs each request `timeout_ms`: keep it short.
    let store = store_timing_out(redis, 20, 30, "deny", 300);
    let gw = Gateway::start_with_keys(&routes, &store, "").await;
    assert_eq!(get_with_key(gw.url("/api/0"), PAYER).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    (gw, ok)
}

/// With Redis out of reach: 40 requests, served from the lease (at most
/// what two leases hold), then 503 (`on_error: deny`) once it is spent. A
/// take sent ahead of need just before Redis went away may still land, so a
/// 200 may follow a 503; the last ten are 503. Returns the 200s.
async fn served_from_the_lease_then_503(gw: &Gateway) -> usize {
    let mut statuses = Vec::new();
    for i in 0..40 {
        statuses.push(
            get_with_key(gw.url(&format!("/api/s{i}")), PAYER)
                .await
                .status()
                .as_u16(),
        );
    }
    let served = statuses.iter().filter(|&&s| s == 200).count();
    assert!(served > 0, "nothing served from the lease: {statuses:?}");
    assert!(
        statuses.contains(&503),
        "the lease never ran out: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| [200, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(
        statuses[statuses.len() - 10..].iter().all(|&s| s == 503),
        "{statuses:?}"
    );
    assert!(served <= 2 * 20, "more than the leases held: {statuses:?}");
    served
}

/// A refund goes back into the lease: the balance and the ledger end exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_go_back_into_the_lease() {
    let redis = RedisServer::start();
    import_keys(
        &redis,
        &format!("keys:\n  - {{key: {PAYER}, name: p, credits: 100}}\n"),
    );
    let ok = Origin::json("ok", true, 0).await;
    let broken = Origin::status(500, 0).await;
    let routes = [
        route("t", "/api/", &[&ok], ""),
        route("b", "/broken/", &[&broken], "cost: 5"),
    ];
    let gw = Gateway::start_with_keys(&routes, &store(&redis, 50, 10, "deny"), "").await;
    let first = get_with_key(gw.url("/api/1"), PAYER).await;
    assert_eq!(first.status(), 200);
    let before: u64 = first.headers()["x-credits-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let failed = get_with_key(gw.url("/broken/1"), PAYER).await;
    assert_eq!(failed.status(), 502);
    assert_eq!(failed.headers()["x-credits-cost"], "0");
    let after = get_with_key(gw.url("/api/2"), PAYER).await;
    let remaining: u64 = after.headers()["x-credits-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, before - 1, "the refund came back into the lease");
    // The node shows what it holds once its keeper has looked (each second).
    wait_until("the lease gauge", Duration::from_secs(3), || {
        let m = futures::executor::block_on(gw.metrics());
        sample(&m, "tollgate_lease_credits") > 0.0
    })
    .await;
    signal(gw.pid(), "-TERM");
    until_settled(&redis, Duration::from_secs(6)).await;
    assert_eq!(hget(&redis, "credits"), 98);
    let l = ledger(&redis);
    assert_eq!(
        (l["credits"], l["refunded"], l["requests"]),
        (2, 5, 2),
        "{l:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_need_redis_and_bounded_values() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("t.yaml");
    for (store, says) in [
        (
            "{keys_file: k.yaml, leases: {max_credits: 10, ttl_seconds: 30}}",
            "store.leases: only with a Redis store",
        ),
        (
            "{redis_url: \"redis://127.0.0.1:1\", leases: {max_credits: 0, ttl_seconds: 30}}",
            "store.leases.max_credits: must be at least 1",
        ),
        (
            "{redis_url: \"redis://127.0.0.1:1\", leases: {max_credits: 10, ttl_seconds: 4}}",
            "store.leases.ttl_seconds: must be at least 5",
        ),
        (
            "{redis_url: \"redis://127.0.0.1:1\", leases: {max_credits: 10, ttl_seconds: 3601}}",
            "store.leases.ttl_seconds: must be at most 3600",
        ),
        (
            "{redis_url: \"redis://127.0.0.1:1\", leases: {max_credits: 10}}",
            "ttl_seconds",
        ),
    ] {
        std::fs::write(&conf, format!("store: {store}\nroutes:\n  - {{name: t, prefix: /, backends: [\"http://127.0.0.1:1\"]}}\n")).unwrap();
        let (code, out, err) = tollgate(&["check"], &conf);
        assert_eq!(code, 1, "{store}");
        assert!(format!("{out}{err}").contains(says), "{says}: {out}{err}");
    }
}

/// With leases: a top-up shows in `X-Credits-Remaining` and a revocation
/// refuses the key within about a second; a refill is applied when a lease
/// is taken; `X-Credits-Remaining` is never above the balance in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_show_and_refills_apply_with_leases() {
    let redis = RedisServer::start();
    import_keys(
        &redis,
        &format!(
            "keys:\n  - {{key: {PAYER}, name: p, credits: 100}}\n  - {{key: k_plan, name: plan, credits: 0, refill: {{credits: 30, period: daily}}}}\n"
        ),
    );
    let ok = Origin::json("ok", true, 0).await;
    let routes = [route("t", "/api/", &[&ok], "")];
    let gw = Gateway::start_with_keys(&routes, &store(&redis, 10, 10, "deny"), "").await;
    let remaining = |r: &reqwest::Response| -> i64 {
        r.headers()["x-credits-remaining"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let first = get_with_key(gw.url("/api/0"), PAYER).await;
    assert_eq!(remaining(&first), 99);
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf(dir.path(), &redis);
    let (code, _, err) = tollgate(&["keys", "topup", PAYER, "--credits", "1000"], &conf);
    assert_eq!(code, 0, "{err}");
    let start = Instant::now();
    loop {
        let r = get_with_key(gw.url("/api/t"), PAYER).await;
        assert_eq!(r.status(), 200);
        let shown = remaining(&r);
        assert!(
            shown <= hget(&redis, "credits"),
            "{shown} above the balance in Redis"
        );
        if shown > 1000 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_millis(2500),
            "the top-up never showed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("top-up seen after {:?}", start.elapsed());
    let (code, _, _) = tollgate(&["keys", "revoke", PAYER], &conf);
    assert_eq!(code, 0);
    let start = Instant::now();
    while get_with_key(gw.url("/api/r"), PAYER).await.status() != 403 {
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "still served after revocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new period for the refill key: its lease is taken after the refill.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let plan = format!("tollgate:key:{{{}}}", KeyHash::of("k_plan").hex());
    let _: () = redis::cmd("HSET")
        .arg(&plan)
        .arg("refilled_for")
        .arg("2000-01-01")
        .query(&mut c)
        .unwrap();
    let r = get_with_key(gw.url("/api/p"), "k_plan").await;
    assert_eq!(r.status(), 200);
    assert_eq!(remaining(&r), 29);
}

/// Redis killed (connections refused at once): a node serves from the
/// lease it holds, then `on_error` (deny: 503) once it is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_is_served_from_leases_then_on_error() {
    let mut redis = RedisServer::start();
    let (gw, _origin) = one_node_holding_a_lease(&redis).await;
    redis.stop();
    served_from_the_lease_then_503(&gw).await;
}

/// With leases: a change of `rate_per_second`, `expires_at` or `routes`
/// shows on a node holding a lease of the key within about a second (the
/// key's metadata is read as without leases; the lease does not keep it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_expiry_and_route_changes_show_with_leases() {
    let redis = RedisServer::start();
    import_keys(
        &redis,
        &format!("keys:\n  - {{key: {PAYER}, name: p, credits: 1000}}\n"),
    );
    let ok = Origin::json("ok", true, 0).await;
    let routes = [
        route("t", "/api/", &[&ok], ""),
        route("u", "/other/", &[&ok], ""),
    ];
    let gw = Gateway::start_with_keys(&routes, &store(&redis, 100, 10, "deny"), "").await;
    assert_eq!(get_with_key(gw.url("/api/0"), PAYER).await.status(), 200);
    assert!(hget(&redis, "leased") > 0, "the node holds a lease");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("keys-cli.yaml");
    std::fs::write(
        &conf,
        format!(
            "store:\n  redis_url: {}\nroutes:\n  - {{name: t, prefix: /api/, backends: [\"http://127.0.0.1:1\"]}}\n  - {{name: u, prefix: /other/, backends: [\"http://127.0.0.1:1\"]}}\n",
            redis.url()
        ),
    )
    .unwrap();
    // Each change, then the status it must bring within 1.5 s.
    for (flag, value, status) in [
        ("--routes", "u", 403),
        ("--routes", "all", 200),
        ("--rate", "1", 429),
        ("--rate", "default", 200),
        ("--expires", "2001-01-01T00:00:00Z", 401),
    ] {
        let (code, _, err) = tollgate(&["keys", "update", PAYER, flag, value], &conf);
        assert_eq!(code, 0, "{flag} {value}: {err}");
        let start = Instant::now();
        loop {
            // Two at once, so that a rate of 1 per second shows.
            let urls = (0..2).map(|i| gw.url(&format!("/api/{i}"))).collect();
            let statuses = statuses_at_once(urls, PAYER).await;
            if statuses.contains(&status) && (status != 200 || statuses == [200, 200]) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_millis(1500),
                "{flag} {value}: still {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One node cut off from Redis while another still reaches it, for longer
/// than `ttl_seconds`: the cut-off node serves from its lease only until
/// `MARGIN` before Redis may take it back (then `on_error`), Redis takes
/// the lease back at its expiry and lets the other node spend it, and the
/// cut-off node's late report bills every answer it gave. So the billing
/// stays exact, and the key's balance ends below zero by at most what
/// that node spent unreported (within its lease): the one case where
/// leases can overspend, documented in the README.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_past_the_ttl_is_billed_late_within_its_lease() {
    let redis = RedisServer::start();
    import_keys(
        &redis,
        &format!("keys:\n  - {{key: {PAYER}, name: p, credits: 100, rate_per_second: 100000}}\n"),
    );
    let relay = common::relay::Relay::start(redis.port).await;
    let ok = Origin::json("ok", true, 0).await;
    let routes = [route("t", "/api/", &[&ok], "")];
    let cut_off_store = format!(
        "store:\n  redis_url: {}\n  on_error: deny\n  timeout_ms: 300\n  leases: {{max_credits: 40, ttl_seconds: 5}}\n",
        relay.url()
    );
    let a = Gateway::start_with_keys(&routes, &cut_off_store, "").await;
    let b = Gateway::start_with_keys(&routes, &store(&redis, 40, 5, "deny"), "").await;
    assert_eq!(get_with_key(a.url("/api/a0"), PAYER).await.status(), 200);
    let lease = hget(&redis, "leased");
    assert!(lease > 10, "the first node holds a lease: {lease}");

    relay.cut();
    let cut = Instant::now();
    let mut served_a = 1;
    for i in 1..=10 {
        let status = get_with_key(a.url(&format!("/api/a{i}")), PAYER)
            .await
            .status();
        assert_eq!(status, 200, "served from the lease while cut off");
        served_a += 1;
    }
    // The other node spends what is free, then what Redis takes back from
    // the silent node's lease once it expires.
    let mut served_b = 0;
    while served_b + served_a < 100 + lease {
        let status = get_with_key(b.url(&format!("/api/b{served_b}")), PAYER)
            .await
            .status();
        if status == 200 {
            served_b += 1;
        } else {
            assert_eq!(status, 402);
            if hget(&redis, "leased") == 0 && cut.elapsed() > Duration::from_secs(6) {
                break; // nothing left to take back
            }
        }
        assert!(cut.elapsed() < Duration::from_secs(20), "served {served_b}");
    }
    assert!(cut.elapsed() > Duration::from_secs(3));
    // Past MARGIN before the lease's expiry, the cut-off node stops.
    assert_eq!(get_with_key(a.url("/api/late"), PAYER).await.status(), 503);

    relay.heal();
    let total = served_a + served_b;
    let start = Instant::now();
    while hget(&redis, "credits") != 100 - total {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "late report not billed: credits {} after {total} answers",
            hget(&redis, "credits")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let over = total - 100;
    eprintln!("cut off: {served_a} answers from the lease, {served_b} on the other node, {over} over the balance (lease {lease})");
    assert!(
        over <= lease,
        "overspent {over}, beyond the lease of {lease}"
    );
    assert!(
        over <= served_a,
        "overspent {over}, beyond the cut-off node's {served_a}"
    );
    until_settled(&redis, Duration::from_secs(6)).await;
    assert_eq!(ledger(&redis)["requests"], total);
}

/// A report whose answer was lost (Redis stalled past `timeout_ms`, then
/// ran every copy it had been sent when it woke) is applied once: after the
/// node gives its lease back, the balance and the ledger hold exactly what
/// was served. (Sent again as a new report, each copy charged its spending:
/// 25 credits for 7 answers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_sent_again_after_a_stall_is_applied_once() {
    let redis = RedisServer::start();
    let (gw, _origin) = one_node_holding_a_lease(&redis).await;
    // Right after a report, so that the next one carries what follows.
    let start = Instant::now();
    while ledger(&redis).get("requests") != Some(&1) {
        assert!(start.elapsed() < Duration::from_secs(3), "no report");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..5 {
        let status = get_with_key(gw.url(&format!("/api/r{i}")), PAYER)
            .await
            .status();
        assert_eq!(status, 200);
    }
    // Spent from the lease and not reported yet: the reports meet the stall.
    redis.pause();
    let unanswered = "got no answer, sent again as it is";
    let start = Instant::now();
    while gw.logs().matches(unanswered).count() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "no report sent again: {}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.resume();
    signal(gw.pid(), "-TERM");
    until_settled(&redis, Duration::from_secs(6)).await;
    let served = 6;
    assert_eq!(hget(&redis, "credits"), 1000 - served, "{}", gw.logs());
    let ledger = ledger(&redis);
    assert_eq!(ledger.get("requests"), Some(&served), "{ledger:?}");
    assert_eq!(ledger.get("credits"), Some(&served), "{ledger:?}");
}

/// Redis stalls: past the second for which a key's metadata is cached, a
/// lookup that Redis does not answer falls back to the copy the node holds
/// within the request's store budget, so the lease keeps paying and nothing
/// it can pay is refused. (Waiting the whole budget for Redis, each request
/// that came to read the metadata again was a 503.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_refuses_nothing_the_lease_can_pay() {
    let redis = RedisServer::start();
    let (gw, _origin) = one_node_holding_a_lease(&redis).await;
    redis.pause();
    let start = Instant::now();
    let mut statuses = Vec::new();
    // Twelve requests over about two seconds: the metadata's second passes.
    for i in 0..12 {
        let status = get_with_key(gw.url(&format!("/api/p{i}")), PAYER)
            .await
            .status();
        statuses.push(status.as_u16());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let took = start.elapsed();
    redis.resume();
    assert!(took > Duration::from_millis(1500), "{took:?}");
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
}
