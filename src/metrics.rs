//! Every Prometheus metric the gateway exports, owned by one struct and
//! registered once in the default registry that `pingora-prometheus` serves.
//! Labels come from the config (route and backend names) or small enums,
//! never from paths or keys.

use std::time::Duration;

use pingora_prometheus::prometheus::{
    self, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::answer::Failure;
use crate::config::Route;
use crate::credits::CreditCounters;
use crate::race::{AttemptRecord, Outcome};
use crate::reject::Reject;

/// Seconds, from 100 µs to 300 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Store operations, the `op` label of `tollgate_store_errors_total`:
/// calls that failed (`lookup`, `charge`, `refund`), calls whose outcome was
/// not seen and could not be settled (`settle`), and looks that found the
/// store not set up (`setup`: Redis lost its data).
pub const STORE_OPS: [&str; 5] = ["lookup", "charge", "refund", "settle", "setup"];

/// The `result` label of `tollgate_cache_total`.
pub const CACHE_RESULTS: [&str; 4] = ["hit", "miss", "stale", "error"];

/// The `outcome` label of `tollgate_notifications_total`.
pub const NOTIFICATION_OUTCOMES: [&str; 5] = ["sent", "failed", "timeout", "suppressed", "dropped"];

/// The route label of a request that matched no route.
pub const UNMATCHED: &str = "unmatched";

pub struct Metrics {
    requests: IntCounterVec,
    request_duration: HistogramVec,
    backend_requests: IntCounterVec,
    backend_duration: HistogramVec,
    race_wins: IntCounterVec,
    hedges: IntCounterVec,
    hedge_delay: GaugeVec,
    all_backends_failed: IntCounterVec,
    credits_charged: IntCounterVec,
    credits_refunded: IntCounterVec,
    rejections: IntCounterVec,
    store_errors: IntCounterVec,
    store_unsettled: IntGauge,
    lease_credits: IntGauge,
    lease_requests: IntCounterVec,
    cache: IntCounterVec,
    /// `cache` at each of [`CACHE_RESULTS`], looked up once at start.
    cache_results: [IntCounter; 4],
    notifications: IntCounterVec,
    access_log_dropped: IntCounter,
    tls_handshake_errors: IntCounter,
    admin_requests: IntCounterVec,
    backend_healthy: IntGaugeVec,
    connections: crate::connections::ConnectionCounters,
}

/// A route's series, created at start so that they exist (at 0) before
/// traffic and need no label lookup per request; its runtime object holds them.
pub struct RouteSeries {
    name: String,
    requests: IntCounterVec,
    /// `requests` at status 200, the common answer, looked up once at start.
    ok: IntCounter,
    duration: Histogram,
    credits: CreditCounters,
    backends: Vec<BackendSeries>,
    failed: [IntCounter; 3],
    /// `tollgate_hedges_total`: attempts started by the hedge timer.
    hedges: IntCounter,
}

struct BackendSeries {
    outcomes: [IntCounter; 5],
    duration: Histogram,
    wins: IntCounter,
}

/// `tollgate_lease_requests_total`'s outcomes.
pub const LEASE_OUTCOMES: [&str; 4] = ["granted", "partial", "empty", "error"];

const FAILURES: [Failure; 3] = [Failure::NoData, Failure::UpstreamFailed, Failure::Timeout];

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    let h = HistogramVec::new(opts, labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

fn plain_counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Create every metric in the process's default registry (the one
    /// `pingora-prometheus` serves), with the series of each route.
    pub fn register(routes: &[Route]) -> prometheus::Result<Metrics> {
        Metrics::register_in(prometheus::default_registry(), routes)
    }

    pub fn register_in(r: &Registry, routes: &[Route]) -> prometheus::Result<Metrics> {
        let cache = counter(
            r,
            "tollgate_cache_total",
            "Cache lookups by result: hit, miss, stale (served after every backend failed), error (a tier failed; also counted as its final result).",
            &["result"],
        )?;
        let m = Metrics {
            requests: counter(
                r,
                "tollgate_requests_total",
                "Requests answered, by route and HTTP status.",
                &["route", "status"],
            )?,
            request_duration: histogram(
                r,
                "tollgate_request_duration_seconds",
                "Time from request to the end of the answer, by route.",
                &["route"],
            )?,
            backend_requests: counter(
                r,
                "tollgate_backend_requests_total",
                "Backend attempts, by route, backend and outcome.",
                &["route", "backend", "outcome"],
            )?,
            backend_duration: histogram(
                r,
                "tollgate_backend_duration_seconds",
                "Backend attempt latency (until answer, failure or cancellation).",
                &["route", "backend"],
            )?,
            race_wins: counter(
                r,
                "tollgate_race_wins_total",
                "Races won, by route and backend.",
                &["route", "backend"],
            )?,
            hedges: counter(
                r,
                "tollgate_hedges_total",
                "Backend attempts started by a hedge route's timer (not the first, not after a failure), by route.",
                &["route"],
            )?,
            hedge_delay: {
                let g = GaugeVec::new(
                    Opts::new(
                        "tollgate_hedge_delay_seconds",
                        "A hedge route's current delay before it starts the next backend (hedge_after_ms, or its observed p95 with auto); 0 on race and failover routes.",
                    ),
                    &["route"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            all_backends_failed: counter(
                r,
                "tollgate_all_backends_failed_total",
                "Requests for which no backend succeeded, by route and reason.",
                &["route", "reason"],
            )?,
            credits_charged: counter(
                r,
                "tollgate_credits_charged_total",
                "Credits charged, by route (refunds are counted apart, not subtracted).",
                &["route"],
            )?,
            credits_refunded: counter(
                r,
                "tollgate_credits_refunded_total",
                "Credits given back after a gateway-made failure, by route.",
                &["route"],
            )?,
            rejections: counter(
                r,
                "tollgate_rejections_total",
                "Requests refused before any backend was asked, by reason (the error code).",
                &["reason"],
            )?,
            store_errors: counter(
                r,
                "tollgate_store_errors_total",
                "Key store calls that failed, by operation.",
                &["op"],
            )?,
            store_unsettled: gauge(
                r,
                "tollgate_store_unsettled",
                "Charges and refunds whose outcome Redis has not confirmed, waiting to be settled.",
            )?,
            lease_credits: gauge(
                r,
                "tollgate_lease_credits",
                "Credits this node holds in leases (store.leases), not yet spent.",
            )?,
            lease_requests: {
                let c = counter(
                    r,
                    "tollgate_lease_requests_total",
                    "Leases asked of Redis by outcome: granted (all asked), partial (less), empty (none free), error (Redis did not answer).",
                    &["outcome"],
                )?;
                for outcome in LEASE_OUTCOMES {
                    c.with_label_values(&[outcome]);
                }
                c
            },
            cache_results: CACHE_RESULTS.map(|result| cache.with_label_values(&[result])),
            cache,
            notifications: counter(
                r,
                "tollgate_notifications_total",
                "Failure notifications by outcome: sent (webhook answered 2xx), failed (never delivered after 3 attempts), timeout (delivered, no answer within timeout_ms; not retried), suppressed (an event held back by min_interval), dropped (a post found its route's queue full).",
                &["outcome"],
            )?,
            access_log_dropped: plain_counter(
                r,
                "tollgate_access_log_dropped_total",
                "Access log lines dropped because the writer's buffer was full.",
            )?,
            tls_handshake_errors: plain_counter(
                r,
                "tollgate_tls_handshake_errors_total",
                "Client connections on a TLS listener whose handshake failed or took longer than limits.request_header_timeout_ms.",
            )?,
            admin_requests: counter(
                r,
                "tollgate_admin_requests_total",
                "Admin API (/v1) requests by endpoint (create, list, show, update, topup, revoke, other) and answer status.",
                &["endpoint", "status"],
            )?,
            backend_healthy: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "tollgate_backend_healthy",
                        "1 while a backend is used, 0 while passive health skips it (routes[].health).",
                    ),
                    &["route", "backend"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            connections: crate::connections::ConnectionCounters {
                open: gauge(
                    r,
                    "tollgate_client_connections",
                    "Client connections open now.",
                )?,
                refused: plain_counter(
                    r,
                    "tollgate_client_connections_refused_total",
                    "Client connections closed at once because limits.max_client_connections were open.",
                )?,
                header_timeouts: plain_counter(
                    r,
                    "tollgate_request_header_timeouts_total",
                    "Client connections closed because a request header took longer than limits.request_header_timeout_ms.",
                )?,
            },
        };
        m.zero_series(routes);
        Ok(m)
    }

    /// Every series with fixed labels at 0, so that each family exists
    /// before its first event.
    fn zero_series(&self, routes: &[Route]) {
        let m = self;
        for reject in Reject::ALL.into_iter().filter(|r| r.is_rejection()) {
            m.rejections.with_label_values(&[reject.code()]);
        }
        for outcome in NOTIFICATION_OUTCOMES {
            m.notifications.with_label_values(&[outcome]);
        }
        for op in STORE_OPS {
            m.store_errors.with_label_values(&[op]);
        }
        for route in routes {
            m.route_series(route);
            m.hedge_delay(&route.name);
        }
    }

    /// A route's series (created at 0 if they are not yet).
    pub fn route_series(&self, route: &Route) -> RouteSeries {
        let name = route.name.as_str();
        RouteSeries {
            name: route.name.clone(),
            requests: self.requests.clone(),
            // Also the zero series, so the family exists before the first request.
            ok: self.requests.with_label_values(&[name, "200"]),
            duration: self.request_duration.with_label_values(&[name]),
            credits: CreditCounters {
                charged: self.credits_charged.with_label_values(&[name]),
                refunded: self.credits_refunded.with_label_values(&[name]),
            },
            backends: route
                .backends
                .iter()
                .map(|b| {
                    let label = b.label.as_str();
                    self.backend_healthy
                        .with_label_values(&[name, label])
                        .set(1);
                    BackendSeries {
                        outcomes: Outcome::ALL.map(|o| {
                            self.backend_requests
                                .with_label_values(&[name, label, o.as_str()])
                        }),
                        duration: self.backend_duration.with_label_values(&[name, label]),
                        wins: self.race_wins.with_label_values(&[name, label]),
                    }
                })
                .collect(),
            failed: FAILURES.map(|f| {
                self.all_backends_failed
                    .with_label_values(&[name, f.as_str()])
            }),
            hedges: self.hedges.with_label_values(&[name]),
        }
    }

    /// A route's `tollgate_hedge_delay_seconds` (created at 0), which its
    /// race keeps at the current delay.
    pub fn hedge_delay(&self, route: &str) -> Gauge {
        self.hedge_delay.with_label_values(&[route])
    }

    /// Count one answered request; `route`: its route's series, `None` when
    /// unmatched.
    pub fn request(&self, route: Option<&RouteSeries>, status: u16, elapsed: Duration) {
        match route {
            Some(series) => series.request(status, elapsed),
            None => {
                let code = http::StatusCode::from_u16(status).ok();
                let status = code.as_ref().map_or("0", |c| c.as_str());
                self.requests.with_label_values(&[UNMATCHED, status]).inc();
                self.request_duration
                    .with_label_values(&[UNMATCHED])
                    .observe(elapsed.as_secs_f64());
            }
        }
    }

    /// Count a request refused before the race.
    pub fn rejection(&self, reason: Reject) {
        self.rejections.with_label_values(&[reason.code()]).inc();
    }

    /// Count a cache result (one of [`CACHE_RESULTS`]).
    pub fn cache(&self, result: &'static str) {
        match CACHE_RESULTS.iter().position(|r| *r == result) {
            Some(i) => self.cache_results[i].inc(),
            None => self.cache.with_label_values(&[result]).inc(),
        }
    }

    /// The notifier's counters.
    pub fn notifications(&self) -> crate::notify::Counters {
        let c = |o: &str| self.notifications.with_label_values(&[o]);
        crate::notify::Counters {
            sent: c("sent"),
            failed: c("failed"),
            timeout: c("timeout"),
            suppressed: c("suppressed"),
            dropped: c("dropped"),
        }
    }

    /// A backend's `tollgate_backend_healthy` series, which its route's
    /// race keeps up to date.
    pub fn backend_healthy(&self, route: &str, backend: &str) -> IntGauge {
        self.backend_healthy.with_label_values(&[route, backend])
    }

    /// `tollgate_admin_requests_total`, for the admin API.
    pub fn admin_requests(&self) -> IntCounterVec {
        self.admin_requests.clone()
    }

    pub fn tls_handshake_errors(&self) -> IntCounter {
        self.tls_handshake_errors.clone()
    }

    pub fn access_log_dropped(&self) -> IntCounter {
        self.access_log_dropped.clone()
    }

    /// The client connection series (cap and header deadline).
    pub fn connections(&self) -> crate::connections::ConnectionCounters {
        self.connections.clone()
    }

    /// Count a failed store call (`op`: one of [`STORE_OPS`]).
    pub fn store_error(&self, op: &'static str) {
        self.store_errors.with_label_values(&[op]).inc();
    }

    /// The series of one store operation, for the store to count itself.
    pub fn store_error_counter(&self, op: &'static str) -> IntCounter {
        self.store_errors.with_label_values(&[op])
    }

    /// The lease store's series: credits held, and leases asked by outcome.
    pub fn leases(&self) -> (IntGauge, IntCounterVec) {
        (self.lease_credits.clone(), self.lease_requests.clone())
    }

    pub fn store_unsettled(&self) -> IntGauge {
        self.store_unsettled.clone()
    }
}

impl RouteSeries {
    /// The route's name, its label.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its credit series, for the charges and refunds of its requests.
    pub fn credits(&self) -> &CreditCounters {
        &self.credits
    }

    /// Count one answered request on this route.
    pub fn request(&self, status: u16, elapsed: Duration) {
        if status == 200 {
            self.ok.inc();
        } else {
            let code = http::StatusCode::from_u16(status).ok();
            let status = code.as_ref().map_or("0", |c| c.as_str());
            self.requests.with_label_values(&[&self.name, status]).inc();
        }
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Count a race's attempts, its winner, or its failure.
    pub fn race(
        &self,
        attempts: &[AttemptRecord],
        winner: Option<usize>,
        failure: Option<Failure>,
    ) {
        for a in attempts {
            if let Some(b) = self.backends.get(a.backend) {
                let i = Outcome::ALL
                    .iter()
                    .position(|o| *o == a.outcome)
                    .unwrap_or(0);
                b.outcomes[i].inc();
                b.duration.observe(a.latency.as_secs_f64());
            }
            if a.hedge {
                self.hedges.inc();
            }
        }
        if let Some(b) = winner.and_then(|w| self.backends.get(w)) {
            b.wins.inc();
        }
        if let Some(f) = failure {
            let i = FAILURES.iter().position(|x| *x == f).unwrap_or(0);
            self.failed[i].inc();
        }
    }
}
