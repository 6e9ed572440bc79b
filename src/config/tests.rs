//! Unit tests of configuration parsing and validation.

use super::*;
use serde_yaml::Value;

const MINIMAL: &str =
    "routes:\n  - name: v1\n    prefix: /api/v1/\n    backends: [\"http://127.0.0.1:9001\"]\n";

fn errors_of(yaml: &str) -> Vec<String> {
    match Config::from_yaml(yaml) {
        Ok(_) => Vec::new(),
        Err(ConfigErrors(e)) => e.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    let addrs: Vec<SocketAddr> = c.listen.iter().map(|l| l.addr).collect();
    assert_eq!(addrs, vec!["0.0.0.0:8080".parse().unwrap()]);
    assert!(c.listen[0].tls.is_none() && !c.listen[0].h2);
    assert_eq!(c.admin_listen, "127.0.0.1:9091".parse().unwrap());
    let r = &c.routes[0];
    assert_eq!(r.strategy, Strategy::Race);
    assert_eq!(r.success, SuccessRule::JsonStatus);
    assert_eq!(r.timeout, Duration::from_secs(30));
    assert_eq!(r.backends[0].label, "127.0.0.1:9001");
    assert_eq!(r.backends[0].base_path, "");
    assert_eq!(c.store.on_error, OnStoreError::Deny);
    assert_eq!(c.auth.query_param, "api_key");
}

#[test]
fn unknown_strategy_names_path_and_choices() {
    let yaml = format!("{MINIMAL}  - name: v2\n    prefix: /api/v2/\n    backends: [\"http://127.0.0.1:9001\"]\n    strategy: fastest\n");
    assert_eq!(
        errors_of(&yaml),
        vec![r#"routes[1].strategy: unknown value "fastest", expected race | hedge | failover"#]
    );
}

#[test]
fn unknown_field_in_route_names_path() {
    let yaml = format!("{MINIMAL}    fastest: true\n");
    let e = errors_of(&yaml);
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("routes[0]"), "{e:?}");
    assert!(e[0].contains("unknown field `fastest`"), "{e:?}");
}

#[test]
fn unknown_field_in_server_is_an_error() {
    let yaml = format!("server:\n  threads: 2\n  grace_period_second: 5\n{MINIMAL}");
    let e = errors_of(&yaml);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("server.grace_period_second: unknown field"),
        "{e:?}"
    );
    assert!(e[0].contains("grace_period_seconds"), "{e:?}");
}

#[test]
fn daemon_wait_for_ready_is_refused_with_a_reason() {
    let yaml = format!("server:\n  daemon_wait_for_ready: true\n{MINIMAL}");
    let e = errors_of(&yaml);
    assert!(
        e[0].starts_with("server.daemon_wait_for_ready: not supported"),
        "{e:?}"
    );
}

#[test]
fn server_fields_reach_pingora() {
    let yaml = format!("server:\n  threads: 3\n  grace_period_seconds: 7\n{MINIMAL}");
    let c = Config::from_yaml(&yaml).unwrap();
    assert_eq!(c.server.threads, 3);
    assert_eq!(c.server.grace_period_seconds, Some(7));
}

#[test]
fn empty_backends_bad_urls_and_duplicates_are_reported_together() {
    let yaml = "routes:\n  - name: a\n    prefix: /a/\n    backends: []\n  - name: a\n    prefix: /a/\n    backends: [\"ftp://x\", \"http://127.0.0.1:1?q=1\", \"not a url\"]\n";
    let e = errors_of(yaml);
    assert!(
        e.contains(&"routes[0].backends: must list at least one backend URL".to_string()),
        "{e:?}"
    );
    assert!(
        e.contains(&"routes[1].name: duplicate route name \"a\"".to_string()),
        "{e:?}"
    );
    assert!(
        e.contains(&"routes[1].prefix: duplicate route prefix \"/a/\"".to_string()),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("routes[1].backends[0]: expected a URL")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("routes[1].backends[1]: a backend URL cannot carry a query")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|m| m.starts_with("routes[1].backends[2]:")),
        "{e:?}"
    );
}

