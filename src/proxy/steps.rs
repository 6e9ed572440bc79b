//! The steps of a request after its route is known, each a call into the
//! module that decides: admission (auth, rate limit, credits), the cache,
//! the race and what follows it. Each returns a decision; none writes.

use std::net::IpAddr;
use std::sync::Arc;

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
        // One budget for the lookup and the charge: with `on_error: allow` a
        // stalled store must not hold the request for two timeouts.
        let deadline = tokio::time::Instant::now() + self.store_timeout;
        let own_rate = match within(deadline, self.store.key(&hash)).await {
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
        let deadline = deadline + self.store.charge_wait();
        match within(deadline, self.store.charge(&hash, cost, usage)).await {
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
        if let Some(entry) = self.lookup(step, &key).await {
            return Some(self.hit(entry));
        }
        match self.cache.turn(&key) {
            Turn::Leader(guard) => step.lock = Some(guard),
            Turn::Follower(rx) => {
                // Another request is racing for this key: wait for its answer.
                if cache::wait_for_leader(rx, self.lock_timeout).await {
                    if let Some(entry) = self.lookup(step, &key).await {
                        return Some(self.hit(entry));
                    }
                }
            }
        }
        self.metrics.cache("miss");
        step.key = Some(key);
        None
    }

    fn hit(&self, entry: Arc<Entry>) -> Reply {
        self.metrics.cache("hit");
        Reply::cached(entry, "HIT", self.credits.charge_cache_hits)
    }

    /// A fresh entry, if any; a stale one is kept for stale-if-error.
    async fn lookup(&self, step: &mut CacheStep, key: &str) -> Option<Arc<Entry>> {
        let lookup = self.cache.lookup(key).await;
        if lookup.error {
            self.metrics.cache("error");
        }
        match lookup.found {
            Found::Fresh(entry) => Some(entry),
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
                return Reply::cached(stale, "STALE", self.credits.charge_cache_hits);
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

/// A store call, given what is left of the request's store budget; none
/// left: a store error without making the call.
async fn within<T>(
    deadline: tokio::time::Instant,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    if deadline <= tokio::time::Instant::now() {
        return Err(StoreError("store.timeout_ms spent before this call".into()));
    }
    tokio::time::timeout_at(deadline, call)
        .await
        .unwrap_or_else(|_| Err(StoreError("store.timeout_ms spent".into())))
}
