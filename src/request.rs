//! What the gateway's steps read of a request head: its method, its target
//! as sent and its header fields. Two kinds of head provide it: Pingora's
//! `RequestHeader` (HTTP/2, and the HTTP/1 requests the front door hands to
//! Pingora), and the front door's own reading of a plain GET straight off
//! the connection's bytes ([`PlainGet`]).
//!
//! Why not one type: building a `RequestHeader` for every request the front
//! door answers itself (its URI, header map and case map, an allocation per
//! header name, and 8 KiB of header slots initialised) was about 8 % of a
//! cache hit's CPU, for three fields the steps look at (bench/RESULTS.md,
//! issue 14: "A request head without a header map").

use std::mem::MaybeUninit;

use pingora::http::RequestHeader;

/// A request head as the gateway's steps read it.
pub trait RequestHead: Sync {
    /// The method as sent, e.g. `GET`.
    fn method(&self) -> &str;
    /// The request target as sent: for the origin form, path and query.
    fn target(&self) -> &[u8];
    /// Every header field, name and value, in the order sent.
    fn fields(&self) -> impl Iterator<Item = (&str, &[u8])>;
    /// The values of the header `name` (lowercase), in the order sent.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.fields()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }
}

impl RequestHead for RequestHeader {
    fn method(&self) -> &str {
        self.method.as_str()
    }

    fn target(&self) -> &[u8] {
        self.raw_path()
    }

    fn fields(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.headers.get_all(name).into_iter().map(|v| v.as_bytes())
    }
}

/// A header value as text, under the rule of `http::HeaderValue::to_str`:
/// visible ASCII and tabs only.
pub fn text(value: &[u8]) -> Option<&str> {
    if value.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Header fields a request may have and still be answered by the front
/// door; one with more goes to Pingora.
pub const PLAIN_HEADERS: usize = 64;

/// Slots for the header fields of a [`PlainGet`], left uninitialised.
pub type Slots<'b> = [MaybeUninit<httparse::Header<'b>>; PLAIN_HEADERS];

pub fn slots<'b>() -> Slots<'b> {
    [const { MaybeUninit::uninit() }; PLAIN_HEADERS]
}

/// A request the front door may answer itself, read straight off the
/// connection's bytes: HTTP/1.1 GET or HEAD, keeping the connection alive (no
/// `Connection`, `Expect` or `Upgrade` header), no body or body framing
/// headers, at most [`PLAIN_HEADERS`] fields, and a target that Pingora would
/// keep byte for byte (its URI parser drops a `#…` fragment and refuses
/// `<`, `>` and `` ` ``; such targets go to Pingora, as everything else
/// does). The front door's `check_head` has already refused a second `Host`
/// and userinfo in it, which is all Pingora's `validate_request_authority`
/// checks of an origin-form target.
pub struct PlainGet<'h, 'b> {
    method: &'b str,
    target: &'b [u8],
    fields: &'h [httparse::Header<'b>],
}

impl RequestHead for PlainGet<'_, '_> {
    fn method(&self) -> &str {
        self.method
    }

    fn target(&self) -> &[u8] {
        self.target
    }

    fn fields(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.fields.iter().map(|h| (h.name, h.value))
    }
}

/// `head` as a [`PlainGet`], when the front door may answer it itself.
pub fn plain_get<'h, 'b>(head: &'b [u8], slots: &'h mut Slots<'b>) -> Option<PlainGet<'h, 'b>> {
    let mut parsed = httparse::Request::new(&mut []);
    if !matches!(
        parsed.parse_with_uninit_headers(head, slots),
        Ok(httparse::Status::Complete(_))
    ) || parsed.version != Some(1)
    {
        return None;
    }
    let method = parsed.method?;
    let target = parsed.path?.as_bytes();
    if method != "GET" && method != "HEAD" || !target.iter().all(|&b| kept_by_pingora(b)) {
        return None;
    }
    let fields: &'h [httparse::Header<'b>] = parsed.headers;
    let framing = [
        "connection",
        "expect",
        "upgrade",
        "content-length",
        "transfer-encoding",
    ];
    if fields
        .iter()
        .any(|h| framing.iter().any(|n| h.name.eq_ignore_ascii_case(n)))
    {
        return None;
    }
    Some(PlainGet {
        method,
        target,
        fields,
    })
}

/// A target byte that Pingora's URI parser (the `http` crate's
/// `PathAndQuery`) keeps as it is, in the path and in the query alike.
fn kept_by_pingora(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'#' | b'<' | b'>' | b'`' | b'"' | b'{' | b'}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_text_under_the_rule_of_header_value() {
        for value in [
            &b"abc def"[..],
            b"a\tb",
            b"",
            b"caf\xc3\xa9",
            b"a\x7fb",
            b"\x01",
        ] {
            let expected = http::HeaderValue::from_bytes(value)
                .ok()
                .and_then(|v| v.to_str().ok().map(str::to_owned));
            assert_eq!(text(value).map(str::to_owned), expected, "{value:?}");
        }
    }

    #[test]
    fn values_are_found_by_name_in_any_case_and_in_order() {
        let mut req = RequestHeader::build("GET", b"/a?b", None).unwrap();
        req.append_header("X-Api-Key", "one").unwrap();
        req.append_header("x-api-key", "two").unwrap();
        req.append_header("Host", "h").unwrap();
        let values: Vec<&[u8]> = req.values("x-api-key").collect();
        assert_eq!(values, [&b"one"[..], b"two"]);
        assert_eq!((req.method(), req.target()), ("GET", &b"/a?b"[..]));
        assert_eq!(req.fields().count(), 3);
    }

    #[test]
    fn only_a_plain_keep_alive_get_or_head_is_answered_in_the_front_door() {
        let plain = |h: &str| plain_get(format!("{h}\r\n").as_bytes(), &mut slots()).is_some();
        assert!(plain("GET /a?b=1 HTTP/1.1\r\nHost: x\r\n"));
        assert!(plain("HEAD /a HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\n"));
        let mut slots = slots();
        let head = b"GET /a%20b?c=d&e HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\n\r\n";
        let req = plain_get(head, &mut slots).unwrap();
        assert_eq!((req.method(), req.target()), ("GET", &b"/a%20b?c=d&e"[..]));
        assert_eq!(req.values("x-api-key").collect::<Vec<_>>(), [b"k"]);
        assert_eq!(req.fields().count(), 2);
        let many = format!(
            "GET /a HTTP/1.1\r\nHost: x\r\n{}",
            "X: y\r\n".repeat(PLAIN_HEADERS)
        );
        for other in [
            "GET /a HTTP/1.0\r\nHost: x\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nconnection: keep-alive\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n",
            "GET /a#b HTTP/1.1\r\nHost: x\r\n",
            "GET /a?b=<c> HTTP/1.1\r\nHost: x\r\n",
            "GET /a?b={c} HTTP/1.1\r\nHost: x\r\n",
            many.as_str(),
        ] {
            assert!(!plain(other), "{other}");
        }
    }

    #[test]
    fn a_target_the_front_door_keeps_is_the_one_pingora_keeps() {
        // Every graphic byte, in the path and in the query.
        for b in (0x21u8..0x7f).filter(|&b| b != b'?') {
            for target in [vec![b'/', b'a', b], vec![b'/', b'?', b'a', b]] {
                let pingora = pingora::http::RequestHeader::build("GET", &target, None)
                    .ok()
                    .map(|r| r.raw_path().to_vec());
                if kept_by_pingora(b) {
                    assert_eq!(pingora.as_deref(), Some(&target[..]), "{:?}", b as char);
                }
            }
        }
    }
}
