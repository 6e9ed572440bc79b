//! What a `hedge` route's timer does: how long a race waits before it starts
//! the next backend (`hedge_after_ms`, fixed or `auto`), and whether it may
//! (`hedge_budget_percent`).
//!
//! `auto` is the route's observed 95th percentile of answer latency, taken
//! from race start to the winning answer, or for a request a hedge won, the
//! hedge delay it waited (it would have taken at least that unhedged; were
//! the winner's own latency taken instead, every hedge would pull the
//! estimate down, and more hedges would follow), over a sliding window
//! ([`LatencyWindow`]), between 1 ms and `timeout_ms`; 50 ms until the
//! window holds [`MIN_ANSWERS`] answers. It is recomputed by the first
//! answer of each second (and every [`RECOMPUTE_EVERY`] answers until it
//! has a first estimate), off the path of every other request; a race reads
//! it with one atomic load.
//!
//! With a tail of about 5 % of answers the p95 sits on the tail's edge: a
//! window holding a few more slow requests than 5 % puts it among them.
//! Two choices keep the delay from climbing then (measured before them,
//! 300 ms every 20th answer: the delay walked 7 → 28 ms and back, p99 25 ms;
//! after, it stayed at 6.9-8.7 ms, p99 14.7 ms): a request a hedge won
//! counts at the delay, not at the delay plus its hedge's latency (which
//! would raise the delay by a hedge's latency at each recompute), and the
//! delay is recomputed once a second, so that the window has changed
//! enough to fall back.
//!
//! The budget bounds what hedging adds when backends slow down together
//! (then every request would hedge, multiplying their load just when they
//! can least take it): attempts started by the timer are at most the
//! budget's share of the route's races over the last 10 s, plus
//! [`FLOOR`] per 10 s so that a quiet route can still hedge (as Finagle's
//! retry budgets keep a minimum; a budget of 0 has no floor). An attempt
//! started because everything in flight failed is not a hedge and is never
//! refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pingora_prometheus::prometheus::Gauge;

use super::window::{LatencyWindow, SECONDS};
use crate::config::HedgeAfter;

/// `auto`'s delay until the window holds enough answers.
pub const AUTO_START: Duration = Duration::from_millis(50);
/// Answers in the window before `auto` trusts its 95th percentile (one in
/// twenty is the tail it is after).
pub const MIN_ANSWERS: u64 = 20;
/// `auto` recomputes its delay every this many answers until it has a first
/// estimate (then at each new second).
const RECOMPUTE_EVERY: u64 = 16;
/// Timer attempts the budget allows per 10 s besides its share.
pub const FLOOR: u64 = 10;
/// The quantile `auto` hedges after.
const QUANTILE: f64 = 0.95;

/// A hedge route's timer: its delay and its budget.
pub struct Hedging {
    delay: Delay,
    budget: Budget,
}

enum Delay {
    Fixed(Duration),
    Auto(AutoDelay),
}

impl Hedging {
    /// `gauge`: the route's `tollgate_hedge_delay_seconds`, kept at the delay.
    pub fn new(after: HedgeAfter, budget_percent: u32, timeout: Duration, gauge: Gauge) -> Self {
        let now = Instant::now();
        let delay = match after {
            HedgeAfter::Fixed(d) => {
                gauge.set(d.as_secs_f64());
                Delay::Fixed(d)
            }
            HedgeAfter::Auto => Delay::Auto(AutoDelay::new(timeout, gauge, now)),
        };
        Hedging {
            delay,
            budget: Budget::new(budget_percent, now),
        }
    }

    /// The delay between a race's starts, now.
    pub fn delay(&self) -> Duration {
        match &self.delay {
            Delay::Fixed(d) => *d,
            Delay::Auto(a) => a.delay(),
        }
    }

    /// A race starts: it counts toward the budget's share.
    pub fn race_started(&self) {
        self.budget.request(Instant::now());
    }

    /// May the timer start one more attempt? Takes it from the budget if so.
    pub fn try_hedge(&self) -> bool {
        self.budget.try_hedge(Instant::now())
    }

    /// A race was won `latency` after it started.
    pub fn answered(&self, latency: Duration) {
        if let Delay::Auto(a) = &self.delay {
            a.observe(latency, Instant::now());
        }
    }
}

