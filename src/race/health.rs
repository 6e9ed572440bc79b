//! Passive health of a route's backends (`routes[].health`). A backend whose
//! attempts fail `failures` times in a row is skipped for `skip_seconds`:
//! races leave it out unless every other backend has already failed on that
//! request, and never when it would leave none. After the skip period one
//! request also starts it, at once and beside its usual schedule (the probe,
//! which makes no request wait for it): an answer makes it healthy, a
//! failure or a stall skips it for another period.
//!
//! A failure is an `error` or a `timeout`, or a stall: a loser dropped
//! without a single answer byte although it had been in flight at least the
//! winner's latency plus [`STALL_MARGIN`]. A stopped (SIGSTOP) replica never
//! fails on its own in a race or a hedge: it is always cancelled. Counting
//! its stalls is what ends its cost; on a `hedge` route with the hung replica
//! first, every request waited `hedge_after_ms` for it (p50 14 → 65 ms). A
//! fast replica that merely lost a race either answers while it drains
//! (`drain_losers_ms`) or had not been running longer than the winner: it
//! does not stall.
//!
//! The state is two atomics per backend, read and changed without a lock;
//! `tollgate_backend_healthy` follows it (refreshed at every race).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pingora_prometheus::prometheus::IntGauge;

use super::Outcome;
use crate::config::HealthPolicy;

/// How much longer than the winner a loser must have run, without an answer
/// byte, to count as a stall.
pub const STALL_MARGIN: Duration = Duration::from_millis(20);

/// What a race does with a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Healthy: in its usual place.
    Use,
    /// Skipped, but its period is over: start it at once, beside the usual
    /// schedule, to see whether it answers again.
    Probe,
    /// Skipped: only when everything else failed.
    Skip,
}

/// One backend's health.
pub struct Health {
    /// `None`: never skipped.
    policy: Option<HealthPolicy>,
    /// `route backend`, for the log.
    name: String,
    /// Failures in a row while healthy.
    failures: AtomicU32,
    /// 0 while healthy; otherwise when the skip period ends, as [`now_ms`].
    down_until: AtomicU64,
    /// `tollgate_backend_healthy{route,backend}`.
    gauge: IntGauge,
}

impl Health {
    pub fn new(policy: Option<HealthPolicy>, route: &str, backend: &str, gauge: IntGauge) -> Self {
        gauge.set(1);
        Health {
            policy,
            name: format!("route {route} backend {backend}"),
            failures: AtomicU32::new(0),
            down_until: AtomicU64::new(0),
            gauge,
        }
    }

