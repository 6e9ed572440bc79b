//! What the gateway checks before any route logic: method, request size,
//! path and query well-formedness; then longest-prefix routing. The target is
//! parsed here once, into a [`Target`] whose query pairs have the auth
//! parameter marked: auth takes the key from it, the backends, the cache key
//! and the logs get the rest. Nothing else splits the query.
//! The route table maps a path to whatever the caller keeps per route.
//!
//! The auth parameter rule (README, "Requests"): a query parameter whose name,
//! percent-decoded once (`+` as space), equals `auth.query_param` ignoring
//! ASCII case is the auth parameter. A name that only looks like it — equal
//! after decoding more than once, with a `[…]` suffix, with control
//! characters or spaces, or hidden after a `;` — is refused with 400, so that
//! no spelling of a key is ever passed on or logged.

use percent_encoding::percent_decode;

use crate::reject::Reject;
use crate::request::RequestHead;
use crate::target::{decode_component, Target};

/// Longest request target accepted (nginx's large_client_header_buffers is 8k).
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// Largest total of request header names and values accepted.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// A request target as logs may show it: without the auth parameter, or,
/// when the target does not parse, its path alone (`?…` marks a query left out).
pub fn loggable_target(raw: &[u8], auth_param: &str) -> String {
    if let Ok(target) = parse_target(raw, auth_param) {
        return target.upstream().to_string();
    }
    let (path, query) = match raw.iter().position(|&b| b == b'?') {
        Some(i) => (&raw[..i], true),
        None => (raw, false),
    };
    let mut out = path.escape_ascii().to_string();
    if query {
        out.push_str("?…");
    }
    out
}

/// Size, method and target checks, in that order. HEAD counts as GET.
pub fn check_request(req: &impl RequestHead, auth_param: &str) -> Result<Target, Reject> {
    let raw = req.target();
    if raw.len() > MAX_TARGET_BYTES {
        return Err(Reject::UriTooLong);
    }
    let header_bytes: usize = req
        .fields()
        .map(|(name, value)| name.len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(Reject::HeadersTooLarge);
    }
    if req.method() != "GET" && req.method() != "HEAD" {
        return Err(Reject::MethodNotAllowed);
    }
    parse_target(raw, auth_param)
}

/// Split and check an origin-form target (`/path?query`), marking the auth
/// parameter `auth_param`.
pub fn parse_target(raw: &[u8], auth_param: &str) -> Result<Target, Reject> {
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
        // `%0D%0A` or `%00` would reach a backend (or a log) as a raw
        // control character once decoded.
        if percent_decode(q.as_bytes()).any(|b| b.is_ascii_control()) {
            return Err(Reject::BadRequest("the query contains control characters"));
        }
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
    Target::new(path, query, |pair| check_pair(pair, auth_param))
}

const NEAR_MISS: Reject = Reject::BadRequest(
    "a query parameter name resembles the API key parameter without being it; send the key as exactly one parameter, header X-API-Key or Authorization: Bearer",
);

/// Whether a non-empty query pair is the auth parameter; a near miss of it
/// refuses the request.
fn check_pair(raw: &str, auth_param: &str) -> Result<bool, Reject> {
    let name = raw.split_once('=').map_or(raw, |(n, _)| n);
    let auth = is_auth_name(name, auth_param);
    if !auth && looks_like_auth(name, auth_param) {
        return Err(NEAR_MISS);
    }
    // `x=1;api_key=…`: some servers split at `;` too.
    for segment in raw.split(';').skip(1) {
        let name = segment.split_once('=').map_or(segment, |(n, _)| n);
        if is_auth_name(name, auth_param) || looks_like_auth(name, auth_param) {
            return Err(NEAR_MISS);
        }
    }
    Ok(auth)
}

/// Whether a raw (percent-encoded) query parameter name is the auth
/// parameter: decoded once, equal to it ignoring ASCII case.
pub fn is_auth_name(raw_name: &str, auth_param: &str) -> bool {
    decode_component(raw_name).eq_ignore_ascii_case(auth_param.as_bytes())
}

