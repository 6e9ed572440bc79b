//! The embedded store: keys and balances in process memory, loaded from the
//! keys file at start. Balances are atomics, so a charge is one
//! compare-and-swap loop and never overspends; they start again from the keys
//! file when the process restarts. The admin API changes keys here too
//! (lost at restart, as balances are): a key's metadata is swapped whole.
//! The usage ledger is kept per key, in memory, for `usage.retention_days`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;

use super::{
    Charge, KeyAdmin, KeyInfo, KeyPatch, KeyRecord, KeyRow, KeyState, Store, StoreError, Usage,
    UsageLedger, UsageRow,
};
use crate::config::keys::{self, Lifecycle};
use crate::key::KeyHash;

struct Entry {
    info: RwLock<Arc<KeyInfo>>,
    credits: AtomicU64,
    created: u64,
    /// The refill period last applied; locked while a refill is decided, so
    /// one charge per period refills.
    refilled_for: Mutex<Option<String>>,
    /// The key's usage ledger rows by (day, route).
    usage: Mutex<BTreeMap<(i64, &'static str), Counts>>,
}

/// Drop the ledger rows of days before `oldest`.
fn drop_before(rows: &mut BTreeMap<(i64, &'static str), Counts>, oldest: i64) {
    if rows
        .first_key_value()
        .is_some_and(|((day, _), _)| *day < oldest)
    {
        *rows = rows.split_off(&(oldest, ""));
    }
}

/// One ledger row's numbers.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u64,
    credits: u64,
    refunded: u64,
    cache_hits: u64,
}

impl Entry {
    fn new(r: &KeyRecord, now: i64) -> Entry {
        let info = KeyInfo {
            id: r.hash.id(),
            name: r.name.clone(),
            rate_per_second: r.rate_per_second,
            state: r.state,
            lifecycle: r.lifecycle.clone(),
        };
        Entry {
            info: RwLock::new(Arc::new(info)),
            credits: AtomicU64::new(r.credits),
            created: u64::try_from(now).unwrap_or(0),
            refilled_for: Mutex::new(current_period(&r.lifecycle, now)),
            usage: Mutex::new(BTreeMap::new()),
        }
    }

    /// Change the ledger row of `usage`, dropping days past `keep_days`.
    fn count(&self, usage: Usage, keep_days: i64, change: impl FnOnce(&mut Counts)) {
        if keep_days == 0 {
            return;
        }
        let mut rows = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        if !rows.contains_key(&(usage.day, usage.route)) {
            drop_before(&mut rows, Usage::oldest_kept(usage.day, keep_days));
        }
        change(rows.entry((usage.day, usage.route)).or_default());
    }

    fn info(&self) -> Arc<KeyInfo> {
        self.info.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Swap the key's metadata for a changed copy.
    fn change(&self, edit: impl FnOnce(&mut KeyInfo)) {
        let mut slot = self.info.write().unwrap_or_else(|p| p.into_inner());
        let mut info = KeyInfo::clone(&slot);
        edit(&mut info);
        *slot = Arc::new(info);
    }

    /// Add credits; the new balance.
    fn add(&self, credits: u64) -> u64 {
        self.credits
            .fetch_add(credits, Ordering::AcqRel)
            .saturating_add(credits)
    }

    /// Refill at the first charge of a new period; never lowers a balance.
    fn refill(&self, lifecycle: &Lifecycle, now: i64) {
        let Some(refill) = lifecycle.refill else {
            return;
        };
        let period = refill.period.label(now);
        let mut last = self.refilled_for.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() != Some(period.as_str()) {
            self.credits.fetch_max(refill.credits, Ordering::AcqRel);
            *last = Some(period);
        }
    }
}

/// The period a key with this lifecycle counts as refilled for at `now`.
fn current_period(lifecycle: &Lifecycle, now: i64) -> Option<String> {
    lifecycle.refill.map(|r| r.period.label(now))
}

/// `usage.retention_days` unless configured.
const DEFAULT_RETENTION_DAYS: i64 = 400;

pub struct MemoryStore {
    keys: RwLock<HashMap<KeyHash, Arc<Entry>>>,
    /// `usage.retention_days`; 0: no ledger.
    keep_days: i64,
}

impl MemoryStore {
    pub fn new(records: &[KeyRecord]) -> MemoryStore {
        let now = keys::now();
        let keys = records
            .iter()
            .map(|r| (r.hash, Arc::new(Entry::new(r, now))))
            .collect();
        MemoryStore {
            keys: RwLock::new(keys),
            keep_days: DEFAULT_RETENTION_DAYS,
        }
    }

    /// Keep the usage ledger this many days (0: none).
    pub fn with_usage_retention(mut self, days: u32) -> MemoryStore {
        self.keep_days = i64::from(days);
        self
    }

    fn entry(&self, hash: &KeyHash) -> Option<Arc<Entry>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.get(hash).cloned()
    }

    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyInfo>>, StoreError> {
        Ok(self.entry(hash).map(|e| e.info()))
    }

