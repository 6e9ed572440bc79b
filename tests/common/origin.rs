//! The tests' HTTP/1.1 origin server: keep-alive, a reply chosen per request
//! by a [`Handler`], an optional delay during which a client that closes the
//! connection is noticed, and unasked bytes after an answer. Written by hand
//! on purpose: the tests need to see and do what a well-behaved server
//! library hides (connection numbers, early closes, a stray 408). It lives
//! with the tests, so none of it is in the shipped binary. With an acceptor
//! it speaks TLS (OpenSSL through Pingora's re-export, as the gateway does).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::tls::ssl::{Ssl, SslAcceptor};
use pingora::tls::tokio_ssl::SslStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// Serve connections from `listener` until the task is dropped; over TLS
/// when given an acceptor (a failed handshake ends that connection only).
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    tls: Option<Arc<SslAcceptor>>,
) {
    let ids = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
        let handler = handler.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = match tls {
                None => connection(stream, id, handler).await,
                Some(acceptor) => match accept(&acceptor, stream).await {
                    Some(tls_stream) => connection(tls_stream, id, handler).await,
                    None => Ok(()),
                },
            };
        });
    }
}

async fn accept(acceptor: &SslAcceptor, stream: TcpStream) -> Option<SslStream<TcpStream>> {
    let ssl = Ssl::new(acceptor.context()).ok()?;
    let mut tls = SslStream::new(ssl, stream).ok()?;
    Pin::new(&mut tls).accept().await.ok()?;
    Some(tls)
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    id: u64,
    handler: Arc<dyn Handler>,
) -> std::io::Result<()> {
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
