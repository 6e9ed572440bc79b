//! The usage ledger (issue 18) against the real binary: exact against the
//! balances and the answers on both stores and across two gateways on one
//! Redis, the export (CLI and admin API, JSON lines and CSV) over a day
//! range, retention, TTLs of rows written off the hit path, and cache hit
//! counts whose answer was lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tollgate::key::KeyHash;
use tollgate::store::Usage;

const TOKEN: &str = "tga_usage_test_token";
const PAYER: &str = "k_payer_secret";
/// A key with a rate of 1 a second: its second request in a row is a 429.
const SLOW: &str = "k_slow_secret";
/// A key with no credits: every request is a 402.
const BROKE: &str = "k_broke";
/// No such key: 401.
const NOBODY: &str = "k_nobody_secret";

fn admin_yaml() -> String {
    format!("admin:\n  token_sha256: \"{}\"\n", KeyHash::of(TOKEN).hex())
}

fn today() -> String {
    Usage::now("").date().to_string()
}

/// The date `days` days from today (UTC).
fn day(days: i64) -> String {
    Usage {
        route: "",
        day: Usage::now("").day + days,
    }
    .date()
    .to_string()
}

/// Routes: `a` cached (cost 1), `b` whose backend fails (cost 3, refunded),
/// `c` plain (cost 2), `d` outside the payer's routes.
async fn routes() -> (Vec<String>, Vec<Origin>) {
    let ok = Origin::json("ok", true, 0).await;
    let broken = Origin::status(500, 0).await;
    let routes = vec![
        route("a", "/a/", &[&ok], "cache: {ttl_seconds: 60}"),
        route("b", "/b/", &[&broken], "cost: 3"),
        route("c", "/c/", &[&ok], "cost: 2"),
        route("d", "/d/", &[&ok], ""),
    ];
    (routes, vec![ok, broken])
}

/// What a request to `path` costs on [`routes`].
fn cost(path: &str) -> u64 {
    match &path[..3] {
        "/b/" => 3,
        "/c/" => 2,
        _ => 1,
    }
}

const SLOW_CREDITS: u64 = 100;

/// The keys: the payer (a name with a comma and quotes, routes a, b and c),
/// [`BROKE`] and [`SLOW`].
fn keys(payer_credits: u64) -> String {
    format!(
        "keys:\n  - {{key: \"{PAYER}\", name: \"acme, \\\"the\\\" co\", credits: {payer_credits}, \
         rate_per_second: 100000, routes: [a, b, c]}}\n  \
         - {{key: {BROKE}, name: broke, credits: 0}}\n  \
         - {{key: {SLOW}, name: slow, credits: {SLOW_CREDITS}, rate_per_second: 1}}\n"
    )
}

