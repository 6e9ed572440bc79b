//! Log output: the logger set-up, the access log (one JSON line per request,
//! written in batches by a background service from a bounded buffer, so a
//! slow disk never holds a request), and one structured warning when no backend
//! succeeded. Lines carry the upstream path, from which the auth parameter is
//! already removed, and a key's id, never a key.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora_prometheus::prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::AccessTarget;
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
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
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

/// The current time as access lines write it: RFC 3339, UTC, milliseconds
/// (`2026-11-25T21:01:44.123Z`).
pub fn now_rfc3339() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    rfc3339(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Format unix milliseconds with chrono (89 ns a line here, where the
/// hand-written civil-date formatter it replaced took 339 ns).
fn rfc3339(unix_ms: i64) -> String {
    DateTime::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A fresh request id: 128 random bits in hex. `hex::encode_to_slice` into
/// a stack buffer: 38 ns, where `hex::encode` (a char iterator collected
/// into a String) took 139 ns, on every request that brings no id. The
/// digits are ASCII: `from_utf8`, not `from_utf8_lossy`, whose chunk
/// iterator was 0.3 % of a cache hit's CPU.
pub fn new_request_id() -> String {
    let mut digits = [0u8; 32];
    if hex::encode_to_slice(rand::random::<[u8; 16]>(), &mut digits).is_err() {
        return String::new();
    }
    std::str::from_utf8(&digits)
        .map(str::to_owned)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            super::rfc3339(1_795_640_504_000),
            "2026-11-25T21:01:44.000Z"
        );
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (super::new_request_id(), super::new_request_id());
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }
}

/// Bytes of access lines that may wait for the writer; more are dropped
/// (and counted).
const PENDING_MAX: usize = 8 << 20;
/// The writer is woken early once this much is waiting.
const WAKE_AT: usize = 256 << 10;
/// Otherwise it writes what is waiting this often.
const WRITE_EVERY: Duration = Duration::from_millis(50);

/// Lines serialized by requests, waiting for the writer.
struct Pending {
    buf: Mutex<Vec<u8>>,
    wake: Notify,
}

/// The request side of the access log. A request appends its line to a
/// shared buffer under a short lock; the writer swaps the buffer out every
/// [`WRITE_EVERY`] (sooner when it fills). Handing each line to the writer
/// through a channel woke the writer's thread once per request, which cost
/// ~40% of the throughput on the cache-hit path.
#[derive(Clone)]
pub struct AccessLog {
    pending: Option<Arc<Pending>>,
    dropped: IntCounter,
}

impl AccessLog {
    /// False with `access_log: off`: callers need not build the line.
    pub fn enabled(&self) -> bool {
        self.pending.is_some()
    }

    pub fn write(&self, line: &AccessLine<'_>) {
        let Some(pending) = &self.pending else { return };
        let Ok(mut buf) = pending.buf.lock() else {
            return;
        };
        let before = buf.len();
        if before >= PENDING_MAX {
            drop(buf);
            self.dropped.inc();
            return;
        }
        if serde_json::to_writer(&mut *buf, line).is_err() {
            buf.truncate(before);
            return;
        }
        buf.push(b'\n');
        let wake = before < WAKE_AT && buf.len() >= WAKE_AT;
        drop(buf);
        if wake {
            pending.wake.notify_one();
        }
    }
}

/// The background writer.
pub struct AccessLogService {
    pending: Option<Arc<Pending>>,
    target: AccessTarget,
}

/// A connected pair: the [`AccessLog`] for the proxy, the service for Pingora.
pub fn access_log(target: AccessTarget, dropped: IntCounter) -> (AccessLog, AccessLogService) {
    let pending = (target != AccessTarget::Off).then(|| {
        Arc::new(Pending {
            buf: Mutex::new(Vec::with_capacity(WAKE_AT * 2)),
            wake: Notify::new(),
        })
    });
    (
        AccessLog {
            pending: pending.clone(),
            dropped,
        },
        AccessLogService { pending, target },
    )
}

/// Writes what is waiting; also when dropped, so that lines queued when the
/// runtime ends the writer are not lost.
struct Writer {
    pending: Arc<Pending>,
    out: Box<dyn Write + Send>,
    spare: Vec<u8>,
}

impl Writer {
    fn write_pending(&mut self) {
        if let Ok(mut buf) = self.pending.buf.lock() {
            std::mem::swap(&mut *buf, &mut self.spare);
        }
        if !self.spare.is_empty() {
            let _ = self.out.write_all(&self.spare);
            let _ = self.out.flush();
            self.spare.clear();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.write_pending();
    }
}

fn open(target: &AccessTarget) -> Box<dyn Write + Send> {
    match target {
        AccessTarget::Stderr | AccessTarget::Off => Box::new(std::io::stderr()),
        AccessTarget::File(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                log::error!("access log {}: {e}; writing to stderr", path.display());
                Box::new(std::io::stderr())
            }
        },
    }
}

#[async_trait]
impl BackgroundService for AccessLogService {
    /// Runs until the proxy's side is gone: requests still finishing during
    /// a graceful shutdown keep their lines.
    async fn start(&self, _shutdown: ShutdownWatch) {
        let Some(pending) = self.pending.clone() else {
            return;
        };
        let mut writer = Writer {
            pending,
            out: open(&self.target),
            spare: Vec::with_capacity(WAKE_AT * 2),
        };
        // Held by the proxy's AccessLog, the service and this task.
        while Arc::strong_count(&writer.pending) > 2 {
            tokio::select! {
                _ = writer.pending.wake.notified() => {}
                _ = tokio::time::sleep(WRITE_EVERY) => {}
            }
            writer.write_pending();
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
