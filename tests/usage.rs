//! The usage ledger (issue 18) against the real binary: exact against the
//! balances on both stores and across two gateways on one Redis, the export
//! (CLI and admin API, JSON lines and CSV) over a day range.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tollgate::key::KeyHash;
use tollgate::store::Usage;

const TOKEN: &str = "tga_usage_test_token";
const PAYER: &str = "k_payer_secret";

fn admin_yaml() -> String {
    format!("admin:\n  token_sha256: \"{}\"\n", KeyHash::of(TOKEN).hex())
}

fn today() -> String {
    Usage::now("").date().to_string()
}

/// Routes: `a` cached (cost 1), `b` whose backend fails (cost 3, refunded),
/// `c` plain (cost 2).
async fn routes() -> (Vec<String>, Vec<Origin>) {
    let ok = Origin::json("ok", true, 0).await;
    let broken = Origin::status(500, 0).await;
    let routes = vec![
        route("a", "/a/", &[&ok], "cache: {ttl_seconds: 60}"),
        route("b", "/b/", &[&broken], "cost: 3"),
        route("c", "/c/", &[&ok], "cost: 2"),
    ];
    (routes, vec![ok, broken])
}

fn keys() -> String {
    format!(
        "keys:\n  - {{key: \"{PAYER}\", name: \"acme, \\\"the\\\" co\", credits: 100, rate_per_second: 100000}}\n  \
         - {{key: k_broke, name: broke, credits: 0}}\n"
    )
}

