//! The request target, parsed once (by `router`) and passed by value: its
//! path, its query pairs in order with the auth parameter marked, the path
//! and query the backends receive, and the cache key. Nothing else splits a
//! target again.
//!
//! One buffer holds it all: the upstream path and query (the client's,
//! unchanged, minus the auth parameter and empty pairs), then the auth pairs
//! as sent. A target is one allocation, plus one for its pairs when it has a
//! query: no more than splitting it took before. It imports nothing of the
//! crate.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use percent_encoding::percent_decode;

/// A checked origin-form target (`/path?query`).
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// Upstream path and query, then the raw auth pairs.
    buf: String,
    path_len: usize,
    upstream_len: usize,
    /// In the order sent; each a range of `buf`.
    pairs: Vec<Slot>,
}

#[derive(Clone, PartialEq, Eq)]
struct Slot {
    range: Range<usize>,
    auth: bool,
}

/// One non-empty `&`-separated query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair<'a> {
    /// `name=value` or `name`, still percent-encoded.
    pub raw: &'a str,
    /// This is the auth parameter: its value is the key; nothing passes it on.
    pub auth: bool,
}

impl<'a> Pair<'a> {
    /// The raw (percent-encoded) name.
    pub fn raw_name(&self) -> &'a str {
        self.raw.split_once('=').map_or(self.raw, |(n, _)| n)
    }

    /// The raw (percent-encoded) value; empty when there is no `=`.
    pub fn raw_value(&self) -> &'a str {
        self.raw.split_once('=').map_or("", |(_, v)| v)
    }

    /// The name, `+` as space, percent-decoded once.
    pub fn decoded_name(&self) -> Cow<'a, [u8]> {
        decode_component(self.raw_name())
    }

    /// The value, `+` as space, percent-decoded once.
    pub fn decoded_value(&self) -> Cow<'a, [u8]> {
        decode_component(self.raw_value())
    }
}

/// A query component as a form decoder reads it: `+` as space, then
/// percent-decoded once.
pub fn decode_component(raw: &str) -> Cow<'_, [u8]> {
    if raw.contains('%') || raw.contains('+') {
        Cow::Owned(percent_decode(raw.replace('+', " ").as_bytes()).collect())
    } else {
        Cow::Borrowed(raw.as_bytes())
    }
}

impl Target {
    /// A target of `path` and `query` (both already checked by the router);
    /// `is_auth` marks each non-empty pair, or refuses the target.
    pub fn new<E>(
        path: &str,
        query: Option<&str>,
        mut is_auth: impl FnMut(&str) -> Result<bool, E>,
    ) -> Result<Target, E> {
        let mut buf = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
        buf.push_str(path);
        let mut pairs = Vec::new();
        let Some(query) = query else {
            return Ok(Target {
                path_len: buf.len(),
                upstream_len: buf.len(),
                buf,
                pairs,
            });
        };
        // Public pairs go to the upstream part now; auth pairs keep their
        // place in `query` until it is complete.
        let mut offset = 0;
        for raw in query.split('&') {
            let start = offset;
            offset += raw.len() + 1;
            if raw.is_empty() {
                continue;
            }
            let auth = is_auth(raw)?;
            let range = if auth {
                start..start + raw.len()
            } else {
                buf.push(if buf.len() == path.len() { '?' } else { '&' });
                let at = buf.len();
                buf.push_str(raw);
                at..buf.len()
            };
            pairs.push(Slot { range, auth });
        }
        let upstream_len = buf.len();
        for slot in pairs.iter_mut().filter(|s| s.auth) {
            let at = buf.len();
            buf.push_str(&query[slot.range.clone()]);
            slot.range = at..buf.len();
        }
        Ok(Target {
            buf,
            path_len: path.len(),
            upstream_len,
            pairs,
        })
    }

    /// The path as sent (still percent-encoded).
    pub fn path(&self) -> &str {
        &self.buf[..self.path_len]
    }

    /// The query pairs, in order, the auth parameter marked.
    pub fn pairs(&self) -> impl Iterator<Item = Pair<'_>> {
        self.pairs.iter().map(|s| Pair {
            raw: &self.buf[s.range.clone()],
            auth: s.auth,
        })
    }

    /// The raw values of the auth parameter, in order.
    pub fn auth_values(&self) -> impl Iterator<Item = &str> {
        self.pairs().filter(|p| p.auth).map(|p| Pair::raw_value(&p))
    }

    /// The query without the auth parameter (`None` when nothing is left).
    pub fn public_query(&self) -> Option<&str> {
        self.buf
            .get(self.path_len + 1..self.upstream_len)
            .filter(|q| !q.is_empty())
    }

    /// The path and query the backends receive: the client's, unchanged,
    /// except that the auth parameter is removed (and empty pairs dropped).
    /// Safe to log.
    pub fn upstream(&self) -> &str {
        &self.buf[..self.upstream_len]
    }

    /// The cache key: route name, normalized path, and the query parameters
    /// (auth parameter left out) sorted by name, repeated names keeping their
    /// order. Two customers asking the same thing share one entry.
    pub fn cache_key(&self, route: &str) -> String {
        let mut out = String::with_capacity(route.len() + self.upstream_len + 2);
        out.push_str(route);
        out.push('\n');
        normalize(self.path(), false, &mut out);
        if self.public_query().is_none() {
            return out;
        }
        let mut pairs: Vec<(String, String)> = self
            .pairs()
            .filter(|p| !p.auth)
            .map(|p| {
                let (n, v) = p.raw.split_once('=').unwrap_or((p.raw, ""));
                let (mut name, mut value) = (String::new(), String::new());
                normalize(n, true, &mut name);
                normalize(v, true, &mut value);
                (name, value)
            })
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (n, v)) in pairs.iter().enumerate() {
            out.push(if i == 0 { '?' } else { '&' });
            out.push_str(n);
            out.push('=');
            out.push_str(v);
        }
        out
    }
}