/// `hedge_after_ms: auto`.
struct AutoDelay {
    window: LatencyWindow,
    /// The delay in microseconds.
    current_us: AtomicU64,
    answers: AtomicU64,
    /// The delay is an estimate (not the 50 ms start).
    learned: std::sync::atomic::AtomicBool,
    timeout: Duration,
    gauge: Gauge,
}

impl AutoDelay {
    fn new(timeout: Duration, gauge: Gauge, now: Instant) -> Self {
        let a = AutoDelay {
            window: LatencyWindow::new(now),
            current_us: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            learned: std::sync::atomic::AtomicBool::new(false),
            timeout,
            gauge,
        };
        a.set(AUTO_START);
        a
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.current_us.load(Ordering::Relaxed))
    }

    fn observe(&self, latency: Duration, now: Instant) {
        let new_second = self.window.record(latency, now);
        let n = self.answers.fetch_add(1, Ordering::Relaxed);
        let learning = !self.learned.load(Ordering::Relaxed);
        if new_second || (learning && n.is_multiple_of(RECOMPUTE_EVERY)) {
            self.recompute(now);
        }
    }

    fn recompute(&self, now: Instant) {
        let p = self.window.quantile(QUANTILE, now, MIN_ANSWERS);
        self.learned.store(p.is_some(), Ordering::Relaxed);
        self.set(p.unwrap_or(AUTO_START));
    }

    /// Store `d` within [1 ms, timeout].
    fn set(&self, d: Duration) {
        let d = d.clamp(
            Duration::from_millis(1),
            self.timeout.max(Duration::from_millis(1)),
        );
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.current_us.store(us, Ordering::Relaxed);
        self.gauge.set(d.as_secs_f64());
    }
}

/// `hedge_budget_percent`: races and timer attempts per second, for the last
/// [`SECONDS`] seconds.
struct Budget {
    percent: u64,
    born: Instant,
    seconds: Box<[BudgetSecond]>,
}

#[derive(Default)]
struct BudgetSecond {
    /// The second since `born`, plus one; 0: never used.
    stamp: AtomicU64,
    races: AtomicU64,
    hedges: AtomicU64,
}

impl Budget {
    fn new(percent: u32, born: Instant) -> Self {
        Budget {
            percent: u64::from(percent),
            born,
            seconds: (0..SECONDS).map(|_| BudgetSecond::default()).collect(),
        }
    }

