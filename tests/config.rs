//! `tollgate check` and `tollgate serve -t` accept and reject the same files,
//! naming the field of each problem.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, get, raw, sample, status_and_json, tollgate_bin, Origin, KEY};
use serde_yaml::Value;
use tollgate::config::limits::all_bounds;

struct Run {
    code: i32,
    stderr: String,
}

fn run(args: &[&str], yaml: &str) -> Run {
    run_with(args, yaml, &[])
}

/// Run with extra files (name, text) written beside the config.
fn run_with(args: &[&str], yaml: &str, files: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("t.yaml");
    // pid and upgrade socket inside the temp dir so runs never collide.
    let yaml = yaml.replace("{dir}", &dir.path().display().to_string());
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(tollgate_bin())
        .args(args)
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const GOOD: &str = "server:\n  pid_file: {dir}/p.pid\n  upgrade_sock: {dir}/u.sock\nlisten: [\"127.0.0.1:0\"]\nroutes:\n  - name: v1\n    prefix: /api/v1/\n    backends: [\"http://127.0.0.1:9001\"]\n";

fn both_reject(yaml: &str, expected: &str) {
    for args in [&["check"][..], &["serve", "-t"][..]] {
        let r = run(args, yaml);
        assert_eq!(r.code, 1, "{args:?} accepted:\n{yaml}\n{}", r.stderr);
        assert!(
            r.stderr.contains(expected),
            "{args:?}: expected {expected:?} in:\n{}",
            r.stderr
        );
    }
}

#[test]
fn a_good_file_passes_check_and_serve_t() {
    assert_eq!(run(&["check"], GOOD).code, 0);
    let r = run(&["serve", "-t"], GOOD);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn the_shipped_config_passes() {
    let out = Command::new(tollgate_bin())
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tollgate.yaml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_key_inside_server_is_rejected() {
    both_reject(
        &GOOD.replace("server:\n", "server:\n  grace_period_second: 5\n"),
        "server.grace_period_second: unknown field",
    );
}

#[test]
fn unknown_strategy_names_field_and_choices() {
    both_reject(
        &format!("{GOOD}    strategy: fastest\n"),
        r#"routes[0].strategy: unknown value "fastest", expected race | hedge | failover"#,
    );
}

#[test]
fn unknown_top_level_and_route_fields_are_rejected() {
    both_reject(&format!("colour: blue\n{GOOD}"), "unknown field `colour`");
    both_reject(
        &format!("{GOOD}    retries: 3\n"),
        "routes[0]: unknown field `retries`",
    );
}

#[test]
fn empty_backends_bad_urls_and_duplicates_are_rejected() {
    both_reject(
        &GOOD.replace("[\"http://127.0.0.1:9001\"]", "[]"),
        "routes[0].backends: must list at least one",
    );
    both_reject(
        &GOOD.replace("http://127.0.0.1:9001", "127.0.0.1:9001"),
        "routes[0].backends[0]: expected a URL",
    );
    let dup = format!(
        "{GOOD}  - name: v1\n    prefix: /api/v1/\n    backends: [\"http://127.0.0.1:9002\"]\n"
    );
    both_reject(&dup, "routes[1].name: duplicate route name \"v1\"");
    both_reject(
        &dup,
        "routes[1].prefix: duplicate route prefix \"/api/v1/\"",
    );
}

#[test]
fn type_errors_name_the_field() {
    both_reject(
        &format!("{GOOD}    cost: lots\n"),
        "routes[0].cost: invalid type",
    );
}

#[test]
fn a_missing_file_is_an_error_not_a_panic() {
    let out = Command::new(tollgate_bin())
        .args(["check", "-c", "/nonexistent/tollgate.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/tollgate.yaml"));
}

#[test]
fn a_bad_keys_file_fails_with_entry_index_and_field() {
    let yaml = format!("store:\n  keys_file: {{dir}}/keys.yaml\n{GOOD}");
    let keys =
        "keys:\n  - {key: a, name: a, credits: 1}\n  - {sha256: \"abc\", name: b, credits: 1}\n";
    for args in [&["check"][..], &["serve", "-t"][..]] {
        let r = run_with(args, &yaml, &[("keys.yaml", keys)]);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("store.keys_file: "), "{}", r.stderr);
        assert!(
            r.stderr
                .contains("keys.yaml: keys[1].sha256: expected 64 hex digits"),
            "{}",
            r.stderr
        );
    }
    let good_keys = "keys:\n  - {key: a, name: a, credits: 1}\n";
    assert_eq!(
        run_with(&["check"], &yaml, &[("keys.yaml", good_keys)]).code,
        0
    );
    let r = run(&["check"], &yaml);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("store.keys_file: cannot read"),
        "{}",
        r.stderr
    );
}

/// `serve -c CONF` in the foreground, polled until its admin `/healthz`
/// answers and its listener accepts; killed by PID when dropped.
struct Serving {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Serving {
    async fn start(dir: &std::path::Path, conf: &str, listen: u16, admin: u16) -> Serving {
        let path = dir.join("serve.yaml");
        std::fs::write(&path, conf).unwrap();
        let log = dir.join("serve.log");
        let child = Command::new(tollgate_bin())
            .args(["serve", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Serving { child, log };
        let health = format!("http://127.0.0.1:{admin}/healthz");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = s.child.try_wait().unwrap() {
                panic!("serve exited with {st}:\n{}", s.logs());
            }
            let up = reqwest::get(&health).await.is_ok_and(|r| r.status() == 200);
            if up && std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok() {
                return s;
            }
            assert!(Instant::now() < deadline, "serve not ready:\n{}", s.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running, and never panicked.
    fn assert_healthy(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "{}", self.logs());
        assert!(!self.logs().contains("panicked"), "{}", self.logs());
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Set the field at `path` (a bound's path: `[]` is the first element, or
/// for `costs`, the prefix `/api/v1/x/`) to `n`, making maps on the way.
fn set(doc: &mut Value, path: &str, n: u64) {
    let mut at = doc;
    for part in path.split('.') {
        let (name, index) = match part.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (part, false),
        };
        at = at
            .as_mapping_mut()
            .unwrap()
            .entry(Value::from(name))
            .or_insert_with(|| Value::Mapping(Default::default()));
        if index {
            at = match at {
                Value::Sequence(items) => &mut items[0],
                Value::Mapping(m) => m.entry(Value::from("/api/v1/x/")).or_insert(Value::from(0)),
                other => panic!("{path}: {other:?}"),
            };
        }
    }
    *at = Value::from(n);
}

/// The field path `check` names for a bound's path.
fn concrete(path: &str) -> String {
    path.replace("costs[]", "costs[\"/api/v1/x/\"]")
        .replace("[]", "[0]")
}

struct Files {
    conf: Value,
    keys: Value,
}

fn base_files(dir: &std::path::Path, backend: &str, listen: u16, admin: u16) -> Files {
    let conf = format!(
        "server:\n  pid_file: {d}/p.pid\n  upgrade_sock: {d}/u.sock\n\
         listen: [\"127.0.0.1:{listen}\"]\nadmin_listen: \"127.0.0.1:{admin}\"\n\
         store: {{keys_file: {d}/keys.yaml}}\nnotify: {{}}\n\
         routes:\n  - name: v1\n    prefix: /api/v1/\n    backends: [\"{backend}\"]\n    strategy: hedge\n\
         \x20   cache: {{ttl_seconds: 60}}\n    costs: {{\"/api/v1/x/\": 1}}\n",
        d = dir.display()
    );
    let keys =
        format!("keys:\n  - {{key: \"{KEY}\", name: t, credits: 10, rate_per_second: 10}}\n");
    Files {
        conf: serde_yaml::from_str(&conf).unwrap(),
        keys: serde_yaml::from_str(&keys).unwrap(),
    }
}

fn write_files(dir: &std::path::Path, f: &Files) -> String {
    std::fs::write(
        dir.join("keys.yaml"),
        serde_yaml::to_string(&f.keys).unwrap(),
    )
    .unwrap();
    serde_yaml::to_string(&f.conf).unwrap()
}

/// Every numeric field, of the config and of the keys file: at its maximum
/// (all at once) `serve` starts and answers, twice (a miss, then a cache
/// hit); at its minimum it starts and answers without panicking; one past
/// either end, `check` refuses it naming the field and the bound.
#[tokio::test]
async fn every_numeric_field_at_its_bounds() {
    let origin = Origin::json("o", true, 0).await;
    for at_max in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (listen, admin) = (free_port(), free_port());
        let mut files = base_files(dir.path(), &origin.url(), listen, admin);
        for b in all_bounds() {
            let doc = match b.path.starts_with("keys[]") {
                true => &mut files.keys,
                false => &mut files.conf,
            };
            set(doc, b.path, if at_max { b.max } else { b.min });
        }
        let conf = write_files(dir.path(), &files);
        let mut gw = Serving::start(dir.path(), &conf, listen, admin).await;
        for _ in 0..2 {
            let answer = raw(([127, 0, 0, 1], listen).into(), get("/api/v1/x/AAPL", "")).await;
            let (status, json) = status_and_json(&answer);
            gw.assert_healthy();
            if at_max {
                assert_eq!(status, 200, "{answer}\n{}", gw.logs());
            } else {
                // A 1 ms attempt timeout or no credits: any answer, never a drop.
                assert!(status == 200 || json["status"] == false, "{answer}");
            }
        }
        if at_max {
            assert!(gw.logs().is_empty() || !gw.logs().contains("panicked"));
            let m = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(
                sample(&m, "tollgate_cache_total{result=\"hit\"}"),
                1.0,
                "{m}"
            );
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let mut outside = Vec::new();
    for b in all_bounds() {
        let mut cases = vec![(b.max + 1, format!("must be at most {}", b.max))];
        if b.min > 0 {
            cases.push((b.min - 1, format!("must be at least {}", b.min)));
        }
        for (value, expected) in cases {
            let mut files = base_files(
                dir.path(),
                "http://127.0.0.1:9001",
                free_port(),
                free_port(),
            );
            let is_key = b.path.starts_with("keys[]");
            set(
                if is_key {
                    &mut files.keys
                } else {
                    &mut files.conf
                },
                b.path,
                value,
            );
            let conf = write_files(dir.path(), &files);
            let r = run(&["check"], &conf);
            let field = concrete(b.path);
            let expected = if is_key {
                format!("keys.yaml: {field}: {expected}")
            } else {
                format!("{field}: {expected}")
            };
            assert_eq!(r.code, 1, "{} = {value} accepted", b.path);
            assert!(
                r.stderr.contains(&expected),
                "expected {expected:?} in:\n{}",
                r.stderr
            );
            outside.push(b.path);
        }
    }
    assert!(outside.len() > all_bounds().count(), "{outside:?}");
}

/// Without `grace_period_seconds` and `graceful_shutdown_timeout_seconds`
/// (Pingora's own default grace is 300 s), a SIGTERM stops the gateway well
/// within the unit's `TimeoutStopSec=30`.
#[tokio::test]
async fn a_config_without_shutdown_timers_stops_within_the_unit_bound() {
    let unit = include_str!("../systemd/tollgate.service");
    assert!(unit.contains("TimeoutStopSec=30"));
    let origin = Origin::json("o", true, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let files = base_files(dir.path(), &origin.url(), listen, admin);
    let conf = write_files(dir.path(), &files);
    assert!(!conf.contains("grace_period_seconds") && !conf.contains("graceful_shutdown"));
    let mut gw = Serving::start(dir.path(), &conf, listen, admin).await;
    let answer = raw(([127, 0, 0, 1], listen).into(), get("/api/v1/x/A", "")).await;
    assert_eq!(status_and_json(&answer).0, 200, "{answer}");
    let sent = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(25),
            "still running {:?} after SIGTERM:\n{}",
            sent.elapsed(),
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = sent.elapsed();
    println!("stopped {took:?} after SIGTERM");
    assert!(status.success(), "{status}\n{}", gw.logs());
    assert!(
        gw.logs().contains("grace period 5s starts"),
        "{}",
        gw.logs()
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
}

/// What `check` used to let through, refused by `check` and `serve -t` alike,
/// each naming its field or its line.
#[test]
fn input_that_check_let_through_is_refused() {
    both_reject(
        &format!("access_log: ~\n{GOOD}"),
        "access_log: expected stderr, off, or a file path",
    );
    both_reject(
        &GOOD.replace("http://127.0.0.1:9001", "http://u:p@127.0.0.1:9001"),
        "routes[0].backends[0]: a URL cannot carry user:password@",
    );
    both_reject(
        &GOOD.replace("127.0.0.1:9001", "127.0.0.1:0"),
        "routes[0].backends[0]: port 0",
    );
    both_reject(
        &GOOD.replace("listen: [\"127.0.0.1:0\"]", "listen: [\"127.0.0.1:9091\"]"),
        "listen[0]: 127.0.0.1:9091 overlaps admin_listen",
    );
    both_reject(
        &format!("{GOOD}    cost: 1\0\n"),
        "line 9, column 12: control character U+0000",
    );
    let deep = format!(
        "{GOOD}    costs: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let started = Instant::now();
    both_reject(
        &deep,
        "line 9, column 44: collections nested more than 32 deep",
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let mut bomb = String::from("server:\n  a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        let refs = vec![format!("*{prev}"); 9].join(",");
        bomb.push_str(&format!("  {name}: &{name} [{refs}]\n"));
    }
    both_reject(
        &GOOD.replace("server:\n", &bomb),
        "the first alias is at line 3, column 10",
    );
    let yaml = format!("store:\n  keys_file: {{dir}}/keys.yaml\n{GOOD}");
    let keys = format!(
        "keys:\n  - {{sha256: \"{}\", name: b, credits: 1}}\n",
        "+f".repeat(32)
    );
    let r = run_with(&["check"], &yaml, &[("keys.yaml", &keys)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("keys[0].sha256: expected 64 hex digits"),
        "{}",
        r.stderr
    );
}

#[test]
fn two_redis_kinds_at_once_are_refused_naming_both() {
    let route = "routes:\n  - {name: t, prefix: /, backends: [\"http://127.0.0.1:1\"]}\n";
    let url = "  redis_url: redis://127.0.0.1:6379/0\n";
    let sentinel = "  redis_sentinel: {master_name: m, sentinels: [\"127.0.0.1:26379\"]}\n";
    let cluster = "  redis_cluster: [\"redis://127.0.0.1:7000\"]\n";
    for (a, b, names) in [
        (url, sentinel, "store.redis_url and store.redis_sentinel"),
        (url, cluster, "store.redis_url and store.redis_cluster"),
        (
            sentinel,
            cluster,
            "store.redis_sentinel and store.redis_cluster",
        ),
    ] {
        both_reject(&format!("store:\n{a}{b}{route}"), names);
    }
    for (store, expected) in [
        (
            "  redis_sentinel: {master_name: m, sentinels: [\"nowhere\"]}\n",
            "store.redis_sentinel.sentinels[0]: expected host:port",
        ),
        (
            "  redis_sentinel: {master_name: m, sentinels: []}\n",
            "store.redis_sentinel.sentinels: expected at least one node",
        ),
        (
            "  redis_sentinel: {master_name: m, sentinels: [\"h:1\"], db: 99}\n",
            "store.redis_sentinel.db: must be 0 to 15",
        ),
        (
            "  redis_sentinel: {sentinels: [\"h:1\"]}\n",
            "store.redis_sentinel: missing field `master_name`",
        ),
        (
            "  redis_cluster: [\"redis://h:1\", \"rediss://h:2\"]\n",
            "store.redis_cluster: mixes redis:// and rediss://",
        ),
        (
            "  redis_cluster: [\"http://h:1\"]\n",
            "store.redis_cluster[0]: expected host:port",
        ),
        (
            "  redis_url: rediss://h:1/0\n  redis_ca: /nonexistent/ca.pem\n",
            "store.redis_ca: cannot read /nonexistent/ca.pem",
        ),
    ] {
        both_reject(&format!("store:\n{store}{route}"), expected);
    }
}
