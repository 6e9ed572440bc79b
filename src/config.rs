//! The configuration: the file format (`file.rs`: serde structs that mirror
//! the YAML exactly, `deny_unknown_fields` everywhere, `server` included),
//! converted once into the validated runtime [`Config`] here. `tollgate
//! check` and `tollgate serve -t` both call [`Config::load`], so they accept
//! and reject the same files.

mod file;
pub mod keys;
pub mod limits;
mod route;
mod server;
mod store;
pub mod tls;
mod types;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::Uri;
use pingora::server::configuration::ServerConf;

use file::*;
use keys::{parse_keys, KeyRecord};
pub use route::{Backend, CacheConfig, HealthPolicy, Route};
use store::convert_store;
pub use store::{RedisConfig, RedisTarget};
pub use types::{AccessTarget, HedgeAfter, Strategy, SuccessRule};

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
    pub listen: Vec<Listener>,
    pub admin_listen: SocketAddr,
    /// SHA-256 of the admin API's bearer token; `None`: the `/v1` API is off.
    pub admin_token_sha256: Option<[u8; 32]>,
    pub store: StoreConfig,
    /// `usage.retention_days`: how long the usage ledger keeps a day; 0: no ledger.
    pub usage_retention_days: u32,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub credits: CreditsConfig,
    pub routes: Vec<Route>,
    pub notify: NotifyConfig,
    pub cache: GlobalCacheConfig,
    pub access_log: AccessTarget,
    pub limits: LimitsConfig,
    /// What `check` reports without failing (a certificate that expires soon).
    pub warnings: Vec<ConfigError>,
}

/// One client listener (`listen[i]`).
#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    /// Terminate TLS with these files; `None`: plain HTTP/1.1.
    pub tls: Option<tls::TlsFiles>,
    /// Offer HTTP/2 by ALPN (TLS listeners only).
    pub h2: bool,
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
    /// `None`: the embedded store.
    pub redis: Option<RedisConfig>,
    pub key_prefix: String,
    pub keys_file: Option<String>,
    pub on_error: OnStoreError,
    /// Bound on every Redis call.
    pub timeout: Duration,
    /// The keys file's entries, hashed; read by [`Config::load`] for the
    /// embedded store (with Redis, keys live in Redis).
    pub keys: Vec<KeyRecord>,
    /// `store.leases`: charge from blocks of credits held in process.
    pub leases: Option<LeaseConfig>,
}

