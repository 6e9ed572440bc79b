//! The Redis store, shared by every gateway node: one Redis, Sentinel or
//! Cluster (`conn`). A key is a hash at `{prefix}key:{<sha256>}`, the braces
//! literal (name, credits, rate_per_second, state, created): a Cluster hash
//! tag, so that everything about a key is in one slot.
//! The credit decision is one Lua script per request (EVALSHA, reloaded on
//! NOSCRIPT), so nodes never overspend; key metadata is cached in process for
//! at most [`META_TTL`]. The connection is made on first use, i.e. inside the
//! service after Pingora daemonized, and the connection manager reconnects by
//! itself. Every call is bounded by `store.timeout_ms`.
//!
//! A call that timed out may still run: the command was sent, and a stalled
//! Redis runs it when it wakes. So every charge and refund (and each write
//! of cache hits to the usage ledger) carries an id, and the script that
//! applies it leaves a marker `{prefix}key:{<sha256>}:op:{id}` for
//! [`OP_MEMORY`]. A charge whose answer the gateway did not see was
//! answered as not charged (503, or served uncharged with `on_error: allow`),
//! so it is cancelled: given back if it ran, made a no-op if it has not run
//! yet. A refund whose answer was not seen is sent again with the same id,
//! which applies it once. Both wait in a bounded queue, settled by
//! [`Maintenance`] once Redis answers again.
//!
//! A Redis that restarted without its data would otherwise make every key
//! unknown (401 for every customer). `tollgate keys import`/`create` write a
//! marker `{prefix}store`; while it is missing, an unknown key is a store
//! error (`on_error` decides), counted as `tollgate_store_errors_total{op="setup"}`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_memory_cache::{CacheStatus, MemoryCache};
use redis::{AsyncCommands, ErrorKind, RedisError, Script};
use tokio::sync::Notify;

mod admin;
mod conn;
pub mod lease;
mod scripts;
mod upkeep;
mod usage;

use conn::{Conn, Connector};

use upkeep::{InFlight, Unsettled, SETUP_UNKNOWN};
pub use upkeep::{
    Maintenance, Marker, StoreCounters, OP_MEMORY, SETTLE_QUEUE_MAX, SETUP_CHECK_EVERY,
};

use super::{Charge, KeyInfo, SharedCache, Store, StoreError, Usage};
use crate::config::keys;
use crate::config::RedisConfig;
use crate::key::KeyHash;

/// How long key metadata (state, rate) may be served from the process cache:
/// a revocation or a rate change shows on every node within this time.
pub const META_TTL: Duration = Duration::from_secs(1);
/// Keys whose metadata the process cache holds (pingora-memory-cache,
/// TinyUFO: the least used go first). It allocates for its size up front:
/// 0.5 MB of RSS at 10,000 entries, 6.8 MB at 100,000 (measured), so a key
/// beyond the most used 10,000 costs a Redis round trip more per second.
const META_CACHE_ENTRIES: usize = 10_000;
/// While Redis cannot answer a lookup (a failover, a partition), a key's last
/// metadata read on this node stands this long past [`META_TTL`]: with
/// `on_error: allow` the key keeps its own rate limit and a revoked key stays
/// refused; a key not read here recently gets the default rate.
const META_IF_ERROR: Duration = Duration::from_secs(300);
/// `usage.retention_days` unless configured.
const DEFAULT_RETENTION_DAYS: u64 = 400;

/// The fields a key lookup reads, in [`INFO_FIELDS`]' order.
type Fields = Vec<Option<String>>;
const INFO_FIELDS: [&str; 5] = ["name", "rate_per_second", "state", "expires_at", "routes"];

/// Key metadata as last read from Redis (`None`: unknown key), with the key
/// it is for: the memory cache files entries under a 64-bit hash of the key,
/// and two keys sharing one must not share their metadata.
type CachedInfo = (KeyHash, Option<Arc<KeyInfo>>, Arc<Freshness>);

/// When a cached key's metadata was read, and whether a request is reading
/// it again: past [`META_REFRESH`] one request refreshes it while the others
/// go on with the cached copy, so that a key's traffic does not all wait
/// for Redis once a second (measured: with Redis 20 ms away that wait was
/// the hit path's p99).
pub struct Freshness {
    read: Instant,
    refreshing: AtomicBool,
}

