//! Why the gateway answers a request itself, and what that answer is: each
//! reason decides exactly one status, error code, message and the headers it
//! requires. A plain value: it imports nothing of the crate, so every module
//! that refuses a request can name a reason without depending on the one
//! that writes it (`respond.rs`).

/// The seed design's message for "no backend had data", kept word for word.
pub const NO_DATA_MESSAGE: &str =
    "All API Servers failed to respond - Or there is no Data for the requested resource and parameters";

/// Why the gateway answers a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NoRoute,
    MethodNotAllowed,
    UriTooLong,
    HeadersTooLarge,
    BadRequest(&'static str),
    MissingKey,
    InvalidKey,
    RevokedKey,
    ExpiredKey,
    RouteNotAllowed,
    RateLimited,
    InsufficientCredits,
    StoreUnavailable,
    NoData,
    UpstreamFailed,
    UpstreamTimeout,
    /// A fault of the gateway itself (Pingora reported an internal error).
    Internal,
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Reject::NoRoute | Reject::NoData => 404,
            Reject::MissingKey | Reject::InvalidKey | Reject::ExpiredKey => 401,
            Reject::RevokedKey | Reject::RouteNotAllowed => 403,
            Reject::RateLimited => 429,
            Reject::InsufficientCredits => 402,
            Reject::StoreUnavailable => 503,
            Reject::MethodNotAllowed => 405,
            Reject::UriTooLong => 414,
            Reject::HeadersTooLarge => 431,
            Reject::BadRequest(_) => 400,
            Reject::UpstreamFailed => 502,
            Reject::UpstreamTimeout => 504,
            Reject::Internal => 500,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Reject::NoRoute => "no_route",
            Reject::MethodNotAllowed => "method_not_allowed",
            Reject::UriTooLong => "uri_too_long",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::BadRequest(_) => "bad_request",
            Reject::MissingKey => "missing_api_key",
            Reject::InvalidKey => "invalid_api_key",
            Reject::RevokedKey => "revoked_api_key",
            Reject::ExpiredKey => "expired_api_key",
            Reject::RouteNotAllowed => "route_not_allowed",
            Reject::RateLimited => "rate_limited",
            Reject::InsufficientCredits => "insufficient_credits",
            Reject::StoreUnavailable => "store_unavailable",
            Reject::NoData => "no_data",
            Reject::UpstreamFailed => "upstream_failed",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::Internal => "internal_error",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Reject::NoRoute => "no route matches this path",
            Reject::MethodNotAllowed => "only GET and HEAD are allowed",
            Reject::UriTooLong => "the request target is over 8 KiB",
            Reject::HeadersTooLarge => "the request headers are over 32 KiB",
            Reject::BadRequest(why) => why,
            Reject::MissingKey => {
                "an API key is required: query parameter, X-API-Key header or Authorization: Bearer"
            }
            Reject::InvalidKey => "the API key is not valid",
            Reject::RevokedKey => "the API key has been revoked",
            Reject::ExpiredKey => "the API key has expired",
            Reject::RouteNotAllowed => "the API key may not call this route",
            Reject::RateLimited => {
                "too many requests for this API key; retry after Retry-After seconds"
            }
            Reject::InsufficientCredits => "not enough credits left for this request",
            Reject::StoreUnavailable => "the key store is unavailable; try again shortly",
            Reject::NoData => NO_DATA_MESSAGE,
            Reject::UpstreamFailed => "no backend server could answer",
            Reject::UpstreamTimeout => "no backend server answered in time",
            Reject::Internal => "the gateway failed to handle this request",
        }
    }

    /// Headers a reason requires (e.g. `Allow` on 405).
    pub fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Reject::MethodNotAllowed => &[("Allow", "GET, HEAD")],
            Reject::MissingKey | Reject::InvalidKey | Reject::ExpiredKey => {
                &[("WWW-Authenticate", "Bearer realm=\"tollgate\"")]
            }
            _ => &[],
        }
    }
}

impl Reject {
    /// Refused before any backend was asked (as opposed to a failed race).
    pub fn is_rejection(self) -> bool {
        !matches!(
            self,
            Reject::NoData | Reject::UpstreamFailed | Reject::UpstreamTimeout | Reject::Internal
        )
    }

    /// Every reason, for metrics set-up.
    pub const ALL: [Reject; 17] = [
        Reject::NoRoute,
        Reject::MethodNotAllowed,
        Reject::UriTooLong,
        Reject::HeadersTooLarge,
        Reject::BadRequest(""),
        Reject::MissingKey,
        Reject::InvalidKey,
        Reject::RevokedKey,
        Reject::ExpiredKey,
        Reject::RouteNotAllowed,
        Reject::RateLimited,
        Reject::InsufficientCredits,
        Reject::StoreUnavailable,
        Reject::NoData,
        Reject::UpstreamFailed,
        Reject::UpstreamTimeout,
        Reject::Internal,
    ];
}
