//! Where keys and balances live: one [`Store`] trait, implemented by the
//! embedded in-process store (`memory`) and, next, by Redis. The proxy only
//! sees the trait, so it does not change when the store does. The keys file
//! format is configuration: `config::keys`.
//!
//! The response cache's tier shared between nodes is a trait of its own,
//! [`SharedCache`]: only the Redis store has one, and the cache sees nothing
//! of keys and balances.

pub mod memory;
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::keys::{KeyRecord, KeyState};
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
