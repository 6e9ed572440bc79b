//! Money stays exact at the edges: an answer that is not one whole JSON
//! document never wins (so it is neither charged nor cached), a Redis that
//! stalls mid-charge gets back exactly what the answers said was not charged,
//! and a Redis that lost its data is an unavailable store, not a reason to
//! refuse every customer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const CACHED: &str = "cache: {ttl_seconds: 60, stale_if_error_seconds: 0, max_body_bytes: 4096}";

/// A route whose only backend answers 200 with `body`.
async fn only(body: &'static str) -> Origin {
    Origin::start(move |_| Reply::json(200, body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_ambiguous_json_answer_never_wins_nor_is_cached() {
    let bad_bodies = [
        // Cut off after the member: a close-delimited answer whose backend crashed.
        r#"{"status": true, "data": [1,2,"#,
        // Bytes after the object.
        r#"{"status": true, "data": [1, 2]} trailing"#,
        // Two top-level members.
        r#"{"status": true, "data": [], "status": false}"#,
    ];
    for bad in bad_bodies {
        let broken = only(bad).await;
        let good = Origin::json("good", true, 150).await;
        let alone = only(bad).await;
        let gw = Gateway::start(
            &[
                route("both", "/both/", &[&broken, &good], CACHED),
                route("alone", "/alone/", &[&alone], CACHED),
            ],
            "",
        )
        .await;
        // The fast broken answer loses to the slower whole one, which is cached.
        for x_cache in ["MISS", "HIT"] {
            let resp = client().get(gw.url("/both/x")).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{bad}");
            assert_eq!(resp.headers()["x-cache"], x_cache, "{bad}");
            let text = resp.text().await.unwrap();
            let body: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{bad}: served {text:?} ({e})"));
            assert_eq!(body["from"], "good", "{bad}");
        }
        // Alone, it is "no data": not charged, not cached, asked again.
        for n in 1..=2 {
            let resp = client().get(gw.url("/alone/x")).send().await.unwrap();
            assert_eq!(resp.status(), 404, "{bad}");
            assert_eq!(resp.headers()["x-credits-cost"], "0", "{bad}");
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["error"], "no_data", "{bad}");
            assert_eq!(alone.hits(), n, "{bad}");
        }
    }
}

const PAYER: &str =
    "keys:\n  - {key: \"payer\", name: payer, credits: 100000, rate_per_second: 1000000}\n";

fn redis_store(redis: &RedisServer, on_error: &str) -> String {
    format!(
        "store:\n  redis_url: {}\n  timeout_ms: 200\n  on_error: {on_error}\n",
        redis.url()
    )
}

/// `payer`'s balance, read from Redis itself.
async fn balance(redis: &RedisServer) -> i64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!(
        "tollgate:key:{{{}}}",
        tollgate::key::KeyHash::of("payer").hex()
    );
    redis::cmd("HGET")
        .arg(key)
        .arg("credits")
        .query_async(&mut c)
        .await
        .unwrap()
}

/// The usage ledger's row of key `payer` on route `t` today: (requests,
/// credits, refunded).
async fn ledger(redis: &RedisServer) -> (i64, i64, i64) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!(
        "tollgate:usage:{{{}}}:{}",
        tollgate::key::KeyHash::of("payer").hex(),
        tollgate::store::Usage::now("").date()
    );
    let fields: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    let get = |f: &str| fields.get(&format!("t:{f}")).copied().unwrap_or(0);
    (get("requests"), get("credits"), get("refunded"))
}

/// Answers seen by the load: (status, X-Credits-Cost), in order.
type Seen = Arc<Mutex<Vec<(u16, u64)>>>;

