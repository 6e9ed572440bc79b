//! The per-request context, in the groups the steps fill: the route and
//! target, admission (key, rate limit, credit hold), the cache step, and the
//! race. Guards live here so that dropping the request releases them: the
//! credit hold refunds, the cache lock wakes the requests waiting for it.

use std::sync::Arc;
use std::time::Instant;

use super::RouteRuntime;
use crate::cache::{Entry, LeaderGuard};
use crate::credits::CreditHold;
use crate::key::KeyHash;
use crate::limits::Decision;
use crate::race::RaceReport;
use crate::reject::Reject;
use crate::target::Target;

pub struct Ctx {
    pub(super) started: Instant,
    pub(super) request_id: String,
    pub(super) head: bool,
    /// Set once the route is known.
    pub(super) routed: Option<Routed>,
    pub(super) admit: Admit,
    pub(super) cache: CacheStep,
    pub(super) race: Option<RaceReport>,
    /// The gateway-made answer, when it made one.
    pub(super) reject: Option<Reject>,
}

/// The route a request matched, and its target.
pub struct Routed {
    pub route: &'static RouteRuntime,
    pub target: Target,
}

/// What admission learned and took.
#[derive(Default)]
pub struct Admit {
    /// The caller's key hash, once known (its id goes to the access log).
    pub key: Option<KeyHash>,
    pub limit: Option<Decision>,
    /// The charge, once taken; dropping it unsettled refunds it.
    pub hold: Option<CreditHold>,
}

/// What the cache step left for the race.
#[derive(Default)]
pub struct CacheStep {
    /// The cache key, when the route caches and this request races for it.
    pub key: Option<String>,
    /// An expired entry still within its stale-if-error window.
    pub stale: Option<Arc<Entry>>,
    /// Held while this request races for its cache key; dropping it lets
    /// the requests waiting for the same key go on.
    pub lock: Option<LeaderGuard>,
    /// `X-Cache` of a proxied answer.
    pub status: Option<&'static str>,
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx::starting(Instant::now())
    }

    /// The context of a request whose clock started at `started`.
    pub fn starting(started: Instant) -> Ctx {
        Ctx {
            started,
            request_id: String::new(),
            head: false,
            routed: None,
            admit: Admit::default(),
            cache: CacheStep::default(),
            race: None,
            reject: None,
        }
    }

    /// Rate-limit and credit headers for the answer: numbers, written
    /// straight into the answer (a `String` each was six allocations per
    /// request).
    pub(super) fn headers(&self) -> Vec<(&'static str, u64)> {
        let mut h = Vec::with_capacity(6);
        h.extend(self.admit.limit.iter().flat_map(Decision::headers));
        match &self.admit.hold {
            Some(hold) => {
                h.push(("X-Credits-Cost", hold.cost()));
                h.push(("X-Credits-Remaining", hold.remaining()));
            }
            // Admitted, but the store could not charge (on_error: allow).
            None if self.admit.limit.is_some_and(|l| l.allowed) && self.reject.is_none() => {
                h.push(("X-Credits-Cost", 0));
            }
            None => {}
        }
        h
    }
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx::new()
    }
}
