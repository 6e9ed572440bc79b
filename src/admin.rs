//! The admin listener (`admin_listen`, loopback by default): `GET /healthz`
//! and `GET /metrics`, the latter served by `pingora-prometheus`.
//!
//! `/healthz` answers 200 only while every listener of the process accepts
//! (see `listeners::Health`), otherwise 503 with the reason; both carry the
//! answering process's `pid`, because after a hand-over the old and the new
//! process share this listener for a while and `tollgate reload` must hear
//! the new one.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use pingora_prometheus::PrometheusHttpApp;

use crate::listeners::Health;
use crate::reject::Reject;
use crate::respond::error_body;

pub struct AdminApp {
    metrics: PrometheusHttpApp,
    health: Health,
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

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
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

/// The admin service, listening on `addr`, answering `/healthz` from `health`.
pub fn service(addr: &str, health: Health) -> Service<HttpServer<AdminApp>> {
    let app = HttpServer::new_app(AdminApp {
        metrics: PrometheusHttpApp,
        health,
    });
    let mut service = Service::new("tollgate admin".to_string(), app);
    service.add_tcp(addr);
    service
}
