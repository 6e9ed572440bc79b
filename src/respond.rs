//! The one place that writes responses: gateway-made JSON errors
//! (`{"status": false, "error": CODE, "message": TEXT}`) and proxied answers.
//! Each reject reason maps to exactly one status and error code here.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use serde::Serialize;

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

/// Answer with a gateway-made JSON error.
pub async fn reject(session: &mut Session, common: &Common<'_>, reject: Reject) -> Result<()> {
    let mut resp = ResponseHeader::build(reject.status(), Some(4))?;
    for (name, value) in reject.headers() {
        resp.insert_header(*name, *value)?;
    }
    resp.insert_header("Content-Type", "application/json")?;
    send(session, common, resp, Bytes::from(error_body(reject))).await
}

/// Answer with a backend's answer (status, Content-Type, Content-Encoding and
/// body unchanged), fresh from a race or from the cache (`age` in seconds).
pub async fn proxied(
    session: &mut Session,
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
    send(session, common, resp, answer.body.clone()).await
}

async fn send(
    session: &mut Session,
    common: &Common<'_>,
    mut resp: ResponseHeader,
    body: Bytes,
) -> Result<()> {
    resp.insert_header("Content-Length", body.len())?;
    resp.insert_header("X-Request-Id", common.request_id)?;
    for (name, value) in common.extra {
        resp.insert_header(*name, value.as_str())?;
    }
    if common.head || body.is_empty() {
        session.write_response_header(Box::new(resp), true).await
    } else {
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }
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
