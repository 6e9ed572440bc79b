//! What a race produces: a backend's answer kept whole (it is judged, then
//! returned or cached), or why there was none. Plain values, below the race,
//! the cache and the writer that all use them.

use bytes::Bytes;
use http::HeaderValue;

use crate::reject::Reject;

/// A backend's answer, kept whole: it is judged, then returned or cached.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<HeaderValue>,
    pub cache_control: Option<HeaderValue>,
    /// Passed on with the body it describes (gzip bytes stay readable) and
    /// kept in the cache entry.
    pub content_encoding: Option<HeaderValue>,
    /// The backend set a cookie: the answer may be meant for one client, so
    /// it is never stored (see `cache::freshness`). The cookie itself is
    /// not passed on: tollgate sends backends no `Cookie` header, so it
    /// could never come back to them.
    pub sets_cookie: bool,
    pub body: Bytes,
}

/// Why a race had no winner; decides the gateway's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Every backend answered, none with success → 404 `no_data`.
    NoData,
    /// At least one backend failed → 502 `upstream_failed`.
    UpstreamFailed,
    /// Every backend timed out → 504 `upstream_timeout`.
    Timeout,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::NoData => "no_data",
            Failure::UpstreamFailed => "upstream_failed",
            Failure::Timeout => "upstream_timeout",
        }
    }
}

impl From<Failure> for Reject {
    fn from(f: Failure) -> Self {
        match f {
            Failure::NoData => Reject::NoData,
            Failure::UpstreamFailed => Reject::UpstreamFailed,
            Failure::Timeout => Reject::UpstreamTimeout,
        }
    }
}
