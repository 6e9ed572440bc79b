//! The HTTP/1 front door: reads each request head off a client connection
//! (plain or TLS) before Pingora does, refuses what nginx refuses with the
//! gateway's JSON error, and hands Pingora exactly one request at a time.
//!
//! Why it exists: Pingora's HTTP/1 server decides some things before any
//! `ProxyHttp` hook runs, and they cannot be changed from one:
//! - a head its parser rejects is answered by `HttpSession::respond_error(400)`
//!   in `HttpProxy::handle_new_request`: empty body, `Server: Pingora`; so is
//!   `CONNECT` (405);
//! - a raw space or control character in the target is percent-encoded by
//!   `escape_illegal_request_line` and served: the hooks see `%20`, the same
//!   as a client that encoded it;
//! - with both `Content-Length` and `Transfer-Encoding` it drops
//!   `Content-Length` and serves the request;
//! - bytes of a pipelined next request read together with the first make the
//!   connection un-reusable: the next request is dropped with the connection.
//!
//! So the front door reads a head itself (with `httparse`, strictly), answers
//! a bad one with [`respond::raw_reject`] and closes, and otherwise puts back
//! exactly that request's bytes (`l4::Stream::rewind`) for Pingora to read.
//! Bytes of the next pipelined request stay here until that request's turn:
//! answers go out in request order. A request that carries a body (the
//! gateway serves only GET and HEAD) closes the connection after its answer,
//! so no body bytes are ever taken for a request head.
//!
//! A plain keep-alive HTTP/1.1 GET or HEAD ([`plain_get`]: no body or
//! framing headers, no `Connection`, `Expect` or `Upgrade`, a target that
//! Pingora keeps byte for byte) is answered here, on the connection, by the
//! gateway's own steps and writer ([`Gateway::answer_raw`]), read straight
//! off the connection's bytes ([`crate::request::PlainGet`]): the same bytes
//! as through Pingora's HTTP/1 session, which cost 6.3 of the 10.2 µs of
//! CPU a cache hit took (bench/RESULTS.md, issue 14). Every other request
//! goes to Pingora as above.
//!
//! On a TLS listener it first shakes hands ([`crate::tls`]); HTTP/1.1 over
//! TLS then goes through the same door (a [`TlsConnection`] puts the bytes
//! read ahead back, as `rewind` does on a plain stream), and HTTP/2, which
//! ALPN chose, goes to Pingora's HTTP/2 server as it is: its frames carry no
//! head to check, and the gateway's own checks (method, target, header
//! sizes) run in the proxy's hooks for each stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Ssl, Stream, ALPN, IO};
use pingora::proxy::{http_proxy, HttpProxy};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::LimitsConfig;
use crate::connections::{Cap, ConnectionCounters};
use crate::proxy::{Gateway, GatewayProxy};
use crate::reject::Reject;
use crate::request::{plain_get, slots};
use crate::respond;
use crate::router::{MAX_HEADER_BYTES, MAX_TARGET_BYTES};
use crate::tls::{TlsConnection, TlsListeners};

mod head;

use head::too_large;
pub use head::{check_head, Head};

/// Pingora's keep-alive timeout: how long a connection may sit without a
/// byte of its next request (and how long any one read of a head may wait).
const IDLE: Duration = Duration::from_secs(60);
/// Longest head read before answering 414/431 without parsing further; the
/// router's exact limits (8 KiB target, 32 KiB headers) apply below it.
const MAX_HEAD_BYTES: usize = MAX_TARGET_BYTES + MAX_HEADER_BYTES + 4 * 1024;
/// Pingora's own limit on the number of request header fields.
const MAX_HEADERS: usize = 256;
/// After refusing a request, how long to read and discard what the client
/// still sends, so that closing does not reset the answer away (lingering
/// close, as nginx does).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// The listening service: the front door in front of the gateway's proxy.
pub fn service(
    conf: &Arc<ServerConf>,
    gateway: Gateway,
    name: &str,
    limits: &LimitsConfig,
    counters: ConnectionCounters,
    tls: TlsListeners,
) -> Service<Front> {
    let gateway = Arc::new(gateway);
    let proxy = Arc::new(http_proxy(conf, GatewayProxy(gateway.clone())));
    Service::new(
        name.to_string(),
        Front {
            gateway,
            proxy,
            cap: Cap::new(limits.max_client_connections, counters),
            header_timeout: limits.request_header_timeout,
            tls,
        },
    )
}

pub struct Front {
    /// Answers the requests the front door serves itself ([`plain_get`]),
    /// and counts and logs those it refuses.
    gateway: Arc<Gateway>,
    proxy: Arc<HttpProxy<GatewayProxy>>,
    /// `limits.max_client_connections`.
    cap: Cap,
    /// `limits.request_header_timeout_ms`: how long one whole request head
    /// may take, from the connection's accept (first request) or from the
    /// first byte of the head (later requests on a keep-alive connection).
    header_timeout: Duration,
    /// The TLS listeners, whose connections shake hands first.
    tls: TlsListeners,
}

