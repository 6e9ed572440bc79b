//! The one place that writes responses: gateway-made JSON errors
//! (`{"status": false, "error": CODE, "message": TEXT}`) and proxied answers.
//! Each reject reason maps to exactly one status and error code here.

use std::future::Future;

use bytes::{BufMut, Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::protocols::http::date;
use pingora::proxy::Session;
use pingora::{Error, ErrorType::InvalidHTTPHeader, OrErr, Result};
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::answer::Answer;
use crate::reject::Reject;

#[derive(Serialize)]
struct ErrorBody {
    status: bool,
    error: &'static str,
    message: &'static str,
}

/// The JSON body of a gateway-made answer.
pub fn error_body(reject: Reject) -> Vec<u8> {
    serde_json::to_vec(&ErrorBody {
        status: false,
        error: reject.code(),
        message: reject.message(),
    })
    .unwrap_or_default()
}

/// A whole HTTP/1.1 answer with a gateway-made JSON error, as bytes, for the
/// front door (`front.rs`), which answers before any Pingora session exists.
/// It always closes the connection.
pub fn raw_reject(reject: Reject, request_id: &str) -> Vec<u8> {
    let body = error_body(reject);
    let status = http::StatusCode::from_u16(reject.status()).ok();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: {request_id}\r\nConnection: close\r\n",
        reject.status(),
        status.and_then(|s| s.canonical_reason()).unwrap_or(""),
        body.len(),
    );
    for (name, value) in reject.headers() {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    out
}

/// What every response carries, whoever made it.
pub struct Common<'a> {
    pub request_id: &'a str,
    /// HEAD: send headers only.
    pub head: bool,
    /// Per-request headers (rate limit, credits).
    pub extra: &'a [(&'static str, u64)],
}

/// An answer's status and header fields in the order they go out. A field
/// set again keeps its place and takes the new value, as
/// `ResponseHeader::insert_header` does, so both sinks write the same bytes.
pub struct Fields<'a> {
    status: u16,
    list: Vec<(&'static str, Value<'a>)>,
}

/// A field's value: bytes, or a number written in decimal as it goes out
/// (`Content-Length`, `Age`, the rate-limit and credit headers), with no
/// `String` made for it.
pub enum Value<'a> {
    Bytes(&'a [u8]),
    Number(u64),
}

impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(bytes: &'a [u8]) -> Value<'a> {
        Value::Bytes(bytes)
    }
}

impl From<u64> for Value<'_> {
    fn from(n: u64) -> Self {
        Value::Number(n)
    }
}

impl<'a> Fields<'a> {
    fn new(status: u16) -> Fields<'a> {
        Fields {
            status,
            list: Vec::with_capacity(16),
        }
    }

    fn insert(&mut self, name: &'static str, value: impl Into<Value<'a>>) {
        let value = value.into();
        match self
            .list
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(field) => *field = (name, value),
            None => self.list.push((name, value)),
        }
    }
}

/// Where an answer is written: Pingora's session, or a connection the front
/// door answers on itself ([`Raw`]). Both get the same fields, built here.
pub trait Sink: Send {
    /// Write the status and fields, then `body` if there is one (none: the
    /// header ends the answer).
    fn write(
        &mut self,
        fields: Fields<'_>,
        body: Option<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send;
}

impl Sink for Session {
    async fn write(&mut self, fields: Fields<'_>, body: Option<Bytes>) -> Result<()> {
        let mut resp = ResponseHeader::build(fields.status, Some(fields.list.len()))?;
        for (name, value) in fields.list {
            match value {
                Value::Bytes(bytes) => resp.insert_header(name, bytes)?,
                Value::Number(n) => resp.insert_header(name, http::HeaderValue::from(n))?,
            }
        }
        match body {
            None => self.write_response_header(Box::new(resp), true).await,
            Some(body) => {
                self.write_response_header(Box::new(resp), false).await?;
                self.write_response_body(Some(body), true).await
            }
        }
    }
}

/// An HTTP/1.1 connection the front door answers on: the answer goes out
/// in one write, as Pingora's session writes it (status line, the fields,
/// then the `Date` and `Connection` it adds: `keep-alive`, or `close` when
/// `.1` is false), without building a header map for it.
pub struct Raw<'a, C>(pub &'a mut C, pub bool);