/// Never print the key by accident: Debug shows what the backends see.
impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("path", &self.path())
            .field("upstream", &self.upstream())
            .field("auth_pairs", &self.pairs.iter().filter(|s| s.auth).count())
            .finish()
    }
}

/// Bytes that need no percent-encoding (RFC 3986 unreserved).
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// One canonical spelling: escapes of unreserved bytes decoded, every other
/// escape in upper-case hex, literal bytes kept, and in a query `+` as `%20`.
/// (The router has already rejected malformed escapes.)
fn normalize(raw: &str, plus_is_space: bool, out: &mut String) {
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let decoded = std::str::from_utf8(&b[i + 1..(i + 3).min(b.len())])
                    .ok()
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match decoded {
                    Some(d) if unreserved(d) => out.push(char::from(d)),
                    Some(d) => out.push_str(&format!("%{d:02X}")),
                    None => {
                        out.push('%');
                        i += 1;
                        continue;
                    }
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push_str("%20");
                i += 1;
            }
            byte => {
                out.push(char::from(byte));
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target whose auth parameter is `api_key` spelled exactly.
    fn t(raw: &str) -> Target {
        let (path, query) = match raw.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (raw, None),
        };
        Target::new(path, query, |p| {
            Ok::<_, ()>(p.split('=').next() == Some("api_key"))
        })
        .unwrap()
    }

    fn key(route: &str, path: &str, query: Option<&str>) -> String {
        match query {
            Some(q) => t(&format!("{path}?{q}")).cache_key(route),
            None => t(path).cache_key(route),
        }
    }

    #[test]
    fn parts_of_a_target() {
        let target = t("/a/b?x=1&&api_key=k1&y=%41+b&api_key&");
        assert_eq!(target.path(), "/a/b");
        assert_eq!(target.upstream(), "/a/b?x=1&y=%41+b");
        assert_eq!(target.public_query(), Some("x=1&y=%41+b"));
        assert_eq!(target.auth_values().collect::<Vec<_>>(), ["k1", ""]);
        let pairs: Vec<(&str, bool)> = target.pairs().map(|p| (p.raw, p.auth)).collect();
        assert_eq!(
            pairs,
            [
                ("x=1", false),
                ("api_key=k1", true),
                ("y=%41+b", false),
                ("api_key", true)
            ]
        );
        let y = target.pairs().nth(2).unwrap();
        assert_eq!(&*y.decoded_name(), b"y");
        assert_eq!(&*y.decoded_value(), b"A b");
        assert_eq!(t("/a?api_key=k").upstream(), "/a");
        assert_eq!(t("/a?api_key=k").public_query(), None);
        assert_eq!(t("/a?").upstream(), "/a");
        assert_eq!(t("/a").upstream(), "/a");
        assert!(!format!("{:?}", t("/a?api_key=s3cret")).contains("s3cret"));
    }

    #[test]
    fn a_refused_pair_refuses_the_target() {
        let r = Target::new("/a", Some("x=1&bad=2"), |p| {
            if p.starts_with("bad") {
                Err("no")
            } else {
                Ok(false)
            }
        });
        assert_eq!(r, Err("no"));
    }

    #[test]
    fn key_sorts_query_parameters() {
        let a = key("v1", "/api/eod/AAPL", Some("to=2&from=1"));
        let b = key("v1", "/api/eod/AAPL", Some("from=1&to=2"));
        assert_eq!(a, b);
        assert_eq!(a, "v1\n/api/eod/AAPL?from=1&to=2");
        assert_ne!(a, key("v2", "/api/eod/AAPL", Some("from=1&to=2")));
        assert_ne!(a, key("v1", "/api/eod/AAPL", Some("from=1&to=3")));
        // Repeated names keep their order.
        assert_ne!(
            key("v1", "/a", Some("x=1&x=2")),
            key("v1", "/a", Some("x=2&x=1"))
        );
    }

    #[test]
    fn the_key_never_holds_the_auth_parameter() {
        assert_eq!(key("v1", "/a", Some("api_key=s3cret")), "v1\n/a");
        assert_eq!(key("v1", "/a", Some("x=1&api_key=s3cret")), "v1\n/a?x=1");
        assert_eq!(key("v1", "/a", Some("&&")), "v1\n/a");
    }

    #[test]
    fn equivalent_percent_encodings_share_a_key() {
        assert_eq!(
            key("v1", "/api/%65od/%41APL", Some("q=a%20b")),
            key("v1", "/api/eod/AAPL", Some("q=a+b"))
        );
        assert_eq!(key("v1", "/api/x%2fy", None), key("v1", "/api/x%2Fy", None));
        assert_ne!(key("v1", "/api/x%2Fy", None), key("v1", "/api/x/y", None));
        assert_eq!(key("v1", "/a", Some("q=%7e")), key("v1", "/a", Some("q=~")));
    }
}
