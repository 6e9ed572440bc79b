//! One runtime object per route: its config, its backends (replicas, pools,
//! health), its metric series and its outage state, built once at start and
//! found by the route table. A request holds a `&'static` to it: the gateway
//! lives as long as its process (a reload starts a new process), so the
//! routes are leaked once instead of counted per request.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::answer::Failure;
use crate::config::Route;
use crate::logging;
use crate::metrics::{Metrics, RouteSeries};
use crate::notify::{BackendReport, Event, Notifier, RouteNotifier};
use crate::race::{RaceReport, RouteUpstream};
use crate::target::Target;

pub struct RouteRuntime {
    pub config: Route,
    pub upstream: RouteUpstream,
    pub series: RouteSeries,
    notifier: RouteNotifier,
    /// Its last race had no winner (for the recovery notice).
    failing: AtomicBool,
}

impl RouteRuntime {
    /// Every route of the config, in its order, for the process's lifetime.
    pub fn leak_all(
        routes: &[Route],
        pool_size: usize,
        metrics: &Metrics,
        notifier: &Notifier,
    ) -> &'static [RouteRuntime] {
        let all: Vec<RouteRuntime> = routes
            .iter()
            .zip(notifier.routes())
            .map(|(r, notifier)| RouteRuntime {
                config: r.clone(),
                upstream: RouteUpstream::new(
                    r,
                    pool_size,
                    |b| metrics.backend_healthy(&r.name, b),
                    metrics.hedge_delay(&r.name),
                ),
                series: metrics.route_series(r),
                notifier,
                failing: AtomicBool::new(false),
            })
            .collect();
        Box::leak(all.into_boxed_slice())
    }

    /// The label of backend `i` (`host:port`).
    pub fn backend_label(&self, i: usize) -> Option<&str> {
        self.upstream.replicas.get(i).map(|r| r.label.as_str())
    }

    /// After a request on this route: count its race, log a race that no
    /// backend won, and tell the notifier of answers, outages and the
    /// recovery that ends one.
    pub fn observe(&self, request_id: &str, target: &Target, race: Option<&RaceReport>) {
        self.notifier.answered();
        let Some(report) = race else { return };
        let failure = report.winner.is_none().then(|| report.failure());
        self.series.race(&report.attempts, report.winner, failure);
        let Some(f) = failure else {
            self.recovered(request_id);
            return;
        };
        let labels: Vec<&str> = self
            .upstream
            .replicas
            .iter()
            .map(|r| r.label.as_str())
            .collect();
        logging::all_backends_failed(
            &self.config.name,
            f.as_str(),
            target.upstream(),
            request_id,
            &labels,
            &report.attempts,
        );
        // "No such data" is the data API working: it only counts toward the
        // route's no_data share, and ends an outage like a success.
        if f == Failure::NoData {
            self.notifier.no_data();
            self.recovered(request_id);
            return;
        }
        self.notifier.notify(Event::Failed {
            reason: f.as_str(),
            request_id: request_id.to_string(),
            backends: report
                .attempts
                .iter()
                .map(|a| BackendReport {
                    backend: labels.get(a.backend).copied().unwrap_or("?").to_string(),
                    outcome: a.outcome.as_str(),
                    latency_ms: logging::ms(a.latency),
                })
                .collect(),
        });
        // Only after the notifier has the failure, so that the recovery a
        // concurrent success reports for it can never reach the notifier first.
        self.failing.store(true, Ordering::Release);
    }

    /// Tell the notifier once when a route that had failed answers again.
    fn recovered(&self, request_id: &str) {
        if self.failing.swap(false, Ordering::AcqRel) {
            self.notifier.notify(Event::Recovered {
                request_id: request_id.to_string(),
            });
        }
    }
}
