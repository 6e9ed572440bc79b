//! The Redis store's upkeep: calls whose outcome the gateway did not see,
//! settled once Redis answers again, and the store marker that tells a Redis
//! set up for tollgate from one that lost its data. See the parent module.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora_prometheus::prometheus::{IntCounter, IntGauge};
use redis::AsyncCommands;

use super::{is_key_name, RedisStore};
use crate::key::KeyHash;
use crate::store::{StoreError, Usage};

/// How long Redis remembers a charge or refund by its id. A call whose answer
/// was not seen is settled exactly when Redis answers this node again within
/// this time of the call being sent; later, its outcome cannot be known and
/// it counts in `tollgate_store_errors_total{op="settle"}`. Each charge's
/// marker costs about 230 bytes of Redis memory for this long
/// (measured with redis-server 7.0: 14 MB at 1,000 charges per second).
pub const OP_MEMORY: Duration = Duration::from_secs(60);
/// Charges and refunds waiting to be settled; beyond this they are dropped
/// and counted (`op="settle"`).
pub const SETTLE_QUEUE_MAX: usize = 100_000;
/// How often [`Maintenance`] looks for the store marker.
pub const SETUP_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How soon a settlement that failed is tried again.
const SETTLE_RETRY: Duration = Duration::from_millis(200);
/// Settlements sent at once.
const SETTLE_BATCH: usize = 64;

/// The store marker's value for the current key layout (`key:{<sha256>}`,
/// with the hash tag). Before it, the marker held the time it was written
/// and keys lived at `key:<sha256>`.
pub(super) const LAYOUT: &str = "2";

/// What the store marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// Absent: never set up, or the data is lost.
    Missing,
    /// Set up, keys in the current layout.
    Current,
    /// Set up by a tollgate before the hash tag: `tollgate keys migrate`.
    OldLayout,
}

impl Marker {
    pub(super) fn of(value: Option<&str>) -> Marker {
        match value {
            None => Marker::Missing,
            Some(LAYOUT) => Marker::Current,
            Some(_) => Marker::OldLayout,
        }
    }
}

/// What the last look for the store marker found.
pub(super) const SETUP_UNKNOWN: u8 = 0;
const SETUP_OK: u8 = 1;
const SETUP_MISSING: u8 = 2;

/// Series the store counts itself (the proxy counts the calls that fail).
#[derive(Clone)]
pub struct StoreCounters {
    /// Settlements dropped (queue full) or whose outcome could not be known.
    pub settle: IntCounter,
    /// Looks for the store marker that did not find it.
    pub setup: IntCounter,
    /// Charges and refunds waiting to be settled.
    pub unsettled: IntGauge,
}

/// A charge or refund whose outcome the gateway did not see.
#[derive(Debug, Clone, Copy)]
pub(super) enum Unsettled {
    /// A charge answered as not charged: cancel it.
    Charge {
        hash: KeyHash,
        id: u64,
        usage: Usage,
        sent: Instant,
    },
    /// A refund: apply it, once.
    Refund {
        hash: KeyHash,
        id: u64,
        amount: u64,
        usage: Usage,
        delivered: bool,
        /// When an attempt that may have run was first sent.
        maybe_ran: Option<Instant>,
    },
}

/// A call in flight: queued for settlement if dropped before its outcome was
/// seen (a timeout, or the request's future dropped).
pub(super) struct InFlight<'a> {
    pub(super) store: &'a RedisStore,
    pub(super) op: Option<Unsettled>,
}

impl InFlight<'_> {
    /// The outcome is known: nothing to settle.
    pub(super) fn seen(mut self) {
        self.op = None;
    }

    pub(super) fn take(mut self) -> Option<Unsettled> {
        self.op.take()
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            self.store.defer(op);
        }
    }
}

impl RedisStore {
    /// Queue a call whose outcome was not seen; `false` if the queue is full
    /// (dropped and counted).
    pub(super) fn defer(&self, op: Unsettled) -> bool {
        let queued = match self.unsettled.lock() {
            Ok(mut q) if q.len() < SETTLE_QUEUE_MAX => {
                q.push_back(op);
                true
            }
            _ => false,
        };
        if queued {
            if let Some(c) = &self.counters {
                c.unsettled.inc();
            }
            self.settle_wake.notify_one();
        } else {
            if let Some(c) = &self.counters {
                c.settle.inc();
            }
            log::error!("store: settlement queue full, dropped {op:?}: that key's balance may be off by its amount");
        }
        queued
    }

