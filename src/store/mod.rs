//! Where keys and balances live: one [`Store`] trait, implemented by the
//! embedded in-process store (`memory`) and, next, by Redis. The proxy only
//! sees the trait, so it does not change when the store does. Also the keys
//! file format (`keys: [{key | sha256, name, credits, rate_per_second, state}]`).
//!
//! The response cache's tier shared between nodes is a trait of its own,
//! [`SharedCache`]: only the Redis store has one, and the cache sees nothing
//! of keys and balances.

pub mod memory;
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use crate::config::ConfigError;
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

/// A key's metadata (not its balance, which only `charge` decides on).
#[derive(Debug, Clone)]
pub struct KeyInfo {
    /// First 12 hex digits of the key's SHA-256: safe to log.
    pub id: String,
    pub name: String,
    /// The key's own rate limit; `None`: the configured default.
    pub rate_per_second: Option<u32>,
    pub state: KeyState,
}

/// A key as `tollgate keys list|show` prints it (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub credits: u64,
    pub rate_per_second: Option<u32>,
    pub state: KeyState,
    /// Unix seconds, where the store records it.
    pub created: Option<u64>,
}

impl KeyRow {
    pub fn of(record: &KeyRecord) -> KeyRow {
        KeyRow {
            id: record.hash.id(),
            name: record.name.clone(),
            credits: record.credits,
            rate_per_second: record.rate_per_second,
            state: record.state,
            created: None,
        }
    }
}

/// The outcome of an atomic check-and-charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    Charged { remaining: u64 },
    Insufficient { remaining: u64 },
    Unknown,
    Revoked,
}

/// The store could not answer (Redis down, timeout…).
#[derive(Debug, Clone)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Keys and balances.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key's metadata, `None` if unknown. A store that cannot vouch for
    /// "unknown" (a Redis that lost its data) answers an error instead.
    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyInfo>>, StoreError>;
    /// Check state and balance and take `cost` credits, atomically: N credits
    /// buy exactly N unit-cost charges under any concurrency. An error means
    /// not charged, even if the store learns of the call later.
    async fn charge(&self, hash: &KeyHash, cost: u64) -> Result<Charge, StoreError>;
    /// Give `amount` credits back; returns the new balance if the key exists
    /// and it is known now (`None` also for a refund queued until the store
    /// answers again, which then applies it once).
    async fn refund(&self, hash: &KeyHash, amount: u64) -> Result<Option<u64>, StoreError>;
}

/// The response cache's tier shared between nodes (Redis). The embedded
/// store has none: its in-process cache tier is all there is.
#[async_trait]
pub trait SharedCache: Send + Sync + 'static {
    /// Read an entry.
    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Write an entry, expiring after `ttl`.
    async fn cache_put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StoreError>;
}

/// One key as a keys file describes it, hashed.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub hash: KeyHash,
    pub name: String,
    pub credits: u64,
    pub rate_per_second: Option<u32>,
    pub state: KeyState,
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
}

/// Parse a keys file; plaintext keys are hashed here and dropped.
pub fn parse_keys(text: &str) -> Result<Vec<KeyRecord>, Vec<ConfigError>> {
    use crate::config::limits;
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
        let mut fail = |field: &str, message: String| {
            errors.push(ConfigError {
                path: format!("keys[{i}].{field}"),
                message,
            })
        };
        let hash = match (&k.key, &k.sha256) {
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
        };
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
        let state = match k.state.as_deref() {
            None | Some("active") => KeyState::Active,
            Some("revoked") => KeyState::Revoked,
            Some(other) => {
                fail(
                    "state",
                    format!("unknown value \"{other}\", expected active | revoked"),
                );
                KeyState::Active
            }
        };
        let Some(hash) = hash else { continue };
        if records.iter().any(|r| r.hash == hash) {
            fail("key", "the same key appears twice".into());
            continue;
        }
        records.push(KeyRecord {
            hash,
            name: k.name,
            credits: k.credits,
            rate_per_second: k.rate_per_second,
            state,
        });
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(errors)
    }
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
