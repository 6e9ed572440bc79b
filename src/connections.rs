//! Client connections as a whole: a cap on how many are open at once
//! (`limits.max_client_connections`). The other limit, a deadline for each
//! whole request header (`limits.request_header_timeout_ms`), is kept by the
//! front door (`front.rs`), which reads every request head itself.
//!
//! A connection over the cap is accepted and closed at once, without
//! reading from it or answering (as Envoy does past its connection limit):
//! answering would mean reading a request header, the very work the cap
//! refuses.

use std::sync::atomic::{AtomicUsize, Ordering};

use pingora_prometheus::prometheus::{IntCounter, IntGauge};

/// The series the connection limits keep (see `metrics.rs`).
#[derive(Clone)]
pub struct ConnectionCounters {
    /// Client connections open now.
    pub open: IntGauge,
    /// Connections closed at once because the cap was reached.
    pub refused: IntCounter,
    /// Connections closed because a request header missed its deadline.
    pub header_timeouts: IntCounter,
}

/// The cap on open client connections.
pub struct Cap {
    max: usize,
    open: AtomicUsize,
    counters: ConnectionCounters,
}

impl Cap {
    pub fn new(max: usize, counters: ConnectionCounters) -> Self {
        Cap {
            max,
            open: AtomicUsize::new(0),
            counters,
        }
    }

    pub fn counters(&self) -> &ConnectionCounters {
        &self.counters
    }

    /// Take a place under the cap, or `None` (counted) when it is reached.
    pub fn admit(&self) -> Option<Place<'_>> {
        let mut open = self.open.load(Ordering::Acquire);
        loop {
            if open >= self.max {
                self.counters.refused.inc();
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => open = now,
            }
        }
        self.counters.open.inc();
        Some(Place(self))
    }
}

/// Holds one place under the cap; gives it back when the connection ends.
pub struct Place<'a>(&'a Cap);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.counters.open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_given_back_when_dropped() {
        let counters = ConnectionCounters {
            open: IntGauge::new("o", "o").unwrap(),
            refused: IntCounter::new("r", "r").unwrap(),
            header_timeouts: IntCounter::new("h", "h").unwrap(),
        };
        let cap = Cap::new(2, counters);
        let a = cap.admit();
        let b = cap.admit();
        assert!(a.is_some() && b.is_some());
        assert!(cap.admit().is_none());
        assert_eq!(cap.counters().refused.get(), 1);
        assert_eq!(cap.counters().open.get(), 2);
        drop(a);
        assert!(cap.admit().is_some());
        assert_eq!(cap.counters().open.get(), 1);
    }
}
