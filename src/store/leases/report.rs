//! Reporting leases (the node's side of `store.leases`): each second every
//! lease's spending, refunds and usage ledger deltas go to Redis in one
//! report, which renews, shrinks or ends it; a report whose answer was lost
//! is sent again as it is (Redis applies each once, by its id). At stop
//! [`LeaseKeeper`] ends every lease, giving the unspent credits back.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::{Lease, LeasedStore, IDLE, REPORT_EVERY, TICK, YIELD_IDLE};
use crate::key::KeyHash;
use crate::store::redis::lease::{Deltas, Report, ReportFailed, Reported, REPORT_MEMORY};
use crate::store::{StoreError, Usage};

/// A report sent and not answered, as it was sent.
#[derive(Debug)]
pub(super) struct Unanswered {
    id: u64,
    spent: i64,
    give: u64,
    end: bool,
    ledger: BTreeMap<Usage, Deltas>,
    /// When it was first sent.
    sent: Instant,
}

/// What a report says to do with its lease next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Report again when due.
    Wait,
    /// Another node wants the credits this idle lease holds: end it now.
    Yield,
}

impl LeasedStore {
    /// Report every lease once; `end` ends them all (stop). Updates the
    /// credits-held gauge.
    pub async fn report_all(&self, end: bool) -> usize {
        let leases: Vec<(KeyHash, Arc<tokio::sync::Mutex<Lease>>)> = {
            let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
            book.iter().map(|(h, l)| (*h, l.clone())).collect()
        };
        let mut failed = 0;
        let mut held = 0;
        for (hash, lease) in leases {
            let mut reported = self.report(&hash, &lease, end).await;
            if matches!(reported, Ok(Next::Yield)) {
                // Wanted elsewhere, and idle here: give it back now.
                reported = self.report(&hash, &lease, true).await;
            }
            if reported.is_err() {
                failed += 1;
            }
            held += lease.lock().await.unspent;
        }
        if let Some(c) = &self.counters {
            c.credits.set(i64::try_from(held).unwrap_or(i64::MAX));
        }
        failed
    }

    /// Report one lease when due (each [`REPORT_EVERY`], or at once when
    /// another node wants its idle credits): what it spent and its ledger,
    /// giving back what is above its size (everything when idle, wanted or
    /// ending). The node counts what it holds itself: Redis' record of the
    /// lease changes by exactly what the node sends, so takes and reports
    /// may cross. A report whose answer was lost is sent again first, as it
    /// was: Redis applies each report once (by its id), so spending is never
    /// charged twice.
    async fn report(
        &self,
        hash: &KeyHash,
        lease: &Arc<tokio::sync::Mutex<Lease>>,
        end: bool,
    ) -> Result<Next, StoreError> {
        let unanswered = {
            let mut l = lease.lock().await;
            if l.unanswered.is_some() {
                if !end && l.reported.elapsed() < REPORT_EVERY {
                    return Ok(Next::Wait);
                }
                l.reported = Instant::now();
            }
            l.unanswered.take()
        };
        if let Some(report) = unanswered {
            if report.sent.elapsed() < REPORT_MEMORY {
                self.send(hash, lease, report).await?;
            } else {
                // Redis no longer remembers its id: sending it again could
                // charge its spending twice. Left uncharged, as a dead node's.
                self.redis.report_forgotten(hash, report.spent);
                lease.lock().await.reporting -= report.spent;
            }
        }
        let report = {
            let mut l = lease.lock().await;
            let idle = l.used.elapsed();
            let yielding = l.wanted && l.unspent > 0 && idle >= YIELD_IDLE;
            if !end && !yielding && l.reported.elapsed() < REPORT_EVERY {
                return Ok(Next::Wait);
            }
            let end = end || yielding || idle >= IDLE;
            let want = self.want(&l, 1);
            let give = if end {
                l.unspent
            } else {
                l.unspent.saturating_sub(want)
            };
            let quiet = l.spent == 0 && l.ledger.is_empty() && give == 0 && !end;
            let fresh = l.renewed.is_some_and(|r| r.elapsed() * 3 < self.config.ttl);
            if quiet && fresh {
                return Ok(Next::Wait);
            }
            if l.renewed.is_none() && l.spent == 0 && l.ledger.is_empty() {
                // Never taken: nothing to report.
                drop(l);
                self.forget(hash, lease);
                return Ok(Next::Wait);
            }
            let spent = std::mem::take(&mut l.spent);
            l.reporting += spent;
            l.reported = Instant::now();
            l.unspent -= give;
            Unanswered {
                id: rand::random::<u64>(),
                spent,
                give,
                end,
                ledger: std::mem::take(&mut l.ledger),
                sent: Instant::now(),
            }
        };
        self.send(hash, lease, report).await
    }