/// Past this age one request reads a cached key's metadata again.
const META_REFRESH: Duration = Duration::from_millis(750);

/// A failed call, and whether Redis may have run it all the same.
struct Failure {
    error: StoreError,
    maybe_ran: bool,
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure {
            error,
            maybe_ran: false,
        }
    }
}

/// Whether a command that failed with `e` may have run: anything but a
/// refused connection or an error answer from Redis itself.
fn maybe_ran(e: &RedisError) -> bool {
    !(e.is_connection_refusal() || matches!(e.kind(), ErrorKind::Server(_)))
}

pub struct RedisStore {
    connector: Connector,
    prefix: String,
    timeout: Duration,
    meta: MemoryCache<KeyHash, CachedInfo>,
    charge: Script,
    cancel: Script,
    refund: Script,
    add_hits: Script,
    insert: Script,
    add: Script,
    set_state: Script,
    update: Script,
    /// `usage.retention_days` in seconds, as the scripts take it ("0": no ledger).
    usage_ttl: String,
    /// Cache hits not yet written to the ledger (see `usage`).
    hits: Mutex<usage::Hits>,
    unsettled: Mutex<VecDeque<Unsettled>>,
    settle_wake: Notify,
    counters: Option<StoreCounters>,
    /// SETUP_*: whether `{prefix}store` was there at the last periodic look.
    setup: AtomicU8,
    /// A lookup found a key but no marker: the store has data.
    seen_key: AtomicBool,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl RedisStore {
    /// Check the settings; nothing connects until the first call.
    pub fn new(
        config: &RedisConfig,
        prefix: &str,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        Ok(RedisStore {
            connector: Connector::new(config, timeout).map_err(err)?,
            prefix: prefix.to_string(),
            timeout,
            meta: MemoryCache::new(META_CACHE_ENTRIES),
            charge: Script::new(scripts::CHARGE),
            cancel: Script::new(scripts::CANCEL),
            refund: Script::new(scripts::REFUND),
            add_hits: Script::new(scripts::HITS),
            insert: Script::new(admin::INSERT_LUA),
            add: Script::new(admin::ADD_LUA),
            set_state: Script::new(admin::STATE_LUA),
            update: Script::new(admin::UPDATE_LUA),
            usage_ttl: (DEFAULT_RETENTION_DAYS * 86_400).to_string(),
            hits: Mutex::new(usage::Hits::default()),
            unsettled: Mutex::new(VecDeque::new()),
            settle_wake: Notify::new(),
            counters: None,
            setup: AtomicU8::new(SETUP_UNKNOWN),
            seen_key: AtomicBool::new(false),
        })
    }

    /// Keep the usage ledger this many days (0: none).
    pub fn with_usage_retention(mut self, days: u32) -> RedisStore {
        self.usage_ttl = (u64::from(days) * 86_400).to_string();
        self
    }

    /// Count what the store does on its own in these series.
    pub fn with_counters(mut self, counters: StoreCounters) -> RedisStore {
        self.counters = Some(counters);
        self
    }

    /// A key's hash: `{prefix}key:{<sha256>}`, the braces literal (a
    /// Cluster hash tag: the key and its operation markers share a slot).
    fn redis_key(&self, hash: &KeyHash) -> String {
        self.key_name(&hash.hex())
    }

    /// [`Self::redis_key`] of a hash already in hex.
    fn key_name(&self, hex: &str) -> String {
        format!("{}key:{{{hex}}}", self.prefix)
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.connector.conn().await.map_err(|e| {
            self.connector.failed(Some(&e));
            err(e)
        })
    }

    /// Run one Redis call under the store's timeout.
    async fn bounded<T, F>(&self, call: F) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        self.call(call).await.map_err(|f| f.error)
    }

