//! The `ProxyHttp` implementation. Every request is answered from
//! `request_filter`, whose steps follow the contract's order of checks:
//! method and path → route → auth → rate limit → credits → [cache] → race.
//! `logging` counts and logs it. Each step is a call into its own module.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::Method;
use pingora::http::RequestHeader;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::auth::{self, KeyHash};
use crate::cache::{self, Cache, Entry, Found, LeaderGuard, Turn};
use crate::config::{Config, CreditsConfig, OnStoreError, Route};
use crate::credits::CreditHold;
use crate::drain::Draining;
use crate::limits::{Decision, Limiter};
use crate::logging::{self, AccessLine, AccessLog};
use crate::metrics::{Metrics, UNMATCHED};
use crate::notify::{BackendReport, Event, Notifier};
use crate::race::{Answer, Failure, RaceReport, Racer, RouteUpstream, UpstreamRequest};
use crate::respond::{self, Common, Reject};
use crate::router::{self, RouteTable};
use crate::store::{Charge, KeyState, SharedCache, Store, StoreError};

/// The gateway service: routes, their upstreams, and shared parts.
pub struct Gateway {
    routes: Vec<Route>,
    table: RouteTable,
    upstreams: Vec<RouteUpstream>,
    racer: Racer,
    store: Arc<dyn Store>,
    limiter: Limiter,
    metrics: Arc<Metrics>,
    auth_param: String,
    on_store_error: OnStoreError,
    /// Bounds a request's store work as a whole (key lookup and charge).
    store_timeout: Duration,
    credits: CreditsConfig,
    cache: Cache,
    lock_timeout: Duration,
    notifier: Notifier,
    access_log: AccessLog,
    /// Per route: its last race had no winner (for the recovery notice).
    failing: Vec<AtomicBool>,
    draining: Draining,
}

impl Gateway {
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        shared_cache: Option<Arc<dyn SharedCache>>,
        metrics: Arc<Metrics>,
        notifier: Notifier,
        access_log: AccessLog,
        draining: Draining,
    ) -> Self {
        Gateway {
            draining,
            notifier,
            access_log,
            failing: config
                .routes
                .iter()
                .map(|_| AtomicBool::new(false))
                .collect(),
            table: RouteTable::new(&config.routes),
            upstreams: config
                .routes
                .iter()
                .map(|r| {
                    RouteUpstream::new(r, config.server.upstream_keepalive_pool_size, |b| {
                        metrics.backend_healthy(&r.name, b)
                    })
                })
                .collect(),
            routes: config.routes.clone(),
            racer: Racer::new(&config.server),
            store: store.clone(),
            limiter: Limiter::new(config.rate_limit.per_second),
            metrics,
            auth_param: config.auth.query_param.clone(),
            on_store_error: config.store.on_error,
            store_timeout: config.store.timeout,
            credits: config.credits.clone(),
            cache: Cache::new(config.cache.memory_entries, shared_cache),
            lock_timeout: config.cache.lock_timeout,
        }
    }
}

impl Gateway {
    /// The metrics and access log, for the HTTP/1 front door's own answers.
    pub fn observers(&self) -> (Arc<Metrics>, AccessLog) {
        (self.metrics.clone(), self.access_log.clone())
    }
}

/// Per-request state, in groups.
pub struct Ctx {
    started: Instant,
    request_id: String,
    head: bool,
    route: Option<usize>,
    /// Path and query as sent upstream (auth parameter removed): safe to log.
    upstream_path: Option<String>,
    /// The caller's key hash, once known (its id goes to the access log).
    key: Option<KeyHash>,
    limit: Option<Decision>,
    /// The charge, once taken; dropping it unsettled refunds it.
    credits: Option<CreditHold>,
    race: Option<RaceReport>,
    /// `X-Cache` of a proxied answer.
    cache: Option<&'static str>,
    /// The cache key, when the route caches and this request races for it.
    cache_key: Option<String>,
    /// An expired entry still within its stale-if-error window.
    stale: Option<Arc<Entry>>,
    /// Held while this request races for its cache key; dropping it lets
    /// the requests waiting for the same key go on.
    cache_lock: Option<LeaderGuard>,
    reject: Option<Reject>,
}