/// Whether a name that is not the auth parameter could be read as it by a
/// more lenient parser: decoded again (up to three times), with a `[…]`
/// suffix cut, control characters and spaces dropped, ignoring case.
fn looks_like_auth(raw_name: &str, auth_param: &str) -> bool {
    let mut name = decode_component(raw_name).into_owned();
    for _ in 0..3 {
        if !name.contains(&b'%') {
            break;
        }
        name = percent_decode(&name).collect();
    }
    if let Some(bracket) = name.iter().position(|&b| b == b'[') {
        name.truncate(bracket);
    }
    name.retain(|b| !b.is_ascii_control() && !b.is_ascii_whitespace());
    name.eq_ignore_ascii_case(auth_param.as_bytes())
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

/// Routes by longest matching prefix, to what the caller keeps per route.
pub struct RouteTable<T> {
    /// Longest prefix first.
    by_prefix: Vec<(String, T)>,
}

impl<T> RouteTable<T> {
    /// `(prefix, route)` pairs, in any order.
    pub fn new(routes: impl IntoIterator<Item = (String, T)>) -> Self {
        let mut by_prefix: Vec<(String, T)> = routes.into_iter().collect();
        by_prefix.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        RouteTable { by_prefix }
    }

    pub fn find(&self, path: &str) -> Option<&T> {
        self.by_prefix
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map(|(_, route)| route)
    }
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
                matches!(
                    parse_target(t.as_bytes(), "api_key"),
                    Err(Reject::BadRequest(_))
                ),
                "{t}"
            );
        }
        assert!(parse_target(b"/api/v1/a..b/...", "api_key").is_ok());
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
                matches!(
                    parse_target(t.as_bytes(), "api_key"),
                    Err(Reject::BadRequest(_))
                ),
                "{t}"
            );
        }
        let t = parse_target(b"/api/v1/a%20b?x=%41&y", "api_key").unwrap();
        assert_eq!(t.path(), "/api/v1/a%20b");
        assert_eq!(t.public_query(), Some("x=%41&y"));
    }

    #[test]
    fn target_must_be_origin_form() {
        assert!(parse_target(b"http://example.com/x", "k").is_err());
        assert!(parse_target(b"*", "k").is_err());
        assert!(parse_target("/caf\u{e9}".as_bytes(), "k").is_err());
    }

    #[test]
    fn longest_prefix_wins() {
        let yaml = "routes:\n  - {name: a, prefix: /api/, backends: [\"http://127.0.0.1:1\"]}\n  - {name: b, prefix: /api/v1/, backends: [\"http://127.0.0.1:1\"]}\n";
        let c = Config::from_yaml(yaml).unwrap();
        let t = RouteTable::new(
            c.routes
                .iter()
                .enumerate()
                .map(|(i, r)| (r.prefix.clone(), i)),
        );
        assert_eq!(t.find("/api/v1/eod"), Some(&1));
        assert_eq!(t.find("/api/v2/eod"), Some(&0));
        assert_eq!(t.find("/other"), None);
    }

    #[test]
    fn auth_param_is_removed_from_upstream_query() {
        let q = |raw: &str| {
            parse_target(raw.as_bytes(), "api_key")
                .unwrap()
                .upstream()
                .to_string()
        };
        assert_eq!(q("/a/b"), "/a/b");
        assert_eq!(q("/a?api_key=s3cret"), "/a");
        assert_eq!(q("/a?x=1&api_key=s3cret&y=2"), "/a?x=1&y=2");
        assert_eq!(q("/a?api%5Fkey=s3cret&y=2"), "/a?y=2");
        assert_eq!(q("/a?api_key&y=2&&"), "/a?y=2");
        assert_eq!(q("/a?api_keys=1"), "/a?api_keys=1");
        assert_eq!(q("/a?API_KEY=s3cret&y=2"), "/a?y=2");
        assert_eq!(q("/a?Api_Key=s3cret"), "/a");
        assert_eq!(q("/a?x=1;y=2"), "/a?x=1;y=2");
    }

    #[test]
    fn auth_param_is_marked_whatever_its_case_or_encoding() {
        let t = parse_target(b"/a?x=1&API_KEY=k1&api%5Fkey=k2&Api_Key", "api_key").unwrap();
        let values: Vec<&str> = t.auth_values().collect();
        assert_eq!(values, ["k1", "k2", ""]);
        assert_eq!(t.public_query(), Some("x=1"));
        let t = parse_target(b"/a?token=k", "TOKEN").unwrap();
        assert_eq!(t.auth_values().collect::<Vec<_>>(), ["k"]);
    }

    #[test]
    fn near_misses_of_the_auth_param_are_rejected() {
        for t in [
            "/a?api%255Fkey=k",
            "/a?api%25255Fkey=k",
            "/a?api_key[]=k",
            "/a?API_KEY[0]=k",
            "/a?api_key%5B%5D=k",
            "/a?api_key%20=k",
            "/a?api_key+=k",
            "/a?x=1;api_key=k",
            "/a?x=1;API%5FKEY=k",
            "/a?x=1;api_key[]=k",
        ] {
            assert_eq!(parse_target(t.as_bytes(), "api_key"), Err(NEAR_MISS), "{t}");
        }
        // Look-alikes that are different names stay ordinary parameters.
        for t in [
            "/a?api_keys=1",
            "/a?apikey=1",
            "/a?my_api_key=1",
            "/a?x=api_key",
        ] {
            let target = parse_target(t.as_bytes(), "api_key").unwrap();
            assert_eq!(target.auth_values().count(), 0, "{t}");
        }
    }

    #[test]
    fn loggable_targets_never_carry_the_key() {
        assert_eq!(
            loggable_target(b"/a?x=1&api_key=s3cret", "api_key"),
            "/a?x=1"
        );
        assert_eq!(loggable_target(b"/a?API_KEY=s3cret", "api_key"), "/a");
        assert_eq!(
            loggable_target(b"/a/%zz?api_key=s3cret", "api_key"),
            "/a/%zz?…"
        );
        assert_eq!(loggable_target(b"/a?api_key[]=s3cret", "api_key"), "/a?…");
        assert_eq!(loggable_target(b"/a\n", "api_key"), "/a\\n");
    }

    #[test]
    fn control_characters_in_the_query_are_rejected() {
        for t in [
            "/a?q=%0D%0AX:1",
            "/a?q=%00",
            "/a?q=%7f",
            "/a?%0a=1",
            "/a?api_key%00=k",
        ] {
            assert!(
                matches!(
                    parse_target(t.as_bytes(), "api_key"),
                    Err(Reject::BadRequest(_))
                ),
                "{t}"
            );
        }
        assert!(parse_target(b"/a?q=%20%09", "api_key").is_err());
        assert!(parse_target(b"/a?q=%20%C3%A9", "api_key").is_ok());
    }
}
