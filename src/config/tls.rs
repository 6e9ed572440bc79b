//! The files TLS needs, read and checked at load time so that `check` and
//! `serve -t` name the field of a bad one: each TLS listener's certificate
//! chain and key (`listen[i].tls`), and each route's `backend_ca` bundle.
//! OpenSSL (through Pingora's `openssl` feature) parses them, as it will when
//! serving.

use std::path::Path;
use std::sync::Arc;

use openssl::asn1::Asn1Time;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::x509::X509;

use super::{err, ConfigError};

/// A certificate that expires within this many days gets a warning.
pub const EXPIRY_WARNING_DAYS: u32 = 14;

/// A TLS listener's files (`listen[i].tls`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: String,
    /// The leaf's private key (PEM).
    pub key: String,
}

/// A PEM bundle of CA certificates (`routes[i].backend_ca`), parsed.
pub type CaBundle = Arc<Box<[X509]>>;

/// What checking a listener's files found wrong, and what is only a warning.
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
}

/// Check `listen[i].tls` (`at`): both files readable, each a PEM of its kind,
/// the key the certificate's, the certificate not expired (a warning when it
/// expires within [`EXPIRY_WARNING_DAYS`]).
pub fn check_listener(at: &str, files: &TlsFiles, found: &mut Findings) {
    let cert_at = format!("{at}.cert");
    let key_at = format!("{at}.key");
    let chain = read(&cert_at, &files.cert, &mut found.errors).and_then(|pem| {
        match X509::stack_from_pem(&pem) {
            Ok(chain) if !chain.is_empty() => Some(chain),
            _ => {
                found.errors.push(err(
                    &cert_at,
                    format!("{} is not a PEM certificate chain", files.cert),
                ));
                None
            }
        }
    });
    let key = read(&key_at, &files.key, &mut found.errors).and_then(|pem| {
        let key: Option<PKey<Private>> = PKey::private_key_from_pem(&pem).ok();
        if key.is_none() {
            found.errors.push(err(
                &key_at,
                format!("{} is not a PEM private key", files.key),
            ));
        }
        key
    });
    let Some(leaf) = chain.as_ref().and_then(|c| c.first()) else {
        return;
    };
    if let Some(key) = &key {
        let matches = leaf.public_key().is_ok_and(|p| p.public_eq(key));
        if !matches {
            found.errors.push(err(
                &key_at,
                format!(
                    "{} is not the private key of the certificate in {}",
                    files.key, files.cert
                ),
            ));
        }
    }
    expiry(&cert_at, &files.cert, leaf, found);
}

/// An expired leaf is an error; one that expires soon, a warning.
fn expiry(at: &str, file: &str, leaf: &X509, found: &mut Findings) {
    let not_after = leaf.not_after();
    let (Ok(now), Ok(soon)) = (
        Asn1Time::days_from_now(0),
        Asn1Time::days_from_now(EXPIRY_WARNING_DAYS),
    ) else {
        return;
    };
    if not_after < now {
        found.errors.push(err(
            at,
            format!("the certificate in {file} expired on {not_after}"),
        ));
    } else if not_after < soon {
        found.warnings.push(err(
            at,
            format!(
                "the certificate in {file} expires on {not_after}, within {EXPIRY_WARNING_DAYS} days"
            ),
        ));
    }
}

/// `routes[i].backend_ca` (`at`): a readable PEM bundle of at least one certificate.
pub fn load_ca(at: &str, file: &str, errors: &mut Vec<ConfigError>) -> Option<CaBundle> {
    let pem = read(at, file, errors)?;
    match X509::stack_from_pem(&pem) {
        Ok(certs) if !certs.is_empty() => Some(Arc::new(certs.into_boxed_slice())),
        _ => {
            errors.push(err(
                at,
                format!("{file} is not a PEM bundle of CA certificates"),
            ));
            None
        }
    }
}

fn read(at: &str, file: &str, errors: &mut Vec<ConfigError>) -> Option<Vec<u8>> {
    match std::fs::read(Path::new(file)) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            errors.push(err(at, format!("cannot read {file}: {e}")));
            None
        }
    }
}
