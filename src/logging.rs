//! Log output: the logger set-up, one access line per request, and one
//! structured warning when no backend succeeded (the event the notifier will
//! consume). Lines carry the upstream path, from which the auth parameter is
//! already removed, and never a key.

use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use crate::race::AttemptRecord;

/// Log to stderr (Pingora points stderr at `server.error_log` when it
/// daemonizes). `RUST_LOG` overrides the default level, `info`.
pub fn init() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            writeln!(
                buf,
                "{} {:<5} {} {}",
                buf.timestamp_millis(),
                record.level(),
                record.target(),
                record.args()
            )
        })
        .try_init();
}

/// Milliseconds with microsecond precision, for log fields.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// One request as the access log records it.
#[derive(Serialize)]
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    /// Path and query as sent upstream (auth parameter removed).
    pub path: Option<&'a str>,
    pub status: u16,
    pub latency_ms: f64,
    pub cache: Option<&'static str>,
    /// The winning backend's label.
    pub winner: Option<&'a str>,
    /// The caller's key id (hash prefix), never the key.
    pub key_id: Option<&'a str>,
    /// Credits charged (after any refund).
    pub credits: Option<u64>,
    pub error: Option<&'static str>,
}

impl AccessLine<'_> {
    pub fn emit(&self) {
        if let Ok(json) = serde_json::to_string(self) {
            log::info!(target: "tollgate::access", "{json}");
        }
    }
}

#[derive(Serialize)]
struct BackendOutcome<'a> {
    backend: &'a str,
    outcome: &'static str,
    started_ms: f64,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

#[derive(Serialize)]
struct FailureLine<'a> {
    event: &'static str,
    route: &'a str,
    reason: &'static str,
    path: &'a str,
    request_id: &'a str,
    backends: Vec<BackendOutcome<'a>>,
}

/// The structured warning written when no backend succeeded.
pub fn all_backends_failed(
    route: &str,
    reason: &'static str,
    path: &str,
    request_id: &str,
    labels: &[&str],
    attempts: &[AttemptRecord],
) {
    let line = FailureLine {
        event: "all_backends_failed",
        route,
        reason,
        path,
        request_id,
        backends: attempts
            .iter()
            .map(|a| BackendOutcome {
                backend: labels.get(a.backend).copied().unwrap_or("?"),
                outcome: a.outcome.as_str(),
                started_ms: ms(a.started),
                latency_ms: ms(a.latency),
                detail: a.detail.as_deref(),
            })
            .collect(),
    };
    if let Ok(json) = serde_json::to_string(&line) {
        log::warn!(target: "tollgate::race", "{json}");
    }
}
