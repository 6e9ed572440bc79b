//! The admin API (`/v1/keys…`, `/v1/usage` on the admin listener), on when
//! `admin.token_sha256` is set: each endpoint parses its input, calls the one
//! implementation of the key operation in `keyops` (which `tollgate keys`
//! calls too), and answers JSON; errors have the gateway's error shape.
//! The bearer token is checked by its SHA-256, compared in constant time
//! (OpenSSL's `CRYPTO_memcmp`); bodies are capped at [`MAX_BODY`]; an
//! unknown field in a body is a 400 naming it.

use std::sync::Arc;

use http::{Method, Response};
use pingora::protocols::http::ServerSession;
use pingora_prometheus::prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod json;

use json::{key_json, Balance, CreateBody, Created, Page, PatchBody, TopupBody};

use super::simple;
use crate::config::keys::{self, Lifecycle, Refill};
use crate::keyops::{self, NewKey, OpError};
use crate::store::{KeyAdmin, KeyPatch, UsageLedger};
use crate::usage::{self, Export, Format};

/// The largest request body the admin API reads.
pub const MAX_BODY: usize = 64 * 1024;
/// Keys per page of `GET /v1/keys` unless `limit` says otherwise, and the most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// What the admin API needs: the store's keys, the token's hash, the
/// configuration's route names, and its counter.
pub struct KeyApi {
    pub store: Arc<dyn KeyAdmin>,
    pub ledger: Arc<dyn UsageLedger>,
    pub token_sha256: [u8; 32],
    pub routes: Vec<String>,
    pub requests: IntCounterVec,
}

/// An answer the admin API makes: status, then JSON.
struct Answer {
    status: u16,
    body: Vec<u8>,
    allow: Option<&'static str>,
}

fn ok(status: u16, body: impl Serialize) -> Answer {
    Answer {
        status,
        body: serde_json::to_vec(&body).unwrap_or_default(),
        allow: None,
    }
}

impl Answer {
    /// As the HTTP answer: JSON, with `WWW-Authenticate` on a 401 and
    /// `Allow` on a 405.
    fn into_response(self) -> Response<Vec<u8>> {
        let mut resp = simple(self.status, "application/json", self.body);
        if self.status == 401 {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"tollgate admin\""),
            );
        }
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
        }
        resp
    }
}

/// The gateway's error shape, in its field order.
#[derive(Serialize)]
struct ErrorJson<'a> {
    status: bool,
    error: &'a str,
    message: String,
}

fn fail(status: u16, code: &str, message: impl Into<String>) -> Answer {
    ok(
        status,
        ErrorJson {
            status: false,
            error: code,
            message: message.into(),
        },
    )
}

/// The answer to `/v1` while the admin API is off.
pub(super) fn off() -> Response<Vec<u8>> {
    fail(
        404,
        "no_route",
        "the admin API is off: set admin.token_sha256",
    )
    .into_response()
}

fn op_error(e: OpError) -> Answer {
    match e {
        OpError::NotFound(_) => fail(404, "unknown_key", "no key with this id"),
        OpError::Ambiguous => fail(409, "ambiguous_id", e.to_string()),
        OpError::Invalid(..) => fail(400, "bad_request", e.to_string()),
        OpError::Store(e) => {
            log::warn!("admin API: store failed: {e}");
            fail(
                503,
                "store_unavailable",
                "the key store is unavailable; try again shortly",
            )
        }
    }
}

/// A JSON body; a problem names the field it is in.
fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Answer> {
    let mut json = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        fail(400, "bad_request", format!("{at}{}", e.inner()))
    })
}

fn expires(text: Option<&str>) -> Result<Option<i64>, Answer> {
    text.map(|t| {
        keys::parse_time(t).ok_or_else(|| {
            fail(
                400,
                "bad_request",
                format!("expires_at: expected an RFC 3339 time, got \"{t}\""),
            )
        })
    })
    .transpose()
}

/// Read the whole body, at most [`MAX_BODY`] bytes.
async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Answer> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(fail(
                        413,
                        "payload_too_large",
                        format!("the body is over {} KiB", MAX_BODY / 1024),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(fail(
                    400,
                    "bad_request",
                    format!("cannot read the body: {e}"),
                ))
            }
        }
    }
}

