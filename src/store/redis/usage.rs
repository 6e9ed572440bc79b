//! The usage ledger in Redis: one hash per key and UTC day at
//! `{prefix}usage:{<sha256>}:YYYY-MM-DD` (the key's hash tag, so the charge
//! and refund scripts write it in the key's slot), fields
//! `<route>:requests`, `<route>:credits`, `<route>:refunded`,
//! `<route>:cache_hits`. The scripts write requests, credits and refunds
//! with the balance; a cache hit is known only after the charge, so hits are
//! counted in process and added by [`super::Maintenance`] every second
//! (one `HINCRBY` per key, day and route seen), never on the request path.
//! Reading a day SCANs for that day's rows (never `KEYS`), so an export
//! holds one day's rows at a time.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::RedisStore;
use crate::key::KeyHash;
use crate::store::{StoreError, Usage, UsageLedger, UsageRow};

/// The ledger's fields of one route, in a row's order.
const FIELDS: [&str; 4] = ["requests", "credits", "refunded", "cache_hits"];

impl RedisStore {
    /// A key's ledger row for a day (`YYYY-MM-DD`).
    pub(super) fn usage_key(&self, hash: &KeyHash, date: &str) -> String {
        self.usage_name(&hash.hex(), date)
    }

    /// [`Self::usage_key`] of a hash already in hex.
    pub(super) fn usage_name(&self, hex: &str, date: &str) -> String {
        format!("{}usage:{{{hex}}}:{date}", self.prefix)
    }

    /// Count a delivered cache hit, to be written within a second.
    pub(super) fn note_hit(&self, hash: &KeyHash, usage: Usage) {
        if self.usage_ttl == "0" {
            return;
        }
        let mut hits = self.hits.lock().unwrap_or_else(|p| p.into_inner());
        *hits.entry((*hash, usage)).or_default() += 1;
    }

    /// Write the cache hits counted so far; those that fail wait for the
    /// next flush. `true` if all were written.
    pub(super) async fn flush_hits(&self) -> bool {
        let pending: HashMap<(KeyHash, Usage), u64> =
            std::mem::take(&mut *self.hits.lock().unwrap_or_else(|p| p.into_inner()));
        if pending.is_empty() {
            return true;
        }
        let writes = pending.iter().map(|((hash, usage), n)| async move {
            let mut c = self.conn().await?;
            let key = self.usage_key(hash, &usage.date());
            let field = format!("{}:cache_hits", usage.route);
            let ttl: i64 = self.usage_ttl.parse().unwrap_or(0);
            let pipe = redis::pipe()
                .atomic()
                .hincr(&key, field, *n)
                .ignore()
                .expire(&key, ttl)
                .ignore()
                .clone();
            self.bounded(pipe.query_async::<()>(&mut c)).await
        });
        let results = futures::future::join_all(writes).await;
        let mut all = true;
        let mut hits = self.hits.lock().unwrap_or_else(|p| p.into_inner());
        for (((hash, usage), n), result) in pending.into_iter().zip(results) {
            if result.is_err() {
                all = false;
                *hits.entry((hash, usage)).or_default() += n;
            }
        }
        all
    }
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
