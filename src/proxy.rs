//! The `ProxyHttp` implementation. Every request is answered from
//! `request_filter`, whose steps follow the contract's order of checks
//! (method and path → route → [auth → rate limit → credits → cache] → race);
//! `logging` counts and logs it. Each step is a call into its own module.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::Method;
use pingora::http::RequestHeader;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};

use crate::config::{Config, Route};
use crate::logging::{self, AccessLine};
use crate::metrics::{Metrics, UNMATCHED};
use crate::race::{RaceReport, Racer, RouteUpstream, UpstreamRequest};
use crate::respond::{self, Common, Reject};
use crate::router::{self, RouteTable};

/// The gateway service: routes, their upstreams, and shared parts.
pub struct Gateway {
    routes: Vec<Route>,
    table: RouteTable,
    upstreams: Vec<RouteUpstream>,
    racer: Racer,
    metrics: Arc<Metrics>,
    auth_param: String,
}

impl Gateway {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        Gateway {
            table: RouteTable::new(&config.routes),
            upstreams: config.routes.iter().map(RouteUpstream::new).collect(),
            routes: config.routes.clone(),
            racer: Racer::new(&config.server),
            metrics,
            auth_param: config.auth.query_param.clone(),
        }
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
    race: Option<RaceReport>,
    /// `X-Cache` of a proxied answer.
    cache: Option<&'static str>,
    reject: Option<Reject>,
}

impl Gateway {
    async fn reject(&self, session: &mut Session, ctx: &mut Ctx, reject: Reject) -> Result<bool> {
        ctx.reject = Some(reject);
        let common = Common {
            request_id: &ctx.request_id,
            head: ctx.head,
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
        let sent = match &report.winner {
            Some((_, answer)) => {
                ctx.cache = Some("MISS");
                let common = Common {
                    request_id: &ctx.request_id,
                    head: ctx.head,
                };
                respond::proxied(session, &common, answer, "MISS")
                    .await
                    .map(|()| None)
            }
            None => Ok(Some(Reject::from(report.failure()))),
        };
        ctx.race = Some(report);
        match sent? {
            None => Ok(true),
            Some(reject) => self.reject(session, ctx, reject).await,
        }
    }

    fn log_race(&self, ctx: &Ctx, route: usize) {
        let Some(report) = &ctx.race else { return };
        let winner = report.winner.as_ref().map(|(i, _)| *i);
        let failure = winner.is_none().then(|| report.failure());
        self.metrics.race(route, &report.attempts, winner, failure);
        if let Some(f) = failure {
            let name = &self.routes[route].name;
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
        }
    }
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
    format!("{:032x}", rand::random::<u128>())
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
            race: None,
            cache: None,
            reject: None,
        }
    }

    /// tollgate passes backend answers through unchanged: no compression module.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = request_id(req);
        ctx.head = req.method == Method::HEAD;
        let route = match router::check_request(req) {
            Err(reject) => return self.reject(session, ctx, reject).await,
            Ok(target) => match self.table.find(target.path) {
                None => None,
                Some(route) => {
                    ctx.upstream_path =
                        Some(router::upstream_path_and_query(&target, &self.auth_param));
                    Some(route)
                }
            },
        };
        let Some(route) = route else {
            return self.reject(session, ctx, Reject::NoRoute).await;
        };
        ctx.route = Some(route);
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
        if let Some(route) = ctx.route {
            self.log_race(ctx, route);
        }
        let winner = ctx
            .route
            .zip(ctx.race.as_ref().and_then(|r| r.winner.as_ref()))
            .map(|(route, (i, _))| self.upstreams[route].replicas[*i].label.as_str());
        AccessLine {
            request_id: &ctx.request_id,
            method: session.req_header().method.as_str(),
            route: route_name,
            path: ctx.upstream_path.as_deref(),
            status,
            latency_ms: logging::ms(elapsed),
            cache: ctx.cache,
            winner,
            error: ctx.reject.map(Reject::code),
        }
        .emit();
    }
}
