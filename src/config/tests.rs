//! Unit tests of configuration parsing and validation.

use super::*;

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
    assert_eq!(c.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
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
fn limits_have_defaults_bounds_and_field_paths() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.limits.request_header_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.max_client_connections, 50_000);

    let with = |body: &str| format!("limits:\n{body}\n{MINIMAL}");
    let c = Config::from_yaml(&with(
        "  request_header_timeout_ms: 1\n  max_client_connections: 10000000",
    ))
    .unwrap();
    assert_eq!(c.limits.request_header_timeout, Duration::from_millis(1));
    assert_eq!(c.limits.max_client_connections, 10_000_000);
    let c = Config::from_yaml(&with(
        "  request_header_timeout_ms: 600000\n  max_client_connections: 1",
    ))
    .unwrap();
    assert_eq!(c.limits.request_header_timeout, Duration::from_secs(600));
    assert_eq!(c.limits.max_client_connections, 1);

    assert_eq!(
        errors_of(&with(
            "  request_header_timeout_ms: 0\n  max_client_connections: 10000001"
        )),
        vec![
            "limits.request_header_timeout_ms: must be between 1 and 600000, got 0",
            "limits.max_client_connections: must be between 1 and 10000000, got 10000001",
        ]
    );
    assert_eq!(
        errors_of(&with(
            "  request_header_timeout_ms: 600001\n  max_client_connections: 0"
        )),
        vec![
            "limits.request_header_timeout_ms: must be between 1 and 600000, got 600001",
            "limits.max_client_connections: must be between 1 and 10000000, got 0",
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