    /// Send one report and take in Redis' answer. Failed: a report Redis
    /// may have applied is kept to be sent again as it is; one it surely did
    /// not goes back into the next report.
    async fn send(
        &self,
        hash: &KeyHash,
        lease: &Arc<tokio::sync::Mutex<Lease>>,
        report: Unanswered,
    ) -> Result<Next, StoreError> {
        let reported = self
            .redis
            .report_lease(
                &self.scripts,
                hash,
                &self.node,
                self.config.ttl,
                Report {
                    id: report.id,
                    spent: report.spent,
                    give: report.give,
                    end: report.end,
                    ledger: &report.ledger,
                },
            )
            .await;
        let mut l = lease.lock().await;
        match reported {
            Ok(answer) => {
                let (next, gone) = l.answered(report.spent, answer);
                drop(l);
                if gone {
                    self.forget(hash, lease);
                }
                Ok(next)
            }
            Err(ReportFailed {
                error,
                maybe_ran: true,
            }) => {
                log::warn!(
                    "store: a lease report of key {} got no answer, sent again as it is \
                     until Redis answers: {error}",
                    hash.id()
                );
                l.unanswered = Some(report);
                Err(error)
            }
            Err(ReportFailed { error, .. }) => {
                log::warn!(
                    "store: a lease report of key {} failed, joins the next one: {error}",
                    hash.id()
                );
                l.take_back(report);
                Err(error)
            }
        }
    }
}

impl Lease {
    /// Redis applied a report that spent `spent` and answered: the key's
    /// balance, the lease as Redis has it now, and whether another node
    /// wants credits. Also whether the lease is gone (ended in Redis, and
    /// nothing here left to report), for the caller to forget.
    fn answered(&mut self, spent: i64, answer: Reported) -> (Next, bool) {
        let Reported {
            credits,
            leased,
            outstanding,
            active,
            wanted,
        } = answer;
        self.reporting -= spent;
        self.balance = credits;
        self.leased = leased;
        self.wanted = wanted;
        self.renewed = Some(Instant::now());
        if outstanding.is_none() || !active {
            // Ended, taken back after its expiry, or the key revoked.
            self.unspent = 0;
        }
        let gone = outstanding.is_none()
            && self.spent == 0
            && self.ledger.is_empty()
            && self.unanswered.is_none();
        let next = if wanted && self.unspent > 0 && self.used.elapsed() >= YIELD_IDLE {
            Next::Yield
        } else {
            Next::Wait
        };
        (next, gone)
    }

    /// A report Redis surely did not apply: its spending, the credits it
    /// gave back and its ledger join the next report.
    fn take_back(&mut self, report: Unanswered) {
        self.reporting -= report.spent;
        self.spent += report.spent;
        self.unspent += report.give;
        for (usage, deltas) in report.ledger {
            self.count(usage, deltas);
        }
    }
}

/// Reports every lease each second; at stop ends them all.
pub struct LeaseKeeper(pub Arc<LeasedStore>);

#[async_trait]
impl BackgroundService for LeaseKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let store = &self.0;
        loop {
            tokio::select! {
                () = tokio::time::sleep(TICK) => {
                    store.report_all(false).await;
                }
                _ = shutdown.changed() => break,
            }
        }
        // Stopping: charges go to Redis one by one from now on; the leases
        // are ended, and refunds of earlier lease charges reported, until the
        // process exits.
        store.closing.store(true, Ordering::Relaxed);
        let mut said = false;
        loop {
            let failed = store.report_all(true).await;
            if failed == 0 && store.held() == 0 && !said {
                log::info!("leases: every lease given back");
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
