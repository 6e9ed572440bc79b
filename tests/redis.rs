//! The Redis store with a real `redis-server`: several gateways sharing
//! balances exactly, no plaintext key in Redis, the `keys` command end to end,
//! and Redis outages (deny / allow) with recovery.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const KEYS: &str = "keys:
  - {key: \"plain-secret-one\", name: one, credits: 60, rate_per_second: 100000}
  - {key: \"plain-secret-two\", name: two, credits: 1000, rate_per_second: 100000}
";

fn redis_top(redis: &RedisServer, extra: &str) -> String {
    format!(
        "store:\n  redis_url: {}\n  timeout_ms: 200\n{extra}",
        redis.url()
    )
}

/// A gateway on `redis` with one route to `origin`; keys live in Redis.
async fn redis_gateway(redis: &RedisServer, origin: &Origin, extra: &str) -> Gateway {
    Gateway::start_with_keys(
        &[route("t", "/api/", &[origin], "")],
        &redis_top(redis, extra),
        "",
    )
    .await
}

async fn status_of(gw: &Gateway, key: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let resp = get_with_key(gw.url("/api/x"), key).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_redis_never_overspend() {
    let redis = RedisServer::start();
    import_keys(&redis, KEYS);
    let ok = Origin::json("ok", true, 2).await;
    let routes = [route("t", "/api/", &[&ok], "")];
    let a = Gateway::start_with_keys(&routes, &redis_top(&redis, ""), "").await;
    let b = Gateway::start_with_keys(&routes, &redis_top(&redis, ""), "").await;
    // Half to each gateway, all at once.
    let urls = (0..120)
        .map(|i| if i % 2 == 0 { &a } else { &b }.url(&format!("/api/{i}")))
        .collect();
    let statuses = statuses_at_once(urls, "plain-secret-one").await;
    let served = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 402).count();
    assert_eq!((served, refused), (60, 60), "{statuses:?}");
    assert_eq!(ok.hits(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_never_holds_a_plaintext_key() {
    let redis = RedisServer::start();
    import_keys(&redis, KEYS);
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf(dir.path(), &redis);
    let (code, out, _) = tollgate(
        &["keys", "create", "--name", "new", "--credits", "5"],
        &conf,
    );
    assert_eq!(code, 0);
    let created = out.lines().next().unwrap().to_string();
    let ok = Origin::json("ok", true, 0).await;
    let gw = redis_gateway(&redis, &ok, "").await;
    assert_eq!(status_of(&gw, &created).await.0, 200);
    assert_eq!(status_of(&gw, "plain-secret-two").await.0, 200);

    let dump = redis.dump().await;
    // Three keys, the store marker, the markers of the two charges, and
    // the two keys' usage ledger rows for today.
    let keys = dump
        .iter()
        .filter(|(name, _)| {
            !name.contains(":op:") && !name.contains(":usage:") && name != "tollgate:store"
        })
        .count();
    let usage = dump
        .iter()
        .filter(|(name, _)| name.contains(":usage:"))
        .count();
    assert_eq!((dump.len(), keys, usage), (8, 3, 2), "{dump:?}");
    for (name, values) in &dump {
        assert!(name.starts_with("tollgate:"), "{name}");
        for secret in ["plain-secret-one", "plain-secret-two", created.as_str()] {
            assert!(!name.contains(secret), "{name}");
            assert!(
                values.iter().all(|v| !v.contains(secret)),
                "{name}: {values:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_command_end_to_end_on_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf(dir.path(), &redis);

    let (code, out, err) = tollgate(
        &[
            "keys",
            "create",
            "--name",
            "acme",
            "--credits",
            "2",
            "--rate",
            "20",
        ],
        &conf,
    );
    assert_eq!(code, 0, "{err}");
    let key = out.lines().next().unwrap().to_string();
    assert!(key.starts_with("tg_") && key.len() >= 3 + 32, "{out}");
    let id = tollgate::key::KeyHash::of(&key).id();
    // `-c` before the subcommand works too.
    let out = std::process::Command::new(tollgate_bin())
        .arg("-c")
        .arg(&conf)
        .args(["keys", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        list.contains(&id) && list.contains("acme") && list.contains("active"),
        "{list}"
    );
    assert!(!list.contains(&key), "list printed the key");
    for arg in [id.as_str(), key.as_str()] {
        let (code, show, _) = tollgate(&["keys", "show", arg], &conf);
        assert_eq!(code, 0);
        assert!(
            show.contains(&id) && show.contains(" 2 ") && show.contains("20"),
            "{show}"
        );
        assert!(!show.contains(&key), "show printed the key");
    }

    let ok = Origin::json("ok", true, 0).await;
    let gw = redis_gateway(&redis, &ok, "").await;
    assert_eq!(status_of(&gw, &key).await.0, 200);
    assert_eq!(status_of(&gw, &key).await.0, 200);
    assert_eq!(status_of(&gw, &key).await.0, 402);
    let (code, out, _) = tollgate(&["keys", "topup", &id, "--credits", "10"], &conf);
    assert_eq!(
        (code, out.trim()),
        (0, format!("id {id} credits 10").as_str())
    );
    let (status, headers, _) = status_of(&gw, &key).await;
    assert_eq!(
        (status, headers["x-credits-remaining"].to_str().unwrap()),
        (200, "9")
    );

    // A revocation shows within the metadata cache's second.
    let (code, _, _) = tollgate(&["keys", "revoke", &id], &conf);
    assert_eq!(code, 0);
    let revoked_at = Instant::now();
    loop {
        let (status, _, body) = status_of(&gw, &key).await;
        if status == 403 {
            assert!(body.contains("revoked_api_key"), "{body}");
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_millis(1_500),
            "still served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // import keeps existing keys unchanged.
    import_keys(&redis, KEYS);
    let file = dir.path().join("again.yaml");
    std::fs::write(
        &file,
        "keys:\n  - {key: \"plain-secret-one\", name: one, credits: 999999}\n",
    )
    .unwrap();
    let (code, out, _) = tollgate(&["keys", "import", file.to_str().unwrap()], &conf);
    assert_eq!(
        (code, out.trim()),
        (0, "imported 0 key(s); 1 already present, left unchanged")
    );
    let (_, show, _) = tollgate(&["keys", "show", "plain-secret-one"], &conf);
    assert!(show.contains(" 60 "), "{show}");
    // Unknown keys and bad files are clear errors.
    let (code, _, err) = tollgate(&["keys", "topup", "000000000000", "--credits", "1"], &conf);
    assert_eq!(code, 1);
    assert!(err.contains("no key with id 000000000000"), "{err}");
    std::fs::write(&file, "keys:\n  - {sha256: \"abc\", name: x, credits: 1}\n").unwrap();
    let (code, _, err) = tollgate(&["keys", "import", file.to_str().unwrap()], &conf);
    assert_eq!(code, 1);
    assert!(err.contains("keys[0].sha256"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_command_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(
        &keys,
        "# demo keys\nkeys:\n  - {key: \"k1\", name: first, credits: 7}\n",
    )
    .unwrap();
    let conf = dir.path().join("t.yaml");
    std::fs::write(
        &conf,
        format!(
            "store:\n  keys_file: {}\nroutes:\n  - {{name: t, prefix: /, backends: [\"http://127.0.0.1:1\"]}}\n",
            keys.display()
        ),
    )
    .unwrap();
    let (code, list, _) = tollgate(&["keys", "list"], &conf);
    assert_eq!(code, 0);
    assert!(list.contains("first") && list.contains(" 7 "), "{list}");
    assert!(!list.contains("k1 "), "{list}");
    let (code, out, _) = tollgate(
        &["keys", "create", "--name", "second", "--credits", "3"],
        &conf,
    );
    assert_eq!(code, 0);
    let key = out.lines().next().unwrap().to_string();
    let text = std::fs::read_to_string(&keys).unwrap();
    assert!(text.starts_with("# demo keys\n"), "comments lost:\n{text}");
    assert!(
        !text.contains(&key),
        "the keys file holds the plaintext key"
    );
    assert!(
        text.contains(&tollgate::key::KeyHash::of(&key).hex()),
        "{text}"
    );
    let (code, list, _) = tollgate(&["keys", "list"], &conf);
    assert_eq!(code, 0);
    assert!(list.contains("second"), "{list}");
    let (code, _, err) = tollgate(&["keys", "topup", "first", "--credits", "1"], &conf);
    assert_eq!(code, 1);
    assert!(err.contains("needs the Redis store"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_with_deny_is_503_and_recovers() {
    let mut redis = RedisServer::start();
    import_keys(&redis, KEYS);
    let ok = Origin::json("ok", true, 0).await;
    let gw = redis_gateway(&redis, &ok, "").await;
    assert_eq!(status_of(&gw, "plain-secret-two").await.0, 200);

    // Steady traffic from 4 clients while Redis dies and comes back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop) = (gw.url("/api/x"), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let resp = client
                        .get(&url)
                        .header("X-API-Key", "plain-secret-two")
                        .send()
                        .await;
                    seen.push(resp.map(|r| r.status().as_u16()).unwrap_or(0));
                }
                seen
            })
        })
        .collect();
    let wait_for = |want: u16| {
        let gw = &gw;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while status_of(gw, "plain-secret-two").await.0 != want {
                assert!(Instant::now() < deadline, "never saw {want}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(200).await;
    let port = redis.port;
    redis.stop();
    // A request during the outage is refused quickly, never hangs.
    wait_for(503).await;
    let started = Instant::now();
    let (status, _, body) = status_of(&gw, "plain-secret-two").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store_unavailable"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "hung on a dead Redis"
    );

    // Redis comes back (empty: no persistence), keys are loaded again.
    let redis = RedisServer::start_on(port);
    import_keys(&redis, KEYS);
    wait_for(200).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = Vec::new();
    for t in traffic {
        statuses.extend(t.await.unwrap());
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "other answers: {statuses:?}"
    );
    let served = statuses.iter().filter(|&&s| s == 200).count();
    assert!(served > 0 && statuses.contains(&503), "{statuses:?}");
    let m = gw.metrics().await;
    assert!(
        sample(&m, "tollgate_store_errors_total{op=\"charge\"}") >= 1.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "tollgate_rejections_total{reason=\"store_unavailable\"}"
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_with_allow_serves_uncharged() {
    let mut redis = RedisServer::start();
    import_keys(&redis, KEYS);
    let ok = Origin::json("ok", true, 0).await;
    // The extra line lands inside `store:`.
    let gw = redis_gateway(&redis, &ok, "  on_error: allow").await;
    let (status, headers, _) = status_of(&gw, "plain-secret-two").await;
    assert_eq!(
        (status, headers["x-credits-remaining"].to_str().unwrap()),
        (200, "999")
    );

    redis.stop();
    for _ in 0..5 {
        let (status, headers, body) = status_of(&gw, "plain-secret-two").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-credits-cost"], "0");
        assert!(headers.get("x-credits-remaining").is_none());
    }
    // Even a key the gateway never saw is served: the store cannot decide.
    assert_eq!(status_of(&gw, "never-seen").await.0, 200);
    assert_eq!(ok.hits(), 7);
    let m = gw.metrics().await;
    assert!(
        sample(&m, "tollgate_store_errors_total{op=\"charge\"}") >= 5.0,
        "{m}"
    );
}