/// GET `path` on the admin listener with the token: status and body.
async fn admin_get(gw: &Gateway, path: &str, accept: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .get(format!("http://{}{path}", gw.admin))
        .header("Authorization", format!("Bearer {TOKEN}"));
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn lines(jsonl: &str) -> Vec<Value> {
    jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The mix every case sends: hits, misses, refunded failures, a 402, and a
/// top-up. Returns the credits topped up.
async fn traffic(gw: &Gateway) -> u64 {
    for _ in 0..3 {
        assert_eq!(get_with_key(gw.url("/a/x"), PAYER).await.status(), 200);
    }
    for _ in 0..2 {
        assert_eq!(get_with_key(gw.url("/b/x"), PAYER).await.status(), 502);
        assert_eq!(get_with_key(gw.url("/c/y"), PAYER).await.status(), 200);
    }
    assert_eq!(get_with_key(gw.url("/a/x"), "k_broke").await.status(), 402);
    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/keys/{}/topup",
            gw.admin,
            KeyHash::of(PAYER).id()
        ))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .body(r#"{"credits": 10}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    10
}

async fn balance(gw: &Gateway, key: &str) -> u64 {
    let (_, body) = admin_get(gw, &format!("/v1/keys/{}", KeyHash::of(key).id()), None).await;
    serde_json::from_str::<Value>(&body).unwrap()["credits"]
        .as_u64()
        .unwrap()
}

/// Poll the API's export until `ready` holds (cache hits reach Redis within
/// a second), returning its rows.
async fn export_until(gw: &Gateway, query: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let (status, body) = admin_get(gw, &format!("/v1/usage{query}"), None).await;
        assert_eq!(status, 200, "{body}");
        let rows = lines(&body);
        if ready(&rows) {
            return rows;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_rows(rows: &[Value]) {
    let today = today();
    let id = KeyHash::of(PAYER).id();
    let expected = [
        json!({"date": today, "key_id": id, "name": "acme, \"the\" co", "route": "a",
               "requests": 3, "credits": 3, "refunded": 0, "cache_hits": 2}),
        json!({"date": today, "key_id": id, "name": "acme, \"the\" co", "route": "b",
               "requests": 0, "credits": 0, "refunded": 6, "cache_hits": 0}),
        json!({"date": today, "key_id": id, "name": "acme, \"the\" co", "route": "c",
               "requests": 2, "credits": 4, "refunded": 0, "cache_hits": 0}),
    ];
    assert_eq!(rows, expected);
    for row in rows {
        let fields: Vec<&String> = row.as_object().unwrap().keys().collect();
        assert_eq!(fields.len(), 8, "{row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_matches_the_balance_on_the_embedded_store() {
    let (routes, _origins) = routes().await;
    let gw = Gateway::start_with_keys(&routes, &admin_yaml(), &keys()).await;
    let topped = traffic(&gw).await;
    let rows = export_until(&gw, "", |rows| rows.len() == 3).await;
    check_rows(&rows);
    let charged: u64 = rows.iter().map(|r| r["credits"].as_u64().unwrap()).sum();
    assert_eq!(charged, 100 + topped - balance(&gw, PAYER).await);
    // CSV for Accept: text/csv; the name quoted.
    let (status, csv) = admin_get(&gw, "/v1/usage", Some("text/csv")).await;
    assert_eq!(status, 200);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("date,key_id,name,route,requests,credits,refunded,cache_hits")
    );
    let id = KeyHash::of(PAYER).id();
    assert_eq!(
        lines.next(),
        Some(format!("{},{id},\"acme, \"\"the\"\" co\",a,3,3,0,2", today()).as_str())
    );
    // The CLI cannot read a gateway's memory: it says where to look.
    let (code, _, err) = tollgate(&["usage"], &gw.dir.path().join("tollgate.yaml"));
    assert!(code == 1 && err.contains("GET /v1/usage"), "{err}");
    for text in [csv.as_str(), gw.logs().as_str()] {
        assert!(!text.contains(PAYER) && !text.contains(&KeyHash::of(PAYER).hex()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_matches_the_balance_on_redis_and_the_cli_agrees() {
    let redis = RedisServer::start();
    import_keys(&redis, &keys());
    let (routes, _origins) = routes().await;
    let store = format!("store:\n  redis_url: {}\n{}", redis.url(), admin_yaml());
    let gw = Gateway::start_with_keys(&routes, &store, "").await;
    let topped = traffic(&gw).await;
    let rows = export_until(&gw, "", |rows| {
        rows.first().is_some_and(|r| r["cache_hits"] == 2)
    })
    .await;
    check_rows(&rows);
    let charged: u64 = rows.iter().map(|r| r["credits"].as_u64().unwrap()).sum();
    assert_eq!(charged, 100 + topped - balance(&gw, PAYER).await);

    // The CLI writes the same bytes as the API, in both formats.
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf(dir.path(), &redis);
    let (code, jsonl, err) = tollgate(&["usage"], &conf);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines(&jsonl), rows);
    let (_, api_csv) = admin_get(&gw, "/v1/usage", Some("text/csv")).await;
    let (_, cli_csv, _) = tollgate(&["usage", "--format", "csv"], &conf);
    assert_eq!(cli_csv, api_csv);

    // The Redis layout: one hash per key and day, in the key's slot, with
    // the retention as its TTL; nothing of the plaintext key.
    let hex = KeyHash::of(PAYER).hex();
    let name = format!("tollgate:usage:{{{hex}}}:{}", today());
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let ttl: i64 = redis::cmd("TTL").arg(&name).query(&mut c).unwrap();
    assert!(ttl > 399 * 86_400 && ttl <= 400 * 86_400, "{ttl}");
    let field: i64 = redis::cmd("HGET")
        .arg(&name)
        .arg("c:credits")
        .query(&mut c)
        .unwrap();
    assert_eq!(field, 4);
    for (key, values) in redis.dump().await {
        assert!(!key.contains(PAYER) && !values.iter().any(|v| v.contains(PAYER)));
    }
    for text in [&jsonl, &cli_csv, &gw.logs()] {
        assert!(!text.contains(PAYER) && !text.contains(&hex));
    }
}

/// Two gateways on one Redis, many clients at once, hits, misses and
/// refunded failures: the ledger's credits are exactly what the balance lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_keep_the_ledger_exact() {
    let redis = RedisServer::start();
    import_keys(&redis, &keys());
    let (routes, _origins) = routes().await;
    let store = format!("store:\n  redis_url: {}\n{}", redis.url(), admin_yaml());
    let one = Gateway::start_with_keys(&routes, &store, "").await;
    let two = Gateway::start_with_keys(&routes, &store, "").await;
    let paths = ["/a/1", "/a/2", "/b/x", "/c/y", "/a/1"];
    let urls: Vec<String> = (0..150)
        .map(|i| {
            let gw = if i % 2 == 0 { &one } else { &two };
            gw.url(paths[i % paths.len()])
        })
        .collect();
    let statuses = statuses_at_once(urls, PAYER).await;
    let served = statuses.iter().filter(|&&s| s == 200).count() as u64;
    assert!(
        statuses.iter().all(|s| [200, 402, 502].contains(s)),
        "{statuses:?}"
    );
    let left = balance(&one, PAYER).await;
    let rows = export_until(&one, &format!("?key={}", KeyHash::of(PAYER).id()), |rows| {
        let hits: u64 = rows.iter().map(|r| r["cache_hits"].as_u64().unwrap()).sum();
        let requests: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
        requests == served && hits > 0
    })
    .await;
    let charged: u64 = rows.iter().map(|r| r["credits"].as_u64().unwrap()).sum();
    assert_eq!(charged, 100 - left, "{rows:?}");
    let refunded: u64 = rows.iter().map(|r| r["refunded"].as_u64().unwrap()).sum();
    let failed = statuses.iter().filter(|&&s| s == 502).count() as u64;
    assert_eq!(refunded, 3 * failed);
}

/// An export of a day range: rows of other days stay out, rows come sorted
/// by date, key id and route; `--key` and bad parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billing_export_of_a_day_range() {
    let redis = RedisServer::start();
    import_keys(&redis, &keys());
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let (payer, broke) = (KeyHash::of(PAYER), KeyHash::of("k_broke"));
    // Days written by hand in the layout the scripts write.
    for (hash, date, route, requests, credits) in [
        (&payer, "2026-10-31", "a", 9, 9),
        (&payer, "2026-11-01", "c", 2, 4),
        (&payer, "2026-11-01", "a", 5, 5),
        (&broke, "2026-11-01", "a", 1, 1),
        (&payer, "2026-11-30", "a", 7, 7),
        (&payer, "2026-12-01", "a", 8, 8),
    ] {
        let name = format!("tollgate:usage:{{{}}}:{date}", hash.hex());
        let _: () = redis::cmd("HSET")
            .arg(&name)
            .arg(format!("{route}:requests"))
            .arg(requests)
            .arg(format!("{route}:credits"))
            .arg(credits)
            .query(&mut c)
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = keys_conf(dir.path(), &redis);
    let (code, csv, err) = tollgate(
        &[
            "usage",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-30",
            "--format",
            "csv",
        ],
        &conf,
    );
    assert_eq!(code, 0, "{err}");
    let (p, b) = (payer.id(), broke.id());
    let (first, second) = if p < b { (&p, &b) } else { (&b, &p) };
    let name = |id: &String| {
        if *id == p {
            "\"acme, \"\"the\"\" co\""
        } else {
            "broke"
        }
    };
    let mut expected =
        vec!["date,key_id,name,route,requests,credits,refunded,cache_hits".to_string()];
    let mut nov1 = vec![(first, "a"), (second, "a")];
    if first == &p {
        nov1.insert(1, (first, "c"));
    } else {
        nov1.push((second, "c"));
    }
    for (id, route) in nov1 {
        let (requests, credits) = match (id == &p, route) {
            (true, "a") => (5, 5),
            (true, _) => (2, 4),
            _ => (1, 1),
        };
        expected.push(format!(
            "2026-11-01,{id},{},{route},{requests},{credits},0,0",
            name(id)
        ));
    }
    expected.push(format!("2026-11-30,{p},{},a,7,7,0,0", name(&p)));
    assert_eq!(csv.lines().collect::<Vec<_>>(), expected);

    let (code, jsonl, _) = tollgate(
        &[
            "usage",
            "--from",
            "2026-10-01",
            "--to",
            "2026-12-31",
            "--key",
            &b,
        ],
        &conf,
    );
    assert_eq!(code, 0);
    assert_eq!(lines(&jsonl).len(), 1, "{jsonl}");
    for (args, says) in [
        (vec!["--from", "2026-13-01"], "--from"),
        (vec!["--from", "2026-12-01", "--to", "2026-11-01"], "--from"),
        (vec!["--format", "xml"], "--format"),
        (vec!["--key", "000000000000"], "--key"),
    ] {
        let mut all = vec!["usage"];
        all.extend(args.iter());
        let (code, _, err) = tollgate(&all, &conf);
        assert!(code == 1 && err.contains(says), "{args:?}: {err}");
    }

    // The API: the same range, the same bytes; bad parameters are 400s
    // naming them; an unknown key is 404; the token is needed.
    let (routes, _origins) = routes().await;
    let store = format!("store:\n  redis_url: {}\n{}", redis.url(), admin_yaml());
    let gw = Gateway::start_with_keys(&routes, &store, "").await;
    let (status, api_csv) = admin_get(
        &gw,
        "/v1/usage?from=2026-11-01&to=2026-11-30",
        Some("text/csv"),
    )
    .await;
    assert_eq!((status, api_csv), (200, csv));
    for (query, status, says) in [
        ("?from=soon", 400, "from"),
        ("?to=2026-02-30", 400, "to"),
        ("?month=11", 400, "month"),
        ("?key=000000000000", 404, "unknown_key"),
        ("?key=k_broke", 404, "unknown_key"),
    ] {
        let (got, body) = admin_get(&gw, &format!("/v1/usage{query}"), None).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    let anonymous = reqwest::get(format!("http://{}/v1/usage", gw.admin))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let m = gw.metrics().await;
    assert_eq!(
        sample(
            &m,
            "tollgate_admin_requests_total{endpoint=\"usage\",status=\"401\"}"
        ),
        1.0
    );
}

/// `usage.retention_days: 0` keeps no ledger; charges work as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_zero_keeps_no_ledger() {
    let redis = RedisServer::start();
    import_keys(&redis, &keys());
    let (routes, _origins) = routes().await;
    let store = format!(
        "store:\n  redis_url: {}\nusage:\n  retention_days: 0\n",
        redis.url()
    );
    let gw = Gateway::start_with_keys(&routes, &store, "").await;
    traffic_without_admin(&gw).await;
    for (name, _) in redis.dump().await {
        assert!(!name.contains("usage:"), "{name}");
    }
    let top = format!("usage:\n  retention_days: 0\n{}", admin_yaml());
    let embedded = Gateway::start_with_keys(&routes, &top, &keys()).await;
    traffic_without_admin(&embedded).await;
    let (status, body) = admin_get(&embedded, "/v1/usage", None).await;
    assert_eq!((status, body.as_str()), (200, ""));
}

async fn traffic_without_admin(gw: &Gateway) {
    for path in ["/a/x", "/a/x", "/b/x", "/c/y"] {
        let status = get_with_key(gw.url(path), PAYER).await.status();
        assert!(status == 200 || status == 502, "{path}: {status}");
    }
}
