//! The embedded store: keys and balances in process memory, loaded from the
//! keys file at start. Balances are atomics, so a charge is one
//! compare-and-swap loop and never overspends; they start again from the keys
//! file when the process restarts. The admin API changes keys here too
//! (lost at restart, as balances are): a key's metadata is swapped whole.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;

use super::{Charge, KeyAdmin, KeyInfo, KeyPatch, KeyRecord, KeyRow, KeyState, Store, StoreError};
use crate::config::keys::{self, Lifecycle};
use crate::key::KeyHash;

struct Entry {
    info: RwLock<Arc<KeyInfo>>,
    credits: AtomicU64,
    created: u64,
    /// The refill period last applied; locked while a refill is decided, so
    /// one charge per period refills.
    refilled_for: Mutex<Option<String>>,
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
        }
    }

    fn info(&self) -> Arc<KeyInfo> {
        self.info.read().unwrap_or_else(|p| p.into_inner()).clone()
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

pub struct MemoryStore {
    keys: RwLock<HashMap<KeyHash, Arc<Entry>>>,
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
        }
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

    async fn charge(&self, hash: &KeyHash, cost: u64) -> Result<Charge, StoreError> {
        let Some(entry) = self.entry(hash) else {
            return Ok(Charge::Unknown);
        };
        let info = entry.info();
        if info.state == KeyState::Revoked {
            return Ok(Charge::Revoked);
        }
        entry.refill(&info.lifecycle, keys::now());
        let taken = entry
            .credits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(cost));
        Ok(match taken {
            Ok(before) => Charge::Charged {
                remaining: before - cost,
            },
            Err(balance) => Charge::Insufficient { remaining: balance },
        })
    }

    async fn refund(&self, hash: &KeyHash, amount: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.entry(hash).map(|e| {
            e.credits
                .fetch_add(amount, Ordering::AcqRel)
                .saturating_add(amount)
        }))
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
        let mut slot = entry.info.write().unwrap_or_else(|p| p.into_inner());
        let mut info = KeyInfo::clone(&slot);
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
        *slot = Arc::new(info);
        Ok(true)
    }

    async fn add_credits(&self, hash: &KeyHash, credits: u64) -> Result<Option<u64>, StoreError> {
        self.refund(hash, credits).await
    }

    async fn set_state(&self, hash: &KeyHash, state: KeyState) -> Result<bool, StoreError> {
        let Some(entry) = self.entry(hash) else {
            return Ok(false);
        };
        let mut slot = entry.info.write().unwrap_or_else(|p| p.into_inner());
        let mut info = KeyInfo::clone(&slot);
        info.state = state;
        *slot = Arc::new(info);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            s.charge(&h, 2).await.unwrap(),
            Charge::Charged { remaining: 1 }
        );
        assert_eq!(
            s.charge(&h, 2).await.unwrap(),
            Charge::Insufficient { remaining: 1 }
        );
        assert_eq!(s.refund(&h, 2).await.unwrap(), Some(3));
        assert_eq!(
            s.charge(&KeyHash::of("other"), 1).await.unwrap(),
            Charge::Unknown
        );
        let (s, h) = store(3, KeyState::Revoked);
        assert_eq!(s.charge(&h, 1).await.unwrap(), Charge::Revoked);
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
                        matches!(s.charge(&h, 1).await, Ok(Charge::Charged { .. }))
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