#[test]
fn type_errors_name_the_field() {
    let yaml = format!("{MINIMAL}    timeout_ms: soon\n");
    let e = errors_of(&yaml);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("routes[0].timeout_ms: invalid type"),
        "{e:?}"
    );
}

#[test]
fn other_sections_are_validated() {
    let yaml = format!("store:\n  on_error: maybe\n  redis_url: http://x\nrate_limit:\n  per_second: 0\nlisten: [\"nowhere\"]\n{MINIMAL}");
    let e = errors_of(&yaml);
    assert!(
        e.contains(&r#"store.on_error: unknown value "maybe", expected deny | allow"#.to_string()),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.starts_with("store.redis_url:")), "{e:?}");
    assert!(
        e.contains(&"rate_limit.per_second: must be at least 1".to_string()),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.starts_with("listen[0]:")), "{e:?}");
}

#[test]
fn backend_base_path_and_host_header() {
    let yaml = "routes:\n  - name: v1\n    prefix: /api/v1/\n    backends: [\"http://localhost/base/\", \"http://127.0.0.1:9002/x\"]\n";
    let c = Config::from_yaml(yaml).unwrap();
    let b = &c.routes[0].backends;
    assert_eq!(b[0].label, "localhost:80");
    assert_eq!(b[0].host_header, "localhost");
    assert_eq!(b[0].base_path, "/base");
    assert_eq!(b[1].host_header, "127.0.0.1:9002");
    assert_eq!(b[1].base_path, "/x");
}

#[test]
fn credit_settings_parse() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert!(c.credits.refund_on_failure && c.credits.charge_cache_hits);
    let yaml =
        format!("credits:\n  refund_on_failure: false\n  charge_cache_hits: false\n{MINIMAL}");
    let c = Config::from_yaml(&yaml).unwrap();
    assert!(!c.credits.refund_on_failure && !c.credits.charge_cache_hits);
    let yaml = format!("credits:\n  charge_cache_hits: sometimes\n{MINIMAL}");
    assert!(Config::from_yaml(&yaml).is_err());
}

#[test]
fn longest_cost_prefix_wins() {
    let yaml = format!("{MINIMAL}    cost: 2\n    costs: {{\"/api/v1/fundamentals/\": 5, \"/api/v1/fundamentals/big/\": 9}}\n");
    let c = Config::from_yaml(&yaml).unwrap();
    let r = &c.routes[0];
    assert_eq!(r.cost_for("/api/v1/eod/AAPL"), 2);
    assert_eq!(r.cost_for("/api/v1/fundamentals/AAPL"), 5);
    assert_eq!(r.cost_for("/api/v1/fundamentals/big/AAPL"), 9);
}

#[test]
fn cost_prefix_outside_route_is_rejected() {
    let yaml = format!("{MINIMAL}    costs: {{\"/other/\": 5}}\n");
    let e = errors_of(&yaml);
    assert!(
        e[0].starts_with("routes[0].costs: prefix \"/other/\" can never match"),
        "{e:?}"
    );
}

#[test]
fn numbers_that_broke_serve_are_refused_with_path_and_bound() {
    let cases = [
        (
            format!("server:\n  threads: 0\n{MINIMAL}"),
            "server.threads: must be at least 1",
        ),
        (
            format!("{MINIMAL}    cache: {{ttl_seconds: 18446744073709551000}}\n"),
            "routes[0].cache.ttl_seconds: must be at most 31536000, got 18446744073709551000",
        ),
        (
            format!("{MINIMAL}    cache: {{ttl_seconds: 60, stale_if_error_seconds: 18446744073709551000}}\n"),
            "routes[0].cache.stale_if_error_seconds: must be at most 31536000",
        ),
        (
            format!("cache:\n  memory_entries: 1000000000000\n{MINIMAL}"),
            "cache.memory_entries: must be at most 1000000, got 1000000000000",
        ),
        (
            format!("cache:\n  memory_entries: 100000000\n{MINIMAL}"),
            "cache.memory_entries: must be at most 1000000",
        ),
        (
            format!("{MINIMAL}    costs: {{\"/api/v1/x\": 1000000001}}\n"),
            "routes[0].costs[\"/api/v1/x\"]: must be at most 1000000000",
        ),
    ];
    for (yaml, expected) in cases {
        let e = errors_of(&yaml);
        assert!(
            e.iter().any(|m| m.starts_with(expected)),
            "{expected}: {e:?}"
        );
    }
}

