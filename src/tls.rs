//! TLS on the client listeners: one OpenSSL acceptor per TLS listener, and
//! the handshake.
//!
//! Every listener is a plain TCP listener to Pingora; the front door
//! (`front.rs`) asks [`TlsListeners::acceptor`] whether a new connection came
//! in on a TLS one and, if so, shakes hands here before handing the TLS
//! stream to Pingora. Pingora's own TLS listener would do the same handshake
//! but only logs one that fails; here each failure is counted
//! (`tollgate_tls_handshake_errors_total`), and the handshake gets the same
//! clock as a request head (`limits.request_header_timeout_ms`, as nginx's
//! `client_header_timeout` covers its handshake).
//!
//! Settings: Mozilla's "intermediate" profile (TLS 1.2 and 1.3 only, its
//! cipher list), the certificate chain and key read when the process starts
//! (so a graceful upgrade picks up renewed files), and ALPN offering `h2`
//! then `http/1.1`, or `http/1.1` only when the listener has `h2: false`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{server, SslDigest, SslStream, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::tls::ssl::{
    select_next_proto, AlpnError, SslAcceptor, SslFiletype, SslMethod, SslVersion,
};
use pingora_prometheus::prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Listener;

/// ALPN wire format: HTTP/2 preferred, HTTP/1.1 allowed.
const ALPN_H2_H1: &[u8] = b"\x02h2\x08http/1.1";
/// ALPN wire format: HTTP/1.1 only.
const ALPN_H1: &[u8] = b"\x08http/1.1";

/// The TLS listeners of a process, by address.
pub struct TlsListeners {
    acceptors: Vec<(SocketAddr, SslAcceptor)>,
    errors: IntCounter,
}

impl TlsListeners {
    /// An acceptor for each listener with `tls`; `errors` counts failed handshakes.
    pub fn new(listen: &[Listener], errors: IntCounter) -> Result<TlsListeners, String> {
        let mut acceptors = Vec::new();
        for (i, l) in listen.iter().enumerate() {
            if let Some(files) = &l.tls {
                let acceptor = acceptor(&files.cert, &files.key, l.h2)
                    .map_err(|e| format!("listen[{i}].tls: {e}"))?;
                acceptors.push((l.addr, acceptor));
            }
        }
        Ok(TlsListeners { acceptors, errors })
    }

    /// The acceptor of the TLS listener `stream` came in on; `None` for a
    /// plain listener.
    pub fn acceptor(&self, stream: &L4Stream) -> Option<&SslAcceptor> {
        if self.acceptors.is_empty() {
            return None;
        }
        let digest = stream.get_socket_digest()?;
        let local = *digest.local_addr()?.as_inet()?;
        let listens_on = |a: &SocketAddr| {
            a.port() == local.port() && (a.ip() == local.ip() || a.ip().is_unspecified())
        };
        self.acceptors
            .iter()
            .find(|(a, _)| *a == local)
            .or_else(|| self.acceptors.iter().find(|(a, _)| listens_on(a)))
            .map(|(_, acceptor)| acceptor)
    }

    /// Shake hands within `timeout`; a failure is counted and logged at
    /// debug (a scanner's garbage is not the operator's problem), and ends
    /// the connection.
    pub async fn handshake(
        &self,
        acceptor: &SslAcceptor,
        stream: L4Stream,
        timeout: Duration,
    ) -> Option<SslStream<L4Stream>> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().map(|a| a.to_string()));
        let failure = match tokio::time::timeout(timeout, server::handshake(acceptor, stream)).await
        {
            Ok(Ok(tls)) => return Some(tls),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        self.errors.inc();
        log::debug!(
            "TLS handshake with {} failed: {failure}",
            peer.as_deref().unwrap_or("?")
        );
        None
    }
}

/// An acceptor with Mozilla's intermediate settings for these files.
fn acceptor(cert: &str, key: &str, h2: bool) -> Result<SslAcceptor, String> {
    let mut b =
        SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| e.to_string())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| e.to_string())?;
    b.set_certificate_chain_file(cert)
        .map_err(|e| format!("cert {cert}: {e}"))?;
    b.set_private_key_file(key, SslFiletype::PEM)
        .map_err(|e| format!("key {key}: {e}"))?;
    b.check_private_key()
        .map_err(|e| format!("key {key} does not match cert {cert}: {e}"))?;
    let offer = if h2 { ALPN_H2_H1 } else { ALPN_H1 };
    b.set_alpn_select_callback(move |_, client| {
        select_next_proto(offer, client).ok_or(AlpnError::NOACK)
    });
    Ok(b.build())
}

/// A TLS connection that speaks HTTP/1.1, as the front door hands it to
/// Pingora: the bytes it read ahead are put back in front of the stream, as
/// `l4::Stream::rewind` does on a plain connection. Everything else is the
/// TLS stream's.
#[derive(Debug)]
pub struct TlsConnection {
    inner: SslStream<L4Stream>,
    /// Read ahead and put back; read before the stream.
    rewound: BytesMut,
}

impl TlsConnection {
    pub fn new(inner: SslStream<L4Stream>) -> TlsConnection {
        TlsConnection {
            inner,
            rewound: BytesMut::new(),
        }
    }

    /// Put `data` back in front of what is still to be read.
    pub fn rewind(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut front = BytesMut::with_capacity(data.len() + self.rewound.len());
        front.extend_from_slice(data);
        front.extend_from_slice(&self.rewound);
        self.rewound = front;
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.rewound.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = buf.remaining().min(self.rewound.len());
        buf.put_slice(&self.rewound.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsConnection {
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
impl Shutdown for TlsConnection {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut self.inner).await
    }
}

impl UniqueID for TlsConnection {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for TlsConnection {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for TlsConnection {
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

impl GetProxyDigest for TlsConnection {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for TlsConnection {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

/// Peeking is not offered (as on Pingora's own TLS stream).
impl Peek for TlsConnection {}
