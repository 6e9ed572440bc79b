//! A route's recent answer latencies, kept for `hedge_after_ms: auto`: a
//! histogram per second of the last ten, so that old answers drop out as
//! their second is reused, and a quantile over the newest seconds that hold
//! about [`WINDOW_ANSWERS`] answers (a busy route looks back a second or
//! two, a quiet one ten).
//!
//! Recording is a handful of atomic additions, without a lock or an
//! allocation; reading the quantile sums the buckets (at most 2,400 loads)
//! and is done by the caller every few answers, not per request. The buckets
//! are log-linear (eight per power of two of microseconds, as HDR histograms
//! do): a quantile is the middle of its bucket, within 6.25 % of the true
//! value. No crate fits: HDR histograms and DDSketch record under a
//! lock or into one thread's copy, and none slides over time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Seconds of history.
pub const SECONDS: usize = 10;
/// Enough answers: older seconds are left out once the newer ones hold this many.
pub const WINDOW_ANSWERS: u64 = 1_000;
/// Buckets: exact below 8 µs, then eight per power of two up to 2^32 µs
/// (71 minutes, above the longest `timeout_ms`).
const BUCKETS: usize = 240;

/// The bucket of a latency in microseconds.
fn bucket_of(us: u64) -> usize {
    let v = us.min(u64::from(u32::MAX));
    if v < 8 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as usize; // floor(log2 v), 3..=31
    (e - 2) * 8 + ((v >> (e - 3)) & 7) as usize
}

/// The largest latency, in microseconds, that falls in bucket `b`.
fn upper_us(b: usize) -> u64 {
    if b < 8 {
        return b as u64;
    }
    let e = b / 8 + 2;
    let m = 8 + (b % 8) as u64;
    ((m + 1) << (e - 3)) - 1
}

/// The middle of bucket `b`, in microseconds.
fn middle_us(b: usize) -> u64 {
    let lower = if b == 0 { 0 } else { upper_us(b - 1) + 1 };
    lower + (upper_us(b) - lower) / 2
}

/// One second's answers.
struct Second {
    /// Which second since the window's birth, plus one; 0: never used.
    stamp: AtomicU64,
    count: AtomicU64,
    buckets: Box<[AtomicU32]>,
}

/// Latencies of the last [`SECONDS`] seconds.
pub struct LatencyWindow {
    born: Instant,
    seconds: Box<[Second]>,
}

impl LatencyWindow {
    pub fn new(born: Instant) -> Self {
        LatencyWindow {
            born,
            seconds: (0..SECONDS)
                .map(|_| Second {
                    stamp: AtomicU64::new(0),
                    count: AtomicU64::new(0),
                    buckets: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
                })
                .collect(),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.born).as_secs()
    }

