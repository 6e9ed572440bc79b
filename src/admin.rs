//! The admin listener (`admin_listen`, loopback by default): `GET /healthz`
//! and `GET /metrics`, the latter served by `pingora-prometheus`.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use pingora_prometheus::PrometheusHttpApp;

use crate::respond::{error_body, Reject};

pub struct AdminApp {
    metrics: PrometheusHttpApp,
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
            "/healthz" => simple(200, "text/plain", b"ok\n".to_vec()),
            "/metrics" => self.metrics.response(session).await,
            _ => simple(404, "application/json", error_body(Reject::NoRoute)),
        }
    }
}

/// The admin service, listening on `addr`.
pub fn service(addr: &str) -> Service<HttpServer<AdminApp>> {
    let app = HttpServer::new_app(AdminApp {
        metrics: PrometheusHttpApp,
    });
    let mut service = Service::new("tollgate admin".to_string(), app);
    service.add_tcp(addr);
    service
}
