//! One request to one backend: take a pooled connection (or open one), send
//! the GET, read the answer up to the route's body cap, classify it with the
//! success rule, and give the connection back to the pool when it is clean.
//! Dropping the future mid-way drops the connection, which closes it: that is
//! how a losing attempt ends when it has not finished within the route's
//! `drain_losers_ms` (see `race::drain`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::header::{CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, SET_COOKIE};
use http::HeaderValue;
use pingora::connectors::TransportConnector;
use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::health::{Verdict, Watch};
use super::{AttemptRules, Outcome, Replica};
use crate::answer::Answer;
use crate::config::SuccessRule;

/// A pooled connection that fails before any answer byte was probably closed
/// by the backend while idle: try again on another connection this many times.
const STALE_CONNECTION_RETRIES: usize = 2;

/// What one attempt produced.
pub struct AttemptResult {
    pub outcome: Outcome,
    /// Present for answers (success or not); the winner's is returned.
    pub answer: Option<Answer>,
    /// Why an attempt failed, for the log; never sent to clients.
    pub detail: Option<String>,
    pub latency: Duration,
}

/// What the backend is asked for: the same for every backend of a race
/// except for the `Host` header and the backend URL's own path.
pub struct UpstreamRequest<'a> {
    /// Client path and query, auth parameter removed.
    pub path_and_query: &'a str,
    pub request_id: &'a str,
    pub forwarded_for: Option<&'a str>,
}

/// One attempt with a per-attempt timeout. The request header is built at
/// once; the returned future owns everything it needs, so that it can outlive
/// the race (see `drain`).
/// Its end (or its drop, when cancelled) is recorded in the backend's
/// health; `verdict` tells a dropped loser how long the winner took.
pub fn run(
    connector: Arc<TransportConnector>,
    replica: Arc<Replica>,
    req: &UpstreamRequest<'_>,
    rules: AttemptRules,
    verdict: Arc<Verdict>,
) -> impl std::future::Future<Output = AttemptResult> + Send + 'static {
    let header = request_header(&replica.host_header, &replica.base_path, req);
    async move {
        let started = Instant::now();
        let watch = Watch::new(replica.clone(), verdict);
        let exchange = async {
            exchange(
                &connector,
                &replica,
                header?,
                rules.max_body,
                &watch.answered,
            )
            .await
        };
        let result = judge(
            tokio::time::timeout(rules.timeout, exchange).await,
            rules,
            started,
        );
        watch.finish(result.outcome);
        result
    }
}

fn judge(
    result: Result<Result<Answer, String>, tokio::time::error::Elapsed>,
    rules: AttemptRules,
    started: Instant,
) -> AttemptResult {
    let timeout = rules.timeout;
    let (outcome, answer, detail) = match result {
        Err(_) => (
            Outcome::Timeout,
            None,
            Some(format!("no answer within {} ms", timeout.as_millis())),
        ),
        Ok(Err(why)) => (Outcome::Error, None, Some(why)),
        Ok(Ok(answer)) => {
            let outcome = classify(rules.success, answer.status, &answer.body);
            let detail = match outcome {
                Outcome::Success => None,
                _ => Some(format!("HTTP {}", answer.status)),
            };
            (outcome, Some(answer), detail)
        }
    };
    AttemptResult {
        outcome,
        answer,
        detail,
        latency: started.elapsed(),
    }
}

