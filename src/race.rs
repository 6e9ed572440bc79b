//! The upstream race: send one request to a route's backends (all at once,
//! staggered, or one by one), return the first answer that meets the route's
//! success rule, and cancel the rest the moment there is a winner. Every
//! backend's outcome and latency is kept for the log and the metrics.
//!
//! Cancelling a losing HTTP/1 request means closing its connection, and the
//! next race would open a new one (a TCP handshake per loser per request, and
//! a TIME_WAIT socket each). So the race stops waiting for its losers at once,
//! but hands them to a background task that lets them finish for up to the
//! route's `drain_losers_ms`: a loser that answers in that time gives its
//! connection back to the pool; one that does not is dropped, which closes it.
//!
//! Backends that keep failing are skipped for a while (`health.rs`): a race
//! starts the others in their usual order and schedule, and the skipped ones
//! only when every attempt so far has failed; when all are skipped, all run.
//!
//! A `hedge` route's timer (`hedge.rs`) sets the delay between starts (fixed
//! or the observed 95th percentile) and refuses timer starts beyond the
//! route's hedge budget; then the race waits for what it has in flight, and
//! only a failure starts the next backend.

mod attempt;
mod health;
mod hedge;
mod pool;
mod progress;
mod window;

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;
use pingora_prometheus::prometheus::{Gauge, IntGauge};
use tokio::time::Instant;

use crate::answer::{Answer, Failure};
use attempt::AttemptResult;
pub use attempt::{classify, UpstreamRequest};
use health::{Admit, Health, Verdict};
use hedge::Hedging;
use pool::Pool;
use progress::Progress;

use crate::config::{Backend, Route, Strategy, SuccessRule};

/// How one backend attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The backend answered, but not with success (e.g. `"status": false`, 404).
    NoData,
    /// Connection failure, 5xx, broken or oversized answer.
    Error,
    Timeout,
    /// Still running when another backend won; its connection was closed.
    Cancelled,
}

impl Outcome {
    /// The metrics label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::NoData => "no_data",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
        }
    }

    pub const ALL: [Outcome; 5] = [
        Outcome::Success,
        Outcome::NoData,
        Outcome::Error,
        Outcome::Timeout,
        Outcome::Cancelled,
    ];
}

/// Why a race with these attempts had no winner.
fn failure_of(attempts: &[AttemptRecord]) -> Failure {
    if !attempts.is_empty() && attempts.iter().all(|a| a.outcome == Outcome::Timeout) {
        Failure::Timeout
    } else if attempts
        .iter()
        .any(|a| matches!(a.outcome, Outcome::Error | Outcome::Timeout))
    {
        Failure::UpstreamFailed
    } else {
        Failure::NoData
    }
}

/// One backend of a route, ready to be called.
pub struct Replica {
    /// `host:port` from the config.
    pub label: String,
    peer: HttpPeer,
    host_header: String,
    base_path: String,
    /// Its idle connections.
    pool: Pool,
    /// Whether it is being skipped.
    health: Health,
}

/// Where a backend is reached: `https://` ones over TLS, their certificate
/// verified for the URL's host (also the SNI) against `backend_ca` when the
/// route has one, else the system's roots; HTTP/1.1 only, as the race reads
/// answers over HTTP/1.
fn peer(b: &Backend, route: &Route) -> HttpPeer {
    let mut peer = HttpPeer::new(b.addr, b.tls, b.host.clone());
    if b.tls {
        peer.options.ca = route.backend_roots.clone();
        peer.options.set_http_version(1, 1);
    }
    peer
}

/// How long an idle upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Per-attempt rules of a route.
#[derive(Clone, Copy)]
pub struct AttemptRules {
    pub success: SuccessRule,
    pub max_body: usize,
    pub timeout: Duration,
}

/// A route's backends and how to race them.
pub struct RouteUpstream {
    pub replicas: Vec<Arc<Replica>>,
    strategy: Strategy,
    /// `hedge` routes: the timer's delay and budget.
    hedging: Option<Hedging>,
    rules: AttemptRules,
    drain_losers: Duration,
}

