//! Failure notifications, off the request path. The logging phase hands an
//! event to a bounded queue with `try_send` (a full queue drops and counts);
//! a background service posts JSON to `notify.webhook_url` at most once per
//! route and reason every `min_interval`, with the number of events
//! suppressed since the previous post, and says when a failing route
//! recovers. Each post has a timeout and a few retries with backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::Uri;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora_prometheus::prometheus::IntCounter;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Events waiting for the notifier; more are dropped (and counted).
const QUEUE: usize = 1024;
/// Attempts per post, and the pause before the second (doubling after).
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// How often suppressed events are checked for a due summary post.
const TICK: Duration = Duration::from_millis(250);

/// One backend's part in a failed race.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendReport {
    pub backend: String,
    pub outcome: &'static str,
    pub latency_ms: f64,
}

/// What the notifier is told.
#[derive(Debug, Clone)]
pub enum Event {
    /// No backend succeeded.
    Failed {
        route: String,
        reason: &'static str,
        request_id: String,
        backends: Vec<BackendReport>,
    },
    /// A route that had failed answered successfully again.
    Recovered { route: String, request_id: String },
}

/// The webhook's JSON body.
#[derive(Debug, Serialize)]
struct Post<'a> {
    route: &'a str,
    reason: &'a str,
    suppressed: u64,
    first_seen: u64,
    last_seen: u64,
    request_id: &'a str,
    backends: &'a [BackendReport],
}

/// `tollgate_notifications_total{outcome}`.
#[derive(Clone)]
pub struct Counters {
    pub sent: IntCounter,
    pub failed: IntCounter,
    pub suppressed: IntCounter,
    pub dropped: IntCounter,
}

/// The request side: hand events over without waiting.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Event>,
    dropped: IntCounter,
}

impl Notifier {
    pub fn notify(&self, event: Event) {
        if self.tx.try_send(event).is_err() {
            self.dropped.inc();
        }
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Per route and reason: when we last posted, and what we held back since.
struct Window {
    last_post: Instant,
    suppressed: u64,
    first_seen: u64,
    last_seen: u64,
    last: Event,
}

/// The background service that posts.
pub struct NotifierService {
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
    webhook: Option<Uri>,
    min_interval: Duration,
    timeout: Duration,
    counters: Counters,
}

/// A connected pair: give the [`Notifier`] to the proxy and the service to Pingora.
pub fn channel(
    webhook: Option<Uri>,
    min_interval: Duration,
    timeout: Duration,
    counters: Counters,
) -> (Notifier, NotifierService) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let notifier = Notifier {
        tx,
        dropped: counters.dropped.clone(),
    };
    let service = NotifierService {
        rx: Mutex::new(Some(rx)),
        webhook,
        min_interval,
        timeout,
        counters,
    };
    (notifier, service)
}

#[async_trait]
impl BackgroundService for NotifierService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let mut windows: HashMap<(String, &'static str), Window> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        let mut shutting_down = false;
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => self.on_event(event, &mut windows).await,
                    None => return,
                },
                _ = tick.tick() => self.flush_due(&mut windows).await,
                _ = shutdown.changed(), if !shutting_down => {
                    // Say what was held back; keep serving events from
                    // requests that finish during the grace period.
                    shutting_down = true;
                    self.flush(&mut windows, true).await;
                }
            }
        }
    }
}

impl NotifierService {
    /// Post at once if this route and reason has not posted within the
    /// interval (carrying what was held back), otherwise hold it back.
    /// Recoveries have a window of their own, so a flapping route posts at
    /// most one failure and one recovery per interval.
    async fn on_event(&self, event: Event, windows: &mut HashMap<(String, &'static str), Window>) {
        let now = Instant::now();
        let seen = unix_secs();
        let key = match &event {
            Event::Failed { route, reason, .. } => (route.clone(), *reason),
            Event::Recovered { route, .. } => (route.clone(), "recovered"),
        };
        if let Some(w) = windows.get_mut(&key) {
            if now.duration_since(w.last_post) < self.min_interval {
                if w.suppressed == 0 {
                    w.first_seen = seen;
                }
                w.suppressed += 1;
                w.last_seen = seen;
                w.last = event;
                self.counters.suppressed.inc();
                return;
            }
        }
        let (suppressed, first_seen) = windows
            .get(&key)
            .filter(|w| w.suppressed > 0)
            .map_or((0, seen), |w| (w.suppressed, w.first_seen));
        let mut w = Window {
            last_post: now,
            suppressed,
            first_seen,
            last_seen: seen,
            last: event,
        };
        self.post(&mut w).await;
        w.suppressed = 0;
        windows.insert(key, w);
    }

    async fn flush_due(&self, windows: &mut HashMap<(String, &'static str), Window>) {
        self.flush(windows, false).await;
    }

    /// Post a summary for every window with suppressed events whose interval
    /// is over (or all of them, when shutting down).
    async fn flush(&self, windows: &mut HashMap<(String, &'static str), Window>, all: bool) {
        let now = Instant::now();
        for w in windows.values_mut() {
            if w.suppressed > 0 && (all || now.duration_since(w.last_post) >= self.min_interval) {
                self.post(w).await;
                w.last_post = now;
                w.suppressed = 0;
                w.first_seen = w.last_seen;
            }
        }
    }

    /// Log the post and send it to the webhook, if there is one.
    async fn post(&self, w: &mut Window) {
        let empty: &[BackendReport] = &[];
        let (route, reason, request_id, backends) = match &w.last {
            Event::Failed {
                route,
                reason,
                request_id,
                backends,
            } => (
                route.as_str(),
                *reason,
                request_id.as_str(),
                backends.as_slice(),
            ),
            Event::Recovered { route, request_id } => {
                (route.as_str(), "recovered", request_id.as_str(), empty)
            }
        };
        let post = Post {
            route,
            reason,
            suppressed: w.suppressed,
            first_seen: w.first_seen,
            last_seen: w.last_seen,
            request_id,
            backends,
        };
        let Ok(body) = serde_json::to_vec(&post) else {
            return;
        };
        log::warn!(target: "tollgate::notify", "{}", String::from_utf8_lossy(&body));
        let Some(url) = &self.webhook else { return };
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            match tokio::time::timeout(self.timeout, post_json(url, &body)).await {
                Ok(Ok(())) => {
                    self.counters.sent.inc();
                    return;
                }
                Ok(Err(e)) => {
                    log::warn!(target: "tollgate::notify", "webhook attempt {attempt}: {e}")
                }
                Err(_) => {
                    log::warn!(target: "tollgate::notify", "webhook attempt {attempt}: timed out")
                }
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        self.counters.failed.inc();
    }
}

/// POST `body` as JSON over plain HTTP/1.1; a 2xx status is success.
async fn post_json(url: &Uri, body: &[u8]) -> Result<(), String> {
    let host = url.host().ok_or("webhook URL without host")?;
    let port = url.port_u16().unwrap_or(80);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nUser-Agent: tollgate/{}\r\nConnection: close\r\n\r\n",
        body.len(),
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(body).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 64];
    let n = stream.read(&mut answer).await.map_err(|e| e.to_string())?;
    let status_line = String::from_utf8_lossy(&answer[..n]);
    match status_line.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        Some(code) => Err(format!("webhook answered {code}")),
        None => Err("webhook closed without an answer".into()),
    }
}