enum Read {
    Head(Head),
    /// Closed, idle too long, or the server is shutting down: nothing to answer.
    Gone,
    /// The head took longer than `limits.request_header_timeout_ms`: closed
    /// without an answer (the client is too slow to read one anyway).
    TimedOut,
    Refuse(Reject),
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Over the cap: dropping the stream closes the connection at once.
        let _place = self.cap.admit()?;
        if !stream.as_any().is::<L4Stream>() {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        let Some(acceptor) = self.tls.acceptor(&l4) else {
            return self.serve_http1(l4, shutdown).await;
        };
        let tls = self
            .tls
            .handshake(acceptor, *l4, self.header_timeout)
            .await?;
        if tls.selected_alpn_proto() == Some(ALPN::H2) {
            return ServerApp::process_new(&self.proxy, Box::new(tls), shutdown).await;
        }
        self.serve_http1(Box::new(TlsConnection::new(tls)), shutdown)
            .await
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

/// A connection the front door reads HTTP/1 heads from: plain or TLS.
pub trait Connection: IO + Sized + 'static {
    /// Put bytes read ahead back in front of the stream, for Pingora to read.
    fn put_back(&mut self, data: &[u8]);
}

impl Connection for L4Stream {
    fn put_back(&mut self, data: &[u8]) {
        self.rewind(data);
    }
}

impl Connection for TlsConnection {
    fn put_back(&mut self, data: &[u8]) {
        self.rewind(data);
    }
}

/// Pingora's session for the request whose `head` starts `pending`: that
/// request's bytes go back into `conn`, and the session keeps the previous
/// request's `settings`, or else the keep-alive timeout.
fn pingora_session<C: Connection>(
    mut conn: Box<C>,
    pending: &mut BytesMut,
    head: &Head,
    settings: Option<HttpPersistentSettings>,
    shutdown: &ShutdownWatch,
) -> ServerSession {
    // A body's bytes are never parsed as a head: hand over all we have and
    // let Pingora close after the answer.
    let take = if head.has_body {
        pending.len()
    } else {
        head.len
    };
    conn.put_back(&pending.split_to(take));
    if pending.is_empty() {
        *pending = BytesMut::new();
    }
    let mut session = ServerSession::new_http1(conn);
    match settings {
        Some(s) => s.apply_to_session(&mut session),
        None => session.set_keepalive(Some(IDLE.as_secs())),
    }
    if head.has_body || *shutdown.borrow() {
        session.set_keepalive(None);
    }
    session
}

impl Front {
    /// Serve HTTP/1 requests on `conn` one at a time, each head read and
    /// checked here first, until the client leaves, a request is refused or
    /// the server shuts down.
    async fn serve_http1<C: Connection>(
        self: &Arc<Self>,
        mut conn: Box<C>,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut waits = Waits::new(shutdown, IDLE);
        // Bytes read from the client and not yet handed to Pingora.
        let mut pending = BytesMut::new();
        let mut settings: Option<HttpPersistentSettings> = None;
        // The first request's clock starts at accept, later ones' at their
        // first byte.
        let mut deadline = Some(Instant::now() + self.header_timeout);
        // When the current request's first byte came: read_head sets it when
        // the bytes arrive; a pipelined request's clock starts here.
        let mut started = Instant::now();
        loop {
            if !pending.is_empty() {
                started = Instant::now();
            }
            let read = read_head(
                &mut *conn,
                &mut pending,
                &mut started,
                (deadline.take(), self.header_timeout),
                &mut waits,
            )
            .await;
            let head = match read {
                Read::Head(head) => head,
                Read::Gone => return None,
                Read::TimedOut => {
                    self.cap.counters().header_timeouts.inc();
                    return None;
                }
                Read::Refuse(reject) => {
                    self.refuse(&mut *conn, reject, started).await;
                    return None;
                }
            };
            if !head.has_body && !*shutdown.borrow() {
                let mut slots = slots();
                if let Some(req) = plain_get(&pending[..head.len], &mut slots) {
                    let client = conn
                        .get_socket_digest()
                        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
                    if !self
                        .gateway
                        .answer_raw(&req, client, started, &mut *conn)
                        .await
                    {
                        return None;
                    }
                    pending.advance(head.len);
                    continue;
                }
            }
            let session = pingora_session(conn, &mut pending, &head, settings.take(), shutdown);
            let reused = self.proxy.process_new_http(session, shutdown).await?;
            let (stream, next) = reused.consume();
            settings = next;
            conn = stream.into_any().downcast::<C>().ok()?;
        }
    }