impl RouteUpstream {
    /// `pool_size`: idle connections kept per backend
    /// (`server.upstream_keepalive_pool_size`); `healthy`: a backend label's
    /// `tollgate_backend_healthy` series; `hedge_delay`: the route's
    /// `tollgate_hedge_delay_seconds`, which a `hedge` route keeps at its delay.
    pub fn new(
        route: &Route,
        pool_size: usize,
        healthy: impl Fn(&str) -> IntGauge,
        hedge_delay: Gauge,
    ) -> Self {
        let replicas = route
            .backends
            .iter()
            .map(|b| {
                Arc::new(Replica {
                    label: b.label.clone(),
                    peer: peer(b, route),
                    host_header: b.host_header.clone(),
                    base_path: b.base_path.clone(),
                    pool: Pool::new(pool_size, POOL_IDLE_TIMEOUT),
                    health: Health::new(route.health, &route.name, &b.label, healthy(&b.label)),
                })
            })
            .collect();
        RouteUpstream {
            replicas,
            strategy: route.strategy,
            hedging: (route.strategy == Strategy::Hedge).then(|| {
                Hedging::new(
                    route.hedge_after,
                    route.hedge_budget_percent,
                    route.timeout,
                    hedge_delay,
                )
            }),
            rules: AttemptRules {
                success: route.success,
                max_body: route.max_response_bytes,
                timeout: route.timeout,
            },
            drain_losers: route.drain_losers,
        }
    }

    /// Which backends a race tries, in what order, by their health.
    fn plan(&self) -> Plan {
        let n = self.replicas.len();
        let admit: Vec<Admit> = self.replicas.iter().map(|r| r.health.admit()).collect();
        let admit = &admit;
        let with = |a: Admit| (0..n).filter(move |&i| admit[i] == a);
        let mut order: Vec<usize> = with(Admit::Probe).collect();
        let probes = order.len();
        order.extend(with(Admit::Use));
        let admitted = order.len();
        if admitted == probes {
            // None healthy: all in their usual order, never all skipped.
            return Plan {
                order: (0..n).collect(),
                probes: 0,
                admitted: n,
            };
        }
        order.extend(with(Admit::Skip));
        Plan {
            order,
            probes,
            admitted,
        }
    }

    /// The schedule of a race starting now.
    fn schedule(&self) -> Schedule<'_> {
        let hedging = self.hedging.as_ref();
        if let Some(h) = hedging {
            h.race_started();
        }
        Schedule {
            strategy: self.strategy,
            delay: hedging.map_or(Duration::ZERO, Hedging::delay),
            hedging,
            timer: true,
        }
    }
}

/// When a race's scheduled backends start.
struct Schedule<'a> {
    strategy: Strategy,
    /// `hedge`: between starts, read once at the race's start.
    delay: Duration,
    hedging: Option<&'a Hedging>,
    /// `hedge`: false once the budget refused a timer start.
    timer: bool,
}

impl Schedule<'_> {
    /// When the `i`th backend of the schedule is due, counted from the
    /// race's start; `None`: only when nothing else is in flight.
    fn due(&self, i: usize) -> Option<Duration> {
        match self.strategy {
            Strategy::Race => Some(Duration::ZERO),
            Strategy::Hedge if self.timer => Some(self.delay.saturating_mul(i as u32)),
            Strategy::Hedge | Strategy::Failover => None,
        }
    }

    /// The `i`th backend is due while others are in flight: a race starts
    /// it; a hedge asks its budget, and once refused waits for what it has
    /// in flight. `Some(hedged)` to start it.
    fn start_due(&mut self) -> Option<bool> {
        match self.hedging {
            None => Some(false),
            Some(h) if h.try_hedge() => Some(true),
            Some(_) => {
                self.timer = false;
                None
            }
        }
    }

    /// Backend `winner` won the race `latency` after it started. What
    /// `auto` learns is how long the request would have taken unhedged: the
    /// latency, or when a hedge won, that it took at least the hedge delay
    /// (the first hedge's start). Not the race's latency then: it would
    /// count each hedge as delay plus its own latency, and with a tail of
    /// about 5 % (the p95 among the hedged requests) each recompute would
    /// raise the delay by a hedge's latency (measured: the delay walking
    /// 7 → 28 ms and back, p99 25 ms where 13 ms is the delay plus an answer).
    fn won(&self, attempts: &[AttemptRecord], winner: usize, latency: Duration) {
        let Some(h) = self.hedging else { return };
        let hedge_won = attempts.iter().any(|a| a.backend == winner && a.hedge);
        let first_hedge = attempts.iter().find(|a| a.hedge).map(|a| a.started);
        match first_hedge {
            Some(at) if hedge_won => h.answered(at.min(latency)),
            _ => h.answered(latency),
        }
    }
}

/// The backends of one race: `order[..probes]` start at once, beside the
/// schedule; `order[probes..admitted]` follow the strategy's schedule;
/// the rest are skipped, and start (all at once) only when every attempt
/// so far failed with an error or a timeout.
struct Plan {
    order: Vec<usize>,
    probes: usize,
    admitted: usize,
}

/// One backend's part in a race.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// Index into the route's backends.
    pub backend: usize,
    pub outcome: Outcome,
    /// When it started, counted from the race's start.
    pub started: Duration,
    /// Started by the hedge timer (not first, and not because everything
    /// in flight had failed).
    pub hedge: bool,
    pub latency: Duration,
    /// Why it failed, for the log only.
    pub detail: Option<String>,
}

