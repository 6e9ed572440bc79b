//! Client connections, before Pingora's HTTP code reads them: a cap on how
//! many are open at once (`limits.max_client_connections`) and a deadline
//! for each whole request header (`limits.request_header_timeout_ms`).
//!
//! Pingora's HTTP/1 server times each read of a request header on its own
//! (its keep-alive timeout, 60 s), so a client that trickles one byte every
//! 20 s holds a connection forever. [`Frontdoor`] wraps the proxy's
//! `HttpServerApp` and runs the HTTP/1 keep-alive loop that Pingora's own
//! `ServerApp` runs, with each connection's stream wrapped in a
//! [`HeaderDeadline`]: its reads fail once a request has taken longer than
//! the limit. The clock starts when the connection is accepted (for its
//! first request) and at the first byte of each later request (the wait
//! between requests stays the keep-alive timeout's). A GET has no body, so
//! in practice the deadline bounds the header; a body the gateway does not
//! read is drained under the same deadline.
//!
//! Between requests, a keep-alive connection waits for its next request
//! here, holding its stream and a 1 KiB read-ahead buffer (about 7.6 KB per
//! idle connection in all, bench/RESULTS.md), not inside Pingora's request
//! future (10 KB) with its 4 KiB header buffer. The first read of the next
//! request goes into the read-ahead buffer, which Pingora's parser then
//! reads from, so a request still takes one read. The wait ends, closing the
//! connection, after the keep-alive timeout or when the server shuts down.
//!
//! A connection over the cap is accepted and closed at once, without
//! reading from it or answering (as Envoy does past its connection limit):
//! answering would mean reading a request header, the very work the cap
//! refuses. HTTP/2 connections (TLS with ALPN h2) count towards the cap and
//! are handed to Pingora as they are.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use pingora_prometheus::prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::config::LimitsConfig;

/// Pingora's keep-alive timeout for client connections, kept as it was.
const KEEPALIVE_SECONDS: u64 = 60;

/// The series [`Frontdoor`] keeps (see `metrics.rs`).
#[derive(Clone)]
pub struct ConnectionCounters {
    /// Client connections open now.
    pub open: IntGauge,
    /// Connections closed at once because the cap was reached.
    pub refused: IntCounter,
    /// Connections closed because a request header missed its deadline.
    pub header_timeouts: IntCounter,
}

/// The proxy's `HttpServerApp` behind the connection cap and header deadline.
pub struct Frontdoor<A> {
    inner: Arc<A>,
    limits: LimitsConfig,
    open: AtomicUsize,
    counters: ConnectionCounters,
}

impl<A> Frontdoor<A> {
    pub fn new(inner: A, limits: LimitsConfig, counters: ConnectionCounters) -> Self {
        Frontdoor {
            inner: Arc::new(inner),
            limits,
            open: AtomicUsize::new(0),
            counters,
        }
    }

    /// Take a place under the cap, or `None` when the cap is reached.
    fn admit(&self) -> Option<OpenGuard<'_, A>> {
        let max = self.limits.max_client_connections;
        let mut open = self.open.load(Ordering::Acquire);
        loop {
            if open >= max {
                self.counters.refused.inc();
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => open = now,
            }
        }
        self.counters.open.inc();
        Some(OpenGuard(self))
    }
}

/// Holds one place under the cap; gives it back when the connection ends.
struct OpenGuard<'a, A>(&'a Frontdoor<A>);

impl<A> Drop for OpenGuard<'_, A> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.counters.open.dec();
    }
}

#[async_trait]
impl<A> ServerApp for Frontdoor<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_open) = self.admit() else {
            // Dropping the stream closes the connection.
            return None;
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.inner.process_new(stream, shutdown).await;
        }
        let idle = Arc::new(AtomicBool::new(false));
        let stream: Stream = Box::new(HeaderDeadline::new(
            stream,
            self.limits.request_header_timeout,
            idle.clone(),
            self.counters.header_timeouts.clone(),
        ));
        // What Pingora's `ServerApp` for an `HttpServerApp` does for HTTP/1.
        let mut session = ServerSession::new_http1(stream);
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(KEEPALIVE_SECONDS));
        }
        let limit = self
            .inner
            .server_options()
            .and_then(|o| o.keepalive_request_limit);
        session.set_keepalive_reuses_remaining(limit);
        let mut result = self.inner.process_new_http(session, shutdown).await;
        let mut scratch = String::new();
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            // Between requests: the next one's clock starts at its first byte.
            idle.store(true, Ordering::Release);
            let stream: Stream = if may_hold_a_request(settings.as_ref(), &mut scratch) {
                stream
            } else {
                let mut conn = stream.into_any().downcast::<HeaderDeadline>().ok()?;
                if !next_request(&mut conn, shutdown).await {
                    return None;
                }
                conn
            };
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            result = self.inner.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

/// Whether bytes of the next request were already read with the previous
/// one (pipelining): they are in the settings, and waiting for more would
/// wait for bytes the client has already sent. Pingora does not say, but
/// its `Debug` form does; anything else is taken as "maybe", which only
/// skips the cheap idle wait.
/// `scratch` is reused from request to request.
fn may_hold_a_request(settings: Option<&HttpPersistentSettings>, scratch: &mut String) -> bool {
    use std::fmt::Write;
    let Some(settings) = settings else {
        return false;
    };
    scratch.clear();
    write!(scratch, "{settings:?}").is_err() || !scratch.contains("pipelined_prefix: None")
}

