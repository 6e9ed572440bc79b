//! `tollgate check` and `tollgate serve -t` accept and reject the same files,
//! naming the field of each problem.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::tollgate_bin;

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
