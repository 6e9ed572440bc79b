//! `routes[]`: a route's runtime form (its backends, strategy, costs,
//! cache and health settings) and its conversion from the file, one part of
//! a route per function, each error with its field path.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use http::Uri;

use super::file::{FileCache, FileHealth, FileHedgeAfter, FileRoute};
use super::{choice, err, limits, ConfigError, HedgeAfter, Strategy, SuccessRule};

const STRATEGIES: &[(&str, Strategy)] = &[
    ("race", Strategy::Race),
    ("hedge", Strategy::Hedge),
    ("failover", Strategy::Failover),
];

const SUCCESS_RULES: &[(&str, SuccessRule)] = &[
    ("json_status", SuccessRule::JsonStatus),
    ("http_2xx", SuccessRule::Http2xx),
];

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub stale_if_error: Duration,
    pub max_body_bytes: usize,
}

/// One upstream replica of a route.
#[derive(Debug, Clone)]
pub struct Backend {
    /// `host:port` as written in the config: the metrics label and log name.
    pub label: String,
    /// Resolved once at load time.
    pub addr: SocketAddr,
    /// The `Host` header sent to this backend.
    pub host_header: String,
    /// The URL's own path without a trailing `/` (empty when the URL has none);
    /// the client's path is appended to it.
    pub base_path: String,
    /// `https://`: TLS, the certificate verified for `host` (also the SNI).
    pub tls: bool,
    /// The URL's host, the name a TLS backend's certificate must carry.
    pub host: String,
}

/// A route: requests whose path starts with `prefix` race its `backends`.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub prefix: String,
    pub backends: Vec<Backend>,
    pub strategy: Strategy,
    /// `hedge`: when the next backend starts.
    pub hedge_after: HedgeAfter,
    /// `hedge`: attempts started by the hedge timer, at most this share (in
    /// percent, 0-100) of the route's races over the last 10 s.
    pub hedge_budget_percent: u32,
    pub timeout: Duration,
    pub success: SuccessRule,
    pub cost: u64,
    /// `(path prefix, cost)`, longest prefix first.
    pub costs: Vec<(String, u64)>,
    pub cache: Option<CacheConfig>,
    /// A backend answer with a larger body fails that attempt.
    pub max_response_bytes: usize,
    /// How long a race's losers may still finish, in the background, so that
    /// their connections go back to the pool instead of being closed.
    pub drain_losers: Duration,
    /// Passive health of the backends; `None`: never skip one.
    pub health: Option<HealthPolicy>,
    /// `backend_ca`: the PEM bundle that https backends are verified
    /// against instead of the system's roots.
    pub backend_ca: Option<String>,
    /// `backend_ca` read (by `Config::load_tls`).
    pub backend_roots: Option<super::tls::CaBundle>,
}

/// When a backend is skipped (`routes[].health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Failed attempts in a row that make a backend skipped.
    pub failures: u32,
    /// How long it is skipped before one request may try it again.
    pub skip: Duration,
}

impl Route {
    /// The cost of a request path: the longest matching `costs` prefix, else `cost`.
    pub fn cost_for(&self, path: &str) -> u64 {
        self.costs
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(self.cost, |(_, cost)| *cost)
    }
}

/// `routes`: at least one, names and prefixes unique.
pub(super) fn convert_routes(routes: Vec<FileRoute>, errors: &mut Vec<ConfigError>) -> Vec<Route> {
    if routes.is_empty() {
        errors.push(err("routes", "must list at least one route"));
    }
    let mut names = HashSet::new();
    let mut prefixes = HashSet::new();
    let mut out = Vec::new();
    for (i, r) in routes.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        if !names.insert(r.name.clone()) {
            errors.push(err(
                format!("{at}.name"),
                format!("duplicate route name \"{}\"", r.name),
            ));
        }
        if !prefixes.insert(r.prefix.clone()) {
            errors.push(err(
                format!("{at}.prefix"),
                format!("duplicate route prefix \"{}\"", r.prefix),
            ));
        }
        if let Some(route) = convert_route(&at, r, errors) {
            out.push(route);
        }
    }
    out
}

fn convert_route(at: &str, r: FileRoute, errors: &mut Vec<ConfigError>) -> Option<Route> {
    let before = errors.len();
    check_route(at, &r, errors);
    let backends = convert_backends(at, &r.backends, errors);
    let strategy = choice(&format!("{at}.strategy"), &r.strategy, STRATEGIES, errors);
    let success = choice(&format!("{at}.success"), &r.success, SUCCESS_RULES, errors);
    limits::TIMEOUT_MS.check(&format!("{at}.timeout_ms"), r.timeout_ms, errors);
    let hedge_after = match r.hedge_after_ms {
        FileHedgeAfter::Auto => HedgeAfter::Auto,
        FileHedgeAfter::Ms(ms) => {
            limits::HEDGE_AFTER_MS.check(&format!("{at}.hedge_after_ms"), ms, errors);
            HedgeAfter::Fixed(Duration::from_millis(ms))
        }
    };
    limits::HEDGE_BUDGET_PERCENT.check(
        &format!("{at}.hedge_budget_percent"),
        r.hedge_budget_percent,
        errors,
    );
    limits::MAX_RESPONSE_BYTES.check(
        &format!("{at}.max_response_bytes"),
        r.max_response_bytes as u64,
        errors,
    );
    limits::DRAIN_LOSERS_MS.check(&format!("{at}.drain_losers_ms"), r.drain_losers_ms, errors);
    limits::COST.check(&format!("{at}.cost"), r.cost, errors);
    let costs = convert_costs(at, r.costs, &r.prefix, errors);
    let cache = r.cache.map(|c| convert_cache(at, c, errors));
    let health = convert_health(at, &r.health, errors);
    if errors.len() > before {
        return None;
    }
    Some(Route {
        name: r.name,
        prefix: r.prefix,
        backends,
        strategy,
        hedge_after,
        hedge_budget_percent: u32::try_from(r.hedge_budget_percent).unwrap_or(100),
        timeout: Duration::from_millis(r.timeout_ms),
        success,
        cost: r.cost,
        costs,
        cache,
        max_response_bytes: r.max_response_bytes,
        drain_losers: Duration::from_millis(r.drain_losers_ms),
        health,
        backend_ca: r.backend_ca,
        backend_roots: None,
    })
}

