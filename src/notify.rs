//! Failure notifications, decided on the request path and delivered off it.
//!
//! The logging phase reports each outage event (`upstream_failed`,
//! `upstream_timeout`) and each recovery. Whether it is posted is decided at
//! once, under the route's own small lock, never waiting: at most one post per
//! route and reason every `min_interval`, the rest held back and counted
//! (`suppressed`), their number carried by the next post of that reason. Only
//! posts reach a queue, one per route (`try_send`; a full queue drops and
//! counts), so a flood of failures cannot fill it. A `recovered` post takes the
//! route's held-back failure counts with it (`suppressed_failures`): no failure
//! summary follows a recovery, and a summary is only ever posted for the
//! state the route is in, so the last post always tells the route's state.
//!
//! `no_data` answers (every backend said "no such data", e.g. an unknown
//! symbol) are the data API working, not an outage: they never post one by
//! one. A tick samples each route's answers and `no_data` answers; when their
//! share over `no_data_window` reaches `no_data_ratio` (with at least
//! [`NO_DATA_MIN_REQUESTS`] answers in the window), a `no_data` warning is
//! posted, again at most once per `min_interval`.
//!
//! Delivery (`webhook.rs`) runs one task per route, so a slow webhook answer
//! for one route holds no other route's posts, with a bound on posts in flight.

mod webhook;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora_prometheus::prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{NotifyConfig, Route};

/// Posts waiting for delivery, per route; more are dropped (and counted).
/// Deduplication happens before this queue, so a route has at most one post
/// per reason and interval waiting.
const QUEUE: usize = 64;
/// How often held-back events are checked for a due summary post, and the
/// `no_data` share is sampled.
const TICK: Duration = Duration::from_millis(250);
/// A route's `no_data` share is only judged over at least this many answers
/// in the window, so that one unknown symbol on a quiet route warns nobody.
pub const NO_DATA_MIN_REQUESTS: u64 = 10;

const RECOVERED: &str = "recovered";
const NO_DATA: &str = "no_data";

/// One backend's part in a failed race.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendReport {
    pub backend: String,
    pub outcome: &'static str,
    pub latency_ms: f64,
}

/// What a route's notifier is told.
#[derive(Debug, Clone)]
pub enum Event {
    /// No backend succeeded (`upstream_failed` or `upstream_timeout`).
    Failed {
        reason: &'static str,
        request_id: String,
        backends: Vec<BackendReport>,
    },
    /// A route that had failed answered again.
    Recovered { request_id: String },
}

/// The webhook's JSON body.
#[derive(Debug, Serialize)]
struct Post<'a> {
    route: &'a str,
    reason: &'static str,
    suppressed: u64,
    first_seen: u64,
    last_seen: u64,
    request_id: &'a str,
    backends: &'a [BackendReport],
    /// `recovered` only: failure events held back since the last failure
    /// post, by reason, that this recovery ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    suppressed_failures: Option<&'a BTreeMap<&'static str, u64>>,
    /// `no_data` only: the share, and the answers it was taken over.
    #[serde(skip_serializing_if = "Option::is_none")]
    no_data_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_requests: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_seconds: Option<u64>,
}

/// `tollgate_notifications_total{outcome}`.
#[derive(Clone)]
pub struct Counters {
    /// The webhook answered 2xx.
    pub sent: IntCounter,
    /// Never delivered: every attempt failed to connect or write, or was refused.
    pub failed: IntCounter,
    /// Delivered, but the webhook did not answer within the timeout.
    pub timeout: IntCounter,
    /// An event held back by `min_interval` (reported in a later post's counts).
    pub suppressed: IntCounter,
    /// A post that found its route's queue full.
    pub dropped: IntCounter,
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The event a held-back summary reports as its example.
#[derive(Debug, Default)]
struct Example {
    request_id: String,
    backends: Vec<BackendReport>,
}

/// Per route and reason: when it last posted, and what it held back since.
#[derive(Debug, Default)]
struct Window {
    last_post: Option<Instant>,
    held: u64,
    first_seen: u64,
    last_seen: u64,
    example: Example,
    /// `recovered` only: failure counts folded into the next recovery post.
    folded: BTreeMap<&'static str, u64>,
}

impl Window {
    fn open(&self, now: Instant, min_interval: Duration) -> bool {
        self.last_post
            .is_none_or(|at| now.saturating_duration_since(at) >= min_interval)
    }

