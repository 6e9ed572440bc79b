//! A request's charge: what the store's answer to it means (a hold, or a
//! refusal), and the hold itself, kept in the request's context until the
//! request's fate is known: kept when the answer was delivered, returned when
//! the gateway answered with a failure (and `refund_on_failure` is on), and
//! returned anyway if the request is dropped before either happened. The
//! hold knows its usage ledger row, so a refund comes off the row the charge
//! went to, and a delivered cache hit is counted there.

use std::sync::Arc;

use pingora_prometheus::prometheus::IntCounter;

use crate::key::KeyHash;
use crate::reject::Reject;
use crate::store::{Charge, Store, StoreError, Usage};

/// A route's credit series: what its charges take and its refunds give back.
#[derive(Clone)]
pub struct CreditCounters {
    pub charged: IntCounter,
    pub refunded: IntCounter,
}

/// What the store's answer to a charge of `cost` means: a hold on the
/// credits taken (counted as charged), or a refusal that costs nothing.
pub fn hold(
    charge: Charge,
    store: &Arc<dyn Store>,
    hash: KeyHash,
    cost: u64,
    usage: Usage,
    counters: &CreditCounters,
) -> Result<CreditHold, Reject> {
    match charge {
        Charge::Charged { remaining } => {
            counters.charged.inc_by(cost);
            Ok(CreditHold::new(
                store.clone(),
                hash,
                cost,
                remaining,
                usage,
                counters.refunded.clone(),
            ))
        }
        Charge::Insufficient { .. } => Err(Reject::InsufficientCredits),
        Charge::Unknown => Err(Reject::InvalidKey),
        Charge::Revoked => Err(Reject::RevokedKey),
    }
}

pub struct CreditHold {
    store: Arc<dyn Store>,
    hash: KeyHash,
    /// Credits taken and not returned.
    cost: u64,
    /// The balance after the charge (or refund).
    remaining: u64,
    /// The ledger row the charge was counted in.
    usage: Usage,
    settled: bool,
    refunded: IntCounter,
}

impl CreditHold {
    /// A charge of `cost` already taken, leaving `remaining`, counted in
    /// the ledger at `usage`; `refunded` counts what is given back. A free
    /// charge is held too: its ledger request comes off if it is not
    /// delivered.
    pub fn new(
        store: Arc<dyn Store>,
        hash: KeyHash,
        cost: u64,
        remaining: u64,
        usage: Usage,
        refunded: IntCounter,
    ) -> Self {
        CreditHold {
            store,
            hash,
            cost,
            remaining,
            usage,
            settled: false,
            refunded,
        }
    }

    pub fn cost(&self) -> u64 {
        self.cost
    }

    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The answer was delivered: the charge stands.
    pub fn keep(&mut self) {
        self.settled = true;
    }

    /// A cached answer was delivered for this charge: the ledger counts it.
    pub fn cache_hit(&self) {
        self.store.cache_hit(&self.hash, self.usage);
    }

    /// Give the charge back now: for an answer that will not be delivered
    /// (a failure), or one that is delivered free (a cache hit without
    /// `charge_cache_hits`), which the ledger still counts as a request.
    pub async fn refund(&mut self, delivered: bool) -> Result<(), StoreError> {
        if self.settled {
            return Ok(());
        }
        self.settled = true;
        let balance = self
            .store
            .refund(&self.hash, self.cost, self.usage, delivered)
            .await?;
        self.refunded.inc_by(self.cost);
        self.remaining = balance.unwrap_or(self.remaining + self.cost);
        self.cost = 0;
        Ok(())
    }
}

impl Drop for CreditHold {
    /// A request dropped before its answer was delivered costs nothing.
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            log::warn!(
                "credits: no runtime to refund {} credit(s) of key {}",
                self.cost,
                self.hash.id()
            );
            return;
        };
        let (store, hash, cost, usage, refunded) = (
            self.store.clone(),
            self.hash,
            self.cost,
            self.usage,
            self.refunded.clone(),
        );
        runtime.spawn(async move {
            match store.refund(&hash, cost, usage, false).await {
                Ok(_) => refunded.inc_by(cost),
                Err(e) => log::warn!("credits: refund of {cost} to key {} failed: {e}", hash.id()),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn a_charge_decides_hold_or_refusal() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(&[]));
        let counters = CreditCounters {
            charged: IntCounter::new("c", "c").unwrap(),
            refunded: IntCounter::new("r", "r").unwrap(),
        };
        let hash = KeyHash::of("k");
        let usage = Usage {
            route: "r",
            day: 20_000,
        };
        let refused = |charge| hold(charge, &store, hash, 3, usage, &counters).err();
        assert_eq!(
            refused(Charge::Insufficient { remaining: 2 }),
            Some(Reject::InsufficientCredits)
        );
        assert_eq!(refused(Charge::Unknown), Some(Reject::InvalidKey));
        assert_eq!(refused(Charge::Revoked), Some(Reject::RevokedKey));
        assert_eq!(counters.charged.get(), 0);
        let mut held = hold(
            Charge::Charged { remaining: 7 },
            &store,
            hash,
            3,
            usage,
            &counters,
        )
        .unwrap();
        assert_eq!(
            (held.cost(), held.remaining(), counters.charged.get()),
            (3, 7, 3)
        );
        held.keep();
    }
}