async fn exchange(
    connector: &TransportConnector,
    replica: &Replica,
    header: Box<RequestHeader>,
    max_body: usize,
    answered: &AtomicBool,
) -> Result<Answer, String> {
    let peer = &replica.peer;
    let mut tries = 0;
    let mut session = loop {
        let (stream, reused) = match replica.pool.take() {
            Some(stream) => (stream, true),
            None => (
                connector
                    .new_stream(peer)
                    .await
                    .map_err(|e| format!("connect: {e}"))?,
                false,
            ),
        };
        let mut session = HttpSession::new_with_options(stream, peer);
        match send_and_read_header(&mut session, header.clone()).await {
            Ok(()) => {
                answered.store(true, Ordering::Relaxed);
                break session;
            }
            Err(e) if reused && tries < STALE_CONNECTION_RETRIES => {
                log::debug!("pooled connection to {peer} failed ({e}), retrying on another");
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let answer = read_answer(&mut session, max_body).await?;
    session.respect_keepalive();
    if let Some(stream) = session.reuse().await {
        replica.pool.put(stream);
    }
    Ok(answer)
}

fn request_header(
    host_header: &str,
    base_path: &str,
    req: &UpstreamRequest<'_>,
) -> Result<Box<RequestHeader>, String> {
    let target = if base_path.is_empty() {
        req.path_and_query.as_bytes().to_vec()
    } else {
        let mut t = Vec::with_capacity(base_path.len() + req.path_and_query.len());
        t.extend_from_slice(base_path.as_bytes());
        t.extend_from_slice(req.path_and_query.as_bytes());
        t
    };
    let mut h = RequestHeader::build("GET", &target, Some(4)).map_err(|e| e.to_string())?;
    let insert = |h: &mut RequestHeader, name: &'static str, value: &str| {
        h.insert_header(name, value)
            .map_err(|e| format!("request header {name}: {e}"))
    };
    insert(&mut h, "Host", host_header)?;
    insert(&mut h, "X-Request-Id", req.request_id)?;
    if let Some(ip) = req.forwarded_for {
        insert(&mut h, "X-Forwarded-For", ip)?;
    }
    insert(
        &mut h,
        "User-Agent",
        concat!("tollgate/", env!("CARGO_PKG_VERSION")),
    )?;
    Ok(Box::new(h))
}

async fn send_and_read_header(
    session: &mut HttpSession,
    header: Box<RequestHeader>,
) -> Result<(), String> {
    session
        .write_request_header(header)
        .await
        .map_err(|e| format!("send: {e}"))?;
    // Skip informational (1xx) answers.
    loop {
        session
            .read_response()
            .await
            .map_err(|e| format!("read header: {e}"))?;
        match session.get_status() {
            Some(s) if s.is_informational() => continue,
            Some(_) => return Ok(()),
            None => return Err("read header: no status".to_string()),
        }
    }
}

async fn read_answer(session: &mut HttpSession, max_body: usize) -> Result<Answer, String> {
    let status = session.get_status().map(|s| s.as_u16()).unwrap_or(0);
    // Copied, not cloned: a parsed header value is a view into the whole
    // response-header buffer, which a cached answer would then keep alive
    // (~4 KiB per cache entry, measured with bench/run's churn rows).
    let copy = |v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).ok();
    let content_type = session.get_header(CONTENT_TYPE).and_then(copy);
    let cache_control = session.get_header(CACHE_CONTROL).and_then(copy);
    let content_encoding = session.get_header(CONTENT_ENCODING).and_then(copy);
    let sets_cookie = session.get_header(SET_COOKIE).is_some();
    let declared = std::str::from_utf8(session.get_header_bytes(CONTENT_LENGTH))
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(format!(
            "body of {} bytes is over the {max_body} byte cap",
            declared.unwrap_or(0)
        ));
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(1024));
    while let Some(chunk) = session
        .read_body_ref()
        .await
        .map_err(|e| format!("read body: {e}"))?
    {
        if body.len() + chunk.len() > max_body {
            return Err(format!("body is over the {max_body} byte cap"));
        }
        body.extend_from_slice(chunk);
    }
    Ok(Answer {
        status,
        content_type,
        cache_control,
        content_encoding,
        sets_cookie,
        body: body.freeze(),
    })
}

/// Judge an answer by the route's success rule. 5xx is a backend error; any
/// other answer that is not a success means "no data" (the backend worked).
pub fn classify(rule: SuccessRule, status: u16, body: &[u8]) -> Outcome {
    if status >= 500 {
        return Outcome::Error;
    }
    if !(200..300).contains(&status) {
        return Outcome::NoData;
    }
    match rule {
        SuccessRule::Http2xx => Outcome::Success,
        SuccessRule::JsonStatus if top_level_status(body) == Some(true) => Outcome::Success,
        SuccessRule::JsonStatus => Outcome::NoData,
    }
}

/// The top-level `status` member of a JSON object, if it is a boolean and
/// the body can be trusted with it. `Some(true)` only for a complete, valid
/// JSON document with exactly one top-level `status`: a winner is served and
/// cached, so an answer cut off by a backend crash, or with anything after the
/// object, must not win. Any other value is decided as soon as the member is
/// read (what follows is not checked): a loser's answer need not be read
/// whole. `cargo bench --bench hot -- json`, on a loaded 2-core machine where
/// the old early stop at `true` took ~0.1 µs at any size: a winner with its
/// member first now takes 0.36 µs (120 B), 19 µs (16 KiB), 1.6-1.9 ms
/// (1 MiB), the same as one with its member last before; a `false` first
/// stays at ~0.2 µs at any size.
fn top_level_status(body: &[u8]) -> Option<bool> {
    let found = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    // Stopping early makes serde_json report an error; the visitor has noted
    // its verdict by then.
    let whole = de
        .deserialize_map(StatusVisitor(&found))
        .and_then(|()| de.end());
    match found.get() {
        Some(true) if whole.is_err() => None,
        other => other,
    }
}

struct StatusVisitor<'a>(&'a Cell<Option<bool>>);

