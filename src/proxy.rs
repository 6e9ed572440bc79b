//! The `ProxyHttp` implementation. Every request is answered from
//! `request_filter`: [`Gateway::decide`] runs the contract's order of checks
//! (method and path → route → auth → rate limit → credits → [cache] → race),
//! each step a call into the module that decides, and returns one [`Reply`];
//! [`Gateway::send`](reply) is the one place that writes it and settles the
//! charge. `logging` counts and logs the request.
//!
//! Here: the gateway and its phases. `route.rs`: the runtime object of a
//! route; `ctx.rs`: the per-request context; `steps.rs`: admission, cache
//! and race; `reply.rs`: the reply and its writer.

mod ctx;
mod reply;
mod route;
mod steps;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

pub use ctx::Ctx;
use ctx::Routed;
pub use reply::Reply;
pub use route::RouteRuntime;

use crate::auth;
use crate::cache::Cache;
use crate::config::{Config, CreditsConfig, OnStoreError};
use crate::credits::CreditHold;
use crate::drain::Draining;
use crate::key::KeyHash;
use crate::limits::Limiter;
use crate::logging::{self, AccessLine, AccessLog};
use crate::metrics::{Metrics, UNMATCHED};
use crate::notify::Notifier;
use crate::race::Racer;
use crate::reject::Reject;
use crate::request::RequestHead;
use crate::respond::Raw;
use crate::router::{self, RouteTable};
use crate::store::{SharedCache, Store};

/// The gateway service: its routes and the parts they share.
pub struct Gateway {
    table: RouteTable<&'static RouteRuntime>,
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
    access_log: AccessLog,
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
        let pool_size = config.server.upstream_keepalive_pool_size;
        let routes = RouteRuntime::leak_all(&config.routes, pool_size, &metrics, &notifier);
        Gateway {
            draining,
            access_log,
            table: RouteTable::new(routes.iter().map(|r| (r.config.prefix.clone(), r))),
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

    /// The reply to a request, in the contract's order of checks: request
    /// and route → auth → rate limit → credits → cache → race. `client`: the
    /// address the backends get as `X-Forwarded-For`.
    pub async fn decide(
        &self,
        req: &impl RequestHead,
        client: Option<IpAddr>,
        ctx: &mut Ctx,
    ) -> Reply {
        ctx.request_id = request_id(req);
        ctx.head = req.method() == "HEAD";
        let target = match router::check_request(req, &self.auth_param) {
            Ok(target) => target,
            Err(reject) => return Reply::reject(reject),
        };
        let Some(&route) = self.table.find(target.path()) else {
            return Reply::reject(Reject::NoRoute);
        };
        let target = &ctx.routed.insert(Routed { route, target }).target;
        let key = match auth::extract(req, target) {
            Ok(key) => key,
            Err(reject) => return Reply::reject(reject),
        };
        if let Err(reject) = self.admit(route, target, key, &mut ctx.admit).await {
            return Reply::reject(reject);
        }
        if let Some(cached) = self.answer_from_cache(route, target, &mut ctx.cache).await {
            return cached;
        }
        let (report, answer) = self.race(route, target, client, &ctx.request_id).await;
        let reply = self.after_race(route, &report, answer, &mut ctx.cache);
        ctx.race = Some(report);
        reply
    }
}

impl Gateway {
    /// Answer a request the front door read itself (HTTP/1.1, GET or HEAD,
    /// no body, the connection kept alive) on its own connection: the same
    /// steps, the same writer and the same log line as through Pingora, at
    /// less cost per request. `started`: when its first byte came (its
    /// latency counts from then, as nginx's `$request_time` does). `false`: the connection is done (the answer did
    /// not go out, or the gateway is handing over and it said `close`).
    pub async fn answer_raw<C>(
        &self,
        req: &impl RequestHead,
        client: Option<IpAddr>,
        started: Instant,
        conn: &mut C,
    ) -> bool
    where
        C: tokio::io::AsyncWrite + Unpin + Send,
    {
        let mut ctx = Ctx::starting(started);
        // Handing over: let the client reconnect to the new process.
        let keep_alive = !self.draining.is_set();
        let reply = self.decide(req, client, &mut ctx).await;
        let status = reply.status();
        let sent = match self.send(&mut Raw(conn, keep_alive), &mut ctx, reply).await {
            Ok(_) => status,
            Err(e) => {
                // As Pingora logs a request whose answer could not be written.
                let summary = self.summary(req, &ctx);
                log::error!("Fail to filter request: {e}, status: 0, {summary}");
                0
            }
        };
        self.log(&ctx, req.method(), sent);
        sent != 0 && keep_alive
    }

