//! The usage ledger in Redis: one hash per key and UTC day at
//! `{prefix}usage:{<sha256>}:YYYY-MM-DD` (the key's hash tag, so the charge
//! and refund scripts write it in the key's slot), fields
//! `<route>:requests`, `<route>:credits`, `<route>:refunded`,
//! `<route>:cache_hits`. The scripts write requests, credits and refunds
//! with the balance; a cache hit is known only after the charge, so hits are
//! counted in process and added by [`super::Maintenance`] every second
//! (one script per key, day and route seen), never on the request path.
//! Each such flush carries an id that the script remembers for
//! [`OP_MEMORY`], as a refund does: a flush whose answer was not seen (a
//! timeout: Redis may run it when it wakes) is sent again with the same id
//! and counted once.
//! Reading a day SCANs for that day's rows (never `KEYS`), so an export
//! holds one day's rows at a time.

use std::collections::HashMap;
use std::time::Instant;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::{Failure, RedisStore, OP_MEMORY};
use crate::key::KeyHash;
use crate::store::{StoreError, Usage, UsageLedger, UsageRow};

/// The ledger's fields of one route, in a row's order.
const FIELDS: [&str; 4] = ["requests", "credits", "refunded", "cache_hits"];

/// Cache hits on their way to the ledger.
#[derive(Default)]
pub(super) struct Hits {
    /// Counted since the last flush, by key and ledger row.
    counted: HashMap<(KeyHash, Usage), u64>,
    /// Sent, and may have been counted, without an answer: sent again with
    /// the same id until Redis answers (at most [`OP_MEMORY`]).
    unanswered: Vec<Flush>,
}

/// One key's hits of one ledger row, as a flush sends them.
struct Flush {
    hash: KeyHash,
    usage: Usage,
    id: u64,
    hits: u64,
    /// When the first try that may have run without an answer was sent:
    /// after [`OP_MEMORY`] Redis no longer remembers it, so it is dropped
    /// (counted at most once, maybe not at all) rather than sent again.
    maybe_ran: Option<Instant>,
}

impl RedisStore {
    /// A key's ledger row for a day (`YYYY-MM-DD`).
    pub(super) fn usage_key(&self, hash: &KeyHash, date: &str) -> String {
        self.usage_name(&hash.hex(), date)
    }

    /// [`Self::usage_key`] of a hash already in hex.
    pub(super) fn usage_name(&self, hex: &str, date: &str) -> String {
        format!("{}usage:{{{hex}}}:{date}", self.prefix)
    }

    fn lock_hits(&self) -> std::sync::MutexGuard<'_, Hits> {
        self.hits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a delivered cache hit, to be written within a second.
    pub(super) fn note_hit(&self, hash: &KeyHash, usage: Usage) {
        if self.usage_ttl == "0" {
            return;
        }
        *self.lock_hits().counted.entry((*hash, usage)).or_default() += 1;
    }

    /// Write the cache hits counted so far, and send again those whose
    /// answer was not seen; those that fail wait for the next flush. `true`
    /// if all were written.
    pub(super) async fn flush_hits(&self) -> bool {
        let batch = self.take_hits();
        if batch.is_empty() {
            return true;
        }
        let results = self.write_hits(&batch).await;
        let (failed, error) = sort_answers(batch, results);
        if failed.is_empty() {
            return true;
        }
        if let Some(e) = error {
            let n: u64 = failed.iter().map(|f| f.hits).sum();
            log::warn!("store: usage ledger: {n} cache hit(s) not written yet: {e}");
        }
        self.keep_hits(failed);
        false
    }

    /// This flush's batch: the unanswered ones, then one new flush (with a
    /// new id) per key and row counted since the last. An unanswered one
    /// that Redis no longer remembers is dropped and counted as unknowable.
    fn take_hits(&self) -> Vec<Flush> {
        let batch: Vec<Flush> = {
            let mut hits = self.lock_hits();
            let mut batch = std::mem::take(&mut hits.unanswered);
            batch.extend(hits.counted.drain().map(|((hash, usage), n)| Flush {
                hash,
                usage,
                id: rand::random::<u64>(),
                hits: n,
                maybe_ran: None,
            }));
            batch
        };
        batch
            .into_iter()
            .filter(|f| {
                let forgotten = f.maybe_ran.is_some_and(|t| t.elapsed() >= OP_MEMORY);
                if forgotten {
                    self.unknowable(&format!(
                        "a write of {} cache hit(s) of key {} to the usage ledger",
                        f.hits,
                        f.hash.id()
                    ));
                }
                !forgotten
            })
            .collect()
    }

