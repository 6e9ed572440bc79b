//! Limits on what a configuration (or keys) file may say, checked by
//! `tollgate check` so that `serve` never meets a value it cannot run with:
//! the accepted range of every numeric field ([`BOUNDS`], one table that the
//! checks, the tests and the README's reference all follow), the
//! defaults tollgate gives Pingora's shutdown timers, and what a file's text
//! may hold before the YAML parser sees it (its size, control characters,
//! flow nesting: a 100,000-deep `[[[…]]]` took the parser 107 s, quadratic).

use std::fmt::Write as _;

use serde_yaml::Value;

use super::{err, ConfigError};

/// The accepted range of one numeric field, both ends included.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// Field path with `[]` for any index (or, for `costs`, any prefix).
    pub path: &'static str,
    pub min: u64,
    pub max: u64,
    /// Why the maximum is what it is, when it is not obvious.
    pub why: &'static str,
}

const fn bound(path: &'static str, min: u64, max: u64, why: &'static str) -> Bound {
    Bound {
        path,
        min,
        max,
        why,
    }
}

const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;
const YEAR_S: u64 = 365 * 86_400;
const GIB: u64 = 1 << 30;
/// Credits are numbers in Redis' Lua scripts (doubles): exact below 2^53.
pub const MAX_CREDITS: u64 = 1_000_000_000_000_000;

pub const STORE_TIMEOUT_MS: Bound = bound("store.timeout_ms", 1, MINUTE_MS, "");
pub const RATE_PER_SECOND: Bound = bound("rate_limit.per_second", 1, 1_000_000_000, "");
pub const HEDGE_AFTER_MS: Bound = bound("routes[].hedge_after_ms", 1, HOUR_MS, "");
pub const HEDGE_BUDGET_PERCENT: Bound = bound(
    "routes[].hedge_budget_percent",
    0,
    100,
    "a share of the route's requests",
);
pub const TIMEOUT_MS: Bound = bound("routes[].timeout_ms", 1, HOUR_MS, "");
pub const COST: Bound = bound("routes[].cost", 0, 1_000_000_000, "");
pub const COSTS: Bound = bound("routes[].costs[]", 0, 1_000_000_000, "");
pub const MAX_RESPONSE_BYTES: Bound = bound(
    "routes[].max_response_bytes",
    1,
    GIB,
    "an answer is held in memory",
);
pub const HEALTH_FAILURES: Bound = bound("routes[].health.failures", 0, 1_000, "");
pub const HEALTH_SKIP_SECONDS: Bound = bound("routes[].health.skip_seconds", 1, 86_400, "one day");
pub const DRAIN_LOSERS_MS: Bound = bound("routes[].drain_losers_ms", 0, MINUTE_MS, "");
pub const CACHE_TTL: Bound = bound("routes[].cache.ttl_seconds", 1, YEAR_S, "one year");
pub const CACHE_STALE: Bound = bound(
    "routes[].cache.stale_if_error_seconds",
    0,
    YEAR_S,
    "one year",
);
pub const CACHE_MAX_BODY: Bound = bound(
    "routes[].cache.max_body_bytes",
    0,
    GIB,
    "an entry is held in memory",
);
pub const NOTIFY_INTERVAL: Bound = bound("notify.min_interval_seconds", 0, 86_400, "one day");
pub const NOTIFY_TIMEOUT_MS: Bound = bound("notify.timeout_ms", 1, MINUTE_MS, "");
pub const NOTIFY_NO_DATA_WINDOW: Bound =
    bound("notify.no_data_window_seconds", 1, 86_400, "one day");
pub const REQUEST_HEADER_TIMEOUT_MS: Bound = bound(
    "limits.request_header_timeout_ms",
    100,
    10 * MINUTE_MS,
    "ten minutes",
);
pub const MAX_CLIENT_CONNECTIONS: Bound = bound("limits.max_client_connections", 1, 10_000_000, "");
pub const MEMORY_ENTRIES: Bound = bound(
    "cache.memory_entries",
    1,
    1_000_000,
    "the in-process tier allocates about 70 bytes per entry at start: 1,000,000 take 69 MB",
);
pub const LOCK_TIMEOUT_MS: Bound = bound("cache.lock_timeout_ms", 0, HOUR_MS, "");
pub const KEY_CREDITS: Bound = bound(
    "keys[].credits",
    0,
    MAX_CREDITS,
    "Redis scripts count credits exactly only below 2^53",
);
pub const KEY_RATE: Bound = bound("keys[].rate_per_second", 1, 1_000_000_000, "");
/// `store.leases` (Redis only, so not in [`BOUNDS`], whose test sets every
/// field on an embedded store; tests/leases.rs checks these).
pub const LEASE_MAX_CREDITS: Bound = bound("store.leases.max_credits", 1, 1_000_000_000, "");
pub const LEASE_TTL_SECONDS: Bound = bound(
    "store.leases.ttl_seconds",
    5,
    3600,
    "a node stops spending a lease 2 s before Redis may take it back",
);
pub const USAGE_RETENTION_DAYS: Bound = bound("usage.retention_days", 0, 3650, "");

