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
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
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
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            // Between requests: the next one's clock starts at its first byte.
            idle.store(true, Ordering::Release);
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

/// A client stream whose reads fail once the current request has taken
/// longer than `limit` (see the module docs for when the clock starts).
#[derive(Debug)]
pub struct HeaderDeadline {
    inner: Stream,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The deadline passed: the connection is done for.
    expired: bool,
    /// Set between requests: the next byte read starts a new clock.
    idle: Arc<AtomicBool>,
    timeouts: IntCounter,
}

impl HeaderDeadline {
    /// A new connection: its first request's clock starts now.
    fn new(inner: Stream, limit: Duration, idle: Arc<AtomicBool>, timeouts: IntCounter) -> Self {
        HeaderDeadline {
            inner,
            limit,
            timer: Some(Box::pin(tokio::time::sleep(limit))),
            expired: false,
            idle,
            timeouts,
        }
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
        let idle = this.idle.load(Ordering::Acquire);
        if idle {
            this.timer = None;
        } else if let Some(timer) = this.timer.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                this.expired = true;
                this.timeouts.inc();
                return Poll::Ready(Err(deadline_passed()));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if idle && matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.idle.store(false, Ordering::Release);
            this.timer = Some(Box::pin(tokio::time::sleep(this.limit)));
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