/// `store.leases`.
#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// The most credits one node holds of one key.
    pub max_credits: u64,
    /// A lease not renewed this long goes back to its key.
    pub ttl: Duration,
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
        config.load_tls()?;
        Ok(config)
    }

    /// Read and check each TLS listener's certificate and key, and each
    /// route's `backend_ca`. Relative paths are taken from the working
    /// directory.
    pub fn load_tls(&mut self) -> Result<(), ConfigErrors> {
        let mut found = tls::Findings::default();
        for (i, l) in self.listen.iter().enumerate() {
            if let Some(files) = &l.tls {
                tls::check_listener(&format!("listen[{i}].tls"), files, &mut found);
            }
        }
        for (i, route) in self.routes.iter_mut().enumerate() {
            if let Some(file) = &route.backend_ca {
                let at = format!("routes[{i}].backend_ca");
                route.backend_roots = tls::load_ca(&at, file, &mut found.errors);
            }
        }
        if !found.errors.is_empty() {
            return Err(ConfigErrors(found.errors));
        }
        self.warnings.extend(found.warnings);
        Ok(())
    }

    /// Read `store.keys_file` for the embedded store. Relative paths are
    /// taken from the working directory.
    pub fn load_keys(&mut self) -> Result<(), ConfigErrors> {
        let (None, Some(file)) = (&self.store.redis, &self.store.keys_file) else {
            return Ok(());
        };
        let fail = |message: String| ConfigErrors(vec![err("store.keys_file", message)]);
        let bytes = std::fs::read(file).map_err(|e| fail(format!("cannot read {file}: {e}")))?;
        let text = limits::precheck(&bytes, limits::MAX_KEYS_BYTES)
            .map_err(|e| fail(format!("{file}: {}", e.message)))?;
        let in_file = |e: ConfigError| err("store.keys_file", format!("{file}: {e}"));
        let keys = parse_keys(text)
            .map_err(|errors| ConfigErrors(errors.into_iter().map(in_file).collect()))?;
        let unknown = self.unknown_routes(&keys);
        if !unknown.is_empty() {
            return Err(ConfigErrors(unknown.into_iter().map(in_file).collect()));
        }
        self.store.keys = keys;
        Ok(())
    }

    /// The route names this configuration has.
    pub fn route_names(&self) -> Vec<&str> {
        self.routes.iter().map(|r| r.name.as_str()).collect()
    }

    /// A problem for each key whose `routes` names a route this
    /// configuration lacks (`keys[i].routes`).
    pub fn unknown_routes(&self, keys: &[KeyRecord]) -> Vec<ConfigError> {
        let known = self.route_names();
        keys.iter()
            .enumerate()
            .filter_map(|(i, k)| {
                let names = k.lifecycle.routes.as_deref()?;
                let problem = keys::routes_problem(names, Some(&known))?;
                Some(err(format!("keys[{i}].routes"), problem))
            })
            .collect()
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

    /// Section by section, collecting every problem (in the file's order of
    /// sections) rather than stopping at the first.
    fn try_from(file: FileConfig) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();
        let e = &mut errors;
        let server = server::convert_server(file.server, e);
        let (listen, admin_listen) = server::convert_listeners(&file.listen, &file.admin_listen, e);
        let admin_token_sha256 = convert_admin(&file.admin, e);
        let store = convert_store(file.store, e);
        let usage_retention_days = file.usage.retention_days;
        limits::USAGE_RETENTION_DAYS.check("usage.retention_days", usage_retention_days.into(), e);
        let auth = convert_auth(file.auth, e);
        let per_second = file.rate_limit.per_second;
        limits::RATE_PER_SECOND.check("rate_limit.per_second", per_second.into(), e);
        let routes = route::convert_routes(file.routes, e);
        let notify = convert_notify(file.notify.unwrap_or_default(), e);
        let cache = convert_cache(&file.cache, e);
        let access_log = access_target(file.access_log, e);
        if let Some(admin) = admin_listen {
            server::check_listeners(&listen, admin, e);
        }
        let limits = server::convert_limits(&file.limits, e);
        match (errors.is_empty(), server, admin_listen) {
            (true, Some(server), Some(admin_listen)) => Ok(Config {
                server,
                listen,
                admin_listen,
                admin_token_sha256,
                store,
                usage_retention_days,
                auth,
                rate_limit: RateLimitConfig { per_second },
                credits: CreditsConfig {
                    refund_on_failure: file.credits.refund_on_failure,
                    charge_cache_hits: file.credits.charge_cache_hits,
                },
                routes,
                notify,
                cache,
                access_log,
                limits,
                warnings: Vec::new(),
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// A value that names one of a fixed set of choices; anything else is an
/// error listing them (`unknown value "fastest", expected race | hedge |
/// failover`), and the first choice stands in so that checking goes on.
fn choice<T: Copy>(
    path: &str,
    got: &str,
    choices: &[(&str, T)],
    errors: &mut Vec<ConfigError>,
) -> T {
    if let Some((_, value)) = choices.iter().find(|(name, _)| *name == got) {
        return *value;
    }
    let expected: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
    errors.push(err(
        path,
        format!("unknown value \"{got}\", expected {}", expected.join(" | ")),
    ));
    choices[0].1
}

/// `admin.token_sha256`: 64 hex digits.
fn convert_admin(admin: &FileAdmin, errors: &mut Vec<ConfigError>) -> Option<[u8; 32]> {
    let digits = admin.token_sha256.as_deref()?;
    let mut hash = [0u8; 32];
    if hex::decode_to_slice(digits.to_ascii_lowercase(), &mut hash).is_err() {
        errors.push(err(
            "admin.token_sha256",
            "expected the token's SHA-256 as 64 hex digits (tollgate keys admin-token makes one)",
        ));
        return None;
    }
    Some(hash)
}

/// `auth`.
fn convert_auth(auth: FileAuth, errors: &mut Vec<ConfigError>) -> AuthConfig {
    let q = &auth.query_param;
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
    AuthConfig {
        query_param: auth.query_param,
    }
}

/// `notify` (absent: its defaults, no webhook).
fn convert_notify(n: FileNotify, errors: &mut Vec<ConfigError>) -> NotifyConfig {
    let at = "notify.min_interval_seconds";
    limits::NOTIFY_INTERVAL.check(at, n.min_interval_seconds, errors);
    limits::NOTIFY_TIMEOUT_MS.check("notify.timeout_ms", n.timeout_ms, errors);
    let webhook_url = n
        .webhook_url
        .as_deref()
        .and_then(|u| route::http_url("notify.webhook_url", u, errors).map(|(uri, _)| uri));
    let no_data_ratio = no_data_ratio(n.no_data_ratio, errors);
    let (at, secs) = ("notify.no_data_window_seconds", n.no_data_window_seconds);
    limits::NOTIFY_NO_DATA_WINDOW.check(at, secs, errors);
    NotifyConfig {
        webhook_url,
        min_interval: Duration::from_secs(n.min_interval_seconds),
        timeout: Duration::from_millis(n.timeout_ms),
        no_data_ratio,
        no_data_window: Duration::from_secs(secs),
    }
}

/// `cache` (the settings all routes share).
fn convert_cache(c: &FileGlobalCache, errors: &mut Vec<ConfigError>) -> GlobalCacheConfig {
    let entries = c.memory_entries as u64;
    limits::MEMORY_ENTRIES.check("cache.memory_entries", entries, errors);
    limits::LOCK_TIMEOUT_MS.check("cache.lock_timeout_ms", c.lock_timeout_ms, errors);
    GlobalCacheConfig {
        memory_entries: c.memory_entries,
        lock_timeout: Duration::from_millis(c.lock_timeout_ms),
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

/// `notify.no_data_ratio`: a share, more than 0 and at most 1.
fn no_data_ratio(ratio: f64, errors: &mut Vec<ConfigError>) -> f64 {
    if ratio > 0.0 && ratio <= 1.0 {
        return ratio;
    }
    errors.push(err(
        "notify.no_data_ratio",
        format!("must be more than 0 and at most 1 (a share of the route's answers), got {ratio}"),
    ));
    FileNotify::default().no_data_ratio
}

#[cfg(test)]
mod tests;