/// tollgate's default for `server.grace_period_seconds` (Pingora's is 300 s).
pub const DEFAULT_GRACE_PERIOD_SECONDS: u64 = 5;
/// tollgate's default for `server.graceful_shutdown_timeout_seconds`.
pub const DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS: u64 = 10;

/// The numeric fields of Pingora's `ServerConf` (the `server` section).
pub const SERVER_BOUNDS: &[Bound] = &[
    bound("server.version", 0, 1, ""),
    bound("server.threads", 1, 256, "threads per service"),
    bound("server.listener_tasks_per_fd", 1, 64, ""),
    bound("server.grace_period_seconds", 0, 3_600, ""),
    bound("server.graceful_shutdown_timeout_seconds", 0, 3_600, ""),
    bound("server.upstream_keepalive_pool_size", 0, 65_536, ""),
    bound("server.upstream_connect_offload_threadpools", 0, 64, ""),
    bound("server.upstream_connect_offload_thread_per_pool", 0, 64, ""),
    bound("server.downstream_tls_offload_threadpools", 0, 64, ""),
    bound("server.downstream_tls_offload_thread_per_pool", 0, 64, ""),
    bound("server.max_retries", 0, 100, ""),
    bound("server.upgrade_sock_connect_accept_max_retries", 0, 600, ""),
    bound("server.max_blocking_threads", 1, 4_096, ""),
    bound("server.blocking_threads_ttl_seconds", 0, 86_400, ""),
    bound(
        "server.fast_timeout_to_tokio_threshold_seconds",
        0,
        86_400,
        "",
    ),
    bound(
        "server.runtime_metrics_poll_time_histogram_resolution_micros",
        1,
        1_000_000,
        "",
    ),
    bound(
        "server.runtime_metrics_poll_time_histogram_buckets",
        1,
        1_024,
        "",
    ),
    bound("server.daemon_ready_timeout_seconds", 1, 3_600, ""),
    bound("server.daemon_notify_timeout_seconds", 1, 3_600, ""),
];

/// Every numeric field of the configuration and of the keys file.
pub const BOUNDS: &[Bound] = &[
    STORE_TIMEOUT_MS,
    RATE_PER_SECOND,
    HEDGE_AFTER_MS,
    HEDGE_BUDGET_PERCENT,
    TIMEOUT_MS,
    COST,
    COSTS,
    MAX_RESPONSE_BYTES,
    DRAIN_LOSERS_MS,
    HEALTH_FAILURES,
    HEALTH_SKIP_SECONDS,
    CACHE_TTL,
    CACHE_STALE,
    CACHE_MAX_BODY,
    NOTIFY_INTERVAL,
    NOTIFY_TIMEOUT_MS,
    NOTIFY_NO_DATA_WINDOW,
    REQUEST_HEADER_TIMEOUT_MS,
    MAX_CLIENT_CONNECTIONS,
    MEMORY_ENTRIES,
    LOCK_TIMEOUT_MS,
    KEY_CREDITS,
    KEY_RATE,
    USAGE_RETENTION_DAYS,
];

/// Every bound: tollgate's own, then the `server` section's.
pub fn all_bounds() -> impl Iterator<Item = &'static Bound> {
    BOUNDS.iter().chain(SERVER_BOUNDS)
}

impl Bound {
    /// Check `value` of the field at `path` (this bound's path with real indexes).
    pub fn check(&self, path: &str, value: u64, errors: &mut Vec<ConfigError>) -> bool {
        if let Some(e) = self.problem(path, value) {
            errors.push(e);
            return false;
        }
        true
    }

    /// The problem with `value`, if out of range.
    pub fn problem(&self, path: &str, value: u64) -> Option<ConfigError> {
        if value < self.min {
            Some(err(path, format!("must be at least {}", self.min)))
        } else if value > self.max {
            let mut m = format!("must be at most {}, got {value}", self.max);
            if !self.why.is_empty() {
                let _ = write!(m, " ({})", self.why);
            }
            Some(err(path, m))
        } else {
            None
        }
    }
}