    /// A request as the error log shows it: the method and the target as
    /// the access log shows it, never the auth parameter.
    fn summary(&self, req: &impl RequestHead, ctx: &Ctx) -> String {
        let target = match &ctx.routed {
            Some(routed) => routed.target.upstream().to_string(),
            None => router::loggable_target(req.target(), &self.auth_param),
        };
        format!("{} {target}, request_id: {}", req.method(), ctx.request_id)
    }

    /// Count and log a request the front door refused from its head alone
    /// (no method or path: the head is not known to be safe to log), and
    /// return the request id its answer carries.
    pub fn log_refused(&self, reject: Reject, started: Instant) -> String {
        let mut ctx = Ctx::starting(started);
        ctx.request_id = logging::new_request_id();
        ctx.reject = Some(reject);
        self.log(&ctx, "-", reject.status());
        ctx.request_id
    }

    /// Count and log a request that got `status` (0: none went out), from
    /// Pingora's logging phase or the front door's own answers.
    fn log(&self, ctx: &Ctx, method: &str, status: u16) {
        let elapsed = ctx.started.elapsed();
        let route = ctx.routed.as_ref().map(|r| r.route);
        let route_name = route.map_or(UNMATCHED, |r| r.config.name.as_str());
        self.metrics
            .request(route.map(|r| &r.series), status, elapsed);
        if let Some(reject) = ctx.reject.filter(|r| r.is_rejection()) {
            self.metrics.rejection(reject);
        }
        if let Some(Routed { route, target }) = &ctx.routed {
            route.observe(&ctx.request_id, target, ctx.race.as_ref());
        }
        if !self.access_log.enabled() {
            return;
        }
        let key_id = ctx.admit.key.as_ref().map(KeyHash::id);
        let winner = route
            .zip(ctx.race.as_ref().and_then(|r| r.winner))
            .and_then(|(route, i)| route.backend_label(i));
        let line = AccessLine {
            time: logging::now_rfc3339(),
            request_id: &ctx.request_id,
            method,
            route: route_name,
            path: ctx.routed.as_ref().map(|r| r.target.upstream()),
            status,
            latency_ms: logging::ms(elapsed),
            cache: ctx.cache.status,
            winner,
            key_id: key_id.as_deref(),
            credits: ctx.admit.hold.as_ref().map(CreditHold::cost),
            error: ctx.reject.map(Reject::code),
        };
        self.access_log.write(&line);
    }
}

/// The gateway as Pingora's proxy sees it: shared with the front door, which
/// answers some requests on its own connections ([`Gateway::answer_raw`]).
pub struct GatewayProxy(pub Arc<Gateway>);

impl std::ops::Deref for GatewayProxy {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.0
    }
}

/// Keep a sane client-supplied `X-Request-Id`, otherwise make one.
fn request_id(req: &impl RequestHead) -> String {
    if let Some(b) = req.values("x-request-id").next() {
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
impl ProxyHttp for GatewayProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new()
    }

    /// What Pingora's own log lines (`Fail to filter request: …`, `Fail to
    /// proxy: …`) show for a request: the method and the target as the access
    /// log shows it, never the auth parameter.
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        self.summary(session.req_header(), ctx)
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
            if self
                .send(session, ctx, Reply::reject(reject))
                .await
                .is_err()
            {
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
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let reply = self.decide(session.req_header(), client, ctx).await;
        self.send(session, ctx, reply).await
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // request_filter answers every request; Pingora's own proxying is unused.
        Error::e_explain(
            InternalError,
            "tollgate answers every request in request_filter",
        )
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        self.log(ctx, session.req_header().method.as_str(), status);
    }
}
