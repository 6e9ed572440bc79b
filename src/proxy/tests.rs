//! The request pipeline in process: the real [`Gateway`] over the embedded
//! store and a real HTTP origin on 127.0.0.1:0, driven without the binary,
//! first step by step through [`Gateway::decide`], then through Pingora's
//! own phases over a `Session` on an in-memory duplex stream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pingora::proxy::{ProxyHttp, Session};
use pingora_prometheus::prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::config::keys::parse_keys;
use crate::config::AccessTarget;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::request;
use crate::store::memory::MemoryStore;
use crate::store::Charge;

const KEY: &str = "tg_pipeline_key";

/// A keep-alive HTTP/1.1 origin: `/api/fail…` answers 500, anything else
/// `{"status": true}`; counts what it is asked.
async fn origin() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let hits = counted.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    hits.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = if head.starts_with("GET /api/fail") {
                        ("500 Internal Server Error", "{\"status\": false}")
                    } else {
                        ("200 OK", "{\"status\": true}")
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, hits)
}

struct World {
    gateway: GatewayProxy,
    store: Arc<dyn Store>,
    hits: Arc<AtomicUsize>,
}

impl World {
    async fn new(credits: u64) -> World {
        let (port, hits) = origin().await;
        let yaml = format!(
            "routes:\n  - name: api\n    prefix: /api/\n    backends: [\"http://127.0.0.1:{port}\"]\n    cost: 2\n    cache: {{ttl_seconds: 60, max_body_bytes: 1024}}\n"
        );
        let config = Config::from_yaml(&yaml).unwrap();
        let keys = format!("keys:\n  - {{key: \"{KEY}\", name: t, credits: {credits}}}\n");
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(&parse_keys(&keys).unwrap()));
        let metrics = Arc::new(Metrics::register_in(&Registry::new(), &config.routes).unwrap());
        let (notifier, _service) =
            crate::notify::channel(&config.notify, &config.routes, metrics.notifications());
        let (access_log, _writer) =
            logging::access_log(AccessTarget::Off, metrics.access_log_dropped());
        let gateway = Gateway::new(
            &config,
            store.clone(),
            None,
            metrics,
            notifier,
            access_log,
            Draining::default(),
        );
        World {
            gateway: GatewayProxy(Arc::new(gateway)),
            store,
            hits,
        }
    }

    async fn balance(&self) -> u64 {
        let probe = crate::store::Usage {
            route: "probe",
            day: 0,
        };
        match self
            .store
            .charge(&KeyHash::of(KEY), 0, probe)
            .await
            .unwrap()
        {
            Charge::Charged { remaining } | Charge::Insufficient { remaining } => remaining,
            other => panic!("{other:?}"),
        }
    }

    /// Decide a GET of `target` and settle it as if it had been written.
    async fn decide(&self, target: &str) -> (Reply, Ctx) {
        let req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
        let mut ctx = Ctx::new();
        let reply = self.gateway.decide(&req, None, &mut ctx).await;
        self.gateway.settle_before(&mut ctx, &reply).await;
        Gateway::delivered(&mut ctx, &reply);
        (reply, ctx)
    }
}

#[tokio::test]
async fn pipeline_decides_each_step_in_process() {
    let w = World::new(5).await;

    // Refused before any store or backend work: nothing charged.
    let (reply, _) = w.decide("/other?api_key=x").await;
    assert_eq!(reply.rejected(), Some(Reject::NoRoute));
    let (reply, _) = w.decide("/api/a").await;
    assert_eq!(reply.rejected(), Some(Reject::MissingKey));
    let (reply, _) = w.decide("/api/a?api_key=wrong").await;
    assert_eq!(reply.rejected(), Some(Reject::InvalidKey));
    assert_eq!((w.balance().await, w.hits.load(Ordering::SeqCst)), (5, 0));

    // Raced, stored, charged; the key never reaches the backend or the cache.
    let (reply, ctx) = w.decide(&format!("/api/a?x=1&api_key={KEY}")).await;
    assert_eq!((reply.status(), reply.x_cache()), (200, Some("MISS")));
    assert_eq!(reply.answer().unwrap().body.as_ref(), b"{\"status\": true}");
    let routed = ctx.routed.as_ref().unwrap();
    assert_eq!(routed.target.upstream(), "/api/a?x=1");
    assert_eq!(ctx.race.as_ref().unwrap().winner, Some(0));
    assert_eq!(ctx.admit.hold.as_ref().unwrap().cost(), 2);
    assert_eq!((w.balance().await, w.hits.load(Ordering::SeqCst)), (3, 1));

    // The same question again: from the cache, charged, no backend asked.
    let (reply, ctx) = w.decide(&format!("/api/a?api_key={KEY}&x=1")).await;
    assert_eq!((reply.status(), reply.x_cache()), (200, Some("HIT")));
    assert!(ctx.race.is_none());
    assert_eq!((w.balance().await, w.hits.load(Ordering::SeqCst)), (1, 1));

    // One credit left, the route costs two.
    let (reply, _) = w.decide(&format!("/api/a?x=1&api_key={KEY}")).await;
    assert_eq!(reply.rejected(), Some(Reject::InsufficientCredits));
    assert_eq!(w.balance().await, 1);
}

