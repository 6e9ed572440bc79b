//! A small HTTP/1.1 origin server for the demo (`tollgate demo`) and for the
//! tests: keep-alive, a reply chosen per request by a [`Handler`], an optional
//! delay during which a client that closes the connection is noticed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;

/// A request as the origin received it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, when the request declared a `Content-Length`.
    pub body: Vec<u8>,
    /// Numbered per origin from 1, to tell reused connections apart.
    pub connection: u64,
    pub received_at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What to answer, and after how long.
#[derive(Debug, Clone)]
pub struct Reply {
    pub delay: Duration,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// After the answer: wait this long, send these bytes unasked (as a
    /// server's 408 on its idle timeout), then close the connection.
    pub then: Option<(Duration, Vec<u8>)>,
}

impl Reply {
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            delay: Duration::ZERO,
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into(),
            then: None,
        }
    }

    /// Send `bytes` unasked `after` the answer, then hang up.
    pub fn then_send(mut self, after: Duration, bytes: &[u8]) -> Reply {
        self.then = Some((after, bytes.to_vec()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Decides each reply; may watch what happens.
pub trait Handler: Send + Sync + 'static {
    fn reply(&self, req: &Request) -> Reply;
    /// The client closed the connection while this request's reply was delayed.
    fn closed_early(&self, _req: &Request) {}
    /// The reply's unasked bytes were sent (see [`Reply::then_send`]).
    fn sent_unasked(&self, _req: &Request) {}
    /// The reply to this request was written.
    fn answered(&self, _req: &Request) {}
}

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 1024 * 1024;

/// Serve connections from `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, handler: Arc<dyn Handler>) {
    let ids = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = connection(stream, id, handler).await;
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    id: u64,
    handler: Arc<dyn Handler>,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Read one request head.
        let head_len = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            if buf.len() > MAX_HEAD {
                return Ok(());
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let Some(mut req) = parse_head(&buf[..head_len], id) else {
            return Ok(());
        };
        buf.drain(..head_len);
        let body_len = req
            .header("content-length")
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if body_len > MAX_BODY {
            return Ok(());
        }
        while buf.len() < body_len {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        req.body = buf.drain(..body_len).collect();
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = handler.reply(&req);

        // Wait out the delay, noticing a client that gives up.
        let deadline = tokio::time::Instant::now() + reply.delay;
        loop {
            let mut chunk = [0u8; 1024];
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                read = stream.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => {
                        handler.closed_early(&req);
                        return Ok(());
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
            }
        }

        let mut out = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
        for (n, v) in &reply.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if req.method != "HEAD" {
            bytes.extend_from_slice(&reply.body);
        }
        stream.write_all(&bytes).await?;
        handler.answered(&req);
        if let Some((after, unasked)) = reply.then {
            tokio::time::sleep(after).await;
            stream.write_all(&unasked).await?;
            handler.sent_unasked(&req);
            return Ok(());
        }
        if close {
            return Ok(());
        }
    }
}

fn parse_head(head: &[u8], connection: u64) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    Some(Request {
        method: req.method?.to_string(),
        target: req.path?.to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: Vec::new(),
        connection,
        received_at: Instant::now(),
    })
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

/// A demo market-data replica. Replica 1 is fast but often has no data
/// (`"status": false`), replica 2 is steady, replica 3 is slow and
/// sometimes fails, so the race's winner changes from request to request.
struct DemoReplica {
    number: usize,
}

impl Handler for DemoReplica {
    fn reply(&self, req: &Request) -> Reply {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        let (lo, hi, no_data, error) = match self.number {
            1 => (2, 12, 0.5, 0.0),
            2 => (8, 40, 0.0, 0.0),
            _ => (30, 150, 0.0, 0.1),
        };
        let delay = Duration::from_millis(rng.gen_range(lo..=hi));
        let path = req.target.split('?').next().unwrap_or("/");
        let symbol = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("AAPL");
        let roll: f64 = rng.gen();
        let served_by = format!("replica-{}", self.number);
        let body = if roll < error {
            return Reply::json(500, r#"{"status": false, "message": "internal error"}"#)
                .after(delay);
        } else if roll < error + no_data {
            serde_json::json!({"status": false, "served_by": served_by, "message": "no data"})
        } else {
            let close = 100.0
                + (symbol.bytes().map(u32::from).sum::<u32>() % 400) as f64
                + rng.gen_range(0.0..1.0);
            serde_json::json!({
                "status": true,
                "served_by": served_by,
                "path": path,
                "data": {"symbol": symbol, "close": (close * 100.0).round() / 100.0},
            })
        };
        Reply::json(200, body.to_string()).after(delay)
    }
}

/// Start demo replicas on every backend address of the config, on a thread
/// of their own. Fails if an address is taken.
pub fn start(config: &Config) -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for route in &config.routes {
        for b in &route.backends {
            if !addrs.contains(&b.addr) {
                addrs.push(b.addr);
            }
        }
    }
    let listeners = addrs
        .iter()
        .map(|a| {
            let l = std::net::TcpListener::bind(a)
                .map_err(|e| std::io::Error::new(e.kind(), format!("demo backend {a}: {e}")))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("demo-backends".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for (i, l) in listeners.into_iter().enumerate() {
                    let Ok(listener) = TcpListener::from_std(l) else {
                        continue;
                    };
                    let handler: Arc<dyn Handler> = Arc::new(DemoReplica { number: i + 1 });
                    tasks.push(tokio::spawn(serve(listener, handler)));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        })?;
    Ok(addrs)
}
