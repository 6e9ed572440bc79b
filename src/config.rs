//! The configuration: the file format (`file.rs`: serde structs that mirror
//! the YAML exactly, `deny_unknown_fields` everywhere, `server` included),
//! converted once into the validated runtime [`Config`] here. `tollgate
//! check` and `tollgate serve -t` both call [`Config::load`], so they accept
//! and reject the same files.

mod file;
pub mod keys;
pub mod limits;
mod types;

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use http::Uri;
use pingora::server::configuration::ServerConf;
use serde_yaml::Value;

use file::*;
use keys::{parse_keys, KeyRecord};
pub use types::{AccessTarget, Strategy, SuccessRule};

/// One problem in a configuration file, with the field path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Field path such as `routes[1].strategy`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one file (serde stops at the first syntax or type
/// error; the semantic checks after it report all they find).
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// Runtime configuration
// ---------------------------------------------------------------------------

/// The validated configuration the gateway runs on.
#[derive(Debug)]
pub struct Config {
    /// Passed to Pingora's `Server` as is.
    pub server: ServerConf,
    pub listen: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub credits: CreditsConfig,
    pub routes: Vec<Route>,
    pub notify: NotifyConfig,
    pub cache: GlobalCacheConfig,
    pub access_log: AccessTarget,
    pub limits: LimitsConfig,
}

/// Bounds on client connections (`limits:`), applied by `connections.rs`.
#[derive(Debug, Clone, Copy)]
pub struct LimitsConfig {
    /// A request header must arrive whole within this.
    pub request_header_timeout: Duration,
    /// Client connections open at once; more are closed at once.
    pub max_client_connections: usize,
}

/// The cache settings shared by all routes.
#[derive(Debug, Clone)]
pub struct GlobalCacheConfig {
    /// Capacity of the in-process tier, in entries.
    pub memory_entries: usize,
    /// How long a request waits for another request's race for the same
    /// cache key before racing itself.
    pub lock_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    Deny,
    Allow,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub redis_url: Option<String>,
    pub key_prefix: String,
    pub keys_file: Option<String>,
    pub on_error: OnStoreError,
    /// Bound on every Redis call.
    pub timeout: Duration,
    /// The keys file's entries, hashed; read by [`Config::load`] for the
    /// embedded store (with Redis, keys live in Redis).
    pub keys: Vec<KeyRecord>,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub query_param: String,
}

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub per_second: u32,
}

#[derive(Debug, Clone)]
pub struct CreditsConfig {
    pub refund_on_failure: bool,
    pub charge_cache_hits: bool,
}

#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub webhook_url: Option<Uri>,
    pub min_interval: Duration,
    /// Bound on one webhook attempt.
    pub timeout: Duration,
    /// A `no_data` warning is posted when `no_data` answers reach this share
    /// of a route's answers over `no_data_window` (0 < ratio ≤ 1).
    pub no_data_ratio: f64,
    pub no_data_window: Duration,
}

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
}

/// A route: requests whose path starts with `prefix` race its `backends`.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub prefix: String,
    pub backends: Vec<Backend>,
    pub strategy: Strategy,
    pub hedge_after: Duration,
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

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigErrors> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            ConfigErrors(vec![err(
                "",
                format!("cannot read {}: {e}", path.display()),
            )])
        })?;
        let text = limits::precheck(&bytes, limits::MAX_CONFIG_BYTES)
            .map_err(|e| ConfigErrors(vec![e]))?;
        let mut config = Config::from_yaml(text)?;
        config.load_keys()?;
        Ok(config)
    }

    /// Read `store.keys_file` for the embedded store. Relative paths are
    /// taken from the working directory.
    pub fn load_keys(&mut self) -> Result<(), ConfigErrors> {
        let (None, Some(file)) = (&self.store.redis_url, &self.store.keys_file) else {
            return Ok(());
        };
        let fail = |message: String| ConfigErrors(vec![err("store.keys_file", message)]);
        let bytes = std::fs::read(file).map_err(|e| fail(format!("cannot read {file}: {e}")))?;
        let text = limits::precheck(&bytes, limits::MAX_KEYS_BYTES)
            .map_err(|e| fail(format!("{file}: {}", e.message)))?;
        self.store.keys = parse_keys(text).map_err(|errors| {
            ConfigErrors(
                errors
                    .into_iter()
                    .map(|e| err("store.keys_file", format!("{file}: {e}")))
                    .collect(),
            )
        })?;
        Ok(())
    }

    /// Parse and validate configuration text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigErrors> {
        let text = limits::precheck(text.as_bytes(), limits::MAX_CONFIG_BYTES)
            .map_err(|e| ConfigErrors(vec![e]))?;
        // serde_yaml's message starts with the field path ("routes[1].cost: ...").
        let file: FileConfig = serde_yaml::from_str(text)
            .map_err(|e| ConfigErrors(vec![err("", limits::locate(&e, text))]))?;
        Config::try_from(file)
    }
}

