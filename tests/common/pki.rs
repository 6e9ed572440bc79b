//! A throwaway certificate authority for the TLS tests: a CA and leaf
//! certificates for `localhost` and `127.0.0.1`, made with the openssl crate
//! (the library the gateway's TLS runs on) and written as PEM files.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslConnector, SslFiletype, SslMethod};
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Builder, X509Name, X509};
use pingora::tls::tokio_ssl::SslStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DAY: i64 = 86_400;

pub struct Pki {
    dir: PathBuf,
    ca: X509,
    ca_key: PKey<Private>,
}

/// A leaf's files.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(cn: &str) -> X509Name {
    let mut n = X509Name::builder().unwrap();
    n.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    n.build()
}

fn time(days_from_now: i64) -> Asn1Time {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    Asn1Time::from_unix(now + days_from_now * DAY).unwrap()
}

fn serial(n: u32) -> Asn1Integer {
    BigNum::from_u32(n).unwrap().to_asn1_integer().unwrap()
}

impl Pki {
    /// A new CA whose files go in `dir` (`ca.pem`).
    pub fn new(dir: &Path) -> Pki {
        let key = new_key();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial(1)).unwrap();
        b.set_subject_name(&name("tollgate test CA")).unwrap();
        b.set_issuer_name(&name("tollgate test CA")).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&time(-1)).unwrap();
        b.set_not_after(&time(365)).unwrap();
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca: b.build(),
            ca_key: key,
        };
        std::fs::write(pki.ca_path(), pki.ca.to_pem().unwrap()).unwrap();
        pki
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A leaf for `localhost` and `127.0.0.1` with this serial, valid from a
    /// day ago until `days` from now (negative: already expired), written as
    /// `<file>.pem` and `<file>.key`.
    pub fn leaf(&self, file: &str, serial_number: u32, days: i64) -> Leaf {
        let key = new_key();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial(serial_number)).unwrap();
        b.set_subject_name(&name("localhost")).unwrap();
        b.set_issuer_name(self.ca.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&time(days.min(0) - 2)).unwrap();
        b.set_not_after(&time(days)).unwrap();
        let san = SubjectAlternativeName::new()
            .dns("localhost")
            .ip("127.0.0.1")
            .build(&b.x509v3_context(Some(&self.ca), None))
            .unwrap();
        b.append_extension(san).unwrap();
        b.sign(&self.ca_key, MessageDigest::sha256()).unwrap();
        let leaf = Leaf {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&leaf.cert, b.build().to_pem().unwrap()).unwrap();
        std::fs::write(&leaf.key, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        leaf
    }
}

impl Pki {
    /// A TLS acceptor for an https origin, with a fresh leaf from this CA.
    pub fn origin_acceptor(&self) -> SslAcceptor {
        static N: AtomicU32 = AtomicU32::new(1000);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let leaf = self.leaf(&format!("origin{n}"), n, 30);
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        b.set_certificate_chain_file(&leaf.cert).unwrap();
        b.set_private_key_file(&leaf.key, SslFiletype::PEM).unwrap();
        b.build()
    }
}

/// The serial number of a DER certificate (as a client saw it).
pub fn serial_of(der: &[u8]) -> u32 {
    let cert = X509::from_der(der).unwrap();
    let n = cert.serial_number().to_bn().unwrap();
    n.to_dec_str().unwrap().parse().unwrap()
}

/// An HTTPS client that trusts only this CA; `h2`: offer HTTP/2 by ALPN
/// (else HTTP/1.1 only). It reports the server's certificate.
pub fn client(pki: &Pki, h2: bool) -> reqwest::Client {
    let b = builder(pki);
    let b = if h2 { b } else { b.http1_only() };
    b.build().unwrap()
}

/// The settings of [`client`], to add to.
pub fn builder(pki: &Pki) -> reqwest::ClientBuilder {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.ca_path()).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .tls_info(true)
        .timeout(std::time::Duration::from_secs(10))
}

/// The serial of the certificate the server showed for this answer.
pub fn peer_serial(r: &reqwest::Response) -> u32 {
    let info = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("a TLS answer from a client with tls_info");
    serial_of(info.peer_certificate().expect("the server's certificate"))
}

/// Send `bytes` over TLS (ALPN `http/1.1`, this CA trusted, SNI
/// `localhost`) to `127.0.0.1:port` and read until the server closes, which
/// must happen within `within`; the answer and how long after the send the
/// close came.
pub async fn raw_tls(pki: &Pki, port: u16, bytes: &[u8], within: Duration) -> (String, Duration) {
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.set_ca_file(pki.ca_path()).unwrap();
    b.set_alpn_protos(b"\x08http/1.1").unwrap();
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut tls = SslStream::new(ssl, tcp).unwrap();
    Pin::new(&mut tls).connect().await.unwrap();
    tls.write_all(bytes).await.unwrap();
    let sent = Instant::now();
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        // A close without close_notify is an error here: the end all the same.
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(within, read)
        .await
        .unwrap_or_else(|_| panic!("not closed within {within:?}"));
    (String::from_utf8_lossy(&out).into_owned(), sent.elapsed())
}