    /// Add one answer's latency; true when it began a new second (its slot
    /// was cleared of answers ten seconds old), a good moment to recompute.
    /// An answer recorded by another thread between that clearing and the
    /// new stamp may be lost: one sample in a thousand, at a second's edge.
    pub fn record(&self, latency: Duration, now: Instant) -> bool {
        let s = self.second(now);
        let slot = &self.seconds[(s % SECONDS as u64) as usize];
        let stamp = slot.stamp.load(Ordering::Acquire);
        let fresh = stamp != s + 1
            && slot
                .stamp
                .compare_exchange(stamp, s + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if fresh {
            slot.count.store(0, Ordering::Relaxed);
            for b in slot.buckets.iter() {
                b.store(0, Ordering::Relaxed);
            }
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        slot.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        slot.count.fetch_add(1, Ordering::Relaxed);
        fresh
    }

    /// The `q` quantile (0 < q ≤ 1, nearest rank) of the answers of the
    /// newest seconds that hold [`WINDOW_ANSWERS`] (or all ten seconds);
    /// `None` with fewer than `min_answers` there.
    pub fn quantile(&self, q: f64, now: Instant, min_answers: u64) -> Option<Duration> {
        let s = self.second(now);
        let mut sums = [0u64; BUCKETS];
        let mut total = 0;
        for back in 0..SECONDS as u64 {
            let Some(at) = s.checked_sub(back) else { break };
            let slot = &self.seconds[(at % SECONDS as u64) as usize];
            if slot.stamp.load(Ordering::Acquire) != at + 1 {
                continue;
            }
            for (sum, b) in sums.iter_mut().zip(slot.buckets.iter()) {
                *sum += u64::from(b.load(Ordering::Relaxed));
            }
            total += slot.count.load(Ordering::Relaxed);
            if total >= WINDOW_ANSWERS {
                break;
            }
        }
        if total < min_answers.max(1) {
            return None;
        }
        // Counted from the buckets themselves: `count` may run ahead of
        // them by an answer being recorded right now.
        let counted: u64 = sums.iter().sum();
        let rank = ((q * counted as f64).ceil() as u64).clamp(1, counted.max(1));
        let mut seen = 0;
        for (b, n) in sums.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_micros(middle_us(b)));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_hold_their_values() {
        let mut last = None;
        for us in (0..5_000u64).chain([65_535, 300_000, 1 << 20, 3_600_000_000, u64::MAX]) {
            let b = bucket_of(us);
            assert!(b < BUCKETS, "{us} -> {b}");
            assert!(upper_us(b) >= us.min(u64::from(u32::MAX)), "{us} -> {b}");
            if b > 0 {
                assert!(upper_us(b - 1) < us, "{us} belongs lower than {b}");
            }
            if let Some(l) = last {
                assert!(b >= l);
            }
            last = Some(b);
        }
        // The middle of a value's bucket is within 1/16 of it.
        for us in [9u64, 100, 1_000, 5_000, 9_999, 300_000, 3_600_000_000] {
            let mid = middle_us(bucket_of(us)) as f64;
            assert!((mid - us as f64).abs() <= us as f64 / 16.0, "{us} -> {mid}");
        }
        assert_eq!(bucket_of(u64::from(u32::MAX)), BUCKETS - 1);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn p95_of_a_long_tail_is_its_fast_part_until_the_tail_passes_5_percent() {
        let t0 = Instant::now();
        let w = LatencyWindow::new(t0);
        // 4 % of answers 300 ms, the rest 5-9 ms.
        for i in 0..500u64 {
            let l = if i % 25 == 24 { ms(300) } else { ms(5 + i % 5) };
            w.record(l, t0);
        }
        let p95 = w.quantile(0.95, t0, 20).unwrap();
        assert!(p95 >= ms(8) && p95 <= ms(10), "{p95:?}");
        assert!(w.quantile(0.99, t0, 20).unwrap() >= ms(280));
        // 10 % slow: the 95th percentile is in the tail.
        let w = LatencyWindow::new(t0);
        for i in 0..500u64 {
            w.record(if i % 10 == 0 { ms(300) } else { ms(5) }, t0);
        }
        let p95 = w.quantile(0.95, t0, 20).unwrap();
        assert!(p95 >= ms(280) && p95 <= ms(320), "{p95:?}");
    }

    #[test]
    fn too_few_answers_give_none() {
        let t0 = Instant::now();
        let w = LatencyWindow::new(t0);
        assert_eq!(w.quantile(0.95, t0, 20), None);
        for _ in 0..19 {
            w.record(ms(5), t0);
        }
        assert_eq!(w.quantile(0.95, t0, 20), None);
        w.record(ms(5), t0);
        assert!(w.quantile(0.95, t0, 20).is_some());
    }

    #[test]
    fn answers_older_than_ten_seconds_drop_out() {
        let t0 = Instant::now();
        let w = LatencyWindow::new(t0);
        for _ in 0..100 {
            w.record(ms(200), t0);
        }
        // Nine seconds later they still count.
        let t9 = t0 + Duration::from_millis(9_500);
        for _ in 0..100 {
            w.record(ms(2), t9);
        }
        assert!(w.quantile(0.95, t9, 20).unwrap() >= ms(190));
        // At 10 s their slot is reused and cleared.
        let t10 = t0 + ms(10_100);
        assert!(w.record(ms(2), t10), "a new second");
        assert!(w.quantile(0.95, t10, 20).unwrap() <= ms(3));
        // Twenty seconds on, nothing is recent.
        assert_eq!(w.quantile(0.95, t0 + ms(21_000), 1), None);
    }

    #[test]
    fn a_busy_route_looks_back_only_as_far_as_1000_answers() {
        let t0 = Instant::now();
        let w = LatencyWindow::new(t0);
        // An old, slow second, then two seconds of 600 fast answers each.
        for _ in 0..2_000 {
            w.record(ms(100), t0);
        }
        for s in [1u64, 2] {
            for _ in 0..600 {
                w.record(ms(4), t0 + Duration::from_secs(s));
            }
        }
        let t2 = t0 + Duration::from_secs(2);
        assert!(w.quantile(0.95, t2, 20).unwrap() <= ms(5));
        // With only one newer second, the old one is still needed.
        let w2 = LatencyWindow::new(t0);
        for _ in 0..2_000 {
            w2.record(ms(100), t0);
        }
        for _ in 0..600 {
            w2.record(ms(4), t0 + Duration::from_secs(1));
        }
        let t1 = t0 + Duration::from_secs(1);
        assert!(w2.quantile(0.95, t1, 20).unwrap() >= ms(95));
    }
}