    /// The slot of the current second, cleared when its last use was ten
    /// seconds ago (a count made by another thread right then may be lost).
    fn slot(&self, now: Instant) -> &BudgetSecond {
        let s = now.saturating_duration_since(self.born).as_secs();
        let slot = &self.seconds[(s % SECONDS as u64) as usize];
        let stamp = slot.stamp.load(Ordering::Acquire);
        if stamp != s + 1
            && slot
                .stamp
                .compare_exchange(stamp, s + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.races.store(0, Ordering::Relaxed);
            slot.hedges.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Races and timer attempts over the last ten seconds.
    fn totals(&self, now: Instant) -> (u64, u64) {
        let s = now.saturating_duration_since(self.born).as_secs();
        let (mut races, mut hedges) = (0, 0);
        for back in 0..SECONDS as u64 {
            let Some(at) = s.checked_sub(back) else { break };
            let slot = &self.seconds[(at % SECONDS as u64) as usize];
            if slot.stamp.load(Ordering::Acquire) == at + 1 {
                races += slot.races.load(Ordering::Relaxed);
                hedges += slot.hedges.load(Ordering::Relaxed);
            }
        }
        (races, hedges)
    }

    fn request(&self, now: Instant) {
        self.slot(now).races.fetch_add(1, Ordering::Relaxed);
    }

    /// Take one timer attempt if the last ten seconds allow it. It is
    /// counted first and given back when over: two racing callers may both
    /// be refused, never both let through past the budget.
    fn try_hedge(&self, now: Instant) -> bool {
        if self.percent == 0 {
            return false;
        }
        let slot = self.slot(now);
        slot.hedges.fetch_add(1, Ordering::Relaxed);
        let (races, hedges) = self.totals(now);
        if hedges <= races * self.percent / 100 + FLOOR {
            return true;
        }
        slot.hedges.fetch_sub(1, Ordering::Relaxed);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> Gauge {
        Gauge::new("g", "g").unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn auto_starts_at_50_ms_then_follows_the_p95_within_1_ms_and_the_timeout() {
        let t0 = Instant::now();
        let g = gauge();
        let a = AutoDelay::new(ms(30_000), g.clone(), t0);
        assert_eq!(a.delay(), ms(50));
        assert_eq!(g.get(), 0.05);
        for _ in 0..(MIN_ANSWERS - 1) {
            a.observe(ms(10), t0);
        }
        a.recompute(t0);
        assert_eq!(a.delay(), ms(50), "too few answers yet");
        for i in 0..200u64 {
            a.observe(if i % 25 == 0 { ms(300) } else { ms(10) }, t0);
        }
        let d = a.delay();
        assert!(d >= ms(9) && d <= ms(11), "{d:?}");
        assert_eq!(g.get(), d.as_secs_f64());
        // Below 1 ms: 1 ms.
        let fast = AutoDelay::new(ms(30_000), gauge(), t0);
        for _ in 0..100 {
            fast.observe(Duration::from_micros(40), t0);
        }
        assert_eq!(fast.delay(), ms(1));
        // Above the timeout: the timeout; and 50 ms never exceeds it either.
        let short = AutoDelay::new(ms(20), gauge(), t0);
        assert_eq!(short.delay(), ms(20));
        for _ in 0..100 {
            short.observe(ms(500), t0);
        }
        assert_eq!(short.delay(), ms(20));
    }

    #[test]
    fn auto_goes_back_to_50_ms_once_its_answers_are_ten_seconds_old() {
        let t0 = Instant::now();
        let a = AutoDelay::new(ms(30_000), gauge(), t0);
        for _ in 0..100 {
            a.observe(ms(5), t0);
        }
        assert!(a.delay() < ms(6));
        a.observe(ms(5), t0 + ms(11_000));
        assert_eq!(a.delay(), ms(50));
    }

    #[test]
    fn once_learned_auto_moves_once_a_second() {
        let t0 = Instant::now();
        let a = AutoDelay::new(ms(30_000), gauge(), t0);
        for _ in 0..40 {
            a.observe(ms(5), t0);
        }
        let learned = a.delay();
        assert!(learned < ms(6), "{learned:?}");
        for _ in 0..500 {
            a.observe(ms(300), t0 + ms(500));
        }
        assert_eq!(a.delay(), learned, "moved within the second");
        a.observe(ms(300), t0 + ms(1_000));
        assert!(a.delay() >= ms(280), "{:?}", a.delay());
    }

    #[test]
    fn budget_allows_its_share_of_races_plus_the_floor() {
        let t0 = Instant::now();
        let b = Budget::new(10, t0);
        for _ in 0..200 {
            b.request(t0);
        }
        let allowed = (0..100).filter(|_| b.try_hedge(t0)).count() as u64;
        assert_eq!(allowed, 20 + FLOOR);
        // More races earn more.
        for _ in 0..10 {
            b.request(t0);
        }
        assert!(b.try_hedge(t0));
        assert!(!b.try_hedge(t0));
        // Ten seconds on, the old races and hedges are gone: only the floor.
        let t10 = t0 + ms(10_000);
        let allowed = (0..100).filter(|_| b.try_hedge(t10)).count() as u64;
        assert_eq!(allowed, FLOOR);
    }

    #[test]
    fn budget_0_allows_nothing_and_100_one_per_race() {
        let t0 = Instant::now();
        let none = Budget::new(0, t0);
        let all = Budget::new(100, t0);
        for _ in 0..50 {
            none.request(t0);
            all.request(t0);
        }
        assert!(!none.try_hedge(t0));
        let allowed = (0..200).filter(|_| all.try_hedge(t0)).count() as u64;
        assert_eq!(allowed, 50 + FLOOR);
    }

    #[test]
    fn fixed_delay_is_on_the_gauge() {
        let g = gauge();
        let h = Hedging::new(HedgeAfter::Fixed(ms(250)), 10, ms(1_000), g.clone());
        assert_eq!(h.delay(), ms(250));
        assert_eq!(g.get(), 0.25);
    }
}