/// Wait for the next request's first bytes (kept in the stream for Pingora
/// to read). `false`: the client closed, the keep-alive timeout passed, or
/// the server is shutting down; the connection is to be closed.
async fn next_request(conn: &mut HeaderDeadline, shutdown: &ShutdownWatch) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    let mut shutdown = shutdown.clone();
    let peek = std::future::poll_fn(|cx| conn.poll_read_ahead(cx));
    let idle = tokio::time::sleep(Duration::from_secs(KEEPALIVE_SECONDS));
    tokio::pin!(peek, idle);
    loop {
        tokio::select! {
            read = &mut peek => return matches!(read, Ok(true)),
            _ = &mut idle => return false,
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return false;
                }
            }
        }
    }
}

/// A client stream whose reads fail once the current request has taken
/// longer than `limit` (see the module docs for when the clock starts).
/// The timer is made only when a read has to wait: a request that arrives
/// in one read costs one clock reading.
#[derive(Debug)]
pub struct HeaderDeadline {
    inner: Stream,
    limit: Duration,
    deadline: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The deadline passed: the connection is done for.
    expired: bool,
    /// Set between requests: the next byte read starts a new clock.
    idle: Arc<AtomicBool>,
    /// Bytes read while waiting for the next request, not yet given out.
    ahead: Vec<u8>,
    ahead_from: usize,
    timeouts: IntCounter,
}

/// How much the wait between requests reads at once: a whole typical
/// request, so that Pingora's parser needs no second read.
const READ_AHEAD: usize = 1024;

impl HeaderDeadline {
    /// A new connection: its first request's clock starts now.
    fn new(inner: Stream, limit: Duration, idle: Arc<AtomicBool>, timeouts: IntCounter) -> Self {
        HeaderDeadline {
            inner,
            limit,
            deadline: Some(Instant::now() + limit),
            timer: None,
            expired: false,
            idle,
            ahead: Vec::new(),
            ahead_from: 0,
            timeouts,
        }
    }

    /// The first bytes of a request arrived: start its clock.
    fn start_clock(&mut self) {
        self.idle.store(false, Ordering::Release);
        self.deadline = Some(Instant::now() + self.limit);
    }

    /// Wait for the next request's first bytes and keep them for the next
    /// reads. `Ok(false)`: the client closed the connection.
    fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.ahead_from < self.ahead.len() {
            return Poll::Ready(Ok(true));
        }
        self.ahead.clear();
        self.ahead_from = 0;
        self.ahead.reserve_exact(READ_AHEAD);
        let mut buf = ReadBuf::uninit(self.ahead.spare_capacity_mut());
        let read = Pin::new(&mut self.inner).poll_read(cx, &mut buf);
        let n = buf.filled().len();
        match read {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if n == 0 => Poll::Ready(Ok(false)),
            Poll::Ready(Ok(())) => {
                // SAFETY: `poll_read` initialized the first `n` spare bytes.
                unsafe { self.ahead.set_len(n) };
                self.start_clock();
                Poll::Ready(Ok(true))
            }
        }
    }

    fn expire(&mut self) -> Poll<io::Result<()>> {
        self.expired = true;
        self.timer = None;
        self.timeouts.inc();
        Poll::Ready(Err(deadline_passed()))
    }
}

fn deadline_passed() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "request header deadline (limits.request_header_timeout_ms) passed",
    )
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(Err(deadline_passed()));
        }
        if this.ahead_from < this.ahead.len() {
            let n = buf.remaining().min(this.ahead.len() - this.ahead_from);
            buf.put_slice(&this.ahead[this.ahead_from..this.ahead_from + n]);
            this.ahead_from += n;
            if this.ahead_from == this.ahead.len() {
                // Idle connections hold no buffer.
                this.ahead = Vec::new();
                this.ahead_from = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let idle = this.idle.load(Ordering::Acquire);
        if idle {
            this.deadline = None;
        }
        let deadline = this.deadline;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return this.expire();
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        match (&read, deadline) {
            (Poll::Ready(Ok(())), _) if idle && buf.filled().len() > before => this.start_clock(),
            (Poll::Pending, Some(deadline)) => {
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                if timer.deadline() != tokio::time::Instant::from(deadline) {
                    timer.as_mut().reset(deadline.into());
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return this.expire();
                }
            }
            _ => {}
        }
        read
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[tokio::test]
    async fn pipelined_bytes_are_seen_in_the_persistent_settings() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(server));
        let session = ServerSession::new_http1(stream);
        let mut settings = HttpPersistentSettings::for_session(&session);
        // If Pingora's Debug form changes, this fails: see may_hold_a_request.
        let mut scratch = String::new();
        assert!(!may_hold_a_request(Some(&settings), &mut scratch));
        assert!(!may_hold_a_request(None, &mut scratch));
        settings.set_pipelined_prefix(BytesMut::from(&b"GET /"[..]));
        assert!(may_hold_a_request(Some(&settings), &mut scratch));
    }
}