    /// [`Self::bounded`], saying whether a failed call may have run.
    async fn call<T, F>(&self, call: F) -> Result<T, Failure>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.connector.failed(Some(&e));
                Err(Failure {
                    maybe_ran: maybe_ran(&e),
                    error: err(e),
                })
            }
            Err(_) => Err({
                self.connector.failed(None);
                Failure {
                    error: StoreError(format!(
                        "no answer from Redis within {} ms",
                        self.timeout.as_millis()
                    )),
                    maybe_ran: true,
                }
            }),
        }
    }

    fn marker(&self) -> String {
        format!("{}store", self.prefix)
    }

    /// Run a script on a key, the marker of operation `id` and the key's
    /// ledger row for `usage`.
    async fn script_op<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        hash: &KeyHash,
        id: u64,
        usage: Usage,
        args: &[&str],
    ) -> Result<T, Failure> {
        let mut c = self.conn().await?;
        // The three names from one hex encoding of the hash: the key, where
        // the script remembers operation `id` (beside the key, under its
        // hash tag) and the ledger row.
        let hex = hash.hex();
        let key = self.key_name(&hex);
        let op = format!("{key}:op:{id:016x}");
        let mut call = script.key(key);
        call.key(op);
        call.key(self.usage_name(&hex, &usage.date()));
        for a in args {
            call.arg(a);
        }
        self.call(call.invoke_async(&mut c)).await
    }

    fn op_memory_ms() -> String {
        u64::try_from(OP_MEMORY.as_millis())
            .unwrap_or(u64::MAX)
            .to_string()
    }

    /// Apply refund `id` (at most once); the new balance, `None` if the key
    /// is unknown or the refund was applied before.
    async fn apply_refund(
        &self,
        hash: &KeyHash,
        id: u64,
        amount: u64,
        usage: Usage,
        delivered: bool,
    ) -> Result<Option<u64>, Failure> {
        let (amount, memory) = (amount.to_string(), Self::op_memory_ms());
        let delivered = if delivered { "1" } else { "0" };
        let args = [&amount, &memory, usage.route, &self.usage_ttl, delivered];
        let balance: i64 = self.script_op(&self.refund, hash, id, usage, &args).await?;
        Ok(u64::try_from(balance).ok())
    }

    /// Run one of the scripts on a key (EVALSHA, reloaded on NOSCRIPT).
    async fn script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        hash: &KeyHash,
        arg: impl redis::ToRedisArgs,
    ) -> Result<T, StoreError> {
        let mut c = self.conn().await?;
        let mut call = script.key(self.redis_key(hash));
        call.arg(arg);
        self.bounded(call.invoke_async(&mut c)).await
    }

    /// A key's metadata and what the store marker says: a key is unknown
    /// only in a store that is set up. On one Redis one round trip (a
    /// pipeline). On a Cluster the marker lives in a slot of its own, on one
    /// master, and matters only for a key that is not found: it is read
    /// only then, and one that cannot be read (its shard is down) is `None`.
    /// Read with every lookup, a stalled master holding it would hold the
    /// lookups of every key to `timeout_ms` (503s on the masters that are
    /// up), and every node's lookups would land on that one master.
    async fn fields_and_marker(
        &self,
        hash: &KeyHash,
    ) -> Result<(Fields, Option<Marker>), StoreError> {
        let mut c = self.conn().await?;
        let mut fields = redis::cmd("HMGET");
        fields.arg(self.redis_key(hash)).arg(&INFO_FIELDS);
        let mut marker = redis::cmd("GET");
        marker.arg(self.marker());
        if self.connector.is_cluster() {
            let f: Fields = self.bounded(fields.query_async(&mut c)).await?;
            if key_found(&f) {
                return Ok((f, None));
            }
            let m = self
                .bounded(marker.query_async::<Option<String>>(&mut c))
                .await;
            return Ok((f, m.ok().map(|m| Marker::of(m.as_deref()))));
        }
        let (f, m): (Fields, Option<String>) = self
            .bounded(
                redis::pipe()
                    .add_command(fields)
                    .add_command(marker)
                    .query_async(&mut c),
            )
            .await?;
        Ok((f, Some(Marker::of(m.as_deref()))))
    }

    fn forget(&self, hash: &KeyHash) {
        self.meta.remove(hash);
    }

    /// The names matching a glob `pattern`, by SCAN (never KEYS, which
    /// blocks Redis): on a Cluster, on every master in turn. Each page is one
    /// call under the store's timeout. For the keys commands, not for requests.
    pub(super) async fn names(&self, pattern: &str) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn().await?;
        let mut names = Vec::new();
        for node in self.bounded(c.scan_nodes()).await? {
            let mut cursor = 0;
            loop {
                let (next, page) = self.bounded(c.scan_page(&node, cursor, pattern)).await?;
                names.extend(page);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(names)
    }

    /// The keys whose id starts with `id_prefix` (all keys for "").
    async fn hashes(&self, id_prefix: &str) -> Result<Vec<KeyHash>, StoreError> {
        let pattern = format!("{}key:{{{id_prefix}*", self.prefix);
        let names = self.names(&pattern).await?;
        Ok(names
            .iter()
            .filter_map(|n| key_hash_of(n, &self.prefix))
            .collect())
    }
}