impl Ctx {
    /// Rate-limit and credit headers for the answer.
    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h: Vec<(&'static str, String)> =
            self.limit.iter().flat_map(Decision::headers).collect();
        match &self.credits {
            Some(hold) => {
                h.push(("X-Credits-Cost", hold.cost().to_string()));
                h.push(("X-Credits-Remaining", hold.remaining().to_string()));
            }
            // Admitted, but the store could not charge (on_error: allow).
            None if self.limit.is_some_and(|l| l.allowed) && self.reject.is_none() => {
                h.push(("X-Credits-Cost", "0".to_string()));
            }
            None => {}
        }
        h
    }
}

impl Gateway {
    /// Size, method and path checks, then the route; notes the upstream path
    /// and returns the route with the request's API key, if any.
    fn route(&self, req: &RequestHeader, ctx: &mut Ctx) -> Result<(usize, Option<String>), Reject> {
        let target = router::check_request(req, &self.auth_param)?;
        let route = self.table.find(target.path).ok_or(Reject::NoRoute)?;
        ctx.route = Some(route);
        ctx.upstream_path = Some(target.upstream_path_and_query());
        let key = auth::extract(req, &target)?;
        Ok((route, key))
    }

    /// auth → rate limit → credits. A refused request costs nothing.
    async fn admit(&self, ctx: &mut Ctx, route: usize, key: Option<String>) -> Result<(), Reject> {
        let hash = KeyHash::of(&key.ok_or(Reject::MissingKey)?);
        ctx.key = Some(hash);
        // One budget for the lookup and the charge: with `on_error: allow` a
        // stalled store must not hold the request for two timeouts.
        let deadline = tokio::time::Instant::now() + self.store_timeout;
        let own_rate = match within(deadline, self.store.key(&hash)).await {
            Ok(None) => return Err(Reject::InvalidKey),
            Ok(Some(info)) if info.state == KeyState::Revoked => return Err(Reject::RevokedKey),
            Ok(Some(info)) => info.rate_per_second,
            Err(e) => self.store_failed("lookup", e).map(|()| None)?,
        };

        let decision = self.limiter.check(&hash, own_rate);
        ctx.limit = Some(decision);
        if !decision.allowed {
            return Err(Reject::RateLimited);
        }

        let path = ctx.upstream_path.as_deref().unwrap_or("");
        let cost = self.routes[route].cost_for(path);
        match within(deadline, self.store.charge(&hash, cost)).await {
            Ok(Charge::Charged { remaining }) => {
                self.metrics.charged(route, cost);
                let refunded = self.metrics.refunded(route);
                ctx.credits = Some(CreditHold::new(
                    self.store.clone(),
                    hash,
                    cost,
                    remaining,
                    refunded,
                ));
                Ok(())
            }
            Ok(Charge::Insufficient { .. }) => Err(Reject::InsufficientCredits),
            Ok(Charge::Unknown) => Err(Reject::InvalidKey),
            Ok(Charge::Revoked) => Err(Reject::RevokedKey),
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

    /// Answer from the cache when it can; otherwise note what the race needs
    /// (cache key, stale entry, leadership of the key). `Ok(true)`: answered.
    async fn answer_from_cache(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        route: usize,
    ) -> Result<bool> {
        if self.routes[route].cache.is_none() {
            return Ok(false);
        }
        let upstream = ctx.upstream_path.as_deref().unwrap_or("/");
        let (path, query) = match upstream.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (upstream, None),
        };
        let key = cache::key(&self.routes[route].name, path, query);
        if let Some(entry) = self.lookup(ctx, &key).await {
            return self.serve_entry(session, ctx, &entry, "HIT").await;
        }
        match self.cache.turn(&key) {
            Turn::Leader(guard) => ctx.cache_lock = Some(guard),
            Turn::Follower(rx) => {
                // Another request is racing for this key: wait for its answer.
                if cache::wait_for_leader(rx, self.lock_timeout).await {
                    if let Some(entry) = self.lookup(ctx, &key).await {
                        return self.serve_entry(session, ctx, &entry, "HIT").await;
                    }
                }
            }
        }
        self.metrics.cache("miss");
        ctx.cache_key = Some(key);
        Ok(false)
    }

    /// A fresh entry, if any; a stale one is kept in `ctx` for stale-if-error.
    async fn lookup(&self, ctx: &mut Ctx, key: &str) -> Option<Arc<Entry>> {
        let lookup = self.cache.lookup(key).await;
        if lookup.error {
            self.metrics.cache("error");
        }
        match lookup.found {
            Found::Fresh(entry) => Some(entry),
            Found::Stale(entry) => {
                ctx.stale = Some(entry);
                None
            }
            Found::Miss => None,
        }
    }

    /// Serve a cached answer (`HIT` or `STALE`); with `charge_cache_hits: false`
    /// the charge is returned.
    async fn serve_entry(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        entry: &Entry,
        label: &'static str,
    ) -> Result<bool> {
        self.metrics
            .cache(if label == "HIT" { "hit" } else { "stale" });
        ctx.cache = Some(label);
        if !self.credits.charge_cache_hits {
            self.refund(ctx).await;
        }
        let age = entry.age_secs(cache::now_ms());
        self.deliver(session, ctx, &entry.answer, label, Some(age))
            .await
    }

    /// Send an answer (from a race or the cache); once delivered, the charge
    /// stands.
    async fn deliver(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        answer: &Answer,
        x_cache: &'static str,
        age: Option<u64>,
    ) -> Result<bool> {
        let extra = ctx.headers();
        let common = Common {
            request_id: &ctx.request_id,
            head: ctx.head,
            extra: &extra,
        };
        respond::proxied(session, &common, answer, x_cache, age).await?;
        if let Some(hold) = ctx.credits.as_mut() {
            hold.keep();
        }
        Ok(true)
    }

    async fn reject(&self, session: &mut Session, ctx: &mut Ctx, reject: Reject) -> Result<bool> {
        ctx.reject = Some(reject);
        let extra = ctx.headers();
        let common = Common {
            request_id: &ctx.request_id,
            head: ctx.head,
            extra: &extra,
        };
        respond::reject(session, &common, reject).await?;
        Ok(true)
    }

    async fn race(&self, session: &mut Session, ctx: &mut Ctx, route: usize) -> Result<bool> {
        let forwarded_for = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string());
        let report = {
            let req = UpstreamRequest {
                path_and_query: ctx.upstream_path.as_deref().unwrap_or("/"),
                request_id: &ctx.request_id,
                forwarded_for: forwarded_for.as_deref(),
            };
            self.racer.run(&self.upstreams[route], &req).await
        };
        let Some((_, answer)) = &report.winner else {
            let reject = Reject::from(report.failure());
            ctx.race = Some(report);
            ctx.cache_lock = None;
            if let Some(stale) = ctx.stale.take() {
                return self.serve_entry(session, ctx, &stale, "STALE").await;
            }
            if self.credits.refund_on_failure {
                self.refund(ctx).await;
            } else if let Some(hold) = ctx.credits.as_mut() {
                // The failure answer costs the route's price: settle the
                // hold, or dropping it would refund.
                hold.keep();
            }
            return self.reject(session, ctx, reject).await;
        };
        let x_cache = match (&ctx.cache_key, &self.routes[route].cache) {
            (Some(key), Some(cfg)) => {
                if let Some(fresh) = cache::freshness(answer, cfg) {
                    self.cache.store(key, answer, fresh, cfg.stale_if_error);
                }
                "MISS"
            }
            _ => "BYPASS",
        };
        // Waiters for this key may look again now.
        ctx.cache_lock = None;
        ctx.cache = Some(x_cache);
        let sent = self.deliver(session, ctx, answer, x_cache, None).await;
        // Kept for the logging phase whether or not the answer went out.
        ctx.race = Some(report);
        sent
    }