    /// Answer with the JSON error, count and log it (no path: the target is
    /// not known to be safe to log), and close.
    async fn refuse<C: Connection>(&self, conn: &mut C, reject: Reject, started: Instant) {
        let request_id = self.gateway.log_refused(reject, started);
        let answer = respond::raw_reject(reject, &request_id);
        if conn.write_all(&answer).await.is_err() || conn.flush().await.is_err() {
            return;
        }
        let _ = AsyncWriteExt::shutdown(conn).await;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        let deadline = tokio::time::Instant::now() + LINGER;
        while drained < LINGER_BYTES {
            match tokio::time::timeout_at(deadline, conn.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
}

/// What a connection's reads wait on besides bytes: the keep-alive clock and
/// the server's shutdown, each armed once per connection. Armed per read, as
/// `tokio::time::timeout` and `watch::Receiver::wait_for` do, they registered
/// and dropped a tokio timer and a watch waiter on every request (perf, hit
/// path: about 2% of the worker's time, and the timer wheel touched twice
/// per request; bench/RESULTS.md, "The hit path's tail").
struct Waits {
    /// Fires at or after `since + limit`; pushed on when `since` moved.
    idle: Pin<Box<tokio::time::Sleep>>,
    /// How long one wait for bytes may last (`IDLE`).
    limit: Duration,
    /// When the current wait for bytes began.
    since: Instant,
    /// Ends when the server shuts down (or its watch is gone).
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Waits {
    fn new(shutdown: &ShutdownWatch, limit: Duration) -> Waits {
        let mut shutdown = shutdown.clone();
        let since = Instant::now();
        Waits {
            idle: Box::pin(tokio::time::sleep_until((since + limit).into())),
            limit,
            since,
            shutdown: Box::pin(async move {
                let _ = shutdown.wait_for(|down| *down).await;
            }),
        }
    }

    /// The keep-alive clock fired: whether this wait has really lasted
    /// `limit`; if not, the clock is set to when it will have.
    fn idle_over(&mut self) -> bool {
        let due = self.since + self.limit;
        if Instant::now() >= due {
            return true;
        }
        self.idle.as_mut().reset(due.into());
        false
    }
}

/// Read until `pending` holds a complete head (and check it), the client
/// leaves, or the server shuts down. `started` becomes the first byte's time.
async fn read_head<C: Connection>(
    conn: &mut C,
    pending: &mut BytesMut,
    started: &mut Instant,
    (mut deadline, header_timeout): (Option<Instant>, Duration),
    waits: &mut Waits,
) -> Read {
    loop {
        // Bytes of this head already waiting (pipelined) start its clock now.
        if deadline.is_none() && !pending.is_empty() {
            deadline = Some(*started + header_timeout);
        }
        if !pending.is_empty() {
            match check_head(pending) {
                Ok(Some(head)) => return Read::Head(head),
                Ok(None) => {}
                Err(reject) => return Read::Refuse(reject),
            }
            if pending.len() > MAX_HEAD_BYTES {
                return Read::Refuse(too_large(pending));
            }
        }
        // Room for a whole usual head in one read (an empty BytesMut would
        // read 64 bytes at a time); 1 KiB is what an idle connection holds.
        pending.reserve(1024);
        let idle = pending.is_empty();
        // Each read may wait `IDLE` for bytes.
        waits.since = Instant::now();
        let read = loop {
            tokio::select! {
                // Read first: bytes already waiting (a fresh connection's
                // request, with TCP_DEFER_ACCEPT) are served even when
                // shutdown is set.
                biased;
                read = conn.read_buf(pending) => break read,
                // Pingora drops idle keep-alive connections at shutdown; so
                // do we. Not a new connection waiting for its first request
                // (its clock runs from accept: `deadline` is set): on TLS it
                // comes a round trip after the handshake, and a process
                // that took the connection answers it before it exits.
                () = waits.shutdown.as_mut(), if idle && deadline.is_none() => return Read::Gone,
                () = sleep_until_some(deadline) => return Read::TimedOut,
                () = waits.idle.as_mut() => {
                    if waits.idle_over() {
                        return Read::Gone;
                    }
                }
            }
        };
        match read {
            Ok(n) if n > 0 => {
                if idle {
                    *started = Instant::now();
                    deadline.get_or_insert(*started + header_timeout);
                }
            }
            _ => return Read::Gone,
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_keepalive_clock_counts_from_the_start_of_the_current_wait() {
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let limit = Duration::from_millis(200);
        let mut waits = Waits::new(&shutdown, limit);
        tokio::time::sleep(limit / 2).await;
        // A new wait for bytes begins (the previous answer went out).
        waits.since = Instant::now();
        // The clock armed at the connection's start fires, but this wait
        // is younger than the limit: the connection stays.
        waits.idle.as_mut().await;
        assert!(!waits.idle_over());
        waits.idle.as_mut().await;
        assert!(waits.idle_over());
        assert!(waits.since.elapsed() >= limit);
    }
}
