//! Per-key rate limits on `pingora-limits` rate estimates.
//!
//! The estimate is Cloudflare's sliding-window approximation over 1-second
//! windows: the requests counted in the current window plus the previous
//! window's count weighted by the share of it that still lies within the last
//! second (`prev × (1 − elapsed fraction) + curr`). At a window edge this
//! does not reset to zero, so a client cannot send twice its limit by
//! bursting on both sides of the edge, as it could with fixed windows; it
//! assumes the previous window's requests were spread evenly, so a burst at
//! the very end of a window weighs a little less than it should just after
//! the edge. After a pause the estimate decays to zero within two windows
//! (at most ~2 s). Only accepted requests are counted, so a client that keeps
//! sending above its limit still gets its limit's worth through. Counts come
//! from a count-min sketch (4 × 1024): with many busy keys a collision can
//! only over-estimate, never under-estimate.

use std::time::Duration;

use pingora_limits::rate::Rate;

use crate::key::KeyHash;

/// The decision for one request, and the `X-RateLimit-*` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the current window ends (rounded up).
    pub reset_secs: u32,
}

impl Decision {
    /// `X-RateLimit-*` headers (and `Retry-After` when refused).
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, u64)> {
        let retry = (!self.allowed).then(|| ("Retry-After", u64::from(self.reset_secs.max(1))));
        [
            ("X-RateLimit-Limit", u64::from(self.limit)),
            ("X-RateLimit-Remaining", u64::from(self.remaining)),
            ("X-RateLimit-Reset", u64::from(self.reset_secs)),
        ]
        .into_iter()
        .chain(retry)
    }
}

pub struct Limiter {
    rate: Rate,
    default_per_second: u32,
}

const WINDOW: Duration = Duration::from_secs(1);

impl Limiter {
    pub fn new(default_per_second: u32) -> Limiter {
        Limiter {
            rate: Rate::new(WINDOW),
            default_per_second,
        }
    }

    /// Decide on one request of `key`, whose own limit is `own` (else the default).
    pub fn check(&self, key: &KeyHash, own: Option<u32>) -> Decision {
        let limit = own.unwrap_or(self.default_per_second);
        let (estimate, elapsed) = self.rate.rate_with(key, |c| {
            let prev = c.prev_samples as f64 * (1.0 - c.current_interval_fraction);
            (prev + c.curr_samples as f64, c.current_interval_fraction)
        });
        let allowed = estimate + 1.0 <= f64::from(limit);
        if allowed {
            self.rate.observe(key, 1);
        }
        let used = if allowed { estimate + 1.0 } else { estimate };
        let remaining = (f64::from(limit) - used).floor().max(0.0) as u32;
        let reset_secs = ((1.0 - elapsed) * WINDOW.as_secs_f64()).ceil().max(1.0) as u32;
        Decision {
            allowed,
            limit,
            remaining,
            reset_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_at_the_limit_and_counts_down() {
        let l = Limiter::new(5);
        let k = KeyHash::of("a");
        let decisions: Vec<Decision> = (0..7).map(|_| l.check(&k, None)).collect();
        assert!(decisions[..5].iter().all(|d| d.allowed));
        assert_eq!(decisions[0].remaining, 4);
        assert_eq!(decisions[4].remaining, 0);
        assert!(!decisions[5].allowed && !decisions[6].allowed);
        assert_eq!(decisions[5].limit, 5);
        // Another key is not affected; a key's own rate wins over the default.
        assert!(l.check(&KeyHash::of("b"), None).allowed);
        let own: Vec<bool> = (0..3)
            .map(|_| l.check(&KeyHash::of("c"), Some(2)).allowed)
            .collect();
        assert_eq!(own, [true, true, false]);
    }

    #[test]
    fn refusal_carries_retry_after() {
        let l = Limiter::new(1);
        let k = KeyHash::of("a");
        assert!(l.check(&k, None).allowed);
        let d = l.check(&k, None);
        let h: Vec<(&str, u64)> = d.headers().collect();
        assert!(h.contains(&("Retry-After", 1)), "{h:?}");
        assert!(h.contains(&("X-RateLimit-Remaining", 0)), "{h:?}");
    }
}