fn load(
    gw: &Gateway,
    clients: usize,
    stop: &Arc<AtomicBool>,
    seen: &Seen,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|i| {
            let (url, stop, seen) = (gw.url(&format!("/api/{i}")), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !stop.load(Ordering::Relaxed) {
                    let resp = client.get(&url).header("X-API-Key", "payer").send().await;
                    // Every request must get an answer: one that did not
                    // would leave its charge unknown to the test.
                    let resp = resp.expect("the gateway answers every request");
                    let cost = resp
                        .headers()
                        .get("x-credits-cost")
                        .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
                    seen.lock().unwrap().push((resp.status().as_u16(), cost));
                }
            })
        })
        .collect()
}

/// Redis is stalled (SIGSTOP) under load and let go again: charges the
/// gateway gave up on still run when it wakes, and are given back; the final
/// balance is the start minus what the answers said they cost.
async fn a_stalled_redis_takes_exactly_what_the_answers_said(on_error: &str) {
    let redis = RedisServer::start();
    import_keys(&redis, PAYER);
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(
        &[route("t", "/api/", &[&ok], "")],
        &redis_store(&redis, on_error),
        "",
    )
    .await;
    let start = balance(&redis).await;
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Seen = Arc::default();
    let traffic = load(&gw, 8, &stop, &seen);
    let charged_since = |n: usize| {
        seen.lock().unwrap()[n..]
            .iter()
            .any(|&(s, c)| s == 200 && c == 1)
    };
    let series = "tollgate_store_errors_total{op=\"charge\"}";
    // A charge times out only while the key's metadata is still cached (1 s):
    // stall again until some did.
    for _ in 0..5 {
        wait_until("charged answers", Duration::from_secs(10), || {
            charged_since(0)
        })
        .await;
        let before = sample(&gw.metrics().await, series);
        redis.pause();
        let stalled_at = Instant::now();
        // Until charges time out, or the metadata expired and lookups do.
        loop {
            let m = gw.metrics().await;
            if sample(&m, series) > before || stalled_at.elapsed() > Duration::from_millis(1_500) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        redis.resume();
        let n = seen.lock().unwrap().len();
        wait_until(
            "charged answers after the stall",
            Duration::from_secs(10),
            || charged_since(n),
        )
        .await;
        if sample(&gw.metrics().await, series) > 0.0 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    let m = gw.metrics().await;
    assert!(sample(&m, series) > 0.0, "no charge timed out:\n{m}");
    let seen = seen.lock().unwrap().clone();
    let paid: u64 = seen.iter().map(|&(_, c)| c).sum();
    let statuses: std::collections::BTreeSet<u16> = seen.iter().map(|&(s, _)| s).collect();
    let allowed: &[u16] = if on_error == "deny" {
        &[200, 503]
    } else {
        &[200]
    };
    assert!(statuses.iter().all(|s| allowed.contains(s)), "{statuses:?}");
    let uncharged = seen.iter().filter(|&&(_, c)| c == 0).count();
    assert!(uncharged > 0, "nothing was answered as uncharged");
    let expected = start - i64::try_from(paid).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (now, m) = (balance(&redis).await, gw.metrics().await);
        let unsettled = sample(&m, "tollgate_store_unsettled");
        if now == expected && unsettled == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "balance {now}, expected {expected} ({} answers, {paid} charged, {uncharged} not); {unsettled} unsettled",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The usage ledger agrees: a charge given back after the stall came off
    // its row too.
    let charged_answers = seen.iter().filter(|&&(s, c)| s == 200 && c == 1).count();
    let (requests, credits, refunded) = ledger(&redis).await;
    assert_eq!(
        (requests, credits, refunded),
        (
            i64::try_from(charged_answers).unwrap(),
            i64::try_from(paid).unwrap(),
            0
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_redis_takes_exactly_what_the_answers_said_deny() {
    a_stalled_redis_takes_exactly_what_the_answers_said("deny").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_redis_takes_exactly_what_the_answers_said_allow() {
    a_stalled_redis_takes_exactly_what_the_answers_said("allow").await;
}

/// With `allow`, a stalled Redis holds a request for one `timeout_ms` in
/// all, not one per store call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_holds_a_request_for_one_timeout() {
    let redis = RedisServer::start();
    import_keys(&redis, PAYER);
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(
        &[route("t", "/api/", &[&ok], "")],
        &format!(
            "store:\n  redis_url: {}\n  timeout_ms: 600\n  on_error: allow\n",
            redis.url()
        ),
        "",
    )
    .await;
    // One client, made before the clock starts (making one reads the
    // system's root certificates, which takes a while on a busy machine).
    let client = reqwest::Client::new();
    let get = || {
        client
            .get(gw.url("/api/x"))
            .header("X-API-Key", "payer")
            .send()
    };
    assert_eq!(get().await.unwrap().headers()["x-credits-cost"], "1");
    // Let the key's metadata expire, so that the lookup is a Redis call too.
    tokio::time::sleep(tollgate::store::redis::META_TTL + Duration::from_millis(100)).await;
    redis.pause();
    let started = Instant::now();
    let resp = get().await.unwrap();
    let took = started.elapsed();
    redis.resume();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-credits-cost"], "0");
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(1_000),
        "took {took:?}"
    );
}

/// `payer`'s answer: status, error code, X-Credits-Cost.
async fn pay(gw: &Gateway) -> (u16, String, Option<String>) {
    let resp = get_with_key(gw.url("/api/x"), "payer").await;
    let status = resp.status().as_u16();
    let cost = resp
        .headers()
        .get("x-credits-cost")
        .map(|v| v.to_str().unwrap().to_string());
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let error = body["error"].as_str().unwrap_or("").to_string();
    (status, error, cost)
}

/// Redis restarts empty (no persistence): customers are not told their keys
/// are invalid; the store is unavailable (`on_error` decides), counted, and
/// `keys import` will not quietly reset balances into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_lost_its_data_is_unavailable_not_401() {
    for on_error in ["deny", "allow"] {
        let mut redis = RedisServer::start();
        import_keys(&redis, PAYER);
        let ok = Origin::json("ok", true, 0).await;
        // With the key unknown, its own rate is too: the default applies,
        // and this test sends more than 50 a second.
        let top = format!(
            "{}rate_limit:\n  per_second: 1000000\n",
            redis_store(&redis, on_error)
        );
        let gw = Gateway::start_with_keys(&[route("t", "/api/", &[&ok], "")], &top, "").await;
        assert_eq!(pay(&gw).await.0, 200);
        // An unknown key in a store that is set up is still 401.
        let resp = get_with_key(gw.url("/api/x"), "nobody").await;
        assert_eq!(resp.status(), 401);

        let port = redis.port;
        redis.stop();
        let redis = RedisServer::start_on(port);
        let want = if on_error == "deny" {
            (503, "store_unavailable".to_string(), None)
        } else {
            (200, String::new(), Some("0".to_string()))
        };
        // From the first answer on (the key's metadata still cached, or
        // not), never a 401; the periodic look counts the missing marker.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = pay(&gw).await;
            assert_ne!(got.0, 401, "{on_error}: {got:?}");
            let m = gw.metrics().await;
            let looks = sample(&m, "tollgate_store_errors_total{op=\"setup\"}");
            if got == want && looks >= 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "{on_error}: {got:?}\n{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for _ in 0..20 {
            assert_eq!(pay(&gw).await, want, "{on_error}");
        }
        let m = gw.metrics().await;
        assert!(
            sample(&m, "tollgate_store_errors_total{op=\"lookup\"}") >= 1.0,
            "{m}"
        );

        // Importing into it needs --init, and says why.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.yaml");
        std::fs::write(&file, PAYER).unwrap();
        let conf = keys_conf(dir.path(), &redis);
        let (code, _, err) = tollgate(&["keys", "import", file.to_str().unwrap()], &conf);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("lost its data") && err.contains("--init"),
            "{err}"
        );
        let dump = redis.dump().await;
        assert!(
            dump.iter().all(|(k, _)| k.contains(":op:")),
            "a refused import wrote: {dump:?}"
        );
        import_keys(&redis, PAYER);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pay(&gw).await.0 != 200 || pay(&gw).await.2.as_deref() != Some("1") {
            assert!(
                Instant::now() < deadline,
                "{on_error}: {:?}",
                pay(&gw).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A store set up before the marker existed (keys, no marker) keeps working,
/// and gets its marker from the first key the gateway finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_keys_but_no_marker_is_adopted() {
    let redis = RedisServer::start();
    import_keys(&redis, PAYER);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let exists = |c: &mut redis::aio::MultiplexedConnection| {
        let mut c = c.clone();
        async move {
            redis::cmd("EXISTS")
                .arg("tollgate:store")
                .query_async::<bool>(&mut c)
                .await
                .unwrap()
        }
    };
    assert!(exists(&mut c).await, "import wrote no marker");
    let () = redis::cmd("DEL")
        .arg("tollgate:store")
        .query_async(&mut c)
        .await
        .unwrap();
    // `keys import` sees the keys: no --init needed.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    std::fs::write(&file, PAYER).unwrap();
    let conf = keys_conf(dir.path(), &redis);
    let (code, out, err) = tollgate(&["keys", "import", file.to_str().unwrap()], &conf);
    assert_eq!(code, 0, "{out}{err}");
    assert!(exists(&mut c).await);
    let () = redis::cmd("DEL")
        .arg("tollgate:store")
        .query_async(&mut c)
        .await
        .unwrap();

    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start_with_keys(
        &[route("t", "/api/", &[&ok], "")],
        &redis_store(&redis, "deny"),
        "",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert_eq!(pay(&gw).await.0, 200);
        if exists(&mut c).await {
            break;
        }
        assert!(Instant::now() < deadline, "no marker written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A refund sent while Redis stalls is applied when it wakes, once, however
/// often it was sent meanwhile; the failure answer said it cost nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_that_timed_out_is_applied_once() {
    let redis = RedisServer::start();
    import_keys(&redis, PAYER);
    let broken = Origin::start(|_| {
        Reply::json(500, r#"{"status": false}"#).after(Duration::from_millis(700))
    })
    .await;
    let gw = Gateway::start_with_keys(
        &[route("t", "/api/", &[&broken], "")],
        &redis_store(&redis, "deny"),
        "",
    )
    .await;
    let start = balance(&redis).await;
    // Once without a stall, so that Redis knows the refund script: a stalled
    // EVALSHA of an unknown script would fail (NOSCRIPT) rather than run.
    assert_eq!(pay_owned(gw.url("/api/x")).await, (502, Some("0".into())));
    assert_eq!(balance(&redis).await, start);
    let request = tokio::spawn(pay_owned(gw.url("/api/x")));
    // Charged, and waiting for the backend: stall Redis before the refund.
    wait_until("the backend to be asked", Duration::from_secs(5), || {
        broken.hits() == 2
    })
    .await;
    redis.pause();
    let (status, cost) = request.await.unwrap();
    // Retries of the refund pile up behind the stall.
    let m = gw.metrics().await;
    assert!(sample(&m, "tollgate_store_unsettled") >= 1.0, "{m}");
    redis.resume();
    assert_eq!((status, cost.as_deref()), (502, Some("0")));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let unsettled = sample(&gw.metrics().await, "tollgate_store_unsettled");
        let now = balance(&redis).await;
        if unsettled == 0.0 {
            assert_eq!(now, start, "refunded more or less than once");
            // Two requests charged and refunded: nothing delivered.
            assert_eq!(ledger(&redis).await, (0, 0, 2));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "balance {now}, {unsettled} unsettled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn pay_owned(url: String) -> (u16, Option<String>) {
    let resp = get_with_key(url, "payer").await;
    let cost = resp
        .headers()
        .get("x-credits-cost")
        .map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), cost)
}
