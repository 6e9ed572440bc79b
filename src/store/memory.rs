//! The embedded store: keys and balances in process memory, loaded from the
//! keys file at start. Balances are atomics, so a charge is one
//! compare-and-swap loop and never overspends; they start again from the keys
//! file when the process restarts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::{Charge, KeyInfo, KeyRecord, KeyState, Store, StoreError};
use crate::key::KeyHash;

struct Entry {
    info: Arc<KeyInfo>,
    credits: AtomicU64,
}

pub struct MemoryStore {
    keys: HashMap<KeyHash, Entry>,
}

impl MemoryStore {
    pub fn new(records: &[KeyRecord]) -> MemoryStore {
        let keys = records
            .iter()
            .map(|r| {
                let info = KeyInfo {
                    id: r.hash.id(),
                    name: r.name.clone(),
                    rate_per_second: r.rate_per_second,
                    state: r.state,
                };
                let entry = Entry {
                    info: Arc::new(info),
                    credits: AtomicU64::new(r.credits),
                };
                (r.hash, entry)
            })
            .collect();
        MemoryStore { keys }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyInfo>>, StoreError> {
        Ok(self.keys.get(hash).map(|e| e.info.clone()))
    }

    async fn charge(&self, hash: &KeyHash, cost: u64) -> Result<Charge, StoreError> {
        let Some(entry) = self.keys.get(hash) else {
            return Ok(Charge::Unknown);
        };
        if entry.info.state == KeyState::Revoked {
            return Ok(Charge::Revoked);
        }
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
        Ok(self.keys.get(hash).map(|e| {
            e.credits
                .fetch_add(amount, Ordering::AcqRel)
                .saturating_add(amount)
        }))
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