/// The endpoint a method and path name: its metric label, and the key id
/// in the path where there is one.
enum Endpoint<'a> {
    Create,
    List,
    Show(&'a str),
    Update(&'a str),
    Topup(&'a str),
    Revoke(&'a str),
    /// A known path with another method: the methods it takes.
    Method(&'static str),
    Unknown,
}

impl Endpoint<'_> {
    fn of<'p>(method: &Method, path: &'p str) -> Endpoint<'p> {
        let parts: Vec<&str> = path
            .trim_start_matches("/v1/keys")
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        if !path.starts_with("/v1/keys") || (path.len() > 8 && !path[8..].starts_with('/')) {
            return Endpoint::Unknown;
        }
        let (m, get, post, patch) = (method, Method::GET, Method::POST, Method::PATCH);
        match parts.as_slice() {
            [] if *m == get => Endpoint::List,
            [] if *m == post => Endpoint::Create,
            [] => Endpoint::Method("GET, POST"),
            [id] if *m == get => Endpoint::Show(id),
            [id] if *m == patch => Endpoint::Update(id),
            [_] => Endpoint::Method("GET, PATCH"),
            [id, "topup"] if *m == post => Endpoint::Topup(id),
            [id, "revoke"] if *m == post => Endpoint::Revoke(id),
            [_, "topup" | "revoke"] => Endpoint::Method("POST"),
            _ => Endpoint::Unknown,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Endpoint::Create => "create",
            Endpoint::List => "list",
            Endpoint::Show(_) => "show",
            Endpoint::Update(_) => "update",
            Endpoint::Topup(_) => "topup",
            Endpoint::Revoke(_) => "revoke",
            Endpoint::Method(_) | Endpoint::Unknown => "other",
        }
    }
}

/// The endpoints' labels, for setting up the series at start.
pub const ENDPOINTS: [&str; 8] = [
    "create", "list", "show", "update", "topup", "revoke", "usage", "other",
];

impl KeyApi {
    /// Whether the request carries the admin token.
    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(value) = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let Some(token) = value
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("bearer "))
            .map(|_| value[7..].trim())
        else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        openssl::memcmp::eq(&presented, &self.token_sha256)
    }

    /// The request carries the admin token, or the 401 to answer.
    fn authorize(&self, session: &ServerSession) -> Result<(), Answer> {
        if self.authorized(session) {
            return Ok(());
        }
        Err(fail(
            401,
            "unauthorized",
            "the admin API needs Authorization: Bearer TOKEN",
        ))
    }

    /// Answer `GET /v1/usage?from=&to=&key=`: the ledger export as JSON
    /// lines, or CSV for `Accept: text/csv`, streamed a day at a time. A store
    /// failure after the first chunk ends the connection without the
    /// chunked body's end, so a client cannot take a cut export for whole.
    pub async fn usage(&self, session: &mut ServerSession) -> pingora::Result<()> {
        let started = self.start_usage(session).await;
        let (mut export_of, format) = match started {
            Ok(found) => found,
            Err(answer) => {
                self.count("usage", answer.status);
                return super::write(session, answer.into_response()).await;
            }
        };
        self.count("usage", 200);
        let mut header = pingora::http::ResponseHeader::build(200, None)?;
        header.insert_header(http::header::CONTENT_TYPE, format.content_type())?;
        header.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        session.write_response_header(Box::new(header)).await?;
        let mut export = Export::new(
            self.ledger.as_ref(),
            export_of.0,
            export_of.1.take(),
            format,
        );
        loop {
            match export.next_chunk().await {
                Ok(Some(chunk)) => session.write_response_body(chunk.into(), false).await?,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("admin API: usage export failed part way: {e}");
                    session.set_keepalive(None);
                    return pingora::Error::e_explain(
                        pingora::ErrorType::InternalError,
                        "usage export failed part way",
                    );
                }
            }
        }
        session.finish_body().await
    }

    /// Check the token and the query of a usage export: the day range and
    /// the key, and the format the client accepts.
    #[allow(clippy::type_complexity)]
    async fn start_usage(
        &self,
        session: &ServerSession,
    ) -> Result<(((i64, i64), Option<crate::key::KeyHash>), Format), Answer> {
        // The token first, as on every /v1 path: without it, not even the
        // methods a path takes are told.
        self.authorize(session)?;
        let req = session.req_header();
        if req.method != Method::GET {
            return Err(Answer {
                allow: Some("GET"),
                ..fail(405, "method_not_allowed", "this path takes GET")
            });
        }
        let (mut from, mut to, mut key) = (None, None, None);
        let query = req.uri.query().unwrap_or("");
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*name {
                "from" => &mut from,
                "to" => &mut to,
                "key" => &mut key,
                other => {
                    return Err(fail(
                        400,
                        "bad_request",
                        format!("unknown query parameter `{other}`, expected from, to or key"),
                    ))
                }
            };
            *slot = Some(value.into_owned());
        }
        let days = usage::range(from.as_deref(), to.as_deref())
            .map_err(|e| fail(400, "bad_request", e))?;
        let key = match key {
            None => None,
            Some(id) => {
                let id = self.id(&id)?;
                Some(
                    keyops::find(self.store.as_ref(), id)
                        .await
                        .map_err(op_error)?,
                )
            }
        };
        let csv = req
            .headers
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/csv"));
        let format = if csv { Format::Csv } else { Format::Jsonl };
        Ok(((days, key), format))
    }

    fn count(&self, endpoint: &str, status: u16) {
        self.requests
            .with_label_values(&[endpoint, &status.to_string()])
            .inc();
    }

    /// Answer one `/v1` request.
    pub async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        let endpoint = Endpoint::of(&method, &path);
        let answer = match self.authorize(session) {
            Ok(()) => self.answer(&endpoint, &query, session).await,
            Err(refused) => refused,
        };
        self.count(endpoint.label(), answer.status);
        answer.into_response()
    }

    async fn answer(
        &self,
        endpoint: &Endpoint<'_>,
        query: &str,
        session: &mut ServerSession,
    ) -> Answer {
        let body = match endpoint {
            Endpoint::Create | Endpoint::Update(_) | Endpoint::Topup(_) => {
                match read_body(session).await {
                    Ok(body) => body,
                    Err(answer) => return answer,
                }
            }
            _ => Vec::new(),
        };
        let result = match *endpoint {
            Endpoint::Create => self.create(&body).await,
            Endpoint::List => self.list(query).await,
            Endpoint::Show(id) => self.show(id).await,
            Endpoint::Update(id) => self.update(id, &body).await,
            Endpoint::Topup(id) => self.topup(id, &body).await,
            Endpoint::Revoke(id) => self.revoke(id).await,
            Endpoint::Method(allow) => Err(Answer {
                allow: Some(allow),
                ..fail(
                    405,
                    "method_not_allowed",
                    format!("this path takes {allow}"),
                )
            }),
            Endpoint::Unknown => Err(fail(404, "no_route", "no admin endpoint at this path")),
        };
        result.unwrap_or_else(|answer| answer)
    }

    fn routes(&self) -> Vec<&str> {
        self.routes.iter().map(String::as_str).collect()
    }

    /// A key id from the path: 12 hex digits, never a key.
    fn id<'a>(&self, id: &'a str) -> Result<&'a str, Answer> {
        if keyops::is_id(id) {
            Ok(id)
        } else {
            Err(fail(
                404,
                "unknown_key",
                "a key is named by its id, the first 12 hex digits of its SHA-256",
            ))
        }
    }

    async fn create(&self, body: &[u8]) -> Result<Answer, Answer> {
        let b: CreateBody = parse_body(body)?;
        let new = NewKey {
            name: b.name,
            credits: b.credits,
            rate_per_second: b.rate_per_second,
            lifecycle: Lifecycle {
                expires_at: expires(b.expires_at.as_deref())?,
                routes: b.routes,
                refill: b.refill.map(Refill::from),
            },
        };
        let (key, row) = keyops::create(self.store.as_ref(), new, &self.routes())
            .await
            .map_err(op_error)?;
        log::info!("admin API: created key {} ({})", row.id, row.name);
        Ok(ok(
            201,
            Created {
                key,
                row: key_json(&row),
            },
        ))
    }

    async fn list(&self, query: &str) -> Result<Answer, Answer> {
        let (mut limit, mut cursor) = (PAGE, None);
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "limit" => {
                    limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            fail(
                                400,
                                "bad_request",
                                format!("limit: expected 1 to {MAX_PAGE}"),
                            )
                        })?
                }
                "cursor" if keyops::is_id(&value) => cursor = Some(value.into_owned()),
                "cursor" => {
                    return Err(fail(
                        400,
                        "bad_request",
                        "cursor: not a cursor this API gave",
                    ))
                }
                other => {
                    return Err(fail(
                        400,
                        "bad_request",
                        format!("unknown query parameter `{other}`, expected limit or cursor"),
                    ))
                }
            }
        }
        let (rows, next) = keyops::page(self.store.as_ref(), cursor.as_deref(), limit)
            .await
            .map_err(op_error)?;
        let keys = rows.iter().map(key_json).collect();
        Ok(ok(
            200,
            Page {
                keys,
                next_cursor: next,
            },
        ))
    }

    async fn show(&self, id: &str) -> Result<Answer, Answer> {
        let row = keyops::show(self.store.as_ref(), self.id(id)?)
            .await
            .map_err(op_error)?;
        Ok(ok(200, key_json(&row)))
    }

    async fn update(&self, id: &str, body: &[u8]) -> Result<Answer, Answer> {
        let b: PatchBody = parse_body(body)?;
        let patch = KeyPatch {
            name: b.name,
            rate_per_second: b.rate_per_second,
            expires_at: match b.expires_at {
                None => None,
                Some(at) => Some(expires(at.as_deref())?),
            },
            routes: b.routes,
            refill: b.refill.map(|r| r.map(Refill::from)),
        };
        if patch.is_empty() {
            return Err(fail(
                400,
                "bad_request",
                "nothing to change: give name, rate_per_second, expires_at, routes or refill",
            ));
        }
        let row = keyops::update(self.store.as_ref(), self.id(id)?, &patch, &self.routes())
            .await
            .map_err(op_error)?;
        Ok(ok(200, key_json(&row)))
    }

    async fn topup(&self, id: &str, body: &[u8]) -> Result<Answer, Answer> {
        let b: TopupBody = parse_body(body)?;
        let (id, credits) = keyops::topup(self.store.as_ref(), self.id(id)?, b.credits)
            .await
            .map_err(op_error)?;
        Ok(ok(200, Balance { id, credits }))
    }

    async fn revoke(&self, id: &str) -> Result<Answer, Answer> {
        let row = keyops::revoke(self.store.as_ref(), self.id(id)?)
            .await
            .map_err(op_error)?;
        Ok(ok(200, key_json(&row)))
    }
}