    fn hold(&mut self, seen: u64, example: Example) {
        if self.held == 0 {
            self.first_seen = seen;
        }
        self.held += 1;
        self.last_seen = seen;
        self.example = example;
    }
}

/// A route's notification state, shared by its requests and the tick.
#[derive(Debug, Default)]
struct RouteState {
    /// An outage event came after the last recovery.
    failing: bool,
    windows: Vec<(&'static str, Window)>,
}

impl RouteState {
    fn window(&mut self, reason: &'static str) -> &mut Window {
        let i = match self.windows.iter().position(|(r, _)| *r == reason) {
            Some(i) => i,
            None => {
                self.windows.push((reason, Window::default()));
                self.windows.len() - 1
            }
        };
        &mut self.windows[i].1
    }
}

struct RouteSlot {
    name: String,
    answered: AtomicU64,
    no_data: AtomicU64,
    state: Mutex<RouteState>,
    queue: Option<mpsc::Sender<Vec<u8>>>,
}

impl RouteSlot {
    fn state(&self) -> MutexGuard<'_, RouteState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the request side and the service share.
struct Shared {
    routes: Vec<Arc<RouteSlot>>,
    min_interval: Duration,
    counters: Counters,
}

/// The request side, from which each route takes its own [`RouteNotifier`].
#[derive(Clone)]
pub struct Notifier {
    shared: Arc<Shared>,
}

impl Notifier {
    /// One notifier per route, in the config's order.
    pub fn routes(&self) -> Vec<RouteNotifier> {
        self.shared
            .routes
            .iter()
            .map(|slot| RouteNotifier {
                shared: self.shared.clone(),
                slot: slot.clone(),
            })
            .collect()
    }
}

/// One route's side of the notifier: report its events without waiting.
pub struct RouteNotifier {
    shared: Arc<Shared>,
    slot: Arc<RouteSlot>,
}

impl RouteNotifier {
    /// Count an answer (the `no_data` share's denominator; the same
    /// requests as `tollgate_requests_total{route}`).
    pub fn answered(&self) {
        self.slot.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a `no_data` answer.
    pub fn no_data(&self) {
        self.slot.no_data.fetch_add(1, Ordering::Relaxed);
    }

    /// Post the event now, or hold it back and count it.
    pub fn notify(&self, event: Event) {
        self.shared
            .on_event(&self.slot, event, Instant::now(), unix_secs());
    }
}

impl Shared {
    fn on_event(&self, slot: &RouteSlot, event: Event, now: Instant, seen: u64) {
        let (reason, example) = match event {
            Event::Failed {
                reason,
                request_id,
                backends,
            } => (
                reason,
                Example {
                    request_id,
                    backends,
                },
            ),
            Event::Recovered { request_id } => (
                RECOVERED,
                Example {
                    request_id,
                    backends: Vec::new(),
                },
            ),
        };
        let mut state = slot.state();
        let mut folded = BTreeMap::new();
        if reason == RECOVERED {
            state.failing = false;
            for (r, w) in state.windows.iter_mut().filter(|(r, _)| *r != RECOVERED) {
                if w.held > 0 {
                    folded.insert(*r, std::mem::take(&mut w.held));
                }
            }
        } else {
            state.failing = true;
        }
        let w = state.window(reason);
        for (r, n) in folded {
            *w.folded.entry(r).or_default() += n;
        }
        if !w.open(now, self.min_interval) {
            w.hold(seen, example);
            self.counters.suppressed.inc();
            return;
        }
        if w.held == 0 {
            w.first_seen = seen;
        }
        w.last_seen = seen;
        w.example = example;
        self.post(slot, reason, w, now, None);
    }