#[test]
fn listeners_may_not_share_an_address() {
    let e = errors_of(&format!(
        "listen: [\"127.0.0.1:9091\"]\nadmin_listen: \"127.0.0.1:9091\"\n{MINIMAL}"
    ));
    assert_eq!(
        e,
        vec!["listen[0]: 127.0.0.1:9091 overlaps admin_listen 127.0.0.1:9091: they must be different ports"]
    );
    let e = errors_of(&format!(
        "listen: [\"0.0.0.0:9091\"]\nadmin_listen: \"127.0.0.1:9091\"\n{MINIMAL}"
    ));
    assert!(
        e[0].starts_with("listen[0]: 0.0.0.0:9091 overlaps admin_listen"),
        "{e:?}"
    );
    let e = errors_of(&format!(
        "listen: [\"127.0.0.1:8080\", \"0.0.0.0:8080\"]\n{MINIMAL}"
    ));
    assert_eq!(
        e,
        vec!["listen[1]: 0.0.0.0:8080 overlaps listen[0] 127.0.0.1:8080"]
    );
    // Port 0 (the kernel picks) and different ports are fine.
    assert!(errors_of(&format!(
        "listen: [\"127.0.0.1:0\", \"127.0.0.1:8081\"]\nadmin_listen: \"127.0.0.1:0\"\n{MINIMAL}"
    ))
    .is_empty());
}

#[test]
fn access_log_null_or_tilde_is_refused() {
    for value in ["~", "null", "\"~\"", "\"~/access.log\"", "\"\""] {
        let e = errors_of(&format!("access_log: {value}\n{MINIMAL}"));
        assert_eq!(e.len(), 1, "{value}: {e:?}");
        assert!(
            e[0].starts_with("access_log: expected stderr, off, or a file path"),
            "{e:?}"
        );
    }
    let c = Config::from_yaml(&format!("access_log: /tmp/a.log\n{MINIMAL}")).unwrap();
    assert!(matches!(c.access_log, AccessTarget::File(p) if p == Path::new("/tmp/a.log")));
}

#[test]
fn backend_userinfo_and_port_zero_are_refused() {
    let e = errors_of(&MINIMAL.replace("http://127.0.0.1:9001", "http://user:pw@127.0.0.1:9001"));
    assert!(
        e[0].starts_with("routes[0].backends[0]: a URL cannot carry user:password@"),
        "{e:?}"
    );
    let e = errors_of(&MINIMAL.replace("http://127.0.0.1:9001", "http://127.0.0.1:0"));
    assert!(
        e[0].starts_with("routes[0].backends[0]: port 0 is not a port"),
        "{e:?}"
    );
    let e = errors_of(&format!(
        "notify:\n  webhook_url: http://a:b@127.0.0.1:9/h\n{MINIMAL}"
    ));
    assert!(
        e[0].starts_with("notify.webhook_url: a URL cannot carry"),
        "{e:?}"
    );
}

#[test]
fn text_problems_are_named_by_line_before_parsing() {
    let e = errors_of(&format!("{MINIMAL}    cost: 1\0\n"));
    assert_eq!(
        e,
        vec!["line 5, column 12: control character U+0000 (only tab and line breaks are allowed)"]
    );
    let deep = format!(
        "{MINIMAL}    costs: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let started = std::time::Instant::now();
    let e = errors_of(&deep);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        e,
        vec!["line 5, column 44: collections nested more than 32 deep"]
    );
    // Brackets inside quotes and comments do not count.
    let quoted = format!(
        "{MINIMAL}    costs: {{\"/api/v1/{}\": 2}} # {}\n",
        "[".repeat(40),
        "{".repeat(40)
    );
    assert!(errors_of(&quoted).is_empty(), "{:?}", errors_of(&quoted));
    let big = format!("{MINIMAL}{}", "#\n".repeat(limits::MAX_CONFIG_BYTES / 2));
    assert!(
        errors_of(&big)[0].starts_with("the file is "),
        "{:?}",
        errors_of(&big)
    );
}