impl<C: AsyncWrite + Unpin + Send> Sink for Raw<'_, C> {
    async fn write(&mut self, fields: Fields<'_>, body: Option<Bytes>) -> Result<()> {
        let status = http::StatusCode::from_u16(fields.status)
            .or_err(InvalidHTTPHeader, "invalid status")?;
        let body_len = body.as_ref().map_or(0, Bytes::len);
        let mut buf = BytesMut::with_capacity(512 + body_len);
        buf.put_slice(b"HTTP/1.1 ");
        buf.put_slice(status.as_str().as_bytes());
        buf.put_u8(b' ');
        buf.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
        buf.put_slice(b"\r\n");
        let date = date::get_cached_date();
        let connection: &[u8] = if self.1 { b"keep-alive" } else { b"close" };
        let added = [
            ("Date", Value::Bytes(date.as_bytes())),
            ("Connection", Value::Bytes(connection)),
        ];
        let mut digits = itoa::Buffer::new();
        for (name, value) in fields.list.into_iter().chain(added) {
            let value = match value {
                Value::Bytes(bytes) => bytes,
                Value::Number(n) => digits.format(n).as_bytes(),
            };
            // What `HeaderValue` refuses, `insert_header` refuses.
            if !value.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t') {
                return Error::e_explain(InvalidHTTPHeader, "invalid value while insert");
            }
            buf.put_slice(name.as_bytes());
            buf.put_slice(b": ");
            buf.put_slice(value);
            buf.put_slice(b"\r\n");
        }
        buf.put_slice(b"\r\n");
        if let Some(body) = body {
            buf.put_slice(&body);
        }
        let written = async {
            self.0.write_all(&buf).await?;
            self.0.flush().await
        };
        written.await.map_err(|e| {
            pingora::Error::because(pingora::ErrorType::WriteError, "writing an answer", e)
        })
    }
}

/// Answer with a gateway-made JSON error.
pub async fn reject(sink: &mut impl Sink, common: &Common<'_>, reject: Reject) -> Result<()> {
    let mut fields = Fields::new(reject.status());
    for (name, value) in reject.headers() {
        fields.insert(name, value.as_bytes());
    }
    fields.insert("Content-Type", &b"application/json"[..]);
    send(sink, common, fields, Bytes::from(error_body(reject))).await
}

/// Answer with a backend's answer (status, Content-Type, Content-Encoding and
/// body unchanged), fresh from a race or from the cache (`age` in seconds).
pub async fn proxied(
    sink: &mut impl Sink,
    common: &Common<'_>,
    answer: &Answer,
    x_cache: &'static str,
    age: Option<u64>,
) -> Result<()> {
    let mut fields = Fields::new(answer.status);
    if let Some(ct) = &answer.content_type {
        fields.insert("Content-Type", ct.as_bytes());
    }
    if let Some(ce) = &answer.content_encoding {
        fields.insert("Content-Encoding", ce.as_bytes());
    }
    fields.insert("X-Cache", x_cache.as_bytes());
    if let Some(age) = age {
        fields.insert("Age", age);
    }
    send(sink, common, fields, answer.body.clone()).await
}

async fn send(
    sink: &mut impl Sink,
    common: &Common<'_>,
    mut fields: Fields<'_>,
    body: Bytes,
) -> Result<()> {
    fields.insert("Content-Length", body.len() as u64);
    fields.insert("X-Request-Id", common.request_id.as_bytes());
    for &(name, value) in common.extra {
        fields.insert(name, value);
    }
    let body = (!common.head && !body.is_empty()).then_some(body);
    sink.write(fields, body).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Failure;

    #[test]
    fn every_reason_has_json_with_its_code() {
        for r in Reject::ALL {
            let v: serde_json::Value = serde_json::from_slice(&error_body(r)).unwrap();
            assert_eq!(v["status"], false);
            assert_eq!(v["error"], r.code());
            assert_eq!(v["message"], r.message());
        }
        assert_eq!(Reject::from(Failure::Timeout).status(), 504);
        assert_eq!(Reject::from(Failure::UpstreamFailed).status(), 502);
        assert_eq!(Reject::from(Failure::NoData).status(), 404);
    }

    #[test]
    fn raw_reject_is_a_complete_json_answer() {
        let raw = String::from_utf8(raw_reject(Reject::MethodNotAllowed, "abc")).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nAllow: GET, HEAD"), "{head}");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        assert!(
            head.contains(&format!("\r\nContent-Length: {}", body.len())),
            "{head}"
        );
        assert!(!head.to_ascii_lowercase().contains("server:"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "method_not_allowed");
    }
}