    /// Post a summary of what each route held back once its interval is over
    /// (every one, when `all`), but only for the state the route is in now:
    /// a failing route's failure counts, a recovered route's recovery (which
    /// carries the failures it folded in).
    fn flush(&self, now: Instant, all: bool) {
        for slot in &self.routes {
            let mut state = slot.state();
            let failing = state.failing;
            for (reason, w) in &mut state.windows {
                let due = w.held > 0 && (all || w.open(now, self.min_interval));
                if due && (*reason == RECOVERED) != failing {
                    self.post(slot, reason, w, now, None);
                }
            }
        }
    }

    /// Post a `no_data` warning for a route whose share reached the threshold.
    fn no_data_warning(&self, slot: &RouteSlot, share: NoDataShare, now: Instant) {
        let mut state = slot.state();
        let w = state.window(NO_DATA);
        if !w.open(now, self.min_interval) {
            return;
        }
        let seen = unix_secs();
        w.first_seen = seen;
        w.last_seen = seen;
        w.example = Example::default();
        self.post(slot, NO_DATA, w, now, Some(share));
    }

    /// Log the post and queue it for the webhook; the window starts over.
    fn post(
        &self,
        slot: &RouteSlot,
        reason: &'static str,
        w: &mut Window,
        now: Instant,
        share: Option<NoDataShare>,
    ) {
        // `suppressed` counts the events held back since the last post: for
        // an immediate post those before the new one, for a summary all of
        // them (its example is the last).
        let post = Post {
            route: &slot.name,
            reason,
            suppressed: w.held,
            first_seen: w.first_seen,
            last_seen: w.last_seen,
            request_id: &w.example.request_id,
            backends: &w.example.backends,
            suppressed_failures: (reason == RECOVERED).then_some(&w.folded),
            no_data_share: share.map(|s| s.share),
            window_requests: share.map(|s| s.requests),
            window_seconds: share.map(|s| s.window.as_secs()),
        };
        let body = serde_json::to_vec(&post);
        w.last_post = Some(now);
        w.held = 0;
        w.folded.clear();
        let Ok(body) = body else { return };
        log::warn!(target: "tollgate::notify", "{}", String::from_utf8_lossy(&body));
        if let Some(queue) = &slot.queue {
            if queue.try_send(body).is_err() {
                self.counters.dropped.inc();
            }
        }
    }
}

/// A route's `no_data` share over the window, as posted.
#[derive(Debug, Clone, Copy, PartialEq)]
struct NoDataShare {
    share: f64,
    requests: u64,
    window: Duration,
}

/// Answers and `no_data` answers of one route over a sliding window, from
/// the two counters sampled at each tick. At most ~64 samples are kept
/// whatever the window, so the window's edge is exact to 1/64 of it.
#[derive(Debug)]
struct ShareWindow {
    span: Duration,
    samples: VecDeque<(Instant, u64, u64)>,
}

impl ShareWindow {
    fn new(span: Duration, now: Instant, answered: u64, no_data: u64) -> ShareWindow {
        ShareWindow {
            span,
            samples: VecDeque::from([(now, answered, no_data)]),
        }
    }