#[test]
fn an_alias_bomb_names_its_first_alias() {
    let mut bomb = String::from("server:\n  a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        bomb.push_str(&format!(
            "  {name}: &{name} [{}]\n",
            vec![format!("*{prev}"); 9].join(",")
        ));
    }
    let e = errors_of(&format!("{bomb}{MINIMAL}"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("the first alias is at line 3, column 10"),
        "{e:?}"
    );
}

#[test]
fn shutdown_timers_default_to_fit_the_unit() {
    for yaml in [
        MINIMAL.to_string(),
        format!("server:\n  threads: 2\n{MINIMAL}"),
    ] {
        let c = Config::from_yaml(&yaml).unwrap();
        assert_eq!(c.server.grace_period_seconds, Some(5));
        assert_eq!(c.server.graceful_shutdown_timeout_seconds, Some(10));
    }
    let yaml = format!(
        "server:\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n{MINIMAL}"
    );
    let c = Config::from_yaml(&yaml).unwrap();
    assert_eq!(c.server.grace_period_seconds, Some(0));
    assert_eq!(c.server.graceful_shutdown_timeout_seconds, Some(1));
}

#[test]
fn work_stealing_defaults_to_off_and_takes_both_values() {
    for yaml in [
        MINIMAL.to_string(),
        format!("server:\n  threads: 2\n{MINIMAL}"),
    ] {
        assert!(!Config::from_yaml(&yaml).unwrap().server.work_stealing);
    }
    for value in [true, false] {
        let yaml = format!("server:\n  work_stealing: {value}\n{MINIMAL}");
        assert_eq!(
            Config::from_yaml(&yaml).unwrap().server.work_stealing,
            value
        );
    }
}

/// A Pingora upgrade that adds a numeric `server` field must add its bound.
#[test]
fn every_numeric_server_field_has_a_bound() {
    const NOT_NUMERIC: &[&str] = &[
        "daemon",
        "error_log",
        "pid_file",
        "upgrade_sock",
        "user",
        "group",
        "working_directory",
        "work_stealing",
        "runtime_enable_alt_timer",
        "ca_file",
        "client_bind_to_ipv4",
        "client_bind_to_ipv6",
        "upstream_debug_ssl_keylog",
        "runtime_metrics_poll_time_histogram",
        "runtime_metrics_poll_time_histogram_scale",
        "daemon_wait_for_ready",
    ];
    let Ok(Value::Mapping(known)) = serde_yaml::to_value(ServerConf::default()) else {
        panic!("ServerConf serializes to a mapping")
    };
    for key in known.keys().filter_map(Value::as_str) {
        let bounded = limits::SERVER_BOUNDS
            .iter()
            .any(|b| b.path == format!("server.{key}"));
        assert!(
            bounded ^ NOT_NUMERIC.contains(&key),
            "server.{key}: bound it or list it as not numeric"
        );
    }
    for b in limits::SERVER_BOUNDS {
        assert!(
            known.contains_key(b.path.trim_start_matches("server.")),
            "{}",
            b.path
        );
    }
}

#[test]
fn the_defaults_are_within_the_bounds() {
    let c = Config::from_yaml(&format!(
        "{MINIMAL}    cache: {{ttl_seconds: 60}}\nnotify: {{}}\n"
    ));
    assert!(c.is_ok(), "{c:?}");
}

#[test]
fn notify_no_data_rule_defaults_and_values() {
    for yaml in [
        MINIMAL.to_string(),
        format!("notify:\n  min_interval_seconds: 60\n{MINIMAL}"),
    ] {
        let n = Config::from_yaml(&yaml).unwrap().notify;
        assert_eq!(n.no_data_ratio, 0.5);
        assert_eq!(n.no_data_window, Duration::from_secs(300));
    }
    for (ratio, window) in [("0.05", 1), ("0.25", 60), ("1", 86_400)] {
        let yaml = format!(
            "notify:\n  no_data_ratio: {ratio}\n  no_data_window_seconds: {window}\n{MINIMAL}"
        );
        let n = Config::from_yaml(&yaml).unwrap().notify;
        assert_eq!(n.no_data_ratio, ratio.parse::<f64>().unwrap());
        assert_eq!(n.no_data_window, Duration::from_secs(window));
    }
}

