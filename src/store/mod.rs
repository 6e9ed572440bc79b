//! Where keys and balances live: one [`Store`] trait, implemented by the
//! embedded in-process store (`memory`) and, next, by Redis. The proxy only
//! sees the trait, so it does not change when the store does. The keys file
//! format is configuration: `config::keys`.
//!
//! The response cache's tier shared between nodes is a trait of its own,
//! [`SharedCache`]: only the Redis store has one, and the cache sees nothing
//! of keys and balances.

pub mod leases;
pub mod memory;
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::keys::{KeyRecord, KeyState, Lifecycle, Refill};
use crate::key::KeyHash;
use async_trait::async_trait;

/// A key's metadata (not its balance, which only `charge` decides on).
#[derive(Debug, Clone)]
pub struct KeyInfo {
    /// First 12 hex digits of the key's SHA-256: safe to log.
    pub id: String,
    pub name: String,
    /// The key's own rate limit; `None`: the configured default.
    pub rate_per_second: Option<u32>,
    pub state: KeyState,
    pub lifecycle: Lifecycle,
}

/// A key as `tollgate keys list|show` and the admin API show it (never the
/// key itself, nor its full hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub credits: u64,
    pub rate_per_second: Option<u32>,
    pub state: KeyState,
    /// Unix seconds, where the store records it.
    pub created: Option<u64>,
    pub lifecycle: Lifecycle,
    /// The refill period (`YYYY-MM-DD` or `YYYY-MM`) last applied.
    pub refilled_for: Option<String>,
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
            lifecycle: record.lifecycle.clone(),
            refilled_for: None,
        }
    }
}

/// A change to a key's settings (`keys update`, `PATCH /v1/keys/{id}`):
/// `None` leaves a field as it is; `Some(None)` clears it (default rate,
/// never expires, all routes, no refill).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub rate_per_second: Option<Option<u32>>,
    pub expires_at: Option<Option<i64>>,
    pub routes: Option<Option<Vec<String>>>,
    pub refill: Option<Option<Refill>>,
}

impl KeyPatch {
    pub fn is_empty(&self) -> bool {
        *self == KeyPatch::default()
    }
}

/// The usage ledger row a charge, its refund and its cache hit are written
/// to: the route, and the UTC day of the charge (a request counts once, in
/// the day it was charged, even when refunded after midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Usage {
    pub route: &'static str,
    /// Days since 1970-01-01, UTC.
    pub day: i64,
}

impl Usage {
    /// A charge on `route` now.
    pub fn now(route: &'static str) -> Usage {
        Usage {
            route,
            day: crate::config::keys::now().div_euclid(86_400),
        }
    }

    /// The day as `YYYY-MM-DD`.
    pub fn date(&self) -> Arc<str> {
        crate::config::keys::day_labels(self.day).0
    }

    /// The oldest day a ledger kept `keep_days` days holds on `today`: a
    /// day is kept from itself through `keep_days - 1` days later (`today`
    /// counts as one; 0 keeps none). Both stores read by this rule, so they
    /// export the same days whenever rows were written.
    pub fn oldest_kept(today: i64, keep_days: i64) -> i64 {
        today - keep_days + 1
    }
}

/// One row of the usage ledger: a key's use of a route on a UTC day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub key_id: String,
    pub name: String,
    pub route: String,
    /// Answers delivered (charged and not refunded as undelivered).
    pub requests: u64,
    /// Credits charged, net of refunds.
    pub credits: u64,
    pub refunded: u64,
    pub cache_hits: u64,
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
    /// not charged, even if the store learns of the call later. The usage
    /// ledger counts the request and its credits in the same step.
    async fn charge(&self, hash: &KeyHash, cost: u64, usage: Usage) -> Result<Charge, StoreError>;
    /// Give `amount` credits of a charge back (and take them off its ledger
    /// row, counted as refunded; `delivered: false` takes the request off
    /// too); returns the new balance if the key exists and it is known now
    /// (`None` also for a refund queued until the store answers again, which
    /// then applies it once).
    async fn refund(
        &self,
        hash: &KeyHash,
        amount: u64,
        usage: Usage,
        delivered: bool,
    ) -> Result<Option<u64>, StoreError>;
    /// A cached answer of a charged request was delivered: counted in the
    /// ledger's `cache_hits` (on Redis within a second, batched).
    fn cache_hit(&self, hash: &KeyHash, usage: Usage);
    /// How much longer than `store.timeout_ms` a charge may take on
    /// purpose (leases: waiting for other nodes to give credits back).
    fn charge_wait(&self) -> Duration {
        Duration::ZERO
    }
}

/// Reading the usage ledger (`tollgate usage`, `GET /v1/usage`).
#[async_trait]
pub trait UsageLedger: Send + Sync + 'static {
    /// The rows of one UTC day (days since 1970-01-01), of one key or all,
    /// sorted by key id, then route.
    async fn usage_day(&self, day: i64, key: Option<&KeyHash>)
        -> Result<Vec<UsageRow>, StoreError>;
}

/// Managing keys: what `tollgate keys` and the admin API do to a store,
/// through `keyops`, which holds the one implementation both use.
#[async_trait]
pub trait KeyAdmin: Send + Sync + 'static {
    /// Store a new key; `false` if it exists already (nothing changed). A
    /// key with a refill counts as refilled for the current period.
    async fn insert(&self, record: &KeyRecord) -> Result<bool, StoreError>;
    /// All of a key's fields, `None` if unknown.
    async fn row(&self, hash: &KeyHash) -> Result<Option<KeyRow>, StoreError>;
    /// The keys whose id starts with `id_prefix` (all keys for "").
    async fn find_by_id(&self, id_prefix: &str) -> Result<Vec<KeyHash>, StoreError>;
    /// Apply `patch`; `false` if the key is unknown.
    async fn update(&self, hash: &KeyHash, patch: &KeyPatch) -> Result<bool, StoreError>;
    /// Add credits; the new balance, `None` if the key is unknown.
    async fn add_credits(&self, hash: &KeyHash, credits: u64) -> Result<Option<u64>, StoreError>;
    /// Set a key's state; `false` if the key is unknown.
    async fn set_state(&self, hash: &KeyHash, state: KeyState) -> Result<bool, StoreError>;
    /// A key was created: a store that must be marked as set up is marked.
    async fn created(&self) -> Result<(), StoreError> {
        Ok(())
    }
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