    /// Settle one call; `Err` gives it back to be tried again.
    async fn settle(&self, op: Unsettled) -> Result<(), Unsettled> {
        match op {
            Unsettled::Charge {
                hash,
                id,
                usage,
                sent,
            } => {
                let memory = Self::op_memory_ms();
                let args = [&memory, usage.route, &self.usage_ttl];
                let given: i64 = self
                    .script_op(&self.cancel, &hash, id, usage, &args)
                    .await
                    .map_err(|_| op)?;
                if given > 0 {
                    log::info!(
                        "credits: gave back {given} credit(s) of key {} charged while Redis did not answer",
                        hash.id()
                    );
                } else if given < 0 && sent.elapsed() >= OP_MEMORY {
                    self.unknowable(&format!("a charge of key {}", hash.id()));
                }
                Ok(())
            }
            Unsettled::Refund {
                hash,
                id,
                amount,
                usage,
                delivered,
                maybe_ran,
            } => {
                if maybe_ran.is_some_and(|t| t.elapsed() >= OP_MEMORY) {
                    self.unknowable(&format!(
                        "a refund of {amount} credit(s) to key {}",
                        hash.id()
                    ));
                    return Ok(());
                }
                let sent = Instant::now();
                match self.apply_refund(&hash, id, amount, usage, delivered).await {
                    Ok(_) => Ok(()),
                    Err(f) => Err(Unsettled::Refund {
                        hash,
                        id,
                        amount,
                        usage,
                        delivered,
                        maybe_ran: maybe_ran.or(f.maybe_ran.then_some(sent)),
                    }),
                }
            }
        }
    }

    pub(super) fn unknowable(&self, what: &str) {
        if let Some(c) = &self.counters {
            c.settle.inc();
        }
        log::error!(
            "store: cannot tell whether {what} ran: Redis did not answer for over {} s",
            OP_MEMORY.as_secs()
        );
    }

    /// Settle what waits, a batch at a time, until done or a call fails;
    /// `true` if one failed (Redis is not answering yet).
    async fn settle_waiting(&self) -> bool {
        loop {
            let batch: Vec<Unsettled> = match self.unsettled.lock() {
                Ok(mut q) => {
                    let n = q.len().min(SETTLE_BATCH);
                    q.drain(..n).collect()
                }
                Err(_) => return true,
            };
            if batch.is_empty() {
                return false;
            }
            let results =
                futures::future::join_all(batch.into_iter().map(|op| self.settle(op))).await;
            let mut failed = Vec::new();
            let mut done = 0;
            for r in results {
                match r {
                    Ok(()) => done += 1,
                    Err(op) => failed.push(op),
                }
            }
            if let Some(c) = &self.counters {
                c.unsettled.sub(done);
            }
            if !failed.is_empty() {
                if let Ok(mut q) = self.unsettled.lock() {
                    q.extend(failed);
                }
                return true;
            }
        }
    }

    /// How many calls wait to be settled.
    pub fn unsettled(&self) -> usize {
        self.unsettled.lock().map_or(0, |q| q.len())
    }

    /// What `{prefix}store` says (written by `keys import`/`create`/`migrate`).
    pub async fn marker_state(&self) -> Result<Marker, StoreError> {
        let mut c = self.conn().await?;
        let value: Option<String> = self.bounded(c.get(self.marker())).await?;
        Ok(Marker::of(value.as_deref()))
    }

    /// Whether the marker says: set up, keys in the current layout.
    pub async fn is_set_up(&self) -> Result<bool, StoreError> {
        Ok(self.marker_state().await? == Marker::Current)
    }

    /// Write `{prefix}store`: this Redis holds tollgate's keys, in the
    /// current layout.
    pub async fn mark_set_up(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let () = self.bounded(c.set(self.marker(), LAYOUT)).await?;
        self.setup.store(SETUP_OK, Ordering::Relaxed);
        Ok(())
    }