impl AttemptRecord {
    /// An attempt just started: cancelled unless it ends before the race.
    fn started(backend: usize, started: Duration, hedge: bool) -> Self {
        AttemptRecord {
            backend,
            outcome: Outcome::Cancelled,
            started,
            hedge,
            latency: Duration::ZERO,
            detail: None,
        }
    }
}

/// How a race went, for the log and the metrics (the winner's answer is
/// returned beside it, to be served).
pub struct RaceReport {
    /// In start order; backends never started (a hedge or failover that was
    /// not needed) are absent.
    pub attempts: Vec<AttemptRecord>,
    /// The winning backend's index.
    pub winner: Option<usize>,
}

impl RaceReport {
    /// Why there was no winner (meaningless when there is one).
    pub fn failure(&self) -> Failure {
        failure_of(&self.attempts)
    }
}

/// Runs races over HTTP/1 connections made by Pingora's transport connector
/// and kept in each backend's own pool; one per proxy service.
pub struct Racer {
    connector: Arc<TransportConnector>,
}

impl Racer {
    pub fn new(server: &ServerConf) -> Self {
        Racer {
            connector: Arc::new(TransportConnector::new(Some(
                ConnectorOptions::from_server_conf(server),
            ))),
        }
    }

    /// Race `req` over the route's backends as its strategy says: how it
    /// went, and the winner's answer.
    pub async fn run(
        &self,
        route: &RouteUpstream,
        req: &UpstreamRequest<'_>,
    ) -> (RaceReport, Option<Answer>) {
        let n = route.replicas.len();
        let mut race = Progress::new(route);
        let verdict = Arc::new(Verdict::default());
        let mut in_flight = FuturesUnordered::new();
        let mut winner = None;

        loop {
            // Start every backend that is due, and the next one at once when
            // no scheduled one is in flight (nothing left to wait for).
            while race.next < n {
                let now = Instant::now();
                let Some(hedge) = race.start_as(now, in_flight.is_empty()) else {
                    break;
                };
                let i = race.started(now, hedge);
                in_flight.push(self.attempt(route, i, req, &verdict));
            }
            if in_flight.is_empty() {
                break;
            }
            let wake = race.wake();
            tokio::select! {
                Some((i, result)) = in_flight.next() => {
                    if let Some(won) = race.ended(i, result, &verdict) {
                        winner = won;
                        break;
                    }
                }
                _ = sleep_until_some(wake) => {}
            }
        }
        if !in_flight.is_empty() {
            drain(in_flight, route.drain_losers);
        }
        let attempts = race.settle();
        let (winner, answer) = winner.unzip();
        (RaceReport { attempts, winner }, answer)
    }

    /// Backend `i`'s attempt at `req`, which yields `i` beside how it ended.
    fn attempt(
        &self,
        route: &RouteUpstream,
        i: usize,
        req: &UpstreamRequest<'_>,
        verdict: &Arc<Verdict>,
    ) -> impl std::future::Future<Output = (usize, AttemptResult)> + Send + 'static {
        let attempt = attempt::run(
            self.connector.clone(),
            route.replicas[i].clone(),
            req,
            route.rules,
            verdict.clone(),
        );
        async move { (i, attempt.await) }
    }
}

/// Let the losers finish in the background for up to `grace`, so that those
/// that do can return their connections to the pool; dropping the rest
/// closes theirs. Their outcome stays `cancelled`: the race is over.
fn drain<F>(mut losers: FuturesUnordered<F>, grace: Duration)
where
    F: std::future::Future + Send + 'static,
{
    if grace.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(grace, async { while losers.next().await.is_some() {} }).await;
    });
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(outcome: Outcome) -> AttemptRecord {
        AttemptRecord {
            backend: 0,
            outcome,
            started: Duration::ZERO,
            hedge: false,
            latency: Duration::ZERO,
            detail: None,
        }
    }

    #[test]
    fn failure_kind_follows_outcomes() {
        use Outcome::*;
        let f = |o: &[Outcome]| failure_of(&o.iter().map(|&o| rec(o)).collect::<Vec<_>>());
        assert_eq!(f(&[NoData, NoData]), Failure::NoData);
        assert_eq!(f(&[NoData, Error]), Failure::UpstreamFailed);
        assert_eq!(f(&[NoData, Timeout]), Failure::UpstreamFailed);
        assert_eq!(f(&[Timeout, Timeout]), Failure::Timeout);
        assert_eq!(f(&[Error]), Failure::UpstreamFailed);
    }
}
