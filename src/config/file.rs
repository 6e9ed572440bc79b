//! The configuration file's format: serde structs that mirror the YAML
//! exactly (`deny_unknown_fields` everywhere) with their documented defaults.
//! `super` converts them into the validated runtime [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) server: Option<Value>,
    /// Strings (plain HTTP/1.1) or maps; see `server::convert_listeners`.
    pub(super) listen: Vec<Value>,
    pub(super) admin_listen: String,
    pub(super) admin: FileAdmin,
    pub(super) store: FileStore,
    pub(super) usage: FileUsage,
    pub(super) auth: FileAuth,
    pub(super) rate_limit: FileRateLimit,
    pub(super) credits: FileCredits,
    pub(super) routes: Vec<FileRoute>,
    pub(super) notify: Option<FileNotify>,
    pub(super) cache: FileGlobalCache,
    /// `Option` so that `access_log: ~` (null) is refused, not taken as "~".
    pub(super) access_log: Option<String>,
    pub(super) limits: FileLimits,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            server: None,
            listen: vec![Value::String("0.0.0.0:8080".to_string())],
            admin_listen: "127.0.0.1:9091".to_string(),
            admin: FileAdmin::default(),
            usage: FileUsage::default(),
            store: FileStore::default(),
            auth: FileAuth::default(),
            rate_limit: FileRateLimit::default(),
            credits: FileCredits::default(),
            routes: Vec::new(),
            notify: None,
            cache: FileGlobalCache::default(),
            access_log: Some("stderr".to_string()),
            limits: FileLimits::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileLimits {
    pub(super) request_header_timeout_ms: u64,
    pub(super) max_client_connections: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            request_header_timeout_ms: 10_000,
            max_client_connections: 50_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileGlobalCache {
    pub(super) memory_entries: usize,
    pub(super) lock_timeout_ms: u64,
}

impl Default for FileGlobalCache {
    fn default() -> Self {
        FileGlobalCache {
            memory_entries: 10_000,
            lock_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileStore {
    pub(super) redis_url: Option<String>,
    pub(super) redis_sentinel: Option<FileSentinel>,
    pub(super) redis_cluster: Option<Vec<String>>,
    pub(super) redis_ca: Option<String>,
    pub(super) key_prefix: String,
    pub(super) keys_file: Option<String>,
    pub(super) on_error: String,
    pub(super) timeout_ms: u64,
    pub(super) leases: Option<FileLeases>,
}

/// `store.leases`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLeases {
    pub(super) max_credits: u64,
    pub(super) ttl_seconds: u64,
}

/// `store.redis_sentinel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSentinel {
    pub(super) master_name: String,
    pub(super) sentinels: Vec<String>,
    #[serde(default)]
    pub(super) db: i64,
    pub(super) password: Option<String>,
}

impl Default for FileStore {
    fn default() -> Self {
        FileStore {
            redis_url: None,
            redis_sentinel: None,
            redis_cluster: None,
            redis_ca: None,
            key_prefix: "tollgate:".to_string(),
            keys_file: None,
            on_error: "deny".to_string(),
            timeout_ms: 250,
            leases: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileAuth {
    pub(super) query_param: String,
}

impl Default for FileAuth {
    fn default() -> Self {
        FileAuth {
            query_param: "api_key".to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileRateLimit {
    pub(super) per_second: u32,
}

impl Default for FileRateLimit {
    fn default() -> Self {
        FileRateLimit { per_second: 50 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileCredits {
    pub(super) refund_on_failure: bool,
    pub(super) charge_cache_hits: bool,
}

impl Default for FileCredits {
    fn default() -> Self {
        FileCredits {
            refund_on_failure: true,
            charge_cache_hits: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileRoute {
    pub(super) name: String,
    pub(super) prefix: String,
    pub(super) backends: Vec<String>,
    pub(super) strategy: String,
    pub(super) hedge_after_ms: FileHedgeAfter,
    pub(super) hedge_budget_percent: u64,
    pub(super) timeout_ms: u64,
    pub(super) success: String,
    pub(super) cost: u64,
    pub(super) costs: BTreeMap<String, u64>,
    pub(super) cache: Option<FileCache>,
    pub(super) max_response_bytes: usize,
    pub(super) drain_losers_ms: u64,
    pub(super) health: FileHealth,
    pub(super) backend_ca: Option<String>,
}

/// A route's required fields default to empty here; the conversion refuses
/// them empty, naming the field (`routes[0].backends: must list at least one
/// backend URL`).
impl Default for FileRoute {
    fn default() -> Self {
        FileRoute {
            name: String::new(),
            prefix: String::new(),
            backends: Vec::new(),
            strategy: "race".to_string(),
            hedge_after_ms: FileHedgeAfter::Ms(50),
            hedge_budget_percent: 10,
            timeout_ms: 30_000,
            success: "json_status".to_string(),
            cost: 1,
            costs: BTreeMap::new(),
            cache: None,
            max_response_bytes: 8 * 1024 * 1024,
            drain_losers_ms: 50,
            health: FileHealth::default(),
            backend_ca: None,
        }
    }
}

/// `routes[].hedge_after_ms`: a whole number of milliseconds, or `auto`.
/// Read by hand so that a wrong value gets one message that names both
/// forms (an untagged enum would say "did not match any variant").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileHedgeAfter {
    Ms(u64),
    Auto,
}

impl<'de> Deserialize<'de> for FileHedgeAfter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = FileHedgeAfter;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number of milliseconds or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(FileHedgeAfter::Ms(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "auto" => Ok(FileHedgeAfter::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `routes[].health`: passive health of the route's backends.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileHealth {
    pub(super) failures: u32,
    pub(super) skip_seconds: u64,
}

impl Default for FileHealth {
    fn default() -> Self {
        FileHealth {
            failures: 5,
            skip_seconds: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCache {
    pub(super) ttl_seconds: u64,
    #[serde(default)]
    pub(super) stale_if_error_seconds: u64,
    #[serde(default = "default_cache_max_body")]
    pub(super) max_body_bytes: usize,
}

pub(super) fn default_cache_max_body() -> usize {
    1024 * 1024
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileNotify {
    pub(super) webhook_url: Option<String>,
    pub(super) min_interval_seconds: u64,
    pub(super) timeout_ms: u64,
    pub(super) no_data_ratio: f64,
    pub(super) no_data_window_seconds: u64,
}

impl Default for FileNotify {
    fn default() -> Self {
        FileNotify {
            webhook_url: None,
            min_interval_seconds: 300,
            timeout_ms: 5_000,
            no_data_ratio: 0.5,
            no_data_window_seconds: 300,
        }
    }
}

/// `admin:` — the admin API's bearer token, as its SHA-256.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileAdmin {
    pub(super) token_sha256: Option<String>,
}

/// `usage:` — the usage ledger.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct FileUsage {
    pub(super) retention_days: u32,
}

impl Default for FileUsage {
    fn default() -> Self {
        FileUsage {
            retention_days: 400,
        }
    }
}