impl TryFrom<FileConfig> for Config {
    type Error = ConfigErrors;

    fn try_from(file: FileConfig) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();

        let server = convert_server(file.server, &mut errors);

        if file.listen.is_empty() {
            errors.push(err("listen", "must list at least one address"));
        }
        let listen = file
            .listen
            .iter()
            .enumerate()
            .filter_map(|(i, a)| socket_addr(&format!("listen[{i}]"), a, &mut errors))
            .collect();
        let admin_listen = socket_addr("admin_listen", &file.admin_listen, &mut errors);

        let on_error = match file.store.on_error.as_str() {
            "deny" => OnStoreError::Deny,
            "allow" => OnStoreError::Allow,
            other => {
                errors.push(unknown_value("store.on_error", other, "deny | allow"));
                OnStoreError::Deny
            }
        };
        if let Some(url) = &file.store.redis_url {
            let scheme_ok = url.starts_with("redis://") || url.starts_with("unix://");
            if let (false, _) | (_, Err(_)) = (scheme_ok, redis::Client::open(url.as_str())) {
                errors.push(err(
                    "store.redis_url",
                    format!("expected a redis:// or unix:// URL, got \"{url}\""),
                ));
            }
        }
        limits::STORE_TIMEOUT_MS.check("store.timeout_ms", file.store.timeout_ms, &mut errors);
        let store = StoreConfig {
            redis_url: file.store.redis_url,
            key_prefix: file.store.key_prefix,
            keys_file: file.store.keys_file,
            on_error,
            timeout: Duration::from_millis(file.store.timeout_ms),
            keys: Vec::new(),
        };

