//! The one place that writes responses: gateway-made JSON errors
//! (`{"status": false, "error": CODE, "message": TEXT}`) and proxied answers.
//! Each reject reason maps to exactly one status and error code here.

use std::future::Future;

use bytes::{BufMut, Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::protocols::http::date;
use pingora::proxy::Session;
use pingora::Result;
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
    pub extra: &'a [(&'static str, String)],
}

/// Where an answer is written: Pingora's session, or a connection the front
/// door answers on itself ([`Raw`]). Both get the same header, built here.
pub trait Sink: Send {
    /// Write `resp`, then `body` if there is one (none: the header ends the
    /// answer).
    fn write(
        &mut self,
        resp: ResponseHeader,
        body: Option<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send;
}

impl Sink for Session {
    async fn write(&mut self, resp: ResponseHeader, body: Option<Bytes>) -> Result<()> {
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
/// in one write, with the `Date` and `Connection` (`keep-alive`, or `close`
/// when `.1` is false) that Pingora's session adds, in its order.
pub struct Raw<'a, C>(pub &'a mut C, pub bool);

impl<C: AsyncWrite + Unpin + Send> Sink for Raw<'_, C> {
    async fn write(&mut self, mut resp: ResponseHeader, body: Option<Bytes>) -> Result<()> {
        resp.insert_header(http::header::DATE, date::get_cached_date())?;
        let connection = if self.1 { "keep-alive" } else { "close" };
        resp.insert_header(http::header::CONNECTION, connection)?;
        let body_len = body.as_ref().map_or(0, Bytes::len);
        let mut buf = BytesMut::with_capacity(512 + body_len);
        buf.put_slice(b"HTTP/1.1 ");
        buf.put_slice(resp.status.as_str().as_bytes());
        buf.put_u8(b' ');
        if let Some(reason) = resp.get_reason_phrase() {
            buf.put_slice(reason.as_bytes());
        }
        buf.put_slice(b"\r\n");
        resp.header_to_h1_wire(&mut buf);
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
    let mut resp = ResponseHeader::build(reject.status(), Some(4))?;
    for (name, value) in reject.headers() {
        resp.insert_header(*name, *value)?;
    }
    resp.insert_header("Content-Type", "application/json")?;
    send(sink, common, resp, Bytes::from(error_body(reject))).await
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
    let mut resp = ResponseHeader::build(answer.status, Some(12))?;
    if let Some(ct) = &answer.content_type {
        resp.insert_header("Content-Type", ct)?;
    }
    if let Some(ce) = &answer.content_encoding {
        resp.insert_header("Content-Encoding", ce)?;
    }
    resp.insert_header("X-Cache", x_cache)?;
    if let Some(age) = age {
        resp.insert_header("Age", age)?;
    }
    send(sink, common, resp, answer.body.clone()).await
}

async fn send(
    sink: &mut impl Sink,
    common: &Common<'_>,
    mut resp: ResponseHeader,
    body: Bytes,
) -> Result<()> {
    resp.insert_header("Content-Length", body.len())?;
    resp.insert_header("X-Request-Id", common.request_id)?;
    for (name, value) in common.extra {
        resp.insert_header(*name, value.as_str())?;
    }
    let body = (!common.head && !body.is_empty()).then_some(body);
    sink.write(resp, body).await
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