/// A config for the CLI against `redis`, in `dir`, with the route names of
/// [`routes`] (an import checks a key's routes against them) and `extra`
/// top-level YAML.
fn cli_conf(dir: &std::path::Path, redis: &RedisServer, extra: &str) -> std::path::PathBuf {
    let path = dir.join("usage-cli.yaml");
    let routes: String = ["a", "b", "c", "d"]
        .iter()
        .map(|r| format!("  - {{name: {r}, prefix: /{r}/, backends: [\"http://127.0.0.1:1\"]}}\n"))
        .collect();
    let yaml = format!(
        "store:\n  redis_url: {}\n{extra}routes:\n{routes}",
        redis.url()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Load `keys` into `redis` with `tollgate keys import --init`.
fn import(redis: &RedisServer, keys: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    std::fs::write(&file, keys).unwrap();
    let conf = cli_conf(dir.path(), redis, "");
    let args = ["keys", "import", "--init", file.to_str().unwrap()];
    let (code, out, err) = tollgate(&args, &conf);
    assert_eq!(code, 0, "import failed: {out}{err}");
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

/// What the clients saw of one key's requests.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Answers by status.
    statuses: BTreeMap<u16, u64>,
    /// Delivered answers that came from the cache (`X-Cache: HIT`/`STALE`).
    hits: u64,
    /// Credits that refunded failures (502) gave back.
    refunded: u64,
    /// Credits added by top-ups.
    topped_up: u64,
}

impl Seen {
    fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
}

/// What the clients saw, per key (`None`: no key sent).
#[derive(Debug, Default)]
struct Tally(BTreeMap<Option<&'static str>, Seen>);

impl Tally {
    fn note(&mut self, key: Option<&'static str>, path: &str, (status, cached): (u16, bool)) {
        let seen = self.0.entry(key).or_default();
        *seen.statuses.entry(status).or_default() += 1;
        if status == 200 && cached {
            seen.hits += 1;
        }
        if status == 502 {
            seen.refunded += cost(path);
        }
    }

    fn seen(&self, key: &'static str) -> Seen {
        self.0.get(&Some(key)).cloned().unwrap_or_default()
    }

    fn count(&self, key: Option<&'static str>, status: u16) -> u64 {
        self.0.get(&key).map_or(0, |s| s.count(status))
    }
}

/// GET `url` with `key` in `X-API-Key` (none: no key): the status, and
/// whether the answer came from the cache.
async fn send(client: &reqwest::Client, url: String, key: Option<&str>) -> (u16, bool) {
    let mut req = client.get(url);
    if let Some(k) = key {
        req = req.header("X-API-Key", k);
    }
    let resp = req.send().await.unwrap();
    let cached = resp
        .headers()
        .get("x-cache")
        .is_some_and(|v| v == "HIT" || v == "STALE");
    (resp.status().as_u16(), cached)
}

/// Add `credits` to `key` through the admin API.
async fn topup(gw: &Gateway, key: &str, credits: u64) {
    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/keys/{}/topup",
            gw.admin,
            KeyHash::of(key).id()
        ))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .body(format!(r#"{{"credits": {credits}}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// The payer's credits in the per-store tests: phase one spends them all.
const PAYER_CREDITS: u64 = 12;

/// The mix both per-store tests send, one request at a time, each answer
/// checked (status, and cache or not): hits and misses, refunded failures,
/// every refusal that must cost nothing (401 without a key and with an
/// unknown one, 403 outside the key's routes, 429, 402), the payer spending
/// its 12 credits down to a 402, a top-up of 10, then more of the same.
async fn traffic(gw: &Gateway) -> Tally {
    type Step = (Option<&'static str>, &'static str, u16, bool);
    const PHASE_ONE: [Step; 19] = [
        (Some(PAYER), "/a/x", 200, false),
        (Some(PAYER), "/a/x", 200, true),
        (Some(PAYER), "/a/x", 200, true),
        (Some(PAYER), "/b/x", 502, false),
        (Some(PAYER), "/b/x", 502, false),
        (Some(PAYER), "/c/y", 200, false),
        (Some(PAYER), "/c/y", 200, false),
        (None, "/a/x", 401, false),
        (Some(NOBODY), "/a/x", 401, false),
        (Some(PAYER), "/d/z", 403, false),
        (Some(SLOW), "/c/y", 200, false),
        (Some(SLOW), "/c/y", 429, false),
        (Some(SLOW), "/a/x", 429, false),
        (Some(BROKE), "/a/x", 402, false),
        // 5 credits left: 2 + 2, then 1 is too little for /c/, enough for /a/.
        (Some(PAYER), "/c/y", 200, false),
        (Some(PAYER), "/c/y", 200, false),
        (Some(PAYER), "/c/y", 402, false),
        (Some(PAYER), "/a/x", 200, true),
        (Some(PAYER), "/a/x", 402, false),
    ];
    const PHASE_TWO: [Step; 5] = [
        (Some(PAYER), "/a/x", 200, true),
        (Some(PAYER), "/a/w", 200, false),
        (Some(PAYER), "/b/x", 502, false),
        (Some(PAYER), "/c/y", 200, false),
        (Some(PAYER), "/d/z", 403, false),
    ];
    let client = reqwest::Client::new();
    let mut tally = Tally::default();
    for (i, (key, path, status, cached)) in PHASE_ONE.iter().chain(&PHASE_TWO).enumerate() {
        if i == PHASE_ONE.len() {
            topup(gw, PAYER, 10).await;
            tally.0.entry(Some(PAYER)).or_default().topped_up += 10;
        }
        let answer = send(&client, gw.url(path), *key).await;
        assert_eq!(answer, (*status, *cached), "step {i}: {key:?} {path}");
        tally.note(*key, path, answer);
    }
    tally
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

/// The sum of a field over a key's rows.
fn sum(rows: &[Value], key: &str, field: &str) -> u64 {
    let id = KeyHash::of(key).id();
    rows.iter()
        .filter(|r| r["key_id"] == id.as_str())
        .map(|r| r[field].as_u64().unwrap())
        .sum()
}

/// The keys whose ledger the exactness checks read.
const BILLED: [&str; 3] = [PAYER, SLOW, BROKE];

/// Whether every key's requests and cache hits have reached the ledger.
fn caught_up(rows: &[Value], tally: &Tally) -> bool {
    BILLED.iter().all(|key| {
        let seen = tally.seen(key);
        sum(rows, key, "requests") == seen.count(200) && sum(rows, key, "cache_hits") == seen.hits
    })
}

/// Every key's ledger against what its clients saw: credits are what its
/// balance lost plus its top-ups (`balances`: key, start, end), requests its
/// delivered answers, refunded what its failures gave back, cache_hits its
/// answers from the cache; no row for a key that was only refused, nor for
/// requests without a known key.
fn assert_exact(rows: &[Value], tally: &Tally, balances: &[(&'static str, u64, u64)]) {
    for &(key, start, end) in balances {
        let seen = tally.seen(key);
        let got = |field| sum(rows, key, field);
        assert_eq!(
            got("credits"),
            start + seen.topped_up - end,
            "{key}: {seen:?} {rows:?}"
        );
        assert_eq!(got("requests"), seen.count(200), "{key}: {seen:?} {rows:?}");
        assert_eq!(got("refunded"), seen.refunded, "{key}: {seen:?} {rows:?}");
        assert_eq!(got("cache_hits"), seen.hits, "{key}: {seen:?} {rows:?}");
    }
    let billed = [KeyHash::of(PAYER).id(), KeyHash::of(SLOW).id()];
    for row in rows {
        assert!(
            billed.iter().any(|id| row["key_id"] == id.as_str()),
            "{row}"
        );
        let fields: Vec<&String> = row.as_object().unwrap().keys().collect();
        assert_eq!(fields.len(), 8, "{row}");
    }
}

/// Every refusal the mix must cost nothing for did happen.
fn assert_refused_each_way(tally: &Tally) {
    for (key, status) in [
        (None, 401),
        (Some(NOBODY), 401),
        (Some(PAYER), 403),
        (Some(SLOW), 429),
        (Some(PAYER), 402),
    ] {
        assert!(
            tally.count(key, status) > 0,
            "no {status} for {key:?}: {tally:?}"
        );
    }
    let payer = tally.seen(PAYER);
    assert!(payer.hits > 0 && payer.count(502) > 0, "{payer:?}");
}

/// The rows [`traffic`] leaves, sorted by key id, then route.
fn expected_rows() -> Vec<Value> {
    let today = today();
    let (payer, slow) = (KeyHash::of(PAYER).id(), KeyHash::of(SLOW).id());
    let name = "acme, \"the\" co";
    let mut rows = vec![
        json!({"date": today, "key_id": payer, "name": name, "route": "a",
               "requests": 6, "credits": 6, "refunded": 0, "cache_hits": 4}),
        json!({"date": today, "key_id": payer, "name": name, "route": "b",
               "requests": 0, "credits": 0, "refunded": 9, "cache_hits": 0}),
        json!({"date": today, "key_id": payer, "name": name, "route": "c",
               "requests": 5, "credits": 10, "refunded": 0, "cache_hits": 0}),
    ];
    let slow_row = json!({"date": today, "key_id": slow, "name": "slow", "route": "c",
                          "requests": 1, "credits": 2, "refunded": 0, "cache_hits": 0});
    if slow < payer {
        rows.insert(0, slow_row);
    } else {
        rows.push(slow_row);
    }
    rows
}

/// The export of [`expected_rows`] as CSV.
fn expected_csv() -> String {
    let mut csv = String::from("date,key_id,name,route,requests,credits,refunded,cache_hits\n");
    for r in expected_rows() {
        let name = r["name"].as_str().unwrap();
        let name = if name.contains([',', '"']) {
            format!("\"{}\"", name.replace('"', "\"\""))
        } else {
            name.to_string()
        };
        csv.push_str(&format!(
            "{},{},{name},{},{},{},{},{}\n",
            r["date"].as_str().unwrap(),
            r["key_id"].as_str().unwrap(),
            r["route"].as_str().unwrap(),
            r["requests"],
            r["credits"],
            r["refunded"],
            r["cache_hits"]
        ));
    }
    csv
}

/// The balances the per-store tests check: each key from its start.
async fn balances(gw: &Gateway) -> Vec<(&'static str, u64, u64)> {
    vec![
        (PAYER, PAYER_CREDITS, balance(gw, PAYER).await),
        (SLOW, SLOW_CREDITS, balance(gw, SLOW).await),
        (BROKE, 0, balance(gw, BROKE).await),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_matches_the_balance_on_the_embedded_store() {
    let (routes, _origins) = routes().await;
    let gw = Gateway::start_with_keys(&routes, &admin_yaml(), &keys(PAYER_CREDITS)).await;
    let tally = traffic(&gw).await;
    assert_refused_each_way(&tally);
    let rows = export_until(&gw, "", |rows| caught_up(rows, &tally)).await;
    assert_exact(&rows, &tally, &balances(&gw).await);
    assert_eq!(rows, expected_rows());
    // CSV for Accept: text/csv; the name quoted.
    let (status, csv) = admin_get(&gw, "/v1/usage", Some("text/csv")).await;
    assert_eq!(status, 200);
    assert_eq!(csv, expected_csv());
    assert!(
        csv.contains(",\"acme, \"\"the\"\" co\",a,6,6,0,4\n"),
        "{csv}"
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
    import(&redis, &keys(PAYER_CREDITS));
    let (routes, _origins) = routes().await;
    let store = format!("store:\n  redis_url: {}\n{}", redis.url(), admin_yaml());
    let gw = Gateway::start_with_keys(&routes, &store, "").await;
    let tally = traffic(&gw).await;
    assert_refused_each_way(&tally);
    let rows = export_until(&gw, "", |rows| caught_up(rows, &tally)).await;
    assert_exact(&rows, &tally, &balances(&gw).await);
    assert_eq!(rows, expected_rows());

    // The CLI writes the same bytes as the API, in both formats.
    let dir = tempfile::tempdir().unwrap();
    let conf = cli_conf(dir.path(), &redis, "");
    let (code, jsonl, err) = tollgate(&["usage"], &conf);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines(&jsonl), rows);
    let (_, api_csv) = admin_get(&gw, "/v1/usage", Some("text/csv")).await;
    let (_, cli_csv, _) = tollgate(&["usage", "--format", "csv"], &conf);
    assert_eq!(cli_csv, api_csv);
    assert_eq!(cli_csv, expected_csv());

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
    assert_eq!(field, 10);
    for (key, values) in redis.dump().await {
        assert!(!key.contains(PAYER) && !values.iter().any(|v| v.contains(PAYER)));
    }
    for text in [&jsonl, &cli_csv, &gw.logs()] {
        assert!(!text.contains(PAYER) && !text.contains(&hex));
    }
}

/// Requests sent at once, each to one of two gateways; the answers, noted.
async fn at_once(reqs: Vec<(String, Option<&'static str>, &'static str)>, tally: &mut Tally) {
    let client = reqwest::Client::new();
    let tasks: Vec<_> = reqs
        .iter()
        .map(|(url, key, _)| {
            let (client, url, key) = (client.clone(), url.clone(), *key);
            tokio::spawn(async move { send(&client, url, key).await })
        })
        .collect();
    for ((_, key, path), task) in reqs.iter().zip(tasks) {
        tally.note(*key, path, task.await.unwrap());
    }
}

/// One phase of the two-gateway mix: 150 of the payer's requests (hits,
/// misses, refunded failures, 403s outside its routes; more than its
/// credits buy, so some are 402s), ten of [`SLOW`]'s (429s beyond its rate)
/// and eight without a known key (401s), all at once, half on each gateway.
async fn mixed_phase(one: &Gateway, two: &Gateway, tally: &mut Tally) {
    let paths = ["/a/1", "/a/2", "/b/x", "/c/y", "/a/1", "/d/z"];
    let gw = |i: usize| if i.is_multiple_of(2) { one } else { two };
    let mut reqs = Vec::new();
    for i in 0..150 {
        let path = paths[i % paths.len()];
        reqs.push((gw(i).url(path), Some(PAYER), path));
    }
    for i in 0..10 {
        reqs.push((gw(i).url("/c/y"), Some(SLOW), "/c/y"));
    }
    for i in 0..8_usize {
        let key = if i.is_multiple_of(2) {
            None
        } else {
            Some(NOBODY)
        };
        reqs.push((gw(i / 2).url("/a/1"), key, "/a/1"));
    }
    at_once(reqs, tally).await;
}

/// Two gateways on one Redis, many clients at once, the full mix in two
/// phases with a top-up between: the ledger's credits are exactly what each
/// balance lost plus the top-up, its requests the answers delivered, its
/// refunds the failures', its cache hits the answers from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_keep_the_ledger_exact() {
    let redis = RedisServer::start();
    import(&redis, &keys(100));
    let (routes, _origins) = routes().await;
    // Redis calls get 1 s: with 168 requests at once on two gateways and
    // both cores busy, a charge can take longer than the default 250 ms
    // (a 503).
    let store = format!(
        "store:\n  redis_url: {}\n  timeout_ms: 1000\n{}",
        redis.url(),
        admin_yaml()
    );
    let one = Gateway::start_with_keys(&routes, &store, "").await;
    let two = Gateway::start_with_keys(&routes, &store, "").await;
    let mut tally = Tally::default();
    mixed_phase(&one, &two, &mut tally).await;
    topup(&two, PAYER, 50).await;
    tally.0.entry(Some(PAYER)).or_default().topped_up += 50;
    mixed_phase(&one, &two, &mut tally).await;
    for (key, allowed) in [
        (Some(PAYER), &[200, 402, 403, 502][..]),
        (Some(SLOW), &[200, 429]),
        (Some(NOBODY), &[401]),
        (None, &[401]),
    ] {
        let seen = &tally.0[&key];
        assert!(
            seen.statuses.keys().all(|s| allowed.contains(s)),
            "{key:?}: {seen:?}"
        );
    }
    assert_refused_each_way(&tally);
    let rows = export_until(&one, "", |rows| caught_up(rows, &tally)).await;
    let balances = vec![
        (PAYER, 100, balance(&one, PAYER).await),
        (SLOW, SLOW_CREDITS, balance(&one, SLOW).await),
        (BROKE, 0, balance(&one, BROKE).await),
    ];
    assert_exact(&rows, &tally, &balances);
    // One key's export is its rows of the whole export.
    let payer = export_until(&two, &format!("?key={}", KeyHash::of(PAYER).id()), |_| true).await;
    let id = KeyHash::of(PAYER).id();
    let of_payer: Vec<Value> = rows
        .iter()
        .filter(|r| r["key_id"] == id.as_str())
        .cloned()
        .collect();
    assert_eq!(payer, of_payer);
}

/// An export of a day range: rows of other days stay out, rows come sorted
/// by date, key id and route; `--key` (a key that does not exist is an
/// error, however it is named) and bad parameters. The range is a month of
/// 30 days ending 11 days ago (kept, whatever today is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billing_export_of_a_day_range() {
    let redis = RedisServer::start();
    import(&redis, &keys(100));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let (payer, broke) = (KeyHash::of(PAYER), KeyHash::of(BROKE));
    let (before, from, to, after) = (day(-41), day(-40), day(-11), day(-10));
    // Days written by hand in the layout the scripts write.
    for (hash, date, route, requests, credits) in [
        (&payer, &before, "a", 9, 9),
        (&payer, &from, "c", 2, 4),
        (&payer, &from, "a", 5, 5),
        (&broke, &from, "a", 1, 1),
        (&payer, &to, "a", 7, 7),
        (&payer, &after, "a", 8, 8),
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
    let conf = cli_conf(dir.path(), &redis, "");
    let (code, csv, err) = tollgate(
        &["usage", "--from", &from, "--to", &to, "--format", "csv"],
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
    let mut day_one = vec![(first, "a"), (second, "a")];
    if first == &p {
        day_one.insert(1, (first, "c"));
    } else {
        day_one.push((second, "c"));
    }
    for (id, route) in day_one {
        let (requests, credits) = match (id == &p, route) {
            (true, "a") => (5, 5),
            (true, _) => (2, 4),
            _ => (1, 1),
        };
        expected.push(format!(
            "{from},{id},{},{route},{requests},{credits},0,0",
            name(id)
        ));
    }
    expected.push(format!("{to},{p},{},a,7,7,0,0", name(&p)));
    assert_eq!(csv.lines().collect::<Vec<_>>(), expected);

    // One key, named by its id, the key itself or its full hash.
    let (wide_from, wide_to) = (day(-70), today());
    let mut by_key = Vec::new();
    for key in [b.clone(), BROKE.to_string(), broke.hex()] {
        let args = [
            "usage", "--from", &wide_from, "--to", &wide_to, "--key", &key,
        ];
        let (code, jsonl, err) = tollgate(&args, &conf);
        assert_eq!(code, 0, "{err}");
        assert_eq!(lines(&jsonl).len(), 1, "{jsonl}");
        by_key.push(jsonl);
    }
    assert!(by_key.iter().all(|j| *j == by_key[0]), "{by_key:?}");
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
    // A key that does not exist is an error however it is named (an id, a
    // key, a full hash), with the same exit code, printing no rows and never
    // the key or its hash.
    let unknown_hash = KeyHash::of(NOBODY).hex();
    for key in ["000000000000", NOBODY, &unknown_hash] {
        let (code, out, err) = tollgate(&["usage", "--key", key], &conf);
        assert_eq!((code, out.as_str()), (1, ""), "{key}: {err}");
        assert!(err.contains("--key: no "), "{key}: {err}");
        assert!(
            !err.contains(NOBODY) && !err.contains(&unknown_hash),
            "{err}"
        );
    }

    // The API: the same range, the same bytes; bad parameters are 400s
    // naming them; an unknown key is 404; the token is needed.
    let (routes, _origins) = routes().await;
    let store = format!("store:\n  redis_url: {}\n{}", redis.url(), admin_yaml());
    let gw = Gateway::start_with_keys(&routes, &store, "").await;
    let range = format!("/v1/usage?from={from}&to={to}");
    let (status, api_csv) = admin_get(&gw, &range, Some("text/csv")).await;
    assert_eq!((status, api_csv), (200, csv));
    // A key is named by its id here: a key or a hash, known or not, is the
    // same 404 `unknown_key` as an unknown id, and is not repeated.
    for (query, status, says) in [
        ("?from=soon".to_string(), 400, "from"),
        ("?to=2026-02-30".to_string(), 400, "to"),
        ("?month=11".to_string(), 400, "month"),
        ("?key=000000000000".to_string(), 404, "unknown_key"),
        ("?key=k_broke".to_string(), 404, "unknown_key"),
        (format!("?key={NOBODY}"), 404, "unknown_key"),
        (format!("?key={unknown_hash}"), 404, "unknown_key"),
        (format!("?key={}", broke.hex()), 404, "unknown_key"),
    ] {
        let (got, body) = admin_get(&gw, &format!("/v1/usage{query}"), None).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
        for secret in [NOBODY, BROKE, &unknown_hash, &broke.hex()] {
            assert!(!body.contains(secret), "{query}: {body}");
        }
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
    import(&redis, &keys(100));
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
    let embedded = Gateway::start_with_keys(&routes, &top, &keys(100)).await;
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

/// Days past `usage.retention_days` are left out of the export on Redis,
/// as on the embedded store (its unit test), also while their rows have not
/// expired: keeping 3 days, the day 3 days ago is out, 2 days ago in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn days_past_retention_are_not_exported() {
    let redis = RedisServer::start();
    import(&redis, &keys(100));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let hex = KeyHash::of(PAYER).hex();
    for (days, requests) in [(-3, 7), (-2, 5)] {
        let name = format!("tollgate:usage:{{{hex}}}:{}", day(days));
        let _: () = redis::cmd("HSET")
            .arg(&name)
            .arg("a:requests")
            .arg(requests)
            .arg("a:credits")
            .arg(requests)
            .query(&mut c)
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (from, to) = (day(-5), today());
    let export = |extra: &str| {
        let conf = cli_conf(dir.path(), &redis, extra);
        let (code, jsonl, err) = tollgate(&["usage", "--from", &from, "--to", &to], &conf);
        assert_eq!(code, 0, "{err}");
        jsonl
    };
    // Kept 400 days: both days.
    assert_eq!(lines(&export("")).len(), 2);
    let keep = "usage:\n  retention_days: 3\n";
    let jsonl = export(keep);
    let rows = lines(&jsonl);
    assert_eq!(rows.len(), 1, "{jsonl}");
    assert_eq!(rows[0]["date"], day(-2));
    assert_eq!(rows[0]["requests"], 5);
    // The API of a gateway keeping 3 days says the same.
    let (routes, _origins) = routes().await;
    let store = format!(
        "store:\n  redis_url: {}\n{keep}{}",
        redis.url(),
        admin_yaml()
    );
    let gw = Gateway::start_with_keys(&routes, &store, "").await;
    let (status, body) = admin_get(&gw, &format!("/v1/usage?from={from}&to={to}"), None).await;
    assert_eq!((status, body), (200, jsonl));
}

/// A field of a ledger row, and the row's TTL.
fn row_field(c: &mut redis::Connection, row: &str, field: &str) -> Option<i64> {
    redis::cmd("HGET").arg(row).arg(field).query(c).unwrap()
}

fn assert_kept_400_days(c: &mut redis::Connection, row: &str, after: &str) {
    let ttl: i64 = redis::cmd("TTL").arg(row).query(c).unwrap();
    assert!(
        ttl > 399 * 86_400 && ttl <= 400 * 86_400,
        "after {after}: TTL {ttl}"
    );
}

/// Ledger writes off the hit path give a row without a TTL its TTL: a
/// refund landing on a row whose TTL was taken away (PERSIST) or on a row
/// that is gone (DEL: it makes the row again), a cache-hit flush, and a
/// lease report. Each would otherwise leave a row that is kept for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_writes_give_a_row_without_a_ttl_its_ttl() {
    let redis = RedisServer::start();
    import(&redis, &keys(100));
    let row = format!(
        "tollgate:usage:{{{}}}:{}",
        KeyHash::of(PAYER).hex(),
        today()
    );
    // The failing backend runs the command the test leaves it on the row:
    // after the request's charge, before its refund.
    let todo: Arc<Mutex<Option<&'static str>>> = Arc::default();
    let (next, url, name) = (todo.clone(), redis.url(), row.clone());
    let broken = Origin::start(move |_| {
        if let Some(cmd) = next.lock().unwrap().take() {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut c = client.get_connection().unwrap();
            let _: i64 = redis::cmd(cmd).arg(&name).query(&mut c).unwrap();
        }
        Reply::json(500, r#"{"status": false}"#)
    })
    .await;
    let ok = Origin::json("ok", true, 0).await;
    let routes = vec![
        route("a", "/a/", &[&ok], "cache: {ttl_seconds: 60}"),
        route("b", "/b/", &[&broken], "cost: 3"),
        route("c", "/c/", &[&ok], "cost: 2"),
    ];
    let store = format!("store:\n  redis_url: {}\n", redis.url());
    let gw = Gateway::start_with_keys(&routes, &store, "").await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let http = reqwest::Client::new();
    let within = Duration::from_secs(5);

    assert_eq!(send(&http, gw.url("/a/x"), Some(PAYER)).await, (200, false));
    assert_eq!(send(&http, gw.url("/a/x"), Some(PAYER)).await, (200, true));
    wait_until("the first hit in the ledger", within, || {
        row_field(&mut c, &row, "a:cache_hits") == Some(1)
    })
    .await;

    // A refund on the row without its TTL.
    *todo.lock().unwrap() = Some("PERSIST");
    assert_eq!(send(&http, gw.url("/b/x"), Some(PAYER)).await.0, 502);
    wait_until("the refund", within, || {
        row_field(&mut c, &row, "b:refunded") == Some(3)
    })
    .await;
    assert_kept_400_days(&mut c, &row, "a refund");

    // A cache hit flushed to the row without its TTL (the charge before it
    // sets none: not the route's first request of the day).
    let _: i64 = redis::cmd("PERSIST").arg(&row).query(&mut c).unwrap();
    assert_eq!(send(&http, gw.url("/a/x"), Some(PAYER)).await, (200, true));
    wait_until("the second hit in the ledger", within, || {
        row_field(&mut c, &row, "a:cache_hits") == Some(2)
    })
    .await;
    assert_kept_400_days(&mut c, &row, "a cache hit");

    // A refund after the row is gone makes it again, with a TTL.
    *todo.lock().unwrap() = Some("DEL");
    assert_eq!(send(&http, gw.url("/b/x"), Some(PAYER)).await.0, 502);
    wait_until("the refund on a new row", within, || {
        row_field(&mut c, &row, "a:requests").is_none()
            && row_field(&mut c, &row, "b:refunded") == Some(3)
    })
    .await;
    assert_kept_400_days(&mut c, &row, "a refund on a deleted row");

    // A lease report writing a route's second request to the row.
    let leased = format!(
        "store:\n  redis_url: {}\n  leases: {{max_credits: 10, ttl_seconds: 30}}\n",
        redis.url()
    );
    let lease_gw = Gateway::start_with_keys(&routes, &leased, "").await;
    assert_eq!(send(&http, lease_gw.url("/c/y"), Some(PAYER)).await.0, 200);
    wait_until("the first report", within, || {
        row_field(&mut c, &row, "c:requests") == Some(1)
    })
    .await;
    let _: i64 = redis::cmd("PERSIST").arg(&row).query(&mut c).unwrap();
    assert_eq!(send(&http, lease_gw.url("/c/y"), Some(PAYER)).await.0, 200);
    wait_until("the second report", within, || {
        row_field(&mut c, &row, "c:requests") == Some(2)
    })
    .await;
    assert_kept_400_days(&mut c, &row, "a lease report");
}

/// A cache-hit count whose answer was lost (Redis stalled past
/// `timeout_ms`, then ran it when it woke) is sent again with its id and
/// counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_count_sent_again_is_counted_once() {
    let redis = RedisServer::start();
    import(&redis, &keys(100));
    let (routes, _origins) = routes().await;
    // With leases a charge is served in process while Redis is stalled, so
    // cache hits are counted then and their flush meets the stall.
    let store = format!(
        "store:\n  redis_url: {}\n  timeout_ms: 300\n  leases: {{max_credits: 20, ttl_seconds: 30}}\n",
        redis.url()
    );
    let gw = Gateway::start_with_keys(&routes, &store, "").await;
    let row = format!(
        "tollgate:usage:{{{}}}:{}",
        KeyHash::of(PAYER).hex(),
        today()
    );
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let http = reqwest::Client::new();
    assert_eq!(send(&http, gw.url("/a/x"), Some(PAYER)).await, (200, false));
    assert_eq!(send(&http, gw.url("/a/x"), Some(PAYER)).await, (200, true));
    // The first count written: the script is loaded, so the try that will
    // time out runs when Redis wakes.
    wait_until(
        "the first hit in the ledger",
        Duration::from_secs(5),
        || row_field(&mut c, &row, "a:cache_hits") == Some(1),
    )
    .await;
    redis.pause();
    // Hits from the lease (a lookup Redis does not answer falls back to the
    // node's copy of the key's metadata in time).
    let mut stalled_hits = 0;
    for _ in 0..5 {
        assert_eq!(send(&http, gw.url("/a/x"), Some(PAYER)).await, (200, true));
        stalled_hits += 1;
    }
    gw.wait_log("cache hit(s) not written yet").await;
    redis.resume();
    let logs = gw.wait_log("sent again after no answer").await;
    let counted_before: u64 = logs
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("sent again after no answer, ")?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(
        row_field(&mut c, &row, "a:cache_hits"),
        Some(1 + stalled_hits),
        "{logs}"
    );
    // The try that timed out did run when Redis woke: the copy sent again
    // was not counted.
    assert!(counted_before > 0, "{logs}");
}