#[tokio::test]
async fn a_failed_race_is_refunded_in_process() {
    let w = World::new(10).await;
    let (reply, ctx) = w.decide(&format!("/api/fail?api_key={KEY}")).await;
    assert_eq!(reply.rejected(), Some(Reject::UpstreamFailed));
    assert_eq!(ctx.race.as_ref().unwrap().winner, None);
    assert_eq!(w.hits.load(Ordering::SeqCst), 1);
    assert_eq!(w.balance().await, 10);
}

/// One request through Pingora's phases, as the service runs them, over an
/// in-memory stream; returns the raw answer.
async fn through_session(gateway: &GatewayProxy, request: &str) -> String {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    client.write_all(request.as_bytes()).await.unwrap();
    let mut session = Session::new_h1(Box::new(server));
    assert!(session.read_request().await.unwrap());
    let mut ctx = gateway.new_ctx();
    assert!(gateway
        .request_filter(&mut session, &mut ctx)
        .await
        .unwrap());
    gateway.logging(&mut session, None, &mut ctx).await;
    drop(session);
    let mut out = String::new();
    client.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn request_filter_writes_the_one_reply_over_a_session() {
    let w = World::new(100).await;
    let get = format!("GET /api/s?api_key={KEY} HTTP/1.1\r\nHost: t\r\n\r\n");
    let first = through_session(&w.gateway, &get).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("X-Cache: MISS\r\n"), "{first}");
    assert!(first.contains("X-Credits-Cost: 2\r\n"), "{first}");
    assert!(first.contains("X-Credits-Remaining: 98\r\n"), "{first}");
    assert!(first.ends_with("{\"status\": true}"), "{first}");
    let second = through_session(&w.gateway, &get).await;
    assert!(second.contains("X-Cache: HIT\r\n"), "{second}");
    assert!(second.contains("Age: 0\r\n"), "{second}");
    let refused = through_session(&w.gateway, "GET /api/s HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(
        refused.contains("\"error\":\"missing_api_key\""),
        "{refused}"
    );
    let failed = format!("GET /api/fail?api_key={KEY} HTTP/1.1\r\nHost: t\r\n\r\n");
    let failed = through_session(&w.gateway, &failed).await;
    assert!(failed.starts_with("HTTP/1.1 502"), "{failed}");
    assert!(failed.contains("X-Credits-Cost: 0\r\n"), "{failed}");
    assert_eq!((w.hits.load(Ordering::SeqCst), w.balance().await), (2, 96));
}

/// One request answered as the front door answers it, on its own
/// connection (an in-memory stream); returns the raw answer.
async fn through_front_door(gateway: &Gateway, request: &str) -> String {
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let mut slots = request::slots();
    let req = request::plain_get(request.as_bytes(), &mut slots).expect("a plain GET");
    assert!(
        gateway
            .answer_raw(&req, None, std::time::Instant::now(), &mut server)
            .await
    );
    drop(server);
    let mut out = String::new();
    client.read_to_string(&mut out).await.unwrap();
    out
}

/// The answer with the lines that differ between two requests (`Date`,
/// `X-Request-Id`) blanked.
fn comparable(answer: &str) -> String {
    answer
        .split("\r\n")
        .map(|line| match line.split_once(": ") {
            Some(("Date" | "X-Request-Id", _)) => "",
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// The front door's own answers are Pingora's, byte for byte (but for the
/// date and the request id): a miss, a hit, a HEAD, a refusal and a failure.
#[tokio::test]
async fn the_front_doors_answers_are_pingoras() {
    let via_session = World::new(100).await;
    let via_door = World::new(100).await;
    for request in [
        format!("GET /api/s?api_key={KEY} HTTP/1.1\r\nHost: t\r\n\r\n"),
        format!("GET /api/s?api_key={KEY} HTTP/1.1\r\nHost: t\r\n\r\n"),
        format!("HEAD /api/s?api_key={KEY} HTTP/1.1\r\nHost: t\r\n\r\n"),
        "GET /api/s HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
        "GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
        format!("GET /api/fail?api_key={KEY} HTTP/1.1\r\nHost: t\r\n\r\n"),
    ] {
        let session = through_session(&via_session.gateway, &request).await;
        let door = through_front_door(&via_door.gateway, &request).await;
        assert_eq!(comparable(&door), comparable(&session), "{request}");
        assert!(
            door.contains("\r\nDate: ") && door.contains("\r\nX-Request-Id: "),
            "{door}"
        );
    }
    assert_eq!(via_door.balance().await, via_session.balance().await);
}
