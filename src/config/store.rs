//! `store`: which Redis, if any. Exactly one of `redis_url`,
//! `redis_sentinel` and `redis_cluster`; `rediss://` in any of them speaks
//! TLS, verified against the system's roots or `redis_ca`.

use super::file::{FileSentinel, FileStore};
use super::{choice, err, limits, ConfigError, LeaseConfig, OnStoreError, StoreConfig};
use std::time::Duration;

/// Where the Redis store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis: `redis://`, `rediss://` or `unix://`.
    Url(String),
    /// Ask these sentinels (URLs) for the master of `master_name`.
    Sentinel {
        master_name: String,
        sentinels: Vec<String>,
        db: i64,
        password: Option<String>,
        /// `rediss://` sentinels: TLS to them and to the master.
        tls: bool,
    },
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// A Redis store's settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub target: RedisTarget,
    /// `store.redis_ca`: PEM CA certificates for `rediss://` (default: the
    /// system's roots).
    pub ca_pem: Option<Vec<u8>>,
}

impl RedisConfig {
    /// The field the target came from, for error messages.
    pub fn field(&self) -> &'static str {
        match self.target {
            RedisTarget::Url(_) => "store.redis_url",
            RedisTarget::Sentinel { .. } => "store.redis_sentinel",
            RedisTarget::Cluster(_) => "store.redis_cluster",
        }
    }
}

const ON_STORE_ERROR: &[(&str, OnStoreError)] =
    &[("deny", OnStoreError::Deny), ("allow", OnStoreError::Allow)];

/// `store`.
pub(super) fn convert_store(store: FileStore, errors: &mut Vec<ConfigError>) -> StoreConfig {
    let on_error = choice("store.on_error", &store.on_error, ON_STORE_ERROR, errors);
    limits::STORE_TIMEOUT_MS.check("store.timeout_ms", store.timeout_ms, errors);
    let given: Vec<&str> = [
        ("store.redis_url", store.redis_url.is_some()),
        ("store.redis_sentinel", store.redis_sentinel.is_some()),
        ("store.redis_cluster", store.redis_cluster.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if given.len() > 1 {
        errors.push(err(
            given[1],
            format!(
                "{} are mutually exclusive: give one Redis (a URL, sentinels or cluster nodes)",
                given.join(" and ")
            ),
        ));
    }
    let target = if let Some(url) = store.redis_url {
        single(&url, errors).then_some(RedisTarget::Url(url))
    } else if let Some(s) = store.redis_sentinel {
        sentinel(s, errors)
    } else if let Some(nodes) = store.redis_cluster {
        cluster(nodes, errors)
    } else {
        None
    };
    if target.is_none() && store.redis_ca.is_some() && given.is_empty() {
        errors.push(err("store.redis_ca", "only with a Redis store (rediss://)"));
    }
    let ca_pem = store.redis_ca.as_deref().and_then(|file| ca(file, errors));
    let leases = store.leases.and_then(|l| {
        if given.is_empty() {
            errors.push(err(
                "store.leases",
                "only with a Redis store (redis_url, redis_sentinel or redis_cluster): the embedded store charges in process already",
            ));
            return None;
        }
        let ok = limits::LEASE_MAX_CREDITS.check("store.leases.max_credits", l.max_credits, errors)
            & limits::LEASE_TTL_SECONDS.check("store.leases.ttl_seconds", l.ttl_seconds, errors);
        ok.then(|| LeaseConfig {
            max_credits: l.max_credits,
            ttl: Duration::from_secs(l.ttl_seconds),
        })
    });
    StoreConfig {
        redis: target.map(|target| RedisConfig { target, ca_pem }),
        key_prefix: store.key_prefix,
        keys_file: store.keys_file,
        on_error,
        timeout: Duration::from_millis(store.timeout_ms),
        keys: Vec::new(),
        leases,
    }
}

fn single(url: &str, errors: &mut Vec<ConfigError>) -> bool {
    let scheme_ok = ["redis://", "rediss://", "unix://"]
        .iter()
        .any(|s| url.starts_with(s));
    if !scheme_ok || redis::Client::open(url).is_err() {
        errors.push(err(
            "store.redis_url",
            format!("expected a redis://, rediss:// or unix:// URL, got \"{url}\""),
        ));
        return false;
    }
    true
}

/// A node given as `host:port` or a `redis://`/`rediss://` URL, as a URL.
fn node_url(at: &str, node: &str, errors: &mut Vec<ConfigError>) -> Option<String> {
    let has_port = |n: &str| {
        n.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
    };
    let url = if node.contains("://") {
        node.to_string()
    } else if has_port(node) {
        format!("redis://{node}")
    } else {
        String::new()
    };
    let tcp = url.starts_with("redis://") || url.starts_with("rediss://");
    if !tcp || redis::Client::open(url.as_str()).is_err() {
        errors.push(err(
            at,
            format!("expected host:port or a redis:// or rediss:// URL, got \"{node}\""),
        ));
        return None;
    }
    Some(url)
}

/// Node URLs, all with one scheme; whether that is `rediss://`.
fn nodes(at: &str, given: &[String], errors: &mut Vec<ConfigError>) -> Option<(Vec<String>, bool)> {
    if given.is_empty() {
        errors.push(err(at, "expected at least one node"));
        return None;
    }
    let urls: Vec<String> = given
        .iter()
        .enumerate()
        .filter_map(|(i, n)| node_url(&format!("{at}[{i}]"), n, errors))
        .collect();
    if urls.len() != given.len() {
        return None;
    }
    let tls = urls[0].starts_with("rediss://");
    if urls.iter().any(|u| u.starts_with("rediss://") != tls) {
        errors.push(err(at, "mixes redis:// and rediss:// nodes: use one"));
        return None;
    }
    Some((urls, tls))
}

fn sentinel(s: FileSentinel, errors: &mut Vec<ConfigError>) -> Option<RedisTarget> {
    if s.master_name.is_empty() {
        errors.push(err("store.redis_sentinel.master_name", "must not be empty"));
    }
    if !(0..=15).contains(&s.db) {
        errors.push(err(
            "store.redis_sentinel.db",
            format!("must be 0 to 15, got {}", s.db),
        ));
    }
    let (sentinels, tls) = nodes("store.redis_sentinel.sentinels", &s.sentinels, errors)?;
    Some(RedisTarget::Sentinel {
        master_name: s.master_name,
        sentinels,
        db: s.db,
        password: s.password,
        tls,
    })
}

fn cluster(given: Vec<String>, errors: &mut Vec<ConfigError>) -> Option<RedisTarget> {
    let (urls, _) = nodes("store.redis_cluster", &given, errors)?;
    Some(RedisTarget::Cluster(urls))
}

/// `store.redis_ca`: a readable PEM bundle of at least one certificate.
fn ca(file: &str, errors: &mut Vec<ConfigError>) -> Option<Vec<u8>> {
    let pem = match std::fs::read(file) {
        Ok(pem) => pem,
        Err(e) => {
            errors.push(err("store.redis_ca", format!("cannot read {file}: {e}")));
            return None;
        }
    };
    if !openssl::x509::X509::stack_from_pem(&pem).is_ok_and(|c| !c.is_empty()) {
        errors.push(err(
            "store.redis_ca",
            format!("{file} is not a PEM bundle of CA certificates"),
        ));
        return None;
    }
    Some(pem)
}
