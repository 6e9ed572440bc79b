//! Every Prometheus metric the gateway exports, owned by one struct and
//! registered once in the default registry that `pingora-prometheus` serves.
//! Labels come from the config (route and backend names) or small enums,
//! never from paths or keys.

use std::time::Duration;

use pingora_prometheus::prometheus::{
    self, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry,
};

use crate::race::{AttemptRecord, Failure};

/// Seconds, from 100 µs to 300 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The route label of a request that matched no route.
pub const UNMATCHED: &str = "unmatched";

pub struct Metrics {
    requests: IntCounterVec,
    request_duration: HistogramVec,
    backend_requests: IntCounterVec,
    backend_duration: HistogramVec,
    race_wins: IntCounterVec,
    all_backends_failed: IntCounterVec,
}

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

impl Metrics {
    /// Create every metric and register it in the process's default registry.
    pub fn register() -> prometheus::Result<Metrics> {
        Metrics::register_in(prometheus::default_registry())
    }

    pub fn register_in(r: &Registry) -> prometheus::Result<Metrics> {
        Ok(Metrics {
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
            all_backends_failed: counter(
                r,
                "tollgate_all_backends_failed_total",
                "Requests for which no backend succeeded, by route and reason.",
                &["route", "reason"],
            )?,
        })
    }

    /// Count one answered request.
    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        let status = http::StatusCode::from_u16(status)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| status.to_string());
        self.requests.with_label_values(&[route, &status]).inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// Count a race's attempts, its winner, or its failure.
    pub fn race(
        &self,
        route: &str,
        backends: &[&str],
        attempts: &[AttemptRecord],
        winner: Option<usize>,
        failure: Option<Failure>,
    ) {
        for a in attempts {
            let backend = backends.get(a.backend).copied().unwrap_or("?");
            self.backend_requests
                .with_label_values(&[route, backend, a.outcome.as_str()])
                .inc();
            self.backend_duration
                .with_label_values(&[route, backend])
                .observe(a.latency.as_secs_f64());
        }
        if let Some(w) = winner.and_then(|w| backends.get(w)) {
            self.race_wins.with_label_values(&[route, w]).inc();
        }
        if let Some(f) = failure {
            self.all_backends_failed
                .with_label_values(&[route, f.as_str()])
                .inc();
        }
    }
}
