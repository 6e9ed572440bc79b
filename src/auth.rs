//! API keys: where a request carries one (query parameter, `X-API-Key`,
//! `Authorization: Bearer`), its SHA-256, the only form anything keeps, and
//! what the key store's answer about it means for the request.

use crate::config::keys::{self, KeyState};
use crate::reject::Reject;
use crate::request::{self, RequestHead};
use crate::store::KeyInfo;
use crate::target::Target;
use percent_encoding::percent_decode_str;

const CONFLICT: Reject = Reject::BadRequest("the request carries two different API keys");

/// The API key of a request, from any of its three sources: the target's
/// auth parameter (as the router marked it), `X-API-Key`, `Authorization:
/// Bearer`. `Ok(None)`: none given; two sources with different keys is a bad
/// request.
pub fn extract(req: &impl RequestHead, target: &Target) -> Result<Option<String>, Reject> {
    let mut found: Option<String> = None;
    let mut offer = |candidate: String| -> Result<(), Reject> {
        match &found {
            Some(k) if *k != candidate => Err(CONFLICT),
            Some(_) => Ok(()),
            None => {
                found = Some(candidate);
                Ok(())
            }
        }
    };
    for value in target.auth_values() {
        let value = percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| Reject::BadRequest("the API key is not valid UTF-8"))?;
        if !value.is_empty() {
            offer(value.into_owned())?;
        }
    }
    for value in req.values("x-api-key") {
        let v = request::text(value)
            .ok_or(Reject::BadRequest("X-API-Key is not ASCII"))?
            .trim();
        if !v.is_empty() {
            offer(v.to_string())?;
        }
    }
    for value in req.values("authorization") {
        let Some(v) = request::text(value) else {
            continue;
        };
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            let token = v[7..].trim();
            if !token.is_empty() {
                offer(token.to_string())?;
            }
        }
    }
    Ok(found)
}

/// What the store's lookup of a key means on the route named `route`:
/// admitted, at the key's own rate limit (`None`: the configured default),
/// or refused (unknown, revoked, expired, not for this route, in that order).
pub fn admit(found: Option<&KeyInfo>, route: &str) -> Result<Option<u32>, Reject> {
    let info = found.ok_or(Reject::InvalidKey)?;
    if info.state == KeyState::Revoked {
        return Err(Reject::RevokedKey);
    }
    if info.lifecycle.expires_at.is_some() && info.lifecycle.expired(keys::now()) {
        return Err(Reject::ExpiredKey);
    }
    if !info.lifecycle.allows(route) {
        return Err(Reject::RouteNotAllowed);
    }
    Ok(info.rate_per_second)
}

#[cfg(test)]
mod tests {
    use pingora::http::RequestHeader;

    use super::*;
    use crate::config::keys::Lifecycle;

    fn extract(
        req: &RequestHeader,
        query: Option<&str>,
        param: &str,
    ) -> Result<Option<String>, Reject> {
        let raw = match query {
            Some(q) => format!("/?{q}"),
            None => "/".to_string(),
        };
        let target = crate::router::parse_target(raw.as_bytes(), param)?;
        super::extract(req, &target)
    }

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn key_from_each_source() {
        assert_eq!(
            extract(&req(&[]), Some("a=1&api_key=k1"), "api_key"),
            Ok(Some("k1".into()))
        );
        assert_eq!(
            extract(&req(&[("X-API-Key", "k2")]), None, "api_key"),
            Ok(Some("k2".into()))
        );
        assert_eq!(
            extract(&req(&[("Authorization", "Bearer k3")]), None, "api_key"),
            Ok(Some("k3".into()))
        );
        assert_eq!(
            extract(&req(&[("authorization", "bearer   k4 ")]), None, "api_key"),
            Ok(Some("k4".into()))
        );
        assert_eq!(
            extract(&req(&[]), Some("token=k5"), "token"),
            Ok(Some("k5".into()))
        );
        assert_eq!(
            extract(&req(&[]), Some("api%5Fkey=k%2B6"), "api_key"),
            Ok(Some("k+6".into()))
        );
    }

    #[test]
    fn no_key_and_other_schemes() {
        assert_eq!(extract(&req(&[]), Some("x=1"), "api_key"), Ok(None));
        assert_eq!(extract(&req(&[]), Some("api_key="), "api_key"), Ok(None));
        assert_eq!(
            extract(&req(&[("Authorization", "Basic abc")]), None, "api_key"),
            Ok(None)
        );
    }

    #[test]
    fn disagreeing_sources_are_a_bad_request() {
        assert_eq!(
            extract(&req(&[("X-API-Key", "a")]), Some("api_key=b"), "api_key"),
            Err(CONFLICT)
        );
        assert_eq!(
            extract(
                &req(&[("X-API-Key", "a"), ("Authorization", "Bearer b")]),
                None,
                "api_key"
            ),
            Err(CONFLICT)
        );
        assert_eq!(
            extract(&req(&[]), Some("api_key=a&api_key=b"), "api_key"),
            Err(CONFLICT)
        );
        // The same key twice is fine.
        assert_eq!(
            extract(&req(&[("X-API-Key", "a")]), Some("api_key=a"), "api_key"),
            Ok(Some("a".into()))
        );
    }

    #[test]
    fn a_lookup_decides_admission() {
        let info = |state, rate, lifecycle| KeyInfo {
            id: "9f86d081884c".into(),
            name: "n".into(),
            rate_per_second: rate,
            state,
            lifecycle,
        };
        let plain = Lifecycle::default;
        let active = |rate| info(KeyState::Active, rate, plain());
        assert_eq!(admit(None, "r"), Err(Reject::InvalidKey));
        assert_eq!(
            admit(Some(&info(KeyState::Revoked, Some(5), plain())), "r"),
            Err(Reject::RevokedKey)
        );
        assert_eq!(admit(Some(&active(Some(5))), "r"), Ok(Some(5)));
        assert_eq!(admit(Some(&active(None)), "r"), Ok(None));
        let now = keys::now();
        let ends = |at| Lifecycle {
            expires_at: Some(at),
            ..plain()
        };
        let expired = info(KeyState::Active, None, ends(now - 1));
        assert_eq!(admit(Some(&expired), "r"), Err(Reject::ExpiredKey));
        let later = info(KeyState::Active, None, ends(now + 60));
        assert_eq!(admit(Some(&later), "r"), Ok(None));
        let scoped = info(
            KeyState::Active,
            None,
            Lifecycle {
                routes: Some(vec!["a".into(), "b".into()]),
                ..plain()
            },
        );
        assert_eq!(admit(Some(&scoped), "b"), Ok(None));
        assert_eq!(admit(Some(&scoped), "c"), Err(Reject::RouteNotAllowed));
        // Revoked before expired before the route.
        let all = Lifecycle {
            routes: Some(vec!["a".into()]),
            ..ends(now - 1)
        };
        let revoked = info(KeyState::Revoked, None, all.clone());
        assert_eq!(admit(Some(&revoked), "c"), Err(Reject::RevokedKey));
        let expired = info(KeyState::Active, None, all);
        assert_eq!(admit(Some(&expired), "c"), Err(Reject::ExpiredKey));
    }
}
