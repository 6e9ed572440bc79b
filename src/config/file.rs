//! The configuration file's format: serde structs that mirror the YAML
//! exactly (`deny_unknown_fields` everywhere) with their documented defaults.
//! `super` converts them into the validated runtime [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) server: Option<Value>,
    #[serde(default = "default_listen")]
    pub(super) listen: Vec<String>,
    #[serde(default = "default_admin_listen")]
    pub(super) admin_listen: String,
    #[serde(default)]
    pub(super) store: FileStore,
    #[serde(default)]
    pub(super) auth: FileAuth,
    #[serde(default)]
    pub(super) rate_limit: FileRateLimit,
    #[serde(default)]
    pub(super) credits: FileCredits,
    pub(super) routes: Vec<FileRoute>,
    #[serde(default)]
    pub(super) notify: Option<FileNotify>,
    #[serde(default)]
    pub(super) cache: FileGlobalCache,
    /// `Option` so that `access_log: ~` (null) is refused, not taken as "~".
    #[serde(default = "default_access_log")]
    pub(super) access_log: Option<String>,
    #[serde(default)]
    pub(super) limits: FileLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLimits {
    #[serde(default = "default_request_header_timeout_ms")]
    pub(super) request_header_timeout_ms: u64,
    #[serde(default = "default_max_client_connections")]
    pub(super) max_client_connections: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            request_header_timeout_ms: default_request_header_timeout_ms(),
            max_client_connections: default_max_client_connections(),
        }
    }
}

pub(super) fn default_request_header_timeout_ms() -> u64 {
    10_000
}

pub(super) fn default_max_client_connections() -> u64 {
    50_000
}

pub(super) fn default_access_log() -> Option<String> {
    Some("stderr".to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileGlobalCache {
    #[serde(default = "default_memory_entries")]
    pub(super) memory_entries: usize,
    #[serde(default = "default_lock_timeout_ms")]
    pub(super) lock_timeout_ms: u64,
}

impl Default for FileGlobalCache {
    fn default() -> Self {
        FileGlobalCache {
            memory_entries: default_memory_entries(),
            lock_timeout_ms: default_lock_timeout_ms(),
        }
    }
}

pub(super) fn default_memory_entries() -> usize {
    10_000
}

pub(super) fn default_lock_timeout_ms() -> u64 {
    5_000
}

pub(super) fn default_listen() -> Vec<String> {
    vec!["0.0.0.0:8080".to_string()]
}

pub(super) fn default_admin_listen() -> String {
    "127.0.0.1:9091".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileStore {
    pub(super) redis_url: Option<String>,
    #[serde(default = "default_key_prefix")]
    pub(super) key_prefix: String,
    pub(super) keys_file: Option<String>,
    #[serde(default = "default_on_error")]
    pub(super) on_error: String,
    #[serde(default = "default_store_timeout_ms")]
    pub(super) timeout_ms: u64,
}

impl Default for FileStore {
    fn default() -> Self {
        FileStore {
            redis_url: None,
            key_prefix: default_key_prefix(),
            keys_file: None,
            on_error: default_on_error(),
            timeout_ms: default_store_timeout_ms(),
        }
    }
}

pub(super) fn default_key_prefix() -> String {
    "tollgate:".to_string()
}

pub(super) fn default_store_timeout_ms() -> u64 {
    250
}

pub(super) fn default_on_error() -> String {
    "deny".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAuth {
    #[serde(default = "default_query_param")]
    pub(super) query_param: String,
}

impl Default for FileAuth {
    fn default() -> Self {
        FileAuth {
            query_param: default_query_param(),
        }
    }
}

pub(super) fn default_query_param() -> String {
    "api_key".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRateLimit {
    #[serde(default = "default_per_second")]
    pub(super) per_second: u32,
}

impl Default for FileRateLimit {
    fn default() -> Self {
        FileRateLimit {
            per_second: default_per_second(),
        }
    }
}

pub(super) fn default_per_second() -> u32 {
    50
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCredits {
    #[serde(default = "yes")]
    pub(super) refund_on_failure: bool,
    #[serde(default = "yes")]
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

pub(super) fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub(super) name: String,
    pub(super) prefix: String,
    pub(super) backends: Vec<String>,
    #[serde(default = "default_strategy")]
    pub(super) strategy: String,
    #[serde(default = "default_hedge_after_ms")]
    pub(super) hedge_after_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub(super) timeout_ms: u64,
    #[serde(default = "default_success")]
    pub(super) success: String,
    #[serde(default = "default_cost")]
    pub(super) cost: u64,
    #[serde(default)]
    pub(super) costs: BTreeMap<String, u64>,
    #[serde(default)]
    pub(super) cache: Option<FileCache>,
    #[serde(default = "default_max_response_bytes")]
    pub(super) max_response_bytes: usize,
    #[serde(default = "default_drain_losers_ms")]
    pub(super) drain_losers_ms: u64,
    #[serde(default)]
    pub(super) health: FileHealth,
}

/// `routes[].health`: passive health of the route's backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHealth {
    #[serde(default = "default_health_failures")]
    pub(super) failures: u32,
    #[serde(default = "default_health_skip_seconds")]
    pub(super) skip_seconds: u64,
}

impl Default for FileHealth {
    fn default() -> Self {
        FileHealth {
            failures: default_health_failures(),
            skip_seconds: default_health_skip_seconds(),
        }
    }
}

pub(super) fn default_health_failures() -> u32 {
    5
}
pub(super) fn default_health_skip_seconds() -> u64 {
    10
}

pub(super) fn default_strategy() -> String {
    "race".to_string()
}
pub(super) fn default_hedge_after_ms() -> u64 {
    50
}
pub(super) fn default_timeout_ms() -> u64 {
    30_000
}
pub(super) fn default_success() -> String {
    "json_status".to_string()
}
pub(super) fn default_cost() -> u64 {
    1
}
pub(super) fn default_max_response_bytes() -> usize {
    8 * 1024 * 1024
}
pub(super) fn default_drain_losers_ms() -> u64 {
    50
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
#[serde(deny_unknown_fields)]
pub(super) struct FileNotify {
    pub(super) webhook_url: Option<String>,
    #[serde(default = "default_min_interval")]
    pub(super) min_interval_seconds: u64,
    #[serde(default = "default_notify_timeout_ms")]
    pub(super) timeout_ms: u64,
    #[serde(default = "default_no_data_ratio")]
    pub(super) no_data_ratio: f64,
    #[serde(default = "default_no_data_window")]
    pub(super) no_data_window_seconds: u64,
}

pub(super) fn default_no_data_ratio() -> f64 {
    0.5
}

pub(super) fn default_no_data_window() -> u64 {
    300
}

pub(super) fn default_notify_timeout_ms() -> u64 {
    5_000
}

pub(super) fn default_min_interval() -> u64 {
    300
}