    async fn refund(&self, ctx: &mut Ctx) {
        if let Some(hold) = ctx.credits.as_mut() {
            if let Err(e) = hold.refund().await {
                self.metrics.store_error("refund");
                log::warn!("store refund failed: {e}");
            }
        }
    }

    fn log_race(&self, ctx: &Ctx, route: usize) {
        self.notifier.answered(route);
        let Some(report) = &ctx.race else { return };
        let winner = report.winner.as_ref().map(|(i, _)| *i);
        let failure = winner.is_none().then(|| report.failure());
        self.metrics.race(route, &report.attempts, winner, failure);
        let name = &self.routes[route].name;
        let Some(f) = failure else {
            self.recovered(ctx, route);
            return;
        };
        let labels: Vec<&str> = self.upstreams[route]
            .replicas
            .iter()
            .map(|r| r.label.as_str())
            .collect();
        logging::all_backends_failed(
            name,
            f.as_str(),
            ctx.upstream_path.as_deref().unwrap_or(""),
            &ctx.request_id,
            &labels,
            &report.attempts,
        );
        // "No such data" is the data API working: it only counts toward the
        // route's no_data share, and ends an outage like a success.
        if f == Failure::NoData {
            self.notifier.no_data(route);
            self.recovered(ctx, route);
            return;
        }
        self.notifier.notify(Event::Failed {
            route,
            reason: f.as_str(),
            request_id: ctx.request_id.clone(),
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
        self.failing[route].store(true, Ordering::Release);
    }
}

impl Gateway {
    /// Tell the notifier once when a route that had failed answers again.
    fn recovered(&self, ctx: &Ctx, route: usize) {
        if self.failing[route].swap(false, Ordering::AcqRel) {
            self.notifier.notify(Event::Recovered {
                route,
                request_id: ctx.request_id.clone(),
            });
        }
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

/// Keep a sane client-supplied `X-Request-Id`, otherwise make one.
fn request_id(req: &RequestHeader) -> String {
    if let Some(id) = req.headers.get("x-request-id") {
        let b = id.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
        {
            return String::from_utf8_lossy(b).into_owned();
        }
    }
    logging::new_request_id()
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            request_id: String::new(),
            head: false,
            route: None,
            upstream_path: None,
            key: None,
            limit: None,
            credits: None,
            race: None,
            cache: None,
            cache_key: None,
            stale: None,
            cache_lock: None,
            reject: None,
        }
    }

    /// What Pingora's own log lines (`Fail to filter request: …`, `Fail to
    /// proxy: …`) show for a request: the method and the target as the access
    /// log shows it, never the auth parameter.
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        let req = session.req_header();
        let target = match &ctx.upstream_path {
            Some(path) => path.clone(),
            None => router::loggable_target(req.raw_path(), &self.auth_param),
        };
        format!("{} {target}, request_id: {}", req.method, ctx.request_id)
    }

    /// Pingora's default answers its own errors with an empty body and
    /// `Server: Pingora`; ours is the JSON error. Status 0: the client is gone.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let reject = match (e.etype(), e.esource()) {
            (_, ErrorSource::Upstream) => Some(Reject::UpstreamFailed),
            // The client is gone (a write to it fails with no source set).
            (WriteError | ReadError | ConnectionClosed, _) => None,
            (HTTPStatus(400), _) | (_, ErrorSource::Downstream) => {
                Some(Reject::BadRequest("malformed request"))
            }
            _ => Some(Reject::Internal),
        };
        let mut code = reject.map_or(0, Reject::status);
        if let Some(reject) = reject.filter(|_| session.response_written().is_none()) {
            session.set_keepalive(None);
            if self.reject(session, ctx, reject).await.is_err() {
                code = 0;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// tollgate passes backend answers through unchanged: no compression module.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if self.draining.is_set() {
            // Handing over: let the client reconnect to the new process.
            session.set_keepalive(None);
        }
        let req = session.req_header();
        ctx.request_id = request_id(req);
        ctx.head = req.method == Method::HEAD;
        let admitted = match self.route(req, ctx) {
            Ok((route, key)) => self.admit(ctx, route, key).await.map(|()| route),
            Err(reject) => Err(reject),
        };
        let route = match admitted {
            Ok(route) => route,
            Err(reject) => return self.reject(session, ctx, reject).await,
        };
        if self.answer_from_cache(session, ctx, route).await? {
            return Ok(true);
        }
        self.race(session, ctx, route).await
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // request_filter answers every request; Pingora's own proxying is unused.
        Error::e_explain(
            InternalError,
            "tollgate answers every request in request_filter",
        )
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let elapsed = ctx.started.elapsed();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route_name = ctx
            .route
            .map_or(UNMATCHED, |i| self.routes[i].name.as_str());
        self.metrics
            .request(ctx.route.map(|i| (i, route_name)), status, elapsed);
        if let Some(reject) = ctx.reject.filter(|r| r.is_rejection()) {
            self.metrics.rejection(reject);
        }
        if let Some(route) = ctx.route {
            self.log_race(ctx, route);
        }
        if !self.access_log.enabled() {
            return;
        }
        let key_id = ctx.key.as_ref().map(KeyHash::id);
        let winner = ctx
            .route
            .zip(ctx.race.as_ref().and_then(|r| r.winner.as_ref()))
            .map(|(route, (i, _))| self.upstreams[route].replicas[*i].label.as_str());
        let line = AccessLine {
            time: logging::now_rfc3339(),
            request_id: &ctx.request_id,
            method: session.req_header().method.as_str(),
            route: route_name,
            path: ctx.upstream_path.as_deref(),
            status,
            latency_ms: logging::ms(elapsed),
            cache: ctx.cache,
            winner,
            key_id: key_id.as_deref(),
            credits: ctx.credits.as_ref().map(CreditHold::cost),
            error: ctx.reject.map(Reject::code),
        };
        self.access_log.write(&line);
    }
}
