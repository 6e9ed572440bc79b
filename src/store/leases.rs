//! Credit leases, the node's side (`store.leases`): a [`Store`] in front of
//! the Redis store that charges a key's requests from a block of its credits
//! held in process, so that a charged request needs no Redis round trip.
//!
//! - A node takes a lease (`store::redis::lease`: one script on the key's
//!   slot) when a key's first request comes, and the next one ahead of need,
//!   off the request path, when less than half of the wanted size is left.
//!   The size is a quarter of what the key has not leased out, between one
//!   request and `max_credits`, so leases shrink as the balance runs low.
//! - [`LeaseKeeper`] reports each lease every second: what was spent (the key
//!   is charged it), the usage ledger's deltas, refunds (back into the
//!   lease); the report renews the lease, gives back what is above the
//!   current size, and ends a lease idle for [`IDLE`]. At stop it ends every
//!   lease, giving the unspent credits back.
//! - A lease not renewed within `ttl_seconds` is taken back by Redis (a
//!   node that died); a node stops spending from a lease [`MARGIN`] before
//!   that, so a live node cut off from Redis never spends what Redis may give
//!   to another.
//! - When a charge finds too little to lease while other nodes hold leases,
//!   it marks the key wanted in Redis and waits up to [`WAIT_FOR_RETURNS`]
//!   for them to give back before answering 402. A node learns of it from
//!   its next report and ends its lease of that key as soon as the lease
//!   has been unused for [`YIELD_IDLE`] (the keeper looks every [`TICK`]),
//!   so credits are never stranded on a node that stopped using them.
//!
//! Here: the lease and the charge paid from it; `leases/report.rs`: the
//! reports and the keeper.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_prometheus::prometheus::{IntCounterVec, IntGauge};

use super::redis::lease::{Deltas, LeaseScripts, Taken};
use super::redis::RedisStore;
use super::{Charge, KeyInfo, Store, StoreError, Usage};
use crate::config::LeaseConfig;
use crate::key::{KeyHash, KeyHashes};

mod report;

pub use report::LeaseKeeper;
use report::Unanswered;

/// How often each lease is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A lease unused this long is ended (its credits go back to the key).
pub const IDLE: Duration = Duration::from_secs(2);
/// A node stops spending a lease this long before Redis may take it back.
pub const MARGIN: Duration = Duration::from_secs(2);
/// How long a charge waits for other nodes to give credits back.
pub const WAIT_FOR_RETURNS: Duration = Duration::from_millis(2500);
/// A lease another node waits for is ended once unused this long.
pub const YIELD_IDLE: Duration = Duration::from_millis(250);
/// How often the keeper looks at each lease (it reports one when due).
pub const TICK: Duration = Duration::from_millis(250);

/// One key's lease on this node.
#[derive(Debug)]
struct Lease {
    /// Credits held and not spent.
    unspent: u64,
    /// Spent since the last report (net of refunds).
    spent: i64,
    /// Spent and sent in a report not yet answered.
    reporting: i64,
    /// Ledger deltas since the last report.
    ledger: BTreeMap<Usage, Deltas>,
    /// The key's balance and what its leases held, at the last take or report.
    balance: i64,
    leased: i64,
    /// The last take or report that Redis answered.
    renewed: Option<Instant>,
    /// The last report sent.
    reported: Instant,
    used: Instant,
    /// Another node waits for this key's credits (as of the last report).
    wanted: bool,
    /// A take ahead of need is under way.
    taking: bool,
    /// A report Redis may have applied without its answer reaching us: sent
    /// again as it is (same id) before anything new is reported.
    unanswered: Option<Unanswered>,
}

impl Lease {
    fn new() -> Lease {
        Lease {
            unspent: 0,
            spent: 0,
            reporting: 0,
            ledger: BTreeMap::new(),
            balance: 0,
            leased: 0,
            renewed: None,
            reported: Instant::now(),
            used: Instant::now(),
            wanted: false,
            taking: false,
            unanswered: None,
        }
    }

    /// Whether its credits may be spent: renewed recently enough.
    fn valid(&self, ttl: Duration) -> bool {
        self.valid_at(Instant::now(), ttl)
    }

    fn valid_at(&self, now: Instant, ttl: Duration) -> bool {
        self.renewed
            .is_some_and(|r| now.saturating_duration_since(r) + MARGIN < ttl)
    }

    /// What is left as this node sees it.
    fn remaining(&self) -> u64 {
        u64::try_from(self.balance - self.spent - self.reporting).unwrap_or(0)
    }