    async fn charge(&self, hash: &KeyHash, cost: u64, usage: Usage) -> Result<Charge, StoreError> {
        let Some(entry) = self.entry(hash) else {
            return Ok(Charge::Unknown);
        };
        let info = entry.info();
        if info.state == KeyState::Revoked {
            return Ok(Charge::Revoked);
        }
        if info.lifecycle.refill.is_some() {
            entry.refill(&info.lifecycle, keys::now());
        }
        let taken = entry
            .credits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(cost));
        Ok(match taken {
            Ok(before) => {
                entry.count(usage, self.keep_days, |c| {
                    c.requests += 1;
                    c.credits += cost;
                });
                Charge::Charged {
                    remaining: before - cost,
                }
            }
            Err(balance) => Charge::Insufficient { remaining: balance },
        })
    }

    async fn refund(
        &self,
        hash: &KeyHash,
        amount: u64,
        usage: Usage,
        delivered: bool,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self.entry(hash).map(|e| {
            e.count(usage, self.keep_days, |c| {
                c.credits = c.credits.saturating_sub(amount);
                c.refunded += amount;
                if !delivered {
                    c.requests = c.requests.saturating_sub(1);
                }
            });
            e.add(amount)
        }))
    }

    fn cache_hit(&self, hash: &KeyHash, usage: Usage) {
        if let Some(e) = self.entry(hash) {
            e.count(usage, self.keep_days, |c| c.cache_hits += 1);
        }
    }
}

#[async_trait]
impl UsageLedger for MemoryStore {
    /// A day past `usage.retention_days` has no rows, also for a key that
    /// wrote nothing since (its old days are dropped here, not only at its
    /// next write), as on Redis, where such a day has expired.
    async fn usage_day(
        &self,
        day: i64,
        key: Option<&KeyHash>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let oldest = Usage::oldest_kept(Usage::now("").day, self.keep_days);
        if day < oldest {
            return Ok(Vec::new());
        }
        let entries: Vec<(KeyHash, Arc<Entry>)> = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            keys.iter()
                .filter(|(h, _)| key.is_none_or(|k| k == *h))
                .map(|(h, e)| (*h, e.clone()))
                .collect()
        };
        let date = Usage { route: "", day }.date();
        let mut rows = Vec::new();
        for (hash, entry) in entries {
            let name = entry.info().name.clone();
            let mut usage = entry.usage.lock().unwrap_or_else(|p| p.into_inner());
            drop_before(&mut usage, oldest);
            for ((_, route), c) in usage.range((day, "")..(day + 1, "")) {
                rows.push(UsageRow {
                    date: date.to_string(),
                    key_id: hash.id(),
                    name: name.clone(),
                    route: route.to_string(),
                    requests: c.requests,
                    credits: c.credits,
                    refunded: c.refunded,
                    cache_hits: c.cache_hits,
                });
            }
        }
        rows.sort_by(|a, b| a.key_id.cmp(&b.key_id).then(a.route.cmp(&b.route)));
        Ok(rows)
    }
}

#[async_trait]
impl KeyAdmin for MemoryStore {
    async fn insert(&self, record: &KeyRecord) -> Result<bool, StoreError> {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if keys.contains_key(&record.hash) {
            return Ok(false);
        }
        keys.insert(record.hash, Arc::new(Entry::new(record, keys::now())));
        Ok(true)
    }

    async fn row(&self, hash: &KeyHash) -> Result<Option<KeyRow>, StoreError> {
        Ok(self.entry(hash).map(|e| {
            let info = e.info();
            KeyRow {
                id: info.id.clone(),
                name: info.name.clone(),
                credits: e.credits.load(Ordering::Acquire),
                rate_per_second: info.rate_per_second,
                state: info.state,
                created: Some(e.created),
                lifecycle: info.lifecycle.clone(),
                refilled_for: e
                    .refilled_for
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            }
        }))
    }