    /// What a race starting now does with this backend. When the skip
    /// period is over, one caller gets [`Admit::Probe`] and the period
    /// starts again for everyone else.
    pub fn admit(&self) -> Admit {
        let Some(policy) = self.policy else {
            return Admit::Use;
        };
        let until = self.down_until.load(Ordering::Acquire);
        self.gauge.set(i64::from(until == 0));
        if until == 0 {
            return Admit::Use;
        }
        let now = now_ms();
        let probe = now >= until
            && self
                .down_until
                .compare_exchange(
                    until,
                    now.saturating_add(ms(policy.skip)),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
        if probe {
            Admit::Probe
        } else {
            Admit::Skip
        }
    }

    /// Whether the backend is being skipped (the probe included).
    #[cfg(test)]
    fn is_down(&self) -> bool {
        self.down_until.load(Ordering::Acquire) != 0
    }

    /// An attempt ended.
    pub fn record(&self, outcome: Outcome) {
        match outcome {
            Outcome::Success | Outcome::NoData => self.answered(),
            Outcome::Error | Outcome::Timeout => self.failed(outcome.as_str()),
            Outcome::Cancelled => {}
        }
    }

    fn answered(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.down_until.load(Ordering::Acquire) != 0
            && self.down_until.swap(0, Ordering::AcqRel) != 0
        {
            self.gauge.set(1);
            log::info!(target: "tollgate::health", "{} answers again: healthy", self.name);
        }
    }

    fn failed(&self, why: &str) {
        let Some(policy) = self.policy else {
            return;
        };
        let skip_until = now_ms().saturating_add(ms(policy.skip));
        let until = self.down_until.load(Ordering::Acquire);
        if until != 0 {
            // A probe, or an attempt made because nothing else was left.
            if until < skip_until {
                let _ = self.down_until.compare_exchange(
                    until,
                    skip_until,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            return;
        }
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n >= policy.failures
            && self
                .down_until
                .compare_exchange(0, skip_until, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.failures.store(0, Ordering::Relaxed);
            self.gauge.set(0);
            log::warn!(
                target: "tollgate::health",
                "{}: {n} failed attempts in a row (last: {why}), skipped for {} s",
                self.name,
                policy.skip.as_secs()
            );
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the first call in this process, plus one (0 means
/// "healthy" in `down_until`).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    ms(EPOCH.get_or_init(Instant::now).elapsed()).saturating_add(1)
}

/// Shared by a race's attempts: the winner's latency, once there is one.
#[derive(Default)]
pub struct Verdict {
    /// Microseconds plus one; 0 while there is no winner.
    winner_us: AtomicU64,
}

impl Verdict {
    pub fn won(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX - 1);
        self.winner_us.store(us + 1, Ordering::Release);
    }

    fn winner_latency(&self) -> Option<Duration> {
        match self.winner_us.load(Ordering::Acquire) {
            0 => None,
            us => Some(Duration::from_micros(us - 1)),
        }
    }
}

/// Watches one attempt for its backend's health: [`Watch::finish`] records
/// how it ended; dropped unfinished (a cancelled loser), it records a stall
/// when the attempt had no answer byte and ran long enough.
pub struct Watch {
    replica: Arc<super::Replica>,
    verdict: Arc<Verdict>,
    started: Instant,
    /// Set by the attempt when the answer's header has arrived.
    pub answered: AtomicBool,
    finished: bool,
}

impl Watch {
    /// Call when the attempt begins (its future is first polled).
    pub fn new(replica: Arc<super::Replica>, verdict: Arc<Verdict>) -> Watch {
        Watch {
            replica,
            verdict,
            started: Instant::now(),
            answered: AtomicBool::new(false),
            finished: false,
        }
    }

    pub fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        self.replica.health.record(outcome);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.finished || self.answered.load(Ordering::Relaxed) {
            return;
        }
        let stalled = self
            .verdict
            .winner_latency()
            .is_some_and(|w| self.started.elapsed() >= w + STALL_MARGIN);
        if stalled {
            self.replica.health.failed("stalled");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(failures: u32, skip_ms: u64) -> Health {
        let policy = HealthPolicy {
            failures,
            skip: Duration::from_millis(skip_ms),
        };
        Health::new(Some(policy), "r", "b", IntGauge::new("g", "g").unwrap())
    }

    #[test]
    fn failures_in_a_row_skip_then_one_probe_is_let_through() {
        let h = health(3, 60_000);
        h.record(Outcome::Error);
        h.record(Outcome::Timeout);
        // An answer breaks the run.
        h.record(Outcome::NoData);
        h.record(Outcome::Error);
        h.record(Outcome::Error);
        assert!(h.admit() == Admit::Use && !h.is_down());
        assert_eq!(h.gauge.get(), 1);
        h.record(Outcome::Timeout);
        assert!(h.is_down() && h.admit() == Admit::Skip);
        assert_eq!(h.gauge.get(), 0);
        // Cancellations say nothing.
        h.record(Outcome::Cancelled);
        assert!(h.is_down());
    }

    #[test]
    fn after_the_skip_period_one_probe_decides() {
        let h = health(1, 1);
        h.record(Outcome::Error);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(h.admit(), Admit::Probe);
        assert_eq!(h.admit(), Admit::Skip, "only one probe per period");
        // The probe fails: skipped again at once, no run of failures needed.
        h.record(Outcome::Timeout);
        assert!(h.is_down());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(h.admit(), Admit::Probe);
        h.record(Outcome::Success);
        assert!(!h.is_down() && h.admit() == Admit::Use);
        assert_eq!(h.gauge.get(), 1);
    }

    #[test]
    fn without_a_policy_nothing_is_skipped() {
        let h = Health::new(None, "r", "b", IntGauge::new("g", "g").unwrap());
        for _ in 0..100 {
            h.record(Outcome::Timeout);
        }
        assert!(h.admit() == Admit::Use && !h.is_down());
        assert_eq!(h.gauge.get(), 1);
    }

    fn health_of(route_extra: &str) -> Result<Option<HealthPolicy>, Vec<String>> {
        let yaml = format!(
            "routes:\n  - name: v1\n    prefix: /api/v1/\n    backends: [\"http://127.0.0.1:9001\"]\n{route_extra}"
        );
        crate::config::Config::from_yaml(&yaml)
            .map(|c| c.routes[0].health)
            .map_err(|e| e.0.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn config_defaults_values_off_and_errors_name_the_field() {
        let policy = |failures, secs| {
            Ok(Some(HealthPolicy {
                failures,
                skip: Duration::from_secs(secs),
            }))
        };
        assert_eq!(health_of(""), policy(5, 10));
        assert_eq!(health_of("    health: {}\n"), policy(5, 10));
        assert_eq!(
            health_of("    health: {failures: 2, skip_seconds: 30}\n"),
            policy(2, 30)
        );
        assert_eq!(
            health_of("    health: {skip_seconds: 86400}\n"),
            policy(5, 86400)
        );
        assert_eq!(health_of("    health: {failures: 0}\n"), Ok(None));
        for (bad, why) in [
            (0, "must be at least 1".to_string()),
            (
                86401,
                "must be at most 86400, got 86401 (one day)".to_string(),
            ),
        ] {
            assert_eq!(
                health_of(&format!("    health: {{skip_seconds: {bad}}}\n")),
                Err(vec![format!("routes[0].health.skip_seconds: {why}")])
            );
        }
        assert_eq!(
            health_of("    health: {failures: 1001}\n"),
            Err(vec![
                "routes[0].health.failures: must be at most 1000, got 1001".to_string()
            ])
        );
        let e = health_of("    health: {failure: 3}\n").unwrap_err();
        assert!(
            e.len() == 1 && e[0].starts_with("routes[0].health") && e[0].contains("failure"),
            "{e:?}"
        );
        let e = health_of("    health: {failures: -1}\n").unwrap_err();
        assert!(e[0].starts_with("routes[0].health.failures"), "{e:?}");
    }
}