    /// A take was answered: what it granted is held, and renewed.
    fn took(&mut self, taken: &Taken) {
        if let Taken::Granted {
            granted,
            credits,
            leased,
            ..
        } = *taken
        {
            self.balance = credits;
            self.leased = leased;
            self.unspent += granted;
            self.renewed = Some(Instant::now());
        }
    }

    fn count(&mut self, usage: Usage, deltas: Deltas) {
        let row = self.ledger.entry(usage).or_default();
        for (r, d) in row.iter_mut().zip(deltas) {
            *r += d;
        }
    }
}

/// The lease store.
pub struct LeasedStore {
    redis: Arc<RedisStore>,
    scripts: Arc<LeaseScripts>,
    node: String,
    config: LeaseConfig,
    book: Mutex<HashMap<KeyHash, Arc<tokio::sync::Mutex<Lease>>, KeyHashes>>,
    /// Stopping: new charges go to Redis one by one.
    closing: AtomicBool,
    counters: Option<LeaseCounters>,
}

/// The lease store's series (`tollgate_lease_credits`,
/// `tollgate_lease_requests_total{outcome}`).
#[derive(Clone)]
pub struct LeaseCounters {
    pub credits: IntGauge,
    pub requests: IntCounterVec,
}

impl LeaseCounters {
    fn taken(&self, asked: u64, taken: &Result<Taken, StoreError>) {
        let outcome = match taken {
            Ok(Taken::Granted { granted, .. }) if *granted >= asked => "granted",
            Ok(Taken::Granted { granted, .. }) if *granted > 0 => "partial",
            Ok(_) => "empty",
            Err(_) => "error",
        };
        self.requests.with_label_values(&[outcome]).inc();
    }
}

impl LeasedStore {
    pub fn new(redis: Arc<RedisStore>, config: LeaseConfig) -> LeasedStore {
        LeasedStore {
            redis,
            scripts: Arc::new(LeaseScripts::default()),
            node: format!("{:016x}", rand::random::<u64>()),
            config,
            book: Mutex::new(HashMap::default()),
            closing: AtomicBool::new(false),
            counters: None,
        }
    }

    /// Count in these series.
    pub fn with_counters(mut self, counters: LeaseCounters) -> LeasedStore {
        self.counters = Some(counters);
        self
    }

    fn count_take(&self, asked: u64, taken: &Result<Taken, StoreError>) {
        if let Some(c) = &self.counters {
            c.taken(asked, taken);
        }
    }

    fn lease(&self, hash: &KeyHash) -> Arc<tokio::sync::Mutex<Lease>> {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        book.entry(*hash)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Lease::new())))
            .clone()
    }

    /// The size to hold of a key: a quarter of what it has not leased out,
    /// between `cost` and `max_credits`.
    fn want(&self, l: &Lease, cost: u64) -> u64 {
        let free = u64::try_from(l.balance - l.leased).unwrap_or(0);
        (free / 4).clamp(cost.max(1), self.config.max_credits.max(cost))
    }

    /// Take credits into `l` now; the take's answer.
    async fn take(&self, hash: &KeyHash, l: &mut Lease, want: u64) -> Result<Taken, StoreError> {
        let taken = self
            .redis
            .take_lease(&self.scripts, hash, &self.node, want, self.config.ttl)
            .await;
        self.count_take(want, &taken);
        let taken = taken?;
        l.took(&taken);
        Ok(taken)
    }

    /// Start a take ahead of need if the lease runs low.
    fn refill_ahead(
        &self,
        hash: KeyHash,
        lease: &Arc<tokio::sync::Mutex<Lease>>,
        l: &mut Lease,
        cost: u64,
    ) {
        let want = self.want(l, cost);
        if l.taking || l.unspent >= want / 2 || self.closing.load(Ordering::Relaxed) {
            return;
        }
        l.taking = true;
        let (redis, scripts, node, ttl) = (
            self.redis.clone(),
            self.scripts.clone(),
            self.node.clone(),
            self.config.ttl,
        );
        let lease = lease.clone();
        let more = want.saturating_sub(l.unspent);
        let counters = self.counters.clone();
        tokio::spawn(async move {
            let taken = redis.take_lease(&scripts, &hash, &node, more, ttl).await;
            if let Some(c) = &counters {
                c.taken(more, &taken);
            }
            let mut l = lease.lock().await;
            l.taking = false;
            if let Ok(taken) = taken {
                l.took(&taken);
            }
        });
    }

    /// Drop a lease from the book if nothing took it up meanwhile.
    fn forget(&self, hash: &KeyHash, lease: &Arc<tokio::sync::Mutex<Lease>>) {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if book.get(hash).is_some_and(|l| Arc::ptr_eq(l, lease)) && Arc::strong_count(lease) <= 2 {
            book.remove(hash);
        }
    }

    /// How many leases this node holds.
    pub fn held(&self) -> usize {
        self.book.lock().map_or(0, |b| b.len())
    }
}