/// `routes[i].name` (a metrics label), `prefix` and that it has backends.
fn check_route(at: &str, r: &FileRoute, errors: &mut Vec<ConfigError>) {
    if r.name.is_empty()
        || !r
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        errors.push(err(
            format!("{at}.name"),
            format!(
                "expected letters, digits, _ - . (it becomes a metrics label), got \"{}\"",
                r.name
            ),
        ));
    }
    if !r.prefix.starts_with('/') {
        errors.push(err(
            format!("{at}.prefix"),
            format!("expected a path starting with /, got \"{}\"", r.prefix),
        ));
    }
    if r.backends.is_empty() {
        errors.push(err(
            format!("{at}.backends"),
            "must list at least one backend URL",
        ));
    }
}

/// `routes[i].backends`: each URL parsed and resolved once, no duplicates.
fn convert_backends(at: &str, urls: &[String], errors: &mut Vec<ConfigError>) -> Vec<Backend> {
    let mut labels = HashSet::new();
    let mut backends = Vec::new();
    for (j, text) in urls.iter().enumerate() {
        let path = format!("{at}.backends[{j}]");
        let Some((uri, label)) = http_url(&path, text, errors) else {
            continue;
        };
        if !labels.insert(label.clone()) {
            errors.push(err(&path, format!("duplicate backend {label}")));
            continue;
        }
        let addr = match label.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => addr,
            _ => {
                errors.push(err(&path, format!("cannot resolve {label}")));
                continue;
            }
        };
        let host = uri.host().unwrap_or_default().to_string();
        let host_header = match uri.port_u16() {
            Some(_) => label.clone(),
            None => host.clone(),
        };
        backends.push(Backend {
            label,
            addr,
            host_header,
            base_path: uri.path().trim_end_matches('/').to_string(),
            tls: uri.scheme_str() == Some("https"),
            host,
        });
    }
    backends
}

/// Parse an `http(s)://host[:port][/path]` URL; returns it with its `host:port`.
pub(super) fn http_url(
    path: &str,
    text: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<(Uri, String)> {
    let fail = |errors: &mut Vec<ConfigError>, why: &str| {
        errors.push(err(path, format!("{why}, got \"{text}\"")));
        None
    };
    let Ok(uri) = text.parse::<Uri>() else {
        return fail(errors, "expected a URL such as http://127.0.0.1:9001");
    };
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return fail(errors, "expected a URL such as http://127.0.0.1:9001"),
    };
    let Some(host) = uri.host() else {
        return fail(errors, "expected a URL with a host");
    };
    if uri.query().is_some() {
        return fail(errors, "a backend URL cannot carry a query string");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return fail(
            errors,
            "a URL cannot carry user:password@ (tollgate would not send it; it is refused rather than dropped)",
        );
    }
    let port = uri.port_u16().unwrap_or(default_port);
    if port == 0 {
        return fail(errors, "port 0 is not a port to connect to");
    }
    let host_port = format!("{host}:{port}");
    Some((uri, host_port))
}

/// `routes[i].costs`: per path prefix, each under the route's prefix;
/// longest prefix first.
fn convert_costs(
    at: &str,
    costs: BTreeMap<String, u64>,
    route_prefix: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<(String, u64)> {
    let mut costs: Vec<(String, u64)> = costs.into_iter().collect();
    for (p, cost) in &costs {
        limits::COSTS.check(&format!("{at}.costs[{p:?}]"), *cost, errors);
        if !p.starts_with(route_prefix) {
            errors.push(err(
                format!("{at}.costs"),
                format!(
                    "prefix \"{p}\" can never match: it does not start with the route prefix \"{}\"",
                    route_prefix
                ),
            ));
        }
    }
    costs.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    costs
}

/// `routes[i].cache`.
fn convert_cache(at: &str, c: FileCache, errors: &mut Vec<ConfigError>) -> CacheConfig {
    limits::CACHE_TTL.check(&format!("{at}.cache.ttl_seconds"), c.ttl_seconds, errors);
    limits::CACHE_STALE.check(
        &format!("{at}.cache.stale_if_error_seconds"),
        c.stale_if_error_seconds,
        errors,
    );
    limits::CACHE_MAX_BODY.check(
        &format!("{at}.cache.max_body_bytes"),
        c.max_body_bytes as u64,
        errors,
    );
    CacheConfig {
        ttl: Duration::from_secs(c.ttl_seconds),
        stale_if_error: Duration::from_secs(c.stale_if_error_seconds),
        max_body_bytes: c.max_body_bytes,
    }
}

/// `failures: 0` turns passive health off.
fn convert_health(at: &str, h: &FileHealth, errors: &mut Vec<ConfigError>) -> Option<HealthPolicy> {
    limits::HEALTH_FAILURES.check(
        &format!("{at}.health.failures"),
        u64::from(h.failures),
        errors,
    );
    if h.failures == 0 {
        return None;
    }
    let skip_at = format!("{at}.health.skip_seconds");
    limits::HEALTH_SKIP_SECONDS.check(&skip_at, h.skip_seconds, errors);
    Some(HealthPolicy {
        failures: h.failures,
        skip: Duration::from_secs(h.skip_seconds),
    })
}
