//! The Redis side of credit leases: one script to take a lease, one to
//! report what a node spent (renewing, shrinking or ending its lease, and
//! writing its usage ledger deltas), each on the key's slot. See
//! `store::leases` for the node's side.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::Script;

use super::{scripts, Failure, RedisStore, OP_MEMORY};
use crate::config::keys;
use crate::key::KeyHash;
use crate::store::{StoreError, Usage};

/// The ledger's four numbers of one row, as deltas.
pub type Deltas = [i64; 4];
const FIELDS: [&str; 4] = ["requests", "credits", "refunded", "cache_hits"];

/// What a take found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    Unknown,
    Revoked,
    /// Granted this many credits; the key's balance, what its leases hold,
    /// and what other nodes' leases hold.
    Granted {
        granted: u64,
        credits: i64,
        leased: i64,
        others: i64,
    },
}

/// What a report found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    pub credits: i64,
    pub leased: i64,
    /// What the node's lease holds now; `None`: it has none (ended, or
    /// taken back after its expiry).
    pub outstanding: Option<u64>,
    pub active: bool,
    /// Another node waits for this key's credits.
    pub wanted: bool,
}

/// How long Redis remembers a report's id: a report whose answer was lost
/// may be sent again (unchanged) within this time and counts once.
pub const REPORT_MEMORY: Duration = OP_MEMORY;

/// A report that failed, and whether Redis may have applied it all the same
/// (then it is sent again as it is, never merged into the next one).
#[derive(Debug)]
pub struct ReportFailed {
    pub error: StoreError,
    pub maybe_ran: bool,
}

/// What a node reports of one lease.
pub struct Report<'a> {
    /// Its id: Redis applies a report once, however often it is sent.
    pub id: u64,
    /// Spent since the last report (negative: refunds came back into it).
    pub spent: i64,
    /// Unspent credits given back.
    pub give: u64,
    /// End the lease: what it still holds goes back.
    pub end: bool,
    /// The usage ledger's deltas since the last report.
    pub ledger: &'a BTreeMap<Usage, Deltas>,
}

/// The scripts, loaded once per store.
pub struct LeaseScripts {
    take: Script,
    report: Script,
}

impl Default for LeaseScripts {
    fn default() -> Self {
        LeaseScripts {
            take: Script::new(scripts::LEASE_TAKE),
            report: Script::new(scripts::LEASE_REPORT),
        }
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl RedisStore {
    fn leases_key(&self, hash: &KeyHash) -> String {
        format!("{}:leases", self.redis_key(hash))
    }

    /// Set for a few seconds when a node could not lease what it needed.
    fn wanted_key(&self, hash: &KeyHash) -> String {
        format!("{}:wanted", self.redis_key(hash))
    }

    /// Take up to `want` more credits of `hash` into `node`'s lease.
    pub async fn take_lease(
        &self,
        scripts: &LeaseScripts,
        hash: &KeyHash,
        node: &str,
        want: u64,
        ttl: Duration,
    ) -> Result<Taken, StoreError> {
        let mut c = self.conn().await?;
        let (day, month) = keys::day_labels(keys::now().div_euclid(86_400));
        let mut call = scripts.take.key(self.redis_key(hash));
        call.key(self.leases_key(hash))
            .key(self.wanted_key(hash))
            .arg(node)
            .arg(want)
            .arg(ms(ttl))
            .arg(&*day)
            .arg(&*month);
        let (code, granted, credits, leased, others): (i64, i64, i64, i64, i64) =
            self.bounded(call.invoke_async(&mut c)).await?;
        Ok(match code {
            0 => Taken::Unknown,
            1 => Taken::Revoked,
            _ => Taken::Granted {
                granted: u64::try_from(granted).unwrap_or(0),
                credits,
                leased,
                others,
            },
        })
    }

    /// Report what `node` spent of its lease and its ledger deltas; renew
    /// the lease for `ttl`, keeping what the report says.
    pub async fn report_lease(
        &self,
        scripts: &LeaseScripts,
        hash: &KeyHash,
        node: &str,
        ttl: Duration,
        report: Report<'_>,
    ) -> Result<Reported, ReportFailed> {
        let Report {
            id,
            spent,
            give,
            end,
            ledger,
        } = report;
        let failed = |Failure { error, maybe_ran }| ReportFailed { error, maybe_ran };
        let mut c = self.conn().await.map_err(|error| ReportFailed {
            error,
            maybe_ran: false,
        })?;
        let key = self.redis_key(hash);
        let op = format!("{key}:op:{id:016x}");
        let mut call = scripts.report.key(key);
        call.key(self.leases_key(hash))
            .key(self.wanted_key(hash))
            .key(op);
        let mut days: Vec<i64> = ledger.keys().map(|u| u.day).collect();
        days.sort_unstable();
        days.dedup();
        for day in &days {
            let date = Usage {
                route: "",
                day: *day,
            }
            .date();
            call.key(self.usage_key(hash, &date));
        }
        call.arg(node)
            .arg(spent)
            .arg(ms(ttl))
            .arg(give)
            .arg(if end { "1" } else { "0" })
            .arg(&self.usage_ttl)
            .arg(Self::op_memory_ms());
        if self.usage_ttl != "0" {
            for (usage, deltas) in ledger {
                let index = days.iter().position(|d| *d == usage.day).unwrap_or(0) + 1;
                for (field, delta) in FIELDS.iter().zip(deltas) {
                    if *delta != 0 {
                        call.arg(index)
                            .arg(format!("{}:{field}", usage.route))
                            .arg(*delta);
                    }
                }
            }
        }
        let (credits, leased, outstanding, active, wanted): (i64, i64, i64, i64, i64) =
            self.call(call.invoke_async(&mut c)).await.map_err(failed)?;
        Ok(Reported {
            credits,
            leased,
            outstanding: u64::try_from(outstanding).ok(),
            active: active == 1,
            wanted: wanted == 1,
        })
    }

    /// A report that may have been applied went unanswered for longer than
    /// Redis remembers its id: it is not sent again (at most once: its
    /// spending may go uncharged, never charged twice).
    pub fn report_forgotten(&self, hash: &KeyHash, spent: i64) {
        self.unknowable(&format!(
            "a lease report of key {} ({spent} credit(s) spent)",
            hash.id()
        ));
    }
}
