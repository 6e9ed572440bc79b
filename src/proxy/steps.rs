//! The steps of a request after its route is known, each a call into the
//! module that decides: admission (auth, rate limit, credits), the cache,
//! the race and what follows it. Each returns a decision; none writes.

use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use super::ctx::{Admit, CacheStep};
use super::{Gateway, Reply, RouteRuntime};
use crate::answer::Answer;
use crate::auth;
use crate::cache::{self, Entry, Found, Turn};
use crate::config::OnStoreError;
use crate::credits;
use crate::key::KeyHash;
use crate::race::{RaceReport, UpstreamRequest};
use crate::reject::Reject;
use crate::store::{StoreError, Usage};
use crate::target::Target;

impl Gateway {
    /// auth → rate limit → credits. A refused request costs nothing.
    pub(super) async fn admit(
        &self,
        route: &'static RouteRuntime,
        target: &Target,
        key: Option<String>,
        admit: &mut Admit,
    ) -> Result<(), Reject> {
        let hash = KeyHash::of(&key.ok_or(Reject::MissingKey)?);
        admit.key = Some(hash);
        let mut budget = StoreBudget::new(self.store_timeout);
        let own_rate = match budget.within(Duration::ZERO, self.store.key(&hash)).await {
            Ok(found) => auth::admit(found.as_deref(), &route.config.name)?,
            Err(e) => self.store_failed("lookup", e).map(|()| None)?,
        };

        let decision = self.limiter.check(&hash, own_rate);
        admit.limit = Some(decision);
        if !decision.allowed {
            return Err(Reject::RateLimited);
        }

        let cost = route.config.cost_for(target.upstream());
        let usage = Usage::now(&route.config.name);
        let charge = self.store.charge(&hash, cost, usage);
        match budget.within(self.store.charge_wait(), charge).await {
            Ok(charge) => {
                let counters = route.series.credits();
                let hold = credits::hold(charge, &self.store, hash, cost, usage, counters)?;
                admit.hold = Some(hold);
                Ok(())
            }
            Err(e) => self.store_failed("charge", e),
        }
    }

    /// A store call failed: refuse (`deny`) or go on uncharged (`allow`).
    fn store_failed(&self, op: &'static str, e: StoreError) -> Result<(), Reject> {
        self.metrics.store_error(op);
        log::warn!("store {op} failed: {e}");
        match self.on_store_error {
            OnStoreError::Deny => Err(Reject::StoreUnavailable),
            OnStoreError::Allow => Ok(()),
        }
    }

    /// A cached answer when there is one; otherwise `None`, with what the
    /// race needs noted (cache key, stale entry, leadership of the key).
    pub(super) async fn answer_from_cache(
        &self,
        route: &RouteRuntime,
        target: &Target,
        step: &mut CacheStep,
    ) -> Option<Reply> {
        route.config.cache.as_ref()?;
        let key = target.cache_key(&route.config.name);
        if let Some((entry, at)) = self.lookup(step, &key).await {
            return Some(self.hit(entry, at));
        }
        match self.cache.turn(&key) {
            Turn::Leader(guard) => step.lock = Some(guard),
            Turn::Follower(rx) => {
                // Another request is racing for this key: wait for its answer.
                if cache::wait_for_leader(rx, self.lock_timeout).await {
                    if let Some((entry, at)) = self.lookup(step, &key).await {
                        return Some(self.hit(entry, at));
                    }
                }
            }
        }
        self.metrics.cache("miss");
        step.key = Some(key);
        None
    }

    fn hit(&self, entry: Arc<Entry>, at: u64) -> Reply {
        self.metrics.cache("hit");
        Reply::cached(entry, at, "HIT", self.credits.charge_cache_hits)
    }

    /// A fresh entry, if any, with when it was found (unix ms); a stale one
    /// is kept for stale-if-error.
    async fn lookup(&self, step: &mut CacheStep, key: &str) -> Option<(Arc<Entry>, u64)> {
        let lookup = self.cache.lookup(key).await;
        if lookup.error {
            self.metrics.cache("error");
        }
        match lookup.found {
            Found::Fresh(entry) => Some((entry, lookup.at)),
            Found::Stale(entry) => {
                step.stale = Some(entry);
                None
            }
            Found::Miss => None,
        }
    }

    /// Race the route's backends for the target.
    pub(super) async fn race(
        &self,
        route: &RouteRuntime,
        target: &Target,
        client: Option<IpAddr>,
        request_id: &str,
    ) -> (RaceReport, Option<Answer>) {
        let forwarded_for = client.map(|ip| ip.to_string());
        let req = UpstreamRequest {
            path_and_query: target.upstream(),
            request_id,
            forwarded_for: forwarded_for.as_deref(),
        };
        self.racer.run(&route.upstream, &req).await
    }

    /// After the race: the winner's answer (stored for the cache when the
    /// route caches), else the stale entry, else the failure, refunded or
    /// kept as `refund_on_failure` says. Releases the cache key either way.
    pub(super) fn after_race(
        &self,
        route: &RouteRuntime,
        report: &RaceReport,
        answer: Option<Answer>,
        step: &mut CacheStep,
    ) -> Reply {
        // Waiters for this key may look again once this returns.
        let _lock = step.lock.take();
        let Some(answer) = answer else {
            if let Some(stale) = step.stale.take() {
                self.metrics.cache("stale");
                let now = cache::now_ms();
                return Reply::cached(stale, now, "STALE", self.credits.charge_cache_hits);
            }
            let reject = Reject::from(report.failure());
            return Reply::failed(reject, self.credits.refund_on_failure);
        };
        let x_cache = match (&step.key, &route.config.cache) {
            (Some(key), Some(cfg)) => {
                if let Some(fresh) = cache::freshness(&answer, cfg) {
                    self.cache.store(key, &answer, fresh, cfg.stale_if_error);
                }
                "MISS"
            }
            _ => "BYPASS",
        };
        Reply::raced(answer, x_cache)
    }
}

/// A request's one store budget (`store.timeout_ms`, plus what a call may
/// add) for its key lookup and its charge: with `on_error: allow` a stalled
/// store must not hold the request for two timeouts. The clock starts when a
/// call first has to wait; a call answered at once (the embedded store, or
/// the Redis store from what this node holds: key metadata, a lease) costs
/// no clock read and no timer (three clock reads per cache hit before, ~1 %
/// of its CPU).
struct StoreBudget {
    /// The budget, for when the clock starts.
    total: Duration,
    /// Set once a call had to wait.
    deadline: Option<Instant>,
}

impl StoreBudget {
    fn new(total: Duration) -> StoreBudget {
        StoreBudget {
            total,
            deadline: None,
        }
    }

    /// A store call, with `extra` added to the budget; none left: a store
    /// error without making the call.
    async fn within<T>(
        &mut self,
        extra: Duration,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.total += extra;
        let mut call = pin!(call);
        let deadline = match self.deadline {
            Some(deadline) => {
                let deadline = deadline + extra;
                if deadline <= Instant::now() {
                    return Err(StoreError("store.timeout_ms spent before this call".into()));
                }
                deadline
            }
            None => {
                let first = poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
                if let Poll::Ready(result) = first {
                    return result;
                }
                Instant::now() + self.total
            }
        };
        self.deadline = Some(deadline);
        tokio::time::timeout_at(deadline, call)
            .await
            .unwrap_or_else(|_| Err(StoreError("store.timeout_ms spent".into())))
    }
}
