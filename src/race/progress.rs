//! Where one race stands, for [`Racer::run`](super::Racer::run): which
//! backend of its plan starts when, and how each attempt ended. The racer
//! owns the attempts in flight and the one loop that serves race, hedge and
//! failover; this is its bookkeeping, apart from the futures.

use std::time::Duration;

use tokio::time::Instant;

use super::attempt::AttemptResult;
use super::health::Verdict;
use super::{AttemptRecord, Outcome, Plan, RouteUpstream, Schedule};
use crate::answer::Answer;

/// One race's plan and schedule, and the attempts it started so far.
pub(super) struct Progress<'a> {
    plan: Plan,
    schedule: Schedule<'a>,
    start: Instant,
    attempts: Vec<AttemptRecord>,
    /// Scheduled attempts in flight (probes and skipped ones not counted).
    running: usize,
    /// The plan's next backend to start (an index into `plan.order`).
    pub(super) next: usize,
}

impl<'a> Progress<'a> {
    /// A race over `route`'s backends starting now.
    pub(super) fn new(route: &'a RouteUpstream) -> Self {
        let plan = route.plan();
        let schedule = route.schedule();
        Progress {
            plan,
            schedule,
            start: Instant::now(),
            attempts: Vec::with_capacity(route.replicas.len()),
            running: 0,
            next: 0,
        }
    }

    /// Backend `i` follows the strategy's schedule (neither a probe nor
    /// skipped).
    fn scheduled(&self, i: usize) -> bool {
        let Plan {
            order,
            probes,
            admitted,
        } = &self.plan;
        order[*probes..*admitted].contains(&i)
    }

    /// Whether the plan's next backend starts `now` (`idle`: nothing is in
    /// flight); `Some(hedged)` to start it.
    pub(super) fn start_as(&mut self, now: Instant, idle: bool) -> Option<bool> {
        let (probes, admitted) = (self.plan.probes, self.plan.admitted);
        match self.next {
            k if k < probes => Some(false),
            k if k < admitted => {
                if self.running == 0 {
                    Some(false)
                } else if self
                    .schedule
                    .due(k - probes)
                    .is_some_and(|d| self.start + d <= now)
                {
                    self.schedule.start_due()
                } else {
                    None
                }
            }
            // Skipped backends: only once every other one failed.
            k => (k > admitted || (idle && all_failed(&self.attempts))).then_some(false),
        }
    }

    /// The plan's next backend started `now`: note it, and return its index
    /// into the route's backends.
    pub(super) fn started(&mut self, now: Instant, hedge: bool) -> usize {
        let i = self.plan.order[self.next];
        if self.scheduled(i) {
            self.running += 1;
        }
        let at = now.saturating_duration_since(self.start);
        self.attempts.push(AttemptRecord::started(i, at, hedge));
        self.next += 1;
        i
    }

    /// When the plan's next backend is due by the schedule; `None`: it is
    /// not a scheduled one, or only starts when nothing else is in flight.
    pub(super) fn wake(&self) -> Option<Instant> {
        let (probes, admitted) = (self.plan.probes, self.plan.admitted);
        if (probes..admitted).contains(&self.next) {
            self.schedule
                .due(self.next - probes)
                .map(|d| self.start + d)
        } else {
            None
        }
    }

    /// Backend `i`'s attempt ended with `result`. A success ends the race:
    /// `Some` of the winner and its answer (`None` when it had none).
    pub(super) fn ended(
        &mut self,
        i: usize,
        result: AttemptResult,
        verdict: &Verdict,
    ) -> Option<Option<(usize, Answer)>> {
        if self.scheduled(i) {
            self.running -= 1;
        }
        let (latency, answer) = record(&mut self.attempts, i, result)?;
        verdict.won(latency);
        self.schedule.won(&self.attempts, i, self.start.elapsed());
        Some(answer.map(|a| (i, a)))
    }

    /// The race is over: its attempts, those still running cancelled now.
    pub(super) fn settle(mut self) -> Vec<AttemptRecord> {
        settle_cancelled(&mut self.attempts, self.start);
        self.attempts
    }
}

/// Note how backend `i`'s attempt ended; a success returns its latency and
/// answer.
fn record(
    attempts: &mut [AttemptRecord],
    i: usize,
    result: AttemptResult,
) -> Option<(Duration, Option<Answer>)> {
    if let Some(rec) = attempts.iter_mut().find(|a| a.backend == i) {
        rec.outcome = result.outcome;
        rec.latency = result.latency;
        rec.detail = result.detail;
    }
    (result.outcome == Outcome::Success).then_some((result.latency, result.answer))
}

/// Every attempt so far failed (an error or a timeout).
fn all_failed(attempts: &[AttemptRecord]) -> bool {
    attempts
        .iter()
        .all(|a| matches!(a.outcome, Outcome::Error | Outcome::Timeout))
}

/// Attempts still running when the race ended were cancelled now.
fn settle_cancelled(attempts: &mut [AttemptRecord], start: Instant) {
    let now = Instant::now();
    for rec in attempts
        .iter_mut()
        .filter(|a| a.outcome == Outcome::Cancelled)
    {
        rec.latency = now.saturating_duration_since(start + rec.started);
    }
}
