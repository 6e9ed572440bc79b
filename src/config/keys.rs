//! The keys file (`store.keys_file`, and `tollgate keys import`):
//! `keys: [{key | sha256, name, credits, rate_per_second, state, expires_at,
//! routes, refill}]`. Plaintext keys are hashed as they are read and never
//! kept. Every store loads keys in this form, so it lives with the
//! configuration, below them; so do the lifecycle fields' text forms, which
//! the keys file, the keys commands and the admin API share.

use std::cell::RefCell;
use std::sync::Arc;

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::Deserialize;

use super::{choice, limits, ConfigError};
use crate::key::KeyHash;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Revoked => "revoked",
        }
    }
}

const KEY_STATES: &[(&str, KeyState)] =
    &[("active", KeyState::Active), ("revoked", KeyState::Revoked)];

/// How often a key's allowance comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Daily,
    Monthly,
}

const PERIODS: &[(&str, Period)] = &[("daily", Period::Daily), ("monthly", Period::Monthly)];

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Monthly => "monthly",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        PERIODS.iter().find(|(n, _)| *n == s).map(|(_, p)| *p)
    }

    /// The UTC period `unix` seconds fall in: `YYYY-MM-DD` or `YYYY-MM`.
    pub fn label(self, unix: i64) -> String {
        let t = DateTime::<Utc>::from_timestamp(unix, 0).unwrap_or_default();
        match self {
            Period::Daily => format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day()),
            Period::Monthly => format!("{:04}-{:02}", t.year(), t.month()),
        }
    }
}

/// The labels of UTC day `day` (days since 1970-01-01) and of its month,
/// made once per day and thread: every charge on Redis passes both, and
/// formatting them each time cost a few percent of the hit path's CPU.
pub fn day_labels(day: i64) -> (Arc<str>, Arc<str>) {
    /// A day, its label and its month's.
    type Labels = (i64, Arc<str>, Arc<str>);
    thread_local! {
        static LAST: RefCell<Option<Labels>> = const { RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((d, daily, monthly)) if *d == day => (daily.clone(), monthly.clone()),
            _ => {
                let unix = day.saturating_mul(86_400);
                let daily: Arc<str> = Period::Daily.label(unix).into();
                let monthly: Arc<str> = Period::Monthly.label(unix).into();
                *last = Some((day, daily.clone(), monthly.clone()));
                (daily, monthly)
            }
        }
    })
}

/// `refill: {credits, period}`: at the first charge of a new UTC period the
/// balance becomes `credits` if it is lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    pub credits: u64,
    pub period: Period,
}

impl Refill {
    /// `CREDITS/daily`, `CREDITS/monthly` (the command line's form).
    pub fn parse(s: &str) -> Option<Refill> {
        let (credits, period) = s.split_once('/')?;
        Some(Refill {
            credits: credits.parse().ok()?,
            period: Period::parse(period)?,
        })
    }
}

impl std::fmt::Display for Refill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.credits, self.period.as_str())
    }
}

/// What a plan sets beside the balance: when the key ends, which routes it
/// may call, how its allowance refills. `None` everywhere: never, all, none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// Unix seconds after which the key is refused (401 `expired_api_key`).
    pub expires_at: Option<i64>,
    /// Route names the key may call; others answer 403 `route_not_allowed`.
    pub routes: Option<Vec<String>>,
    pub refill: Option<Refill>,
}

impl Lifecycle {
    /// Whether the key has expired at `now` (unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// Whether the key may call the route named `route`.
    pub fn allows(&self, route: &str) -> bool {
        self.routes
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == route))
    }
}

/// Parse an RFC 3339 time (any offset) into unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp())
}

/// Unix seconds as RFC 3339 in UTC, to the second (`2027-01-31T00:00:00Z`).
pub fn format_time(unix: i64) -> String {
    DateTime::<Utc>::from_timestamp(unix, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Now, in unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The problem with a route name list, if any: empty, or a name the
/// configuration does not have (`known`; `None`: not checked here).
pub fn routes_problem(names: &[String], known: Option<&[&str]>) -> Option<String> {
    if names.is_empty() {
        return Some("must name at least one route (leave it out for all routes)".into());
    }
    if let Some(bad) = names.iter().find(|n| n.is_empty() || n.contains(',')) {
        return Some(format!("\"{bad}\" is not a route name"));
    }
    let known = known?;
    let unknown: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !known.contains(n))
        .collect();
    (!unknown.is_empty()).then(|| {
        format!(
            "no route named {} in the configuration (routes: {})",
            unknown.join(", "),
            known.join(", ")
        )
    })
}

/// One key as a keys file describes it, hashed.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub hash: KeyHash,
    pub name: String,
    pub credits: u64,
    pub rate_per_second: Option<u32>,
    pub state: KeyState,
    pub lifecycle: Lifecycle,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRefill {
    credits: u64,
    period: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeys {
    keys: Vec<FileKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    key: Option<String>,
    sha256: Option<String>,
    name: String,
    credits: u64,
    rate_per_second: Option<u32>,
    #[serde(default)]
    state: Option<String>,
    expires_at: Option<String>,
    routes: Option<Vec<String>>,
    refill: Option<FileRefill>,
}

/// Parse a keys file; plaintext keys are hashed here and dropped.
pub fn parse_keys(text: &str) -> Result<Vec<KeyRecord>, Vec<ConfigError>> {
    let text = limits::precheck(text.as_bytes(), limits::MAX_KEYS_BYTES).map_err(|e| vec![e])?;
    let file: FileKeys = serde_yaml::from_str(text).map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            message: limits::locate(&e, text),
        }]
    })?;
    let mut errors = Vec::new();
    let mut records: Vec<KeyRecord> = Vec::new();
    for (i, k) in file.keys.into_iter().enumerate() {
        let Some(record) = convert_key(i, k, &mut errors) else {
            continue;
        };
        if records.iter().any(|r| r.hash == record.hash) {
            errors.push(ConfigError {
                path: format!("keys[{i}].key"),
                message: "the same key appears twice".into(),
            });
            continue;
        }
        records.push(record);
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(errors)
    }
}