/// Check the numeric fields of the raw `server` mapping, before serde turns
/// them into Pingora's types (whose errors name no field).
pub fn check_server(map: &serde_yaml::Mapping, errors: &mut Vec<ConfigError>) -> bool {
    let mut ok = true;
    for b in SERVER_BOUNDS {
        let name = b.path.trim_start_matches("server.");
        // null (Pingora's default) or a type error serde reports.
        let Some(Value::Number(n)) = map.get(name) else {
            continue;
        };
        match n.as_u64() {
            Some(v) => ok &= b.check(b.path, v, errors),
            None => {
                ok = false;
                errors.push(err(
                    b.path,
                    format!(
                        "expected a whole number from {} to {}, got {n}",
                        b.min, b.max
                    ),
                ));
            }
        }
    }
    ok
}

/// The largest configuration file accepted.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// The largest keys file accepted (about 100,000 keys).
pub const MAX_KEYS_BYTES: usize = 16 << 20;
/// The deepest nesting of flow collections (`[`, `{`) accepted.
pub const MAX_FLOW_DEPTH: usize = 32;

/// Check a file's bytes before YAML parsing: its size, that it is UTF-8,
/// that it holds no control characters (named by line and column) and no
/// flow collections nested deeper than [`MAX_FLOW_DEPTH`].
pub fn precheck(bytes: &[u8], max_bytes: usize) -> Result<&str, ConfigError> {
    if bytes.len() > max_bytes {
        return Err(err(
            "",
            format!(
                "the file is {} bytes; at most {max_bytes} are accepted",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, col) = line_col(&bytes[..e.valid_up_to()]);
        err(
            "",
            format!("line {line}, column {col}: the file is not valid UTF-8"),
        )
    })?;
    check_text(text)?;
    Ok(text)
}

fn line_col(before: &[u8]) -> (usize, usize) {
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let col = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
    (line, col)
}

/// Control characters and flow nesting, in one pass that skips quoted
/// scalars and comments (a close enough reading of YAML for an upper bound:
/// a stray bracket in a plain scalar only counts one level more).
fn check_text(text: &str) -> Result<(), ConfigError> {
    let (mut line, mut col) = (1usize, 0usize);
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut prev = '\n';
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        col += 1;
        if c.is_control() && !matches!(c, '\t' | '\n' | '\r') {
            return Err(err(
                "",
                format!(
                    "line {line}, column {col}: control character U+{:04X} (only tab and line breaks are allowed)",
                    u32::from(c)
                ),
            ));
        }
        if c == '\n' {
            (line, col) = (line + 1, 0);
            comment = false;
            prev = c;
            continue;
        }
        match (quote, c) {
            _ if comment => {}
            // An escaped character cannot end the string; keep counting columns.
            (Some('"'), '\\') if chars.next_if(|&n| n != '\n').is_some() => col += 1,
            (Some(q), c) if c == q => {
                // '' inside a single-quoted scalar is an escaped quote.
                if q == '\'' && chars.next_if_eq(&'\'').is_some() {
                    col += 1;
                } else {
                    quote = None;
                }
            }
            (Some(_), _) => {}
            (None, '#') if prev.is_whitespace() => comment = true,
            (None, '"' | '\'') if prev.is_whitespace() || "[{,:".contains(prev) => {
                quote = Some(c);
            }
            (None, '[' | '{') => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Err(err(
                        "",
                        format!(
                            "line {line}, column {col}: collections nested more than {MAX_FLOW_DEPTH} deep"
                        ),
                    ));
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    Ok(())
}

/// Name the place of a YAML error that carries none: serde_yaml's
/// "repetition limit exceeded" (aliases that expand too far: a "billion
/// laughs") and "recursion limit exceeded" have no location.
pub fn locate(e: &serde_yaml::Error, text: &str) -> String {
    let message = e.to_string();
    if e.location().is_some() {
        return message;
    }
    if message.contains("repetition limit") {
        if let Some((line, col)) = first_alias(text) {
            return format!(
                "{message}: the aliases (*name) expand to too many nodes; the first alias is at line {line}, column {col}"
            );
        }
    }
    message
}

/// Where the first alias (`*name` starting a node) is.
fn first_alias(text: &str) -> Option<(usize, usize)> {
    for (i, l) in text.lines().enumerate() {
        let mut prev = ' ';
        for (j, c) in l.chars().enumerate() {
            if c == '#' && prev.is_whitespace() {
                break;
            }
            if c == '*' && (prev.is_whitespace() || "[{,:".contains(prev)) {
                return Some((i + 1, j + 1));
            }
            prev = c;
        }
    }
    None
}