    /// Send the batch's flushes at once: for each, when it was sent and
    /// Redis's answer (whether it counted them now, or a failure).
    async fn write_hits(&self, batch: &[Flush]) -> Vec<(Instant, Result<i64, Failure>)> {
        let memory = Self::op_memory_ms();
        let writes = batch.iter().map(|f| {
            let memory = &memory;
            async move {
                let sent = Instant::now();
                let n = f.hits.to_string();
                let args = [&n, memory, f.usage.route, &self.usage_ttl];
                let result: Result<i64, Failure> = self
                    .script_op(&self.add_hits, &f.hash, f.id, f.usage, &args)
                    .await;
                (sent, result)
            }
        });
        futures::future::join_all(writes).await
    }

    /// Failed flushes wait for the next: one that may have run is sent
    /// again as it is (same id), one that did not joins the next count.
    fn keep_hits(&self, failed: Vec<Flush>) {
        let mut hits = self.lock_hits();
        for f in failed {
            if f.maybe_ran.is_some() {
                hits.unanswered.push(f);
            } else {
                // No try of it ran: it joins the next flush's count.
                *hits.counted.entry((f.hash, f.usage)).or_default() += f.hits;
            }
        }
    }
}

/// Match a batch with its answers: log how many hits sent again had been
/// counted already, and return the flushes that failed (marked from when
/// one may have run without an answer) with the last failure's error.
fn sort_answers(
    batch: Vec<Flush>,
    results: Vec<(Instant, Result<i64, Failure>)>,
) -> (Vec<Flush>, Option<StoreError>) {
    let (mut again, mut twice, mut failed) = (0, 0, Vec::new());
    let mut error = None;
    for (mut f, (sent, result)) in batch.into_iter().zip(results) {
        match result {
            Ok(counted) => {
                if f.maybe_ran.is_some() {
                    again += f.hits;
                    if counted == 0 {
                        twice += f.hits;
                    }
                }
            }
            Err(failure) => {
                if failure.maybe_ran {
                    f.maybe_ran.get_or_insert(sent);
                }
                error = Some(failure.error);
                failed.push(f);
            }
        }
    }
    if again > 0 {
        log::info!(
            "store: usage ledger: {again} cache hit(s) sent again after no answer, \
             {twice} of them counted already (not counted twice)"
        );
    }
    (failed, error)
}

/// A day's rows of one key from its ledger hash, sorted by route.
fn rows_of(hash: &KeyHash, date: &str, name: &str, fields: HashMap<String, i64>) -> Vec<UsageRow> {
    let mut by_route: HashMap<&str, [u64; 4]> = HashMap::new();
    for (field, value) in &fields {
        let Some((route, what)) = field.rsplit_once(':') else {
            continue;
        };
        let Some(i) = FIELDS.iter().position(|f| *f == what) else {
            continue;
        };
        by_route.entry(route).or_default()[i] = u64::try_from(*value).unwrap_or(0);
    }
    let mut rows: Vec<UsageRow> = by_route
        .into_iter()
        .map(
            |(route, [requests, credits, refunded, cache_hits])| UsageRow {
                date: date.to_string(),
                key_id: hash.id(),
                name: name.to_string(),
                route: route.to_string(),
                requests,
                credits,
                refunded,
                cache_hits,
            },
        )
        .collect();
    rows.sort_by(|a, b| a.route.cmp(&b.route));
    rows
}

#[async_trait]
impl UsageLedger for RedisStore {
    /// A day past `usage.retention_days` has no rows: its hash expires
    /// during day `day + retention_days` (its TTL runs from its first
    /// write), and until then it is left out, so that both stores export
    /// the same days.
    async fn usage_day(
        &self,
        day: i64,
        key: Option<&KeyHash>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let keep_days = self.usage_ttl.parse::<i64>().unwrap_or(0) / 86_400;
        if day < Usage::oldest_kept(Usage::now("").day, keep_days) {
            return Ok(Vec::new());
        }
        let date = Usage { route: "", day }.date();
        let mut hashes: Vec<KeyHash> = match key {
            Some(hash) => vec![*hash],
            None => {
                let pattern = format!("{}usage:{{*}}:{date}", self.prefix);
                let prefix = format!("{}usage:{{", self.prefix);
                self.names(&pattern)
                    .await?
                    .iter()
                    .filter_map(|n| {
                        let hex = n
                            .strip_prefix(&prefix)?
                            .strip_suffix(&format!("}}:{date}"))?;
                        KeyHash::from_hex(hex)
                    })
                    .collect()
            }
        };
        hashes.sort_by_key(|h| h.0);
        let mut c = self.conn().await?;
        let mut rows = Vec::new();
        for hash in hashes {
            let fields: HashMap<String, i64> = self
                .bounded(c.hgetall(self.usage_key(&hash, &date)))
                .await?;
            if fields.is_empty() {
                continue;
            }
            let name: Option<String> = self.bounded(c.hget(self.redis_key(&hash), "name")).await?;
            rows.extend(rows_of(&hash, &date, &name.unwrap_or_default(), fields));
        }
        Ok(rows)
    }
}
