//! The admin listener (`admin_listen`, loopback by default): `GET /healthz`
//! and `GET /metrics` (served by `pingora-prometheus`), open without a
//! token, and the admin API under `/v1` (`api.rs`) when
//! `admin.token_sha256` is set.
//!
//! `/healthz` answers 200 only while every listener of the process accepts
//! (see `listeners::Health`), otherwise 503 with the reason; both carry the
//! answering process's `pid`, because after a hand-over the old and the new
//! process share this listener for a while and `tollgate reload` must hear
//! the new one.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use pingora_prometheus::PrometheusHttpApp;

mod api;

pub use api::{KeyApi, MAX_BODY};

use crate::listeners::Health;
use crate::reject::Reject;
use crate::respond::error_body;

pub struct AdminApp {
    metrics: PrometheusHttpApp,
    health: Health,
    keys: Option<KeyApi>,
}

/// The `/healthz` answer: status and JSON body.
fn healthz(health: &Health) -> (u16, Vec<u8>) {
    let pid = std::process::id();
    let (status, body) = match health.verdict() {
        Ok(()) => (200, serde_json::json!({"status": true, "pid": pid})),
        Err(reason) => (
            503,
            serde_json::json!({"status": false, "error": "not_ready", "message": reason, "pid": pid}),
        ),
    };
    (status, serde_json::to_vec(&body).unwrap_or_default())
}

fn simple(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

/// Write a whole answer.
async fn write(session: &mut ServerSession, resp: Response<Vec<u8>>) -> pingora::Result<()> {
    let (parts, body) = resp.into_parts();
    let header: ResponseHeader = parts.into();
    session.write_response_header(Box::new(header)).await?;
    if !body.is_empty() {
        session.write_response_body(body.into(), true).await?;
    }
    Ok(())
}

/// Pingora's HTTP server loop for one request, as its `ServeHttp` apps get
/// it, except that `/v1/usage` streams its answer (a whole month's export
/// is never held in memory).
#[async_trait]
impl HttpServerApp for AdminApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                log::debug!("admin: cannot read a request: {e}");
                return None;
            }
        }
        session.set_keepalive((!*shutdown.borrow()).then_some(60));
        let written = match (&self.keys, session.req_header().uri.path()) {
            (Some(api), "/v1/usage") => api.usage(&mut session).await,
            _ => {
                let resp = self.response(&mut session).await;
                write(&mut session, resp).await
            }
        };
        if let Err(e) = written {
            log::debug!("admin: cannot answer: {e}");
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(reusable) => reusable.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
            Err(e) => {
                log::debug!("admin: cannot finish a request: {e}");
                None
            }
        }
    }
}

impl AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.uri.path() == "/v1" || req.uri.path().starts_with("/v1/") {
            return match &self.keys {
                Some(api) => api.response(session).await,
                None => api::off(),
            };
        }
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            let mut resp = simple(
                405,
                "application/json",
                error_body(Reject::MethodNotAllowed),
            );
            resp.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static("GET, HEAD"),
            );
            return resp;
        }
        match req.uri.path() {
            "/healthz" => {
                let (status, body) = healthz(&self.health);
                simple(status, "application/json", body)
            }
            "/metrics" => self.metrics.response(session).await,
            _ => simple(404, "application/json", error_body(Reject::NoRoute)),
        }
    }
}

/// The admin service, listening on `addr`, answering `/healthz` from
/// `health`, and the admin API with `keys` when it is on.
pub fn service(addr: &str, health: Health, keys: Option<KeyApi>) -> Service<AdminApp> {
    if let Some(api) = &keys {
        // Every endpoint's series exists (at 0) before the first request.
        for endpoint in api::ENDPOINTS {
            api.requests.with_label_values(&[endpoint, "200"]);
        }
    }
    let app = AdminApp {
        metrics: PrometheusHttpApp,
        health,
        keys,
    };
    let mut service = Service::new("tollgate admin".to_string(), app);
    service.add_tcp(addr);
    service
}