#[test]
fn notify_no_data_rule_bad_values_name_the_field() {
    for ratio in ["0", "-0.1", "1.5", ".nan"] {
        let yaml = format!("notify:\n  no_data_ratio: {ratio}\n{MINIMAL}");
        let e = errors_of(&yaml);
        assert_eq!(e.len(), 1, "{ratio}: {e:?}");
        assert!(
            e[0].starts_with("notify.no_data_ratio: must be more than 0 and at most 1"),
            "{e:?}"
        );
    }
    let e = errors_of(&format!("notify:\n  no_data_window_seconds: 0\n{MINIMAL}"));
    assert_eq!(e, ["notify.no_data_window_seconds: must be at least 1"]);
    for bad in ["no_data_ratio: half", "no_data_window_seconds: -5"] {
        let e = errors_of(&format!("notify:\n  {bad}\n{MINIMAL}"));
        assert_eq!(e.len(), 1, "{bad}: {e:?}");
        let field = bad.split(':').next().unwrap();
        assert!(e[0].starts_with(&format!("notify.{field}")), "{e:?}");
    }
}

#[test]
fn limits_have_defaults_bounds_and_field_paths() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.limits.request_header_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.max_client_connections, 50_000);

    let with = |body: &str| format!("limits:\n{body}\n{MINIMAL}");
    let c = Config::from_yaml(&with(
        "  request_header_timeout_ms: 100\n  max_client_connections: 10000000",
    ))
    .unwrap();
    assert_eq!(c.limits.request_header_timeout, Duration::from_millis(100));
    assert_eq!(c.limits.max_client_connections, 10_000_000);
    let c = Config::from_yaml(&with(
        "  request_header_timeout_ms: 600000\n  max_client_connections: 1",
    ))
    .unwrap();
    assert_eq!(c.limits.request_header_timeout, Duration::from_secs(600));
    assert_eq!(c.limits.max_client_connections, 1);

    assert_eq!(
        errors_of(&with(
            "  request_header_timeout_ms: 99\n  max_client_connections: 10000001"
        )),
        vec![
            "limits.request_header_timeout_ms: must be at least 100",
            "limits.max_client_connections: must be at most 10000000, got 10000001",
        ]
    );
    assert_eq!(
        errors_of(&with(
            "  request_header_timeout_ms: 600001\n  max_client_connections: 0"
        )),
        vec![
            "limits.request_header_timeout_ms: must be at most 600000, got 600001 (ten minutes)",
            "limits.max_client_connections: must be at least 1",
        ]
    );
    let e = errors_of(&with("  header_timeout_ms: 5"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("limits"), "{e:?}");
    assert!(e[0].contains("unknown field `header_timeout_ms`"), "{e:?}");
    let e = errors_of(&with("  max_client_connections: -1"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("limits.max_client_connections"), "{e:?}");
}

#[test]
fn listeners_are_strings_or_maps_with_tls_and_h2() {
    let c = Config::from_yaml(&format!(
        "listen:\n  - \"127.0.0.1:8080\"\n  - {{addr: \"127.0.0.1:8443\", tls: {{cert: c.pem, key: k.pem}}}}\n  - {{addr: \"127.0.0.1:8444\", tls: {{cert: c.pem, key: k.pem}}, h2: false}}\n  - {{addr: \"127.0.0.1:8081\"}}\n{MINIMAL}"
    ))
    .unwrap();
    let l = &c.listen;
    assert_eq!(l.len(), 4);
    assert!(l[0].tls.is_none() && !l[0].h2);
    let tls = l[1].tls.as_ref().unwrap();
    assert_eq!((tls.cert.as_str(), tls.key.as_str()), ("c.pem", "k.pem"));
    assert!(l[1].h2, "h2 defaults to true on a TLS listener");
    assert!(l[2].tls.is_some() && !l[2].h2);
    assert!(
        l[3].tls.is_none() && !l[3].h2,
        "a map without tls is plain HTTP/1.1"
    );
    assert_eq!(l[1].addr, "127.0.0.1:8443".parse().unwrap());
}

#[test]
fn bad_listener_maps_name_their_field() {
    let e = errors_of(&format!(
        "listen:\n  - {{addr: nowhere}}\n  - {{addr: \"127.0.0.1:1\", h2: true}}\n  - {{addr: \"127.0.0.1:2\", tls: {{cert: c.pem}}}}\n  - {{addr: \"127.0.0.1:3\", tsl: {{}}}}\n{MINIMAL}"
    ));
    assert!(
        e.iter()
            .any(|m| m.starts_with("listen[0].addr: expected an IP address")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("listen[1].h2: HTTP/2 is offered on TLS listeners only")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("listen[2]:") && m.contains("missing field `key`")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("listen[3]:") && m.contains("unknown field `tsl`")),
        "{e:?}"
    );
}

#[test]
fn https_backends_take_port_443_and_keep_their_host_for_verification() {
    let yaml = MINIMAL.replace("http://127.0.0.1:9001", "https://localhost/base");
    let c = Config::from_yaml(&yaml).unwrap();
    let b = &c.routes[0].backends[0];
    assert!(b.tls);
    assert_eq!(
        (b.label.as_str(), b.host.as_str(), b.host_header.as_str()),
        ("localhost:443", "localhost", "localhost")
    );
    assert_eq!(b.addr.port(), 443);
    assert_eq!(b.base_path, "/base");
    let plain = Config::from_yaml(MINIMAL).unwrap();
    assert!(!plain.routes[0].backends[0].tls);
}

#[test]
fn hedge_after_ms_takes_milliseconds_or_auto_and_the_budget_a_percentage() {
    let route = |extra: &str| {
        let yaml = format!("{MINIMAL}    strategy: hedge\n{extra}");
        Config::from_yaml(&yaml).map(|c| {
            let r = &c.routes[0];
            (r.hedge_after, r.hedge_budget_percent)
        })
    };
    let ms = |n| HedgeAfter::Fixed(Duration::from_millis(n));
    // Defaults: 50 ms, 10 %.
    assert_eq!(route("").unwrap(), (ms(50), 10));
    assert_eq!(
        route("    hedge_after_ms: auto\n").unwrap(),
        (HedgeAfter::Auto, 10)
    );
    assert_eq!(route("    hedge_after_ms: 1\n").unwrap().0, ms(1));
    assert_eq!(
        route("    hedge_after_ms: 3600000\n").unwrap().0,
        ms(3_600_000)
    );
    for (budget, want) in [("0", 0), ("1", 1), ("100", 100)] {
        let extra = format!("    hedge_after_ms: auto\n    hedge_budget_percent: {budget}\n");
        assert_eq!(route(&extra).unwrap(), (HedgeAfter::Auto, want));
    }
}

#[test]
fn bad_hedge_values_name_the_field_and_what_is_expected() {
    let errors = |extra: &str| errors_of(&format!("{MINIMAL}    strategy: hedge\n{extra}"));
    let expected = r#"expected a whole number of milliseconds or "auto""#;
    for bad in ["fast", "Auto", "\"50\"", "-5", "2.5", "[]"] {
        let e = errors(&format!("    hedge_after_ms: {bad}\n"));
        assert_eq!(e.len(), 1, "{bad}: {e:?}");
        assert!(
            e[0].starts_with("routes[0].hedge_after_ms: invalid") && e[0].contains(expected),
            "{bad}: {e:?}"
        );
    }
    assert_eq!(
        errors("    hedge_after_ms: 0\n"),
        vec!["routes[0].hedge_after_ms: must be at least 1"]
    );
    assert_eq!(
        errors("    hedge_budget_percent: 101\n"),
        vec!["routes[0].hedge_budget_percent: must be at most 100, got 101 (a share of the route's requests)"]
    );
    for bad in ["-1", "auto", "10.5", "ten"] {
        let e = errors(&format!("    hedge_budget_percent: {bad}\n"));
        assert_eq!(e.len(), 1, "{bad}: {e:?}");
        assert!(
            e[0].starts_with("routes[0].hedge_budget_percent: invalid"),
            "{bad}: {e:?}"
        );
    }
}