        let q = &file.auth.query_param;
        if q.is_empty()
            || !q
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            errors.push(err(
                "auth.query_param",
                format!("expected a query parameter name of letters, digits, _ - ., got \"{q}\""),
            ));
        }
        limits::RATE_PER_SECOND.check(
            "rate_limit.per_second",
            u64::from(file.rate_limit.per_second),
            &mut errors,
        );

        if file.routes.is_empty() {
            errors.push(err("routes", "must list at least one route"));
        }
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        let mut routes = Vec::new();
        for (i, r) in file.routes.into_iter().enumerate() {
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
            if let Some(route) = convert_route(&at, r, &mut errors) {
                routes.push(route);
            }
        }

        let notify = match file.notify {
            None => NotifyConfig {
                webhook_url: None,
                min_interval: Duration::from_secs(default_min_interval()),
                timeout: Duration::from_millis(default_notify_timeout_ms()),
                no_data_ratio: default_no_data_ratio(),
                no_data_window: Duration::from_secs(default_no_data_window()),
            },
            Some(n) => NotifyConfig {
                min_interval: {
                    let at = "notify.min_interval_seconds";
                    limits::NOTIFY_INTERVAL.check(at, n.min_interval_seconds, &mut errors);
                    limits::NOTIFY_TIMEOUT_MS.check("notify.timeout_ms", n.timeout_ms, &mut errors);
                    Duration::from_secs(n.min_interval_seconds)
                },
                webhook_url: n.webhook_url.as_deref().and_then(|u| {
                    http_url("notify.webhook_url", u, &mut errors).map(|(uri, _)| uri)
                }),
                timeout: Duration::from_millis(n.timeout_ms),
                no_data_ratio: no_data_ratio(n.no_data_ratio, &mut errors),
                no_data_window: {
                    let (at, secs) = ("notify.no_data_window_seconds", n.no_data_window_seconds);
                    limits::NOTIFY_NO_DATA_WINDOW.check(at, secs, &mut errors);
                    Duration::from_secs(secs)
                },
            },
        };

        limits::MEMORY_ENTRIES.check(
            "cache.memory_entries",
            file.cache.memory_entries as u64,
            &mut errors,
        );
        limits::LOCK_TIMEOUT_MS.check(
            "cache.lock_timeout_ms",
            file.cache.lock_timeout_ms,
            &mut errors,
        );
        let cache = GlobalCacheConfig {
            memory_entries: file.cache.memory_entries,
            lock_timeout: Duration::from_millis(file.cache.lock_timeout_ms),
        };

        let access_log = access_target(file.access_log, &mut errors);
        if let Some(admin) = admin_listen {
            check_listeners(&file.listen, admin, &mut errors);
        }

        let limits = convert_limits(&file.limits, &mut errors);

        match (errors.is_empty(), server, admin_listen) {
            (true, Some(server), Some(admin_listen)) => Ok(Config {
                server,
                listen,
                admin_listen,
                store,
                auth: AuthConfig {
                    query_param: file.auth.query_param,
                },
                rate_limit: RateLimitConfig {
                    per_second: file.rate_limit.per_second,
                },
                credits: CreditsConfig {
                    refund_on_failure: file.credits.refund_on_failure,
                    charge_cache_hits: file.credits.charge_cache_hits,
                },
                routes,
                notify,
                cache,
                access_log,
                limits,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// `access_log`: `stderr`, `off` or a file path. A `~` is YAML's null (and
/// no shell expands it here), so it and a path starting with it are refused.
fn access_target(value: Option<String>, errors: &mut Vec<ConfigError>) -> AccessTarget {
    const EXPECTED: &str = "expected stderr, off, or a file path";
    match value.as_deref() {
        Some("stderr") => AccessTarget::Stderr,
        Some("off") => AccessTarget::Off,
        None | Some("") => {
            errors.push(err("access_log", format!("{EXPECTED}, got nothing")));
            AccessTarget::Off
        }
        Some(path) if path.starts_with('~') => {
            errors.push(err(
                "access_log",
                format!("{EXPECTED}; \"~\" is not expanded, write the full path, got \"{path}\""),
            ));
            AccessTarget::Off
        }
        Some(path) => AccessTarget::File(path.into()),
    }
}

/// Two listeners on one address would share its connections (Pingora binds
/// with SO_REUSEPORT), so client requests could reach the admin service.
/// An unspecified address (`0.0.0.0`, `[::]`) overlaps every address of its port.
fn check_listeners(listen: &[String], admin: SocketAddr, errors: &mut Vec<ConfigError>) {
    let overlaps = |a: &SocketAddr, b: &SocketAddr| {
        a.port() == b.port()
            && a.port() != 0
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    let parsed: Vec<(usize, SocketAddr)> = listen
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some((i, t.parse().ok()?)))
        .collect();
    for (k, (i, a)) in parsed.iter().enumerate() {
        if overlaps(a, &admin) {
            errors.push(err(
                format!("listen[{i}]"),
                format!("{a} overlaps admin_listen {admin}: they must be different ports"),
            ));
        }
        if let Some((j, b)) = parsed[..k].iter().find(|(_, b)| overlaps(a, b)) {
            errors.push(err(
                format!("listen[{i}]"),
                format!("{a} overlaps listen[{j}] {b}"),
            ));
        }
    }
}

fn convert_limits(l: &FileLimits, errors: &mut Vec<ConfigError>) -> LimitsConfig {
    let (at, timeout_ms) = (
        "limits.request_header_timeout_ms",
        l.request_header_timeout_ms,
    );
    limits::REQUEST_HEADER_TIMEOUT_MS.check(at, timeout_ms, errors);
    let (at, max) = ("limits.max_client_connections", l.max_client_connections);
    limits::MAX_CLIENT_CONNECTIONS.check(at, max, errors);
    LimitsConfig {
        request_header_timeout: Duration::from_millis(timeout_ms),
        max_client_connections: usize::try_from(max).unwrap_or(usize::MAX),
    }
}

fn unknown_value(path: &str, got: &str, expected: &str) -> ConfigError {
    err(
        path,
        format!("unknown value \"{got}\", expected {expected}"),
    )
}

/// The `server` section is Pingora's `ServerConf`, which ignores unknown keys;
/// tollgate rejects them, so a misspelt `grace_period_second` is not silently lost.
fn convert_server(value: Option<Value>, errors: &mut Vec<ConfigError>) -> Option<ServerConf> {
    let value = match value {
        None | Some(Value::Null) => return Some(with_shutdown_defaults(ServerConf::default())),
        Some(v) => v,
    };
    let Value::Mapping(map) = &value else {
        errors.push(err(
            "server",
            "expected a mapping of Pingora server settings",
        ));
        return None;
    };
    // The fields ServerConf knows are the ones it serializes.
    let known = match serde_yaml::to_value(ServerConf::default()) {
        Ok(Value::Mapping(m)) => m,
        _ => serde_yaml::Mapping::new(),
    };
    let mut ok = true;
    for key in map.keys() {
        if !known.contains_key(key) {
            ok = false;
            let name = key.as_str().unwrap_or("?");
            let mut expected: Vec<&str> = known.keys().filter_map(Value::as_str).collect();
            expected.sort_unstable();
            errors.push(err(
                format!("server.{name}"),
                format!("unknown field, expected one of: {}", expected.join(", ")),
            ));
        }
    }
    if !ok || !limits::check_server(map, errors) {
        return None;
    }
    let conf: ServerConf = match serde_yaml::from_value(value) {
        Ok(c) => c,
        Err(e) => {
            errors.push(err("server", e.to_string()));
            return None;
        }
    };
    if conf.daemon_wait_for_ready {
        errors.push(err(
            "server.daemon_wait_for_ready",
            "not supported: tollgate takes over the sockets before it daemonizes, \
             so `serve -u -d` already returns only once the new process holds them",
        ));
        return None;
    }
    match conf.validate() {
        Ok(c) => Some(with_shutdown_defaults(c)),
        Err(e) => {
            errors.push(err("server", e.to_string()));
            None
        }
    }
}

/// Pingora waits 300 s (`grace_period_seconds`) after a SIGTERM or SIGQUIT
/// before it stops, far past systemd's `TimeoutStopSec=30` in our unit; when
/// the file leaves them out, tollgate's defaults keep a stop within ~15 s.
fn with_shutdown_defaults(mut conf: ServerConf) -> ServerConf {
    conf.grace_period_seconds
        .get_or_insert(limits::DEFAULT_GRACE_PERIOD_SECONDS);
    conf.graceful_shutdown_timeout_seconds
        .get_or_insert(limits::DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS);
    conf
}

fn socket_addr(path: &str, text: &str, errors: &mut Vec<ConfigError>) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(err(
                path,
                format!("expected an IP address and port such as 127.0.0.1:8080, got \"{text}\""),
            ));
            None
        }
    }
}