    /// Move keys from the layout before the hash tag (`key:<sha256>`) to
    /// `key:{<sha256>}` (RENAMENX: a key present under both names keeps the
    /// new one, and is counted), then mark the store as in the current
    /// layout. Run with the gateways stopped, or before they take traffic:
    /// a key is unknown to a new gateway until it is moved. Operation
    /// markers of the old layout are left to expire. Returns (moved, kept).
    pub async fn migrate(&self) -> Result<(usize, usize), StoreError> {
        let mut c = self.conn().await?;
        let old: Vec<(String, KeyHash)> = self
            .names(&format!("{}key:*", self.prefix))
            .await?
            .into_iter()
            .filter_map(|n| {
                let hash = n
                    .strip_prefix(self.prefix.as_str())?
                    .strip_prefix("key:")
                    .and_then(KeyHash::from_hex)?;
                Some((n, hash))
            })
            .collect();
        let (mut moved, mut kept) = (0, 0);
        for (name, hash) in old {
            let renamed: bool = self
                .bounded(c.rename_nx(&name, self.redis_key(&hash)))
                .await?;
            if renamed {
                moved += 1;
            } else {
                kept += 1;
            }
        }
        self.mark_set_up().await?;
        Ok((moved, kept))
    }

    /// Whether any key is stored (a store set up before the marker existed).
    pub async fn has_keys(&self) -> Result<bool, StoreError> {
        let pattern = format!("{}key:{{*", self.prefix);
        let names = self.names(&pattern).await?;
        Ok(names.iter().any(|n| is_key_name(n, &self.prefix)))
    }

    /// Look for the marker; a store that has keys but no marker (set up by
    /// an older tollgate) gets one. Counts and logs a missing marker.
    pub async fn check_setup(&self) -> Result<bool, StoreError> {
        let marker = self.marker_state().await?;
        let mut set_up = marker == Marker::Current;
        // A lookup found a key but no marker since the last look: the store
        // has data, set up before the marker existed.
        let seen_key = self.seen_key.swap(false, Ordering::Relaxed);
        if marker == Marker::Missing && seen_key {
            self.mark_set_up().await?;
            log::info!(
                "store: Redis holds keys but no {} marker: written",
                self.marker()
            );
            set_up = true;
        }
        let now = if set_up { SETUP_OK } else { SETUP_MISSING };
        let before = self.setup.swap(now, Ordering::Relaxed);
        if !set_up {
            if let Some(c) = &self.counters {
                c.setup.inc();
            }
            if before != SETUP_MISSING && marker == Marker::OldLayout {
                log::error!(
                    "store: Redis holds keys in the layout of an older tollgate ({}key:<sha256>): \
                     every key is unknown until `tollgate keys migrate` moves them (README, Stores); \
                     until then unknown keys are store errors (store.on_error)",
                    self.prefix
                );
            } else if before != SETUP_MISSING {
                log::error!(
                    "store: Redis has no {} marker: it was never set up with `tollgate keys import`, \
                     or it lost its data (restarted without persistence?). Unknown keys are store \
                     errors (store.on_error) until it is restored; see README, Stores",
                    self.marker()
                );
            }
        } else if before == SETUP_MISSING {
            log::info!("store: {} marker found again", self.marker());
        }
        Ok(set_up)
    }

    /// The error for an unknown key in a store without the marker.
    pub(super) fn not_set_up(&self) -> StoreError {
        StoreError(format!(
            "Redis has no {} marker of the current key layout (lost its data, or needs `tollgate keys migrate`?)",
            self.marker()
        ))
    }
}

/// The store's own background work, started with the service (after Pingora
/// daemonized): look for the store marker at start and every
/// [`SETUP_CHECK_EVERY`], write the usage ledger's cache hits as often, and
/// settle calls whose outcome was not seen as soon as Redis answers. At stop
/// it settles and writes what it can once more.
pub struct Maintenance(pub Arc<RedisStore>);

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let store = &self.0;
        let mut next_check = Instant::now();
        loop {
            if Instant::now() >= next_check {
                if let Err(e) = store.check_setup().await {
                    log::debug!("store: marker check failed: {e}");
                }
                store.flush_hits().await;
                next_check = Instant::now() + SETUP_CHECK_EVERY;
            }
            let failed = store.settle_waiting().await;
            let wait = if failed {
                SETTLE_RETRY
            } else {
                next_check.saturating_duration_since(Instant::now())
            };
            tokio::select! {
                () = store.settle_wake.notified(), if !failed => {}
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {
                    store.settle_waiting().await;
                    if !store.flush_hits().await {
                        log::error!("store: stopping with cache hits not written to the usage ledger");
                    }
                    let left = store.unsettled();
                    if left > 0 {
                        log::error!("store: stopping with {left} charge(s)/refund(s) not settled");
                    }
                    return;
                }
            }
        }
    }
}
