//! What the gateway checks before any route logic: method, request size,
//! path and query well-formedness; then longest-prefix routing, and the
//! path-and-query the backends receive (auth parameter removed).

use http::Method;
use percent_encoding::percent_decode;
use pingora::http::RequestHeader;

use crate::config::Route;
use crate::respond::Reject;

/// Longest request target accepted (nginx's large_client_header_buffers is 8k).
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// Largest total of request header names and values accepted.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// A request target that passed the checks, split at `?`.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// Size, method and target checks, in that order. HEAD counts as GET.
pub fn check_request(req: &RequestHeader) -> Result<Target<'_>, Reject> {
    let raw = req.raw_path();
    if raw.len() > MAX_TARGET_BYTES {
        return Err(Reject::UriTooLong);
    }
    let header_bytes: usize = req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(Reject::HeadersTooLarge);
    }
    if req.method != Method::GET && req.method != Method::HEAD {
        return Err(Reject::MethodNotAllowed);
    }
    parse_target(raw)
}

/// Split and check an origin-form target (`/path?query`).
pub fn parse_target(raw: &[u8]) -> Result<Target<'_>, Reject> {
    let Ok(text) = std::str::from_utf8(raw) else {
        return Err(Reject::BadRequest("the request target is not ASCII"));
    };
    if !text.starts_with('/') || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Reject::BadRequest(
            "the request target must be a path such as /api/v1/...",
        ));
    }
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    check_percent_encoding(path)?;
    if let Some(q) = query {
        check_percent_encoding(q)?;
    }
    // `..` after decoding could climb out of the route prefix on a backend
    // that decodes (`%2e%2e`, `..%2f`); no legitimate API path needs it.
    let decoded = percent_decode(path.as_bytes()).collect::<Vec<u8>>();
    if decoded.iter().any(|b| b.is_ascii_control()) {
        return Err(Reject::BadRequest("the path contains control characters"));
    }
    if decoded
        .split(|&b| b == b'/' || b == b'\\')
        .any(|segment| segment == b"..")
    {
        return Err(Reject::BadRequest("the path may not contain .. segments"));
    }
    Ok(Target { path, query })
}

fn check_percent_encoding(s: &str) -> Result<(), Reject> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let ok =
                b.len() > i + 2 && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit();
            if !ok {
                return Err(Reject::BadRequest(
                    "malformed percent-encoding in the request target",
                ));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// Routes by longest matching prefix.
pub struct RouteTable {
    /// `(prefix, route index)`, longest prefix first.
    by_prefix: Vec<(String, usize)>,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> Self {
        let mut by_prefix: Vec<(String, usize)> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.prefix.clone(), i))
            .collect();
        by_prefix.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        RouteTable { by_prefix }
    }

    pub fn find(&self, path: &str) -> Option<usize> {
        self.by_prefix
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map(|(_, i)| *i)
    }
}

/// Whether a raw (percent-encoded) query parameter name is `param`.
pub fn decoded_eq(raw_name: &str, param: &str) -> bool {
    if raw_name.contains('%') || raw_name.contains('+') {
        let decoded: Vec<u8> = percent_decode(raw_name.replace('+', " ").as_bytes()).collect();
        decoded == param.as_bytes()
    } else {
        raw_name == param
    }
}

/// Whether a raw query pair's name is `param`.
fn is_param(pair: &str, param: &str) -> bool {
    decoded_eq(pair.split_once('=').map_or(pair, |(n, _)| n), param)
}

/// The path and query the backends receive: the client's, unchanged, except
/// that the auth query parameter is removed.
pub fn upstream_path_and_query(target: &Target<'_>, auth_param: &str) -> String {
    let Some(query) = target.query else {
        return target.path.to_string();
    };
    let mut out = String::with_capacity(target.path.len() + 1 + query.len());
    out.push_str(target.path);
    let mut first = true;
    for pair in query
        .split('&')
        .filter(|p| !p.is_empty() && !is_param(p, auth_param))
    {
        out.push(if first { '?' } else { '&' });
        out.push_str(pair);
        first = false;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn dot_dot_in_any_spelling_is_rejected() {
        for t in [
            "/api/v1/../admin",
            "/api/v1/%2e%2e/admin",
            "/api/v1/%2E%2E/admin",
            "/api/v1/.%2e/x",
            "/api/v1/..%2fadmin",
            "/api/v1/..\\admin",
            "/api/v1/..",
        ] {
            assert!(
                matches!(parse_target(t.as_bytes()), Err(Reject::BadRequest(_))),
                "{t}"
            );
        }
        assert!(parse_target(b"/api/v1/a..b/...").is_ok());
    }

    #[test]
    fn malformed_percent_encoding_is_rejected() {
        for t in [
            "/api/v1/%zz",
            "/api/v1/%4",
            "/api/v1/x%",
            "/api/v1/x?q=%g1",
            "/api/v1/%00",
        ] {
            assert!(
                matches!(parse_target(t.as_bytes()), Err(Reject::BadRequest(_))),
                "{t}"
            );
        }
        let t = parse_target(b"/api/v1/a%20b?x=%41&y").unwrap();
        assert_eq!(t.path, "/api/v1/a%20b");
        assert_eq!(t.query, Some("x=%41&y"));
    }

    #[test]
    fn target_must_be_origin_form() {
        assert!(parse_target(b"http://example.com/x").is_err());
        assert!(parse_target(b"*").is_err());
        assert!(parse_target("/caf\u{e9}".as_bytes()).is_err());
    }

    #[test]
    fn longest_prefix_wins() {
        let yaml = "routes:\n  - {name: a, prefix: /api/, backends: [\"http://127.0.0.1:1\"]}\n  - {name: b, prefix: /api/v1/, backends: [\"http://127.0.0.1:1\"]}\n";
        let c = Config::from_yaml(yaml).unwrap();
        let t = RouteTable::new(&c.routes);
        assert_eq!(t.find("/api/v1/eod"), Some(1));
        assert_eq!(t.find("/api/v2/eod"), Some(0));
        assert_eq!(t.find("/other"), None);
    }

    #[test]
    fn auth_param_is_removed_from_upstream_query() {
        let q =
            |raw: &str| upstream_path_and_query(&parse_target(raw.as_bytes()).unwrap(), "api_key");
        assert_eq!(q("/a/b"), "/a/b");
        assert_eq!(q("/a?api_key=s3cret"), "/a");
        assert_eq!(q("/a?x=1&api_key=s3cret&y=2"), "/a?x=1&y=2");
        assert_eq!(q("/a?api%5Fkey=s3cret&y=2"), "/a?y=2");
        assert_eq!(q("/a?api_key&y=2&&"), "/a?y=2");
        assert_eq!(q("/a?api_keys=1"), "/a?api_keys=1");
    }
}