impl LeasedStore {
    /// Charge `cost` from the lease, which holds it.
    fn spend(
        &self,
        hash: &KeyHash,
        lease: &Arc<tokio::sync::Mutex<Lease>>,
        l: &mut Lease,
        cost: u64,
        usage: Usage,
    ) -> Charge {
        l.unspent -= cost;
        l.spent += i64::try_from(cost).unwrap_or(i64::MAX);
        l.count(usage, [1, i64::try_from(cost).unwrap_or(0), 0, 0]);
        let remaining = l.remaining();
        self.refill_ahead(*hash, lease, l, cost);
        Charge::Charged { remaining }
    }

    /// The lease cannot pay: take more from Redis (waiting up to
    /// [`WAIT_FOR_RETURNS`] for other nodes to give back), then charge.
    /// Boxed: the take's state is large, and almost every charge is paid
    /// from the lease without it (inline, every charge's future would be
    /// that large, and copied).
    fn charge_taking<'a>(
        &'a self,
        hash: &'a KeyHash,
        lease: Arc<tokio::sync::Mutex<Lease>>,
        cost: u64,
        usage: Usage,
    ) -> futures::future::BoxFuture<'a, Result<Charge, StoreError>> {
        Box::pin(async move {
            let deadline = Instant::now() + WAIT_FOR_RETURNS;
            loop {
                // What other nodes' leases hold, as the take below found.
                let mut others = 0;
                let mut l = lease.lock().await;
                l.used = Instant::now();
                let ttl = self.config.ttl;
                if !l.valid(ttl) {
                    // Too long without a renewal: Redis may have taken it back.
                    l.unspent = 0;
                }
                if l.unspent < cost {
                    let want = self.want(&l, cost).max(cost);
                    let more = if l.valid(ttl) {
                        want.saturating_sub(l.unspent)
                    } else {
                        want
                    };
                    match self.take(hash, &mut l, more.max(1)).await? {
                        Taken::Unknown => return Ok(Charge::Unknown),
                        Taken::Revoked => return Ok(Charge::Revoked),
                        Taken::Granted { others: o, .. } => others = o,
                    }
                }
                if l.unspent >= cost {
                    return Ok(self.spend(hash, &lease, &mut l, cost, usage));
                }
                // Too little free: other nodes hold the rest; the take marked
                // the key wanted, and they give back what they do not use.
                let remaining = l.remaining();
                drop(l);
                if others <= 0 || Instant::now() >= deadline {
                    return Ok(Charge::Insufficient { remaining });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }
}

#[async_trait]
impl Store for LeasedStore {
    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyInfo>>, StoreError> {
        self.redis.key(hash).await
    }

    async fn charge(&self, hash: &KeyHash, cost: u64, usage: Usage) -> Result<Charge, StoreError> {
        if self.closing.load(Ordering::Relaxed) {
            return self.redis.charge(hash, cost, usage).await;
        }
        let lease = self.lease(hash);
        {
            let mut l = lease.lock().await;
            let now = Instant::now();
            l.used = now;
            if l.unspent >= cost && l.valid_at(now, self.config.ttl) {
                return Ok(self.spend(hash, &lease, &mut l, cost, usage));
            }
        }
        self.charge_taking(hash, lease, cost, usage).await
    }

    async fn refund(
        &self,
        hash: &KeyHash,
        amount: u64,
        usage: Usage,
        delivered: bool,
    ) -> Result<Option<u64>, StoreError> {
        let lease = self.lease(hash);
        let mut l = lease.lock().await;
        l.unspent += amount;
        let amount = i64::try_from(amount).unwrap_or(i64::MAX);
        l.spent -= amount;
        let requests = if delivered { 0 } else { -1 };
        l.count(usage, [requests, -amount, amount, 0]);
        Ok(Some(l.remaining()))
    }

    fn cache_hit(&self, hash: &KeyHash, usage: Usage) {
        self.redis.cache_hit(hash, usage);
    }

    fn charge_wait(&self) -> Duration {
        WAIT_FOR_RETURNS
    }
}