/// One entry of the keys file (`keys[i]`); duplicates are the caller's to find.
fn convert_key(i: usize, k: FileKey, errors: &mut Vec<ConfigError>) -> Option<KeyRecord> {
    let mut fail = |field: &str, message: String| {
        errors.push(ConfigError {
            path: format!("keys[{i}].{field}"),
            message,
        })
    };
    let hash = key_hash(k.key.as_deref(), k.sha256.as_deref(), &mut fail);
    if k.name.is_empty() {
        fail("name", "must not be empty".into());
    }
    if let Some(e) = limits::KEY_CREDITS.problem("credits", k.credits) {
        fail("credits", e.message);
    }
    if let Some(e) = k
        .rate_per_second
        .and_then(|r| limits::KEY_RATE.problem("", r.into()))
    {
        fail("rate_per_second", e.message);
    }
    let expires_at = k.expires_at.as_deref().and_then(|t| expiry(t, &mut fail));
    if let Some(problem) = k.routes.as_deref().and_then(|r| routes_problem(r, None)) {
        fail("routes", problem);
    }
    let refill = k.refill.and_then(|r| convert_refill(r, &mut fail));
    let state = k.state.as_deref().unwrap_or("active");
    let state = choice(&format!("keys[{i}].state"), state, KEY_STATES, errors);
    Some(KeyRecord {
        hash: hash?,
        name: k.name,
        credits: k.credits,
        rate_per_second: k.rate_per_second,
        state,
        lifecycle: Lifecycle {
            expires_at,
            routes: k.routes,
            refill,
        },
    })
}

/// An entry's key hash, from exactly one of `key` (plaintext, hashed here)
/// and `sha256`; `fail` takes a problem's field and message.
fn key_hash(
    key: Option<&str>,
    sha256: Option<&str>,
    fail: &mut impl FnMut(&str, String),
) -> Option<KeyHash> {
    match (key, sha256) {
        (Some(key), None) if !key.is_empty() => Some(KeyHash::of(key)),
        (Some(_), None) => {
            fail("key", "must not be empty".into());
            None
        }
        (None, Some(hex)) => {
            let h = KeyHash::from_hex(&hex.to_ascii_lowercase());
            if h.is_none() {
                fail("sha256", format!("expected 64 hex digits, got \"{hex}\""));
            }
            h
        }
        _ => {
            fail(
                "key",
                "give exactly one of key (plaintext) or sha256".into(),
            );
            None
        }
    }
}

/// An entry's `expires_at`, in unix seconds.
fn expiry(t: &str, fail: &mut impl FnMut(&str, String)) -> Option<i64> {
    let parsed = parse_time(t);
    if parsed.is_none() {
        fail(
            "expires_at",
            format!("expected an RFC 3339 time such as 2027-01-31T00:00:00Z, got \"{t}\""),
        );
    }
    parsed
}

/// An entry's `refill`: both its credits and its period are checked, and
/// either problem is reported.
fn convert_refill(r: FileRefill, fail: &mut impl FnMut(&str, String)) -> Option<Refill> {
    if let Some(e) = limits::KEY_CREDITS.problem("", r.credits) {
        fail("refill.credits", e.message);
    }
    let period = Period::parse(&r.period);
    if period.is_none() {
        fail(
            "refill.period",
            format!("unknown value \"{}\", expected daily | monthly", r.period),
        );
    }
    Some(Refill {
        credits: r.credits,
        period: period?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_and_hashed_keys_parse() {
        let text = "keys:\n  - {key: \"demo\", name: demo, credits: 10, rate_per_second: 5}\n  - {sha256: \"9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\", name: ops, credits: 50, state: revoked}\n";
        let keys = parse_keys(text).unwrap();
        assert_eq!(keys[0].hash, KeyHash::of("demo"));
        assert_eq!(keys[0].rate_per_second, Some(5));
        assert_eq!(keys[1].hash, KeyHash::of("test"));
        assert_eq!(keys[1].state, KeyState::Revoked);
        assert_eq!(keys[1].rate_per_second, None);
    }

    #[test]
    fn bad_entries_name_index_and_field() {
        let text = "keys:\n  - {key: a, name: a, credits: 1}\n  - {sha256: \"abc\", name: b, credits: 1}\n  - {key: c, sha256: \"x\", name: c, credits: 1}\n  - {key: d, name: \"\", credits: 1, state: paused}\n  - {key: a, name: again, credits: 1}\n";
        let e: Vec<String> = parse_keys(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            e,
            vec![
                "keys[1].sha256: expected 64 hex digits, got \"abc\"",
                "keys[2].key: give exactly one of key (plaintext) or sha256",
                "keys[3].name: must not be empty",
                "keys[3].state: unknown value \"paused\", expected active | revoked",
                "keys[4].key: the same key appears twice",
            ]
        );
    }

    #[test]
    fn unknown_fields_and_types_are_errors() {
        let e = parse_keys("keys:\n  - {key: a, name: a, credits: lots}\n").unwrap_err();
        assert!(
            e[0].to_string()
                .starts_with("keys[0].credits: invalid type"),
            "{e:?}"
        );
        let e = parse_keys("keys:\n  - {key: a, name: a, credits: 1, plan: gold}\n").unwrap_err();
        assert!(e[0].to_string().contains("unknown field `plan`"), "{e:?}");
    }
}
