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

use std::net::SocketAddr;
use std::time::Duration;

use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::{server, SslStream};
use pingora::protocols::GetSocketDigest;
use pingora::tls::ssl::{
    select_next_proto, AlpnError, SslAcceptor, SslFiletype, SslMethod, SslVersion,
};
use pingora_prometheus::prometheus::IntCounter;

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