/// The key a Redis name is the hash of (`{prefix}key:{<sha256>}`; not an
/// operation marker, not the layout before the hash tag).
fn key_hash_of(name: &str, prefix: &str) -> Option<KeyHash> {
    name.strip_prefix(prefix)?
        .strip_prefix("key:{")?
        .strip_suffix('}')
        .and_then(KeyHash::from_hex)
}

/// Whether a lookup's [`INFO_FIELDS`] found the key (it has a state).
fn key_found(fields: &Fields) -> bool {
    fields.get(2).is_some_and(Option::is_some)
}

/// Whether a Redis key name is a key's hash (not an operation marker).
fn is_key_name(name: &str, prefix: &str) -> bool {
    key_hash_of(name, prefix).is_some()
}

/// Today's and this month's refill periods (UTC), for the charge script.
fn periods() -> (Arc<str>, Arc<str>) {
    keys::day_labels(keys::now().div_euclid(86_400))
}

impl RedisStore {
    /// The copy of a key's metadata that stands while Redis cannot answer:
    /// the last one read for this key, at most [`META_IF_ERROR`] past its
    /// TTL (or still fresh, when a refresh failed).
    fn fallback(&self, hash: &KeyHash) -> Option<(Option<Arc<KeyInfo>>, Arc<Freshness>)> {
        match self.meta.get_stale(hash) {
            (Some((cached, info, fresh)), status)
                if cached == *hash
                    && match status {
                        CacheStatus::Stale(age) => age < META_IF_ERROR,
                        _ => true,
                    } =>
            {
                Some((info, fresh))
            }
            _ => None,
        }
    }