    /// The counters now; returns the answers and `no_data` answers since the
    /// oldest sample still inside the window.
    fn observe(&mut self, now: Instant, answered: u64, no_data: u64) -> (u64, u64) {
        while self.samples.len() > 1
            && self
                .samples
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.0) > self.span)
        {
            self.samples.pop_front();
        }
        let (_, a0, n0) = self
            .samples
            .front()
            .copied()
            .unwrap_or((now, answered, no_data));
        let step = self.span / 64;
        if self
            .samples
            .back()
            .is_none_or(|s| now.saturating_duration_since(s.0) >= step)
        {
            self.samples.push_back((now, answered, no_data));
        }
        (answered.saturating_sub(a0), no_data.saturating_sub(n0))
    }
}

/// The `no_data` rule: a share of at least `ratio` of at least
/// [`NO_DATA_MIN_REQUESTS`] answers over `window`.
#[derive(Debug, Clone, Copy)]
struct NoDataRule {
    ratio: f64,
    window: Duration,
}

impl NoDataRule {
    fn judge(&self, (requests, no_data): (u64, u64)) -> Option<NoDataShare> {
        if requests < NO_DATA_MIN_REQUESTS {
            return None;
        }
        #[allow(clippy::cast_precision_loss)]
        let share = no_data as f64 / requests as f64;
        (share >= self.ratio).then_some(NoDataShare {
            share,
            requests,
            window: self.window,
        })
    }
}

/// The background service: delivery tasks, summaries and the `no_data` check.
pub struct NotifierService {
    shared: Arc<Shared>,
    queues: Mutex<Vec<mpsc::Receiver<Vec<u8>>>>,
    webhook: Option<Arc<webhook::Webhook>>,
    no_data: NoDataRule,
}

/// A connected pair: give the [`Notifier`] to the proxy and the service to Pingora.
pub fn channel(
    config: &NotifyConfig,
    routes: &[Route],
    counters: Counters,
) -> (Notifier, NotifierService) {
    let mut receivers = Vec::new();
    let slots = routes
        .iter()
        .map(|r| {
            let queue = config.webhook_url.as_ref().map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                receivers.push(rx);
                tx
            });
            Arc::new(RouteSlot {
                name: r.name.clone(),
                answered: AtomicU64::new(0),
                no_data: AtomicU64::new(0),
                state: Mutex::new(RouteState::default()),
                queue,
            })
        })
        .collect();
    let shared = Arc::new(Shared {
        routes: slots,
        min_interval: config.min_interval,
        counters: counters.clone(),
    });
    let webhook = config
        .webhook_url
        .clone()
        .map(|url| Arc::new(webhook::Webhook::new(url, config.timeout, counters)));
    let service = NotifierService {
        shared: shared.clone(),
        queues: Mutex::new(receivers),
        webhook,
        no_data: NoDataRule {
            ratio: config.no_data_ratio,
            window: config.no_data_window,
        },
    };
    (Notifier { shared }, service)
}

#[async_trait]
impl BackgroundService for NotifierService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let queues =
            std::mem::take(&mut *self.queues.lock().unwrap_or_else(PoisonError::into_inner));
        if let Some(webhook) = &self.webhook {
            for queue in queues {
                tokio::spawn(webhook.clone().serve(queue));
            }
        }
        let started = Instant::now();
        let mut shares: Vec<ShareWindow> = self
            .shared
            .routes
            .iter()
            .map(|s| {
                let (a, n) = (
                    s.answered.load(Ordering::Relaxed),
                    s.no_data.load(Ordering::Relaxed),
                );
                ShareWindow::new(self.no_data.window, started, a, n)
            })
            .collect();
        let mut tick = tokio::time::interval(TICK);
        let mut shutting_down = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.shared.flush(now, false);
                    for (slot, window) in self.shared.routes.iter().zip(&mut shares) {
                        // no_data first: an answer is counted before its no_data.
                        let no_data = slot.no_data.load(Ordering::Relaxed);
                        let counts = window.observe(now, slot.answered.load(Ordering::Relaxed), no_data);
                        if let Some(share) = self.no_data.judge(counts) {
                            self.shared.no_data_warning(slot, share, now);
                        }
                    }
                }
                _ = shutdown.changed(), if !shutting_down => {
                    // Say what was held back; keep serving events from
                    // requests that finish during the grace period.
                    shutting_down = true;
                    self.shared.flush(Instant::now(), true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
