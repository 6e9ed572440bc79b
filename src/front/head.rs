//! A request head as the front door reads it, checked strictly
//! ([`check_head`]): what nginx refuses is refused with the gateway's JSON
//! error. Whether the front door answers it itself is
//! [`crate::request::plain_get`]'s to say.

use std::mem::MaybeUninit;

use super::MAX_HEADERS;
use crate::reject::Reject;
use crate::router::MAX_TARGET_BYTES;

/// What a checked head says about the request's framing.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head, its blank line included.
    pub len: usize,
    /// Content-Length > 0 or Transfer-Encoding: chunked.
    pub has_body: bool,
}

/// 414 when the request line alone is too long, else 431.
pub(super) fn too_large(pending: &[u8]) -> Reject {
    match pending.iter().position(|&b| b == b'\n') {
        Some(end) if end <= MAX_TARGET_BYTES + 32 => Reject::HeadersTooLarge,
        _ => Reject::UriTooLong,
    }
}

/// Check a request head the way nginx would. `Ok(None)`: not complete yet.
pub fn check_head(buf: &[u8]) -> Result<Option<Head>, Reject> {
    // On the stack and left uninitialised: a heap array here was an 8 KiB
    // allocation per request, an initialised one an 8 KiB memset.
    let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadersTooLarge),
        Err(httparse::Error::Token) => {
            return Err(Reject::BadRequest(
                "malformed request line or header: a character HTTP does not allow (a raw space or control character in the target?)",
            ))
        }
        Err(_) => return Err(Reject::BadRequest("malformed request head")),
    };
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    let http11 = req.version == Some(1);
    if method == "CONNECT" {
        return Err(Reject::MethodNotAllowed);
    }
    if !target.starts_with('/') {
        return Err(Reject::BadRequest(
            "the request target must be a path such as /api/v1/...",
        ));
    }
    let mut hosts = 0;
    let mut lengths: Vec<&[u8]> = Vec::new();
    let mut encodings: Vec<&[u8]> = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if h.value.contains(&b'@') {
                return Err(Reject::BadRequest("userinfo in the Host header"));
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            lengths.extend(h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii));
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            encodings.extend(h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii));
        }
    }
    if hosts > 1 {
        return Err(Reject::BadRequest("more than one Host header"));
    }
    if hosts == 0 && http11 {
        return Err(Reject::BadRequest(
            "an HTTP/1.1 request needs a Host header",
        ));
    }
    let has_body = body_framing(&lengths, &encodings, http11)?;
    Ok(Some(Head { len, has_body }))
}

/// The body's framing from the `Content-Length` and `Transfer-Encoding`
/// values (each list split at commas): whether the request has a body, or
/// why its framing is refused (RFC 9112 §6).
fn body_framing(lengths: &[&[u8]], encodings: &[&[u8]], http11: bool) -> Result<bool, Reject> {
    if !lengths.is_empty() && !encodings.is_empty() {
        // RFC 9112 §6.1: a request smuggling attempt, or a broken client.
        return Err(Reject::BadRequest(
            "both Content-Length and Transfer-Encoding: the body's framing is ambiguous",
        ));
    }
    let mut length: Option<u64> = None;
    for value in lengths.iter().copied() {
        let parsed = std::str::from_utf8(value)
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok());
        match (parsed, length) {
            (None, _) => return Err(Reject::BadRequest("invalid Content-Length")),
            (Some(n), Some(m)) if n != m => {
                return Err(Reject::BadRequest("conflicting Content-Length values"))
            }
            (Some(n), _) => length = Some(n),
        }
    }
    if !encodings.is_empty() {
        let chunked_last = encodings
            .last()
            .is_some_and(|e| e.eq_ignore_ascii_case(b"chunked"));
        let chunked_once = encodings
            .iter()
            .filter(|e| e.eq_ignore_ascii_case(b"chunked"))
            .count()
            == 1;
        if !http11 || !chunked_last || !chunked_once {
            return Err(Reject::BadRequest("unsupported Transfer-Encoding"));
        }
    }
    Ok(length.unwrap_or(0) > 0 || !encodings.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(head: &str) -> Result<Option<Head>, Reject> {
        check_head(head.as_bytes())
    }

    fn refused(head: &str) -> bool {
        matches!(check(head), Err(Reject::BadRequest(_)))
    }

    #[test]
    fn a_plain_get_passes_and_its_length_is_exact() {
        let one = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n";
        let two = format!("{one}GET /b HTTP/1.1\r\nHost: x\r\n\r\n");
        let expected = Head {
            len: one.len(),
            has_body: false,
        };
        assert_eq!(check(one), Ok(Some(expected)));
        assert_eq!(check(&two).unwrap().unwrap().len, one.len());
        assert_eq!(check("GET /a HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        // HTTP/1.0 may leave out Host.
        assert!(check("GET /a HTTP/1.0\r\n\r\n").unwrap().is_some());
    }

    #[test]
    fn what_nginx_refuses_is_refused() {
        assert!(refused("GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(refused("GET /a\tb HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(refused("GET /a HTTP/1.1\r\n\r\n"));
        assert!(refused("GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"));
        assert!(refused("GET /a HTTP/1.1\r\nHost: u@x\r\n\r\n"));
        assert!(refused("GET http://x/a HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(refused(
            "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(refused(
            "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        ));
        assert!(refused(
            "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
        ));
        assert!(refused(
            "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1,2\r\n\r\n"
        ));
        assert!(refused(
            "GET /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
        ));
        assert!(refused(
            "GET /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
        ));
        assert!(refused(
            "GET /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(refused("GET /a HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n"));
        assert_eq!(
            check("CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n"),
            Err(Reject::MethodNotAllowed)
        );
    }

    #[test]
    fn a_body_is_noted() {
        let with = |h: &str| check(&format!("POST /a HTTP/1.1\r\nHost: x\r\n{h}\r\n"));
        assert!(with("Content-Length: 3\r\n").unwrap().unwrap().has_body);
        assert!(!with("Content-Length: 0\r\n").unwrap().unwrap().has_body);
        assert!(with("Content-Length: 3, 3\r\n").unwrap().unwrap().has_body);
        assert!(
            with("Transfer-Encoding: chunked\r\n")
                .unwrap()
                .unwrap()
                .has_body
        );
    }

    #[test]
    fn oversized_heads_get_414_or_431() {
        let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_TARGET_BYTES + 100));
        assert_eq!(too_large(long_line.as_bytes()), Reject::UriTooLong);
        let long_headers = format!("GET /a HTTP/1.1\r\n{}", "X: y\r\n".repeat(10_000));
        assert_eq!(too_large(long_headers.as_bytes()), Reject::HeadersTooLarge);
    }
}