impl<'de> Visitor<'de> for StatusVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(is_status) = map.next_key_seed(IsStatus)? {
            if !is_status {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            if self.0.get().is_some() {
                // A second `status`: which one counts is anyone's guess.
                self.0.set(None);
                return Err(serde::de::Error::custom("two status members"));
            }
            let status = map.next_value::<Option<bool>>()?;
            self.0.set(status);
            if status != Some(true) {
                // Not a success whatever follows: stop reading.
                return Err(serde::de::Error::custom("decided"));
            }
        }
        Ok(())
    }
}

/// Reads an object key and says whether it is `status`, without allocating
/// (unless it has escapes).
struct IsStatus;

impl<'de> DeserializeSeed<'de> for IsStatus {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for IsStatus {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(key == "status")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_status_needs_2xx_and_top_level_true() {
        let ok = br#"{"data": {"status": false}, "status": true}"#;
        assert_eq!(classify(SuccessRule::JsonStatus, 200, ok), Outcome::Success);
        assert_eq!(classify(SuccessRule::JsonStatus, 203, ok), Outcome::Success);
        for body in [
            &br#"{"status": false}"#[..],
            br#"{"status": "true"}"#,
            br#"{"data": {"status": true}}"#,
            br#"[{"status": true}]"#,
            br#"{"status": null}"#,
            br#"{"data": [1, 2, {"status": true}], "status": 1}"#,
            br#"{"data": {"status": true}, "x": ["#,
            b"not json",
            b"",
        ] {
            assert_eq!(
                classify(SuccessRule::JsonStatus, 200, body),
                Outcome::NoData
            );
        }
        // The member may come after anything, and may be spelt with escapes.
        let late = br#"{"data": [{"status": false}, "x"], "n": null, "st\u0061tus": true}"#;
        assert_eq!(
            classify(SuccessRule::JsonStatus, 200, late),
            Outcome::Success
        );
        // Invalid JSON before the member is not a success.
        let broken = br#"{"data": [1,, 2], "status": true}"#;
        assert_eq!(
            classify(SuccessRule::JsonStatus, 200, broken),
            Outcome::NoData
        );
        assert_eq!(classify(SuccessRule::JsonStatus, 404, ok), Outcome::NoData);
        assert_eq!(classify(SuccessRule::JsonStatus, 503, ok), Outcome::Error);
    }

    #[test]
    fn json_status_winner_must_be_one_whole_document() {
        let whole = br#" {"status": true, "data": [1, 2, {"a": "}"}]} "#;
        assert_eq!(
            classify(SuccessRule::JsonStatus, 200, whole),
            Outcome::Success
        );
        for body in [
            // Cut off after the member (a close-delimited answer whose
            // backend crashed).
            &br#"{"status": true, "data": [1,2,"#[..],
            br#"{"status": true"#,
            br#"{"status": true, "data": "abc"#,
            // Invalid or extra bytes after the object.
            br#"{"status": true, "data": [1,, 2]}"#,
            br#"{"status": true} garbage"#,
            br#"{"status": true}{"status": true}"#,
            br#"{"status": true}}"#,
            // Two top-level members: ambiguous.
            br#"{"status": true, "status": true}"#,
            br#"{"status": true, "data": 1, "status": false}"#,
            br#"{"status": false, "status": true}"#,
            br#"{"status": true, "st\u0061tus": true}"#,
        ] {
            assert_eq!(
                classify(SuccessRule::JsonStatus, 200, body),
                Outcome::NoData,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // A member that decides "no success" ends the reading: a loser's
        // invalid rest does not matter.
        assert_eq!(
            top_level_status(br#"{"status": false, "x": [1,"#),
            Some(false)
        );
        assert_eq!(top_level_status(br#"{"status": true, "x": [1,"#), None);
    }

    #[test]
    fn http_2xx_ignores_the_body() {
        assert_eq!(classify(SuccessRule::Http2xx, 200, b"x"), Outcome::Success);
        assert_eq!(classify(SuccessRule::Http2xx, 301, b""), Outcome::NoData);
        assert_eq!(classify(SuccessRule::Http2xx, 500, b""), Outcome::Error);
    }

    #[test]
    fn request_header_joins_base_path_and_sets_host() {
        let req = UpstreamRequest {
            path_and_query: "/api/v1/eod/AAPL?from=2020",
            request_id: "abc",
            forwarded_for: Some("10.0.0.1"),
        };
        let h = request_header("example:9001", "/base", &req).unwrap();
        assert_eq!(h.raw_path(), b"/base/api/v1/eod/AAPL?from=2020");
        assert_eq!(h.headers.get("host").unwrap(), "example:9001");
        assert_eq!(h.headers.get("x-request-id").unwrap(), "abc");
        assert_eq!(h.headers.get("x-forwarded-for").unwrap(), "10.0.0.1");
    }
}