    async fn find_by_id(&self, id_prefix: &str) -> Result<Vec<KeyHash>, StoreError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        Ok(keys
            .keys()
            .filter(|h| h.hex().starts_with(id_prefix))
            .copied()
            .collect())
    }

    async fn update(&self, hash: &KeyHash, patch: &KeyPatch) -> Result<bool, StoreError> {
        let Some(entry) = self.entry(hash) else {
            return Ok(false);
        };
        entry.change(|info| {
            if let Some(name) = &patch.name {
                info.name = name.clone();
            }
            if let Some(rate) = patch.rate_per_second {
                info.rate_per_second = rate;
            }
            if let Some(at) = patch.expires_at {
                info.lifecycle.expires_at = at;
            }
            if let Some(routes) = &patch.routes {
                info.lifecycle.routes = routes.clone();
            }
            if let Some(refill) = patch.refill {
                info.lifecycle.refill = refill;
                *entry.refilled_for.lock().unwrap_or_else(|p| p.into_inner()) =
                    current_period(&info.lifecycle, keys::now());
            }
        });
        Ok(true)
    }

    async fn add_credits(&self, hash: &KeyHash, credits: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.entry(hash).map(|e| e.add(credits)))
    }

    async fn set_state(&self, hash: &KeyHash, state: KeyState) -> Result<bool, StoreError> {
        let Some(entry) = self.entry(hash) else {
            return Ok(false);
        };
        entry.change(|info| info.state = state);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: Usage = Usage {
        route: "r",
        day: 20_000,
    };

    fn store(credits: u64, state: KeyState) -> (MemoryStore, KeyHash) {
        let hash = KeyHash::of("k");
        let rec = KeyRecord {
            hash,
            name: "n".into(),
            credits,
            rate_per_second: None,
            state,
            lifecycle: Lifecycle::default(),
        };
        (MemoryStore::new(&[rec]), hash)
    }

    #[tokio::test]
    async fn charge_refund_and_states() {
        let (s, h) = store(3, KeyState::Active);
        assert_eq!(
            s.charge(&h, 2, U).await.unwrap(),
            Charge::Charged { remaining: 1 }
        );
        assert_eq!(
            s.charge(&h, 2, U).await.unwrap(),
            Charge::Insufficient { remaining: 1 }
        );
        assert_eq!(s.refund(&h, 2, U, false).await.unwrap(), Some(3));
        assert_eq!(
            s.charge(&KeyHash::of("other"), 1, U).await.unwrap(),
            Charge::Unknown
        );
        let (s, h) = store(3, KeyState::Revoked);
        assert_eq!(s.charge(&h, 1, U).await.unwrap(), Charge::Revoked);
    }

    /// A key that wrote nothing since: its days past the retention are not
    /// read (and are dropped), as on Redis, where they have expired.
    #[tokio::test]
    async fn an_idle_keys_days_past_retention_are_not_read() {
        let (s, h) = store(100, KeyState::Active);
        let s = s.with_usage_retention(3);
        let today = Usage::now("").day;
        let on = |day| Usage { route: "r", day };
        // Written while each day was kept (a write keeps three days back
        // from its own); nothing since.
        for day in [today - 3, today - 2] {
            s.charge(&h, 1, on(day)).await.unwrap();
        }
        assert_eq!(s.entry(&h).unwrap().usage.lock().unwrap().len(), 2);
        // Kept: today and the two days before it.
        assert_eq!(s.usage_day(today - 3, None).await.unwrap(), vec![]);
        assert_eq!(s.usage_day(today - 3, Some(&h)).await.unwrap(), vec![]);
        let kept = s.usage_day(today - 2, Some(&h)).await.unwrap();
        assert_eq!((kept.len(), kept[0].requests), (1, 1), "{kept:?}");
        assert_eq!(s.entry(&h).unwrap().usage.lock().unwrap().len(), 1);
        // No retention: nothing is kept, nothing read.
        let (s, h) = store(100, KeyState::Active);
        let s = s.with_usage_retention(0);
        s.charge(&h, 1, on(today)).await.unwrap();
        assert_eq!(s.usage_day(today, None).await.unwrap(), vec![]);
    }

    #[test]
    fn a_refill_comes_once_per_period_and_never_lowers() {
        use crate::config::keys::{Period, Refill};
        let now = keys::now();
        let rec = |credits| KeyRecord {
            hash: KeyHash::of("k"),
            name: "n".into(),
            credits,
            rate_per_second: None,
            state: KeyState::Active,
            lifecycle: Lifecycle {
                refill: Some(Refill {
                    credits: 10,
                    period: Period::Daily,
                }),
                ..Lifecycle::default()
            },
        };
        let low = Entry::new(&rec(2), now);
        let lifecycle = low.info().lifecycle.clone();
        // Made in this period: counts as refilled, its 2 credits stand.
        low.refill(&lifecycle, now);
        assert_eq!(low.credits.load(Ordering::Acquire), 2);
        // The next day: back to 10, once.
        let tomorrow = now + 86_400;
        low.refill(&lifecycle, tomorrow);
        assert_eq!(low.credits.load(Ordering::Acquire), 10);
        low.credits.store(4, Ordering::Release);
        low.refill(&lifecycle, tomorrow);
        assert_eq!(low.credits.load(Ordering::Acquire), 4);
        // A higher balance is kept.
        let high = Entry::new(&rec(50), now);
        high.refill(&lifecycle, tomorrow);
        assert_eq!(high.credits.load(Ordering::Acquire), 50);
        assert_eq!(
            high.refilled_for.lock().unwrap().as_deref(),
            Some(Period::Daily.label(tomorrow).as_str())
        );
    }

    #[test]
    fn concurrent_charges_never_overspend() {
        let (s, h) = store(1000, KeyState::Active);
        let s = Arc::new(s);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        let granted: usize = rt.block_on(async {
            let tasks: Vec<_> = (0..1500)
                .map(|_| {
                    let s = s.clone();
                    tokio::spawn(async move {
                        matches!(s.charge(&h, 1, U).await, Ok(Charge::Charged { .. }))
                    })
                })
                .collect();
            let mut n = 0;
            for t in tasks {
                n += usize::from(t.await.unwrap());
            }
            n
        });
        assert_eq!(granted, 1000);
    }
}
