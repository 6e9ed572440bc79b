//! Micro-benchmarks of the pure functions every request runs: the cache key,
//! the success predicate, the cost lookup, and the key hash.
//!
//!   cargo bench --bench hot
//!
//! Results and the machine they came from are in bench/RESULTS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tollgate::config::Config;
use tollgate::config::SuccessRule;
use tollgate::key::KeyHash;
use tollgate::race::classify;

fn cache_key(c: &mut Criterion) {
    let target = |raw: &str| tollgate::router::parse_target(raw.as_bytes(), "api_key").unwrap();
    let mut g = c.benchmark_group("cache_key");
    let t = target("/api/v1/eod/AAPL");
    g.bench_function("path only", |b| b.iter(|| black_box(&t).cache_key("v1")));
    let t = target("/api/v1/eod/AAPL.US?to=2024-12-31&from=2024-01-01&period=d");
    g.bench_function("3 query params", |b| {
        b.iter(|| black_box(&t).cache_key("v1"))
    });
    let t = target("/api/v1/news/%41APL%2fx?s=%41APL&t=a%20b&limit=10");
    g.bench_function("percent-encoded path and query", |b| {
        b.iter(|| black_box(&t).cache_key("v1"))
    });
    g.finish();
}

/// A backend answer of about `len` bytes with `"status": <ok>` first or last.
fn answer(len: usize, status_first: bool, ok: bool) -> Vec<u8> {
    let row = r#"{"date":"2024-01-02","open":187.15,"high":188.44,"low":183.89,"close":185.64,"volume":82488700},"#;
    let mut rows = row.repeat(len / row.len() + 1);
    rows.pop();
    let body = if status_first {
        format!(r#"{{"status": {ok}, "data": [{rows}]}}"#)
    } else {
        format!(r#"{{"data": [{rows}], "status": {ok}}}"#)
    };
    body.into_bytes()
}

/// A winner (`true`) is read whole wherever its member is; a loser whose
/// `"status": false` comes first is decided there.
fn success_predicate(c: &mut Criterion) {
    let mut g = c.benchmark_group("success_json_status");
    for len in [120, 16 * 1024, 1024 * 1024] {
        for (first, ok, at) in [
            (true, true, "first"),
            (false, true, "last"),
            (true, false, "false first"),
        ] {
            let body = answer(len, first, ok);
            g.throughput(Throughput::Bytes(body.len() as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("status {at}"), len),
                &body,
                |b, body| b.iter(|| classify(SuccessRule::JsonStatus, 200, black_box(body))),
            );
        }
    }
    g.finish();
}

fn cost_lookup(c: &mut Criterion) {
    let config = Config::from_yaml(
        r#"
listen: ["127.0.0.1:8080"]
routes:
  - name: v1
    prefix: /api/v1/
    backends: ["http://127.0.0.1:9001"]
    cost: 1
    costs:
      "/api/v1/fundamentals/": 5
      "/api/v1/fundamentals/bulk/": 50
      "/api/v1/news/": 2
      "/api/v1/intraday/": 3
      "/api/v1/options/": 10
"#,
    )
    .unwrap();
    let route = &config.routes[0];
    let mut g = c.benchmark_group("cost_for");
    g.bench_function("default cost (no prefix matches)", |b| {
        b.iter(|| route.cost_for(black_box("/api/v1/eod/AAPL")))
    });
    g.bench_function("longest prefix", |b| {
        b.iter(|| route.cost_for(black_box("/api/v1/fundamentals/bulk/US")))
    });
    g.finish();
}

fn key_hash(c: &mut Criterion) {
    c.bench_function("key_hash_sha256", |b| {
        b.iter(|| KeyHash::of(black_box("tg_3q2+7w9xT0aRzJ5lQ1mB8vY4cK6dN")))
    });
}

criterion_group!(hot, cache_key, success_predicate, cost_lookup, key_hash);
criterion_main!(hot);