    /// A key's metadata read from Redis (and cached), or the copy last read
    /// when Redis cannot answer. Boxed: the Redis call's state is large, and
    /// the metadata cache answers almost every lookup without it (inline,
    /// every lookup's future would be that large, and copied).
    fn read_key<'a>(
        &'a self,
        hash: &'a KeyHash,
    ) -> futures::future::BoxFuture<'a, Result<Option<Arc<KeyInfo>>, StoreError>> {
        Box::pin(async move {
            // With a copy to fall back on, give Redis three quarters of the
            // request's store budget: a stalled Redis then leaves time to
            // serve from the copy (and, with leases, to charge in process)
            // instead of spending the whole budget waiting.
            let read = self.fields_and_marker(hash);
            let read = if self.fallback(hash).is_some() {
                tokio::time::timeout(self.timeout * 3 / 4, read)
                    .await
                    .unwrap_or_else(|_| Err(StoreError("no answer to a key lookup in time".into())))
            } else {
                read.await
            };
            let (fields, marker) = match read {
                Ok(found) => found,
                Err(e) => match self.fallback(hash) {
                    Some((info, fresh)) => {
                        fresh.refreshing.store(false, Ordering::Release);
                        return Ok(info);
                    }
                    None => return Err(e),
                },
            };
            let found = key_found(&fields);
            match (marker, found) {
                (Some(Marker::Current), _) => {}
                // A Cluster, which reads no marker for a found key.
                (None, true) => {}
                (None, false) => {
                    return Err(StoreError(format!(
                        "cannot read the {} marker (its shard is down?)",
                        self.marker()
                    )))
                }
                (Some(Marker::OldLayout), _) | (Some(Marker::Missing), false) => {
                    return Err(self.not_set_up());
                }
                // A key, but no marker: a store set up by an older tollgate.
                (Some(Marker::Missing), true) => self.seen_key.store(true, Ordering::Relaxed),
            }
            let info = admin::info_of(hash, &fields).map(Arc::new);
            let fresh = Arc::new(Freshness {
                read: Instant::now(),
                refreshing: AtomicBool::new(false),
            });
            self.meta
                .put(hash, (*hash, info.clone(), fresh), Some(META_TTL));
            Ok(info)
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyInfo>>, StoreError> {
        if let (Some((cached, info, fresh)), _) = self.meta.get(hash) {
            let stale = fresh.read.elapsed() >= META_REFRESH;
            // Fresh enough, or another request is reading it again.
            let use_cached = !stale || fresh.refreshing.swap(true, Ordering::AcqRel);
            if cached == *hash && use_cached {
                return Ok(info);
            }
        }
        self.read_key(hash).await
    }

    async fn charge(&self, hash: &KeyHash, cost: u64, usage: Usage) -> Result<Charge, StoreError> {
        let id = rand::random::<u64>();
        let in_flight = InFlight {
            store: self,
            op: Some(Unsettled::Charge {
                hash: *hash,
                id,
                usage,
                sent: Instant::now(),
            }),
        };
        let (day, month) = periods();
        let (price, memory) = (cost.to_string(), Self::op_memory_ms());
        let args: [&str; 6] = [&price, &memory, &day, &month, usage.route, &self.usage_ttl];
        let result = self.script_op(&self.charge, hash, id, usage, &args).await;
        let (code, balance): (i64, i64) = match result {
            Ok(answer) => {
                in_flight.seen();
                answer
            }
            Err(f) => {
                if !f.maybe_ran {
                    in_flight.seen();
                }
                // Otherwise `in_flight` queues the charge to be cancelled:
                // it is answered as not charged.
                return Err(f.error);
            }
        };
        let balance = u64::try_from(balance).unwrap_or(0);
        Ok(match code {
            3 => Charge::Charged { remaining: balance },
            2 => Charge::Insufficient { remaining: balance },
            1 => {
                self.forget(hash);
                Charge::Revoked
            }
            4 => return Err(StoreError("charge cancelled before it ran".into())),
            _ => {
                self.forget(hash);
                // The key was there at the lookup: did the store lose it?
                if !self.is_set_up().await? {
                    return Err(self.not_set_up());
                }
                Charge::Unknown
            }
        })
    }

    /// Applied once, even when retried; a refund whose outcome was not seen
    /// is queued and applied when Redis answers again (`Ok(None)`: the new
    /// balance is not known yet).
    async fn refund(
        &self,
        hash: &KeyHash,
        amount: u64,
        usage: Usage,
        delivered: bool,
    ) -> Result<Option<u64>, StoreError> {
        let id = rand::random::<u64>();
        let in_flight = InFlight {
            store: self,
            op: Some(Unsettled::Refund {
                hash: *hash,
                id,
                amount,
                usage,
                delivered,
                maybe_ran: Some(Instant::now()),
            }),
        };
        match self.apply_refund(hash, id, amount, usage, delivered).await {
            Ok(balance) => {
                in_flight.seen();
                Ok(balance)
            }
            Err(f) => {
                let Some(mut op) = in_flight.take() else {
                    return Err(f.error);
                };
                if let (Unsettled::Refund { maybe_ran, .. }, false) = (&mut op, f.maybe_ran) {
                    *maybe_ran = None;
                }
                if self.defer(op) {
                    log::warn!(
                        "store: refund to key {} queued until Redis answers: {}",
                        hash.id(),
                        f.error
                    );
                    Ok(None)
                } else {
                    Err(f.error)
                }
            }
        }
    }

    fn cache_hit(&self, hash: &KeyHash, usage: Usage) {
        self.note_hit(hash, usage);
    }
}

#[async_trait]
impl SharedCache for RedisStore {
    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut c = self.conn().await?;
        self.bounded(c.get(format!("{}cache:{key}", self.prefix)))
            .await
    }

    async fn cache_put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let opts = redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(millis));
        self.bounded(c.set_options(format!("{}cache:{key}", self.prefix), value, opts))
            .await
    }
}