/// Parse an `http://host[:port][/path]` URL; returns it with its `host:port`.
/// `notify.no_data_ratio`: a share, more than 0 and at most 1.
fn no_data_ratio(ratio: f64, errors: &mut Vec<ConfigError>) -> f64 {
    if ratio > 0.0 && ratio <= 1.0 {
        return ratio;
    }
    errors.push(err(
        "notify.no_data_ratio",
        format!("must be more than 0 and at most 1 (a share of the route's answers), got {ratio}"),
    ));
    default_no_data_ratio()
}

fn http_url(path: &str, text: &str, errors: &mut Vec<ConfigError>) -> Option<(Uri, String)> {
    let fail = |errors: &mut Vec<ConfigError>, why: &str| {
        errors.push(err(path, format!("{why}, got \"{text}\"")));
        None
    };
    let Ok(uri) = text.parse::<Uri>() else {
        return fail(errors, "expected a URL such as http://127.0.0.1:9001");
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return fail(errors, "https backends are not supported (plain HTTP only)"),
        _ => return fail(errors, "expected a URL such as http://127.0.0.1:9001"),
    }
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
    let port = uri.port_u16().unwrap_or(80);
    if port == 0 {
        return fail(errors, "port 0 is not a port to connect to");
    }
    let host_port = format!("{host}:{port}");
    Some((uri, host_port))
}

fn convert_route(at: &str, r: FileRoute, errors: &mut Vec<ConfigError>) -> Option<Route> {
    let before = errors.len();
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
    let mut labels = HashSet::new();
    let mut backends = Vec::new();
    for (j, text) in r.backends.iter().enumerate() {
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
        let host_header = match uri.port_u16() {
            Some(_) => label.clone(),
            None => uri.host().unwrap_or_default().to_string(),
        };
        backends.push(Backend {
            label,
            addr,
            host_header,
            base_path: uri.path().trim_end_matches('/').to_string(),
        });
    }
    let strategy = match r.strategy.as_str() {
        "race" => Strategy::Race,
        "hedge" => Strategy::Hedge,
        "failover" => Strategy::Failover,
        other => {
            errors.push(unknown_value(
                &format!("{at}.strategy"),
                other,
                "race | hedge | failover",
            ));
            Strategy::Race
        }
    };
    let success = match r.success.as_str() {
        "json_status" => SuccessRule::JsonStatus,
        "http_2xx" => SuccessRule::Http2xx,
        other => {
            errors.push(unknown_value(
                &format!("{at}.success"),
                other,
                "json_status | http_2xx",
            ));
            SuccessRule::JsonStatus
        }
    };
    limits::TIMEOUT_MS.check(&format!("{at}.timeout_ms"), r.timeout_ms, errors);
    limits::HEDGE_AFTER_MS.check(&format!("{at}.hedge_after_ms"), r.hedge_after_ms, errors);
    limits::MAX_RESPONSE_BYTES.check(
        &format!("{at}.max_response_bytes"),
        r.max_response_bytes as u64,
        errors,
    );
    limits::DRAIN_LOSERS_MS.check(&format!("{at}.drain_losers_ms"), r.drain_losers_ms, errors);
    limits::COST.check(&format!("{at}.cost"), r.cost, errors);
    let mut costs: Vec<(String, u64)> = r.costs.into_iter().collect();
    for (p, cost) in &costs {
        limits::COSTS.check(&format!("{at}.costs[{p:?}]"), *cost, errors);
        if !p.starts_with(&r.prefix) {
            errors.push(err(
                format!("{at}.costs"),
                format!(
                    "prefix \"{p}\" can never match: it does not start with the route prefix \"{}\"",
                    r.prefix
                ),
            ));
        }
    }
    costs.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    let cache = r.cache.map(|c| {
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
    });
    let health = convert_health(at, &r.health, errors);
    if errors.len() > before {
        return None;
    }
    Some(Route {
        name: r.name,
        prefix: r.prefix,
        backends,
        strategy,
        hedge_after: Duration::from_millis(r.hedge_after_ms),
        timeout: Duration::from_millis(r.timeout_ms),
        success,
        cost: r.cost,
        costs,
        cache,
        max_response_bytes: r.max_response_bytes,
        drain_losers: Duration::from_millis(r.drain_losers_ms),
        health,
    })
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

#[cfg(test)]
mod tests;
