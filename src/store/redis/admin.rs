//! Managing keys in Redis ([`KeyAdmin`]): the fields of a key's hash and
//! their text forms, and the scripts that change an existing key and nothing
//! else. Lifecycle fields: `expires_at` (RFC 3339, UTC), `routes` (route
//! names joined by commas), `refill_credits`, `refill_period` (`daily` |
//! `monthly`), `refilled_for` (the period last refilled, written by the
//! charge script).

use std::collections::HashMap;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::{RedisStore, StoreError};
use crate::config::keys::{self, KeyRecord, KeyState, Lifecycle, Period, Refill};
use crate::key::KeyHash;
use crate::store::{KeyAdmin, KeyInfo, KeyPatch, KeyRow};

/// Add credits to an existing key. Returns the new balance, or -1 if unknown.
pub(super) const ADD_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'credits', ARGV[1])
";

/// Make a key from (field, value) pairs in ARGV unless it exists: one
/// script, so that no lookup sees a half-written key and a failed call
/// leaves nothing behind. Returns 1, or 0 if the key exists (nothing written).
pub(super) const INSERT_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
";

/// Set an existing key's state. Returns 1, or 0 if unknown.
pub(super) const STATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
";

/// Set fields of an existing key from (field, value) pairs in ARGV; an empty
/// value deletes the field. Returns 1, or 0 if unknown (nothing written).
pub(super) const UPDATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
";

/// A key's lifecycle from its hash fields' text; unreadable parts count as
/// absent (a hand-edited hash must not take a key down).
fn lifecycle_of(
    expires_at: Option<&str>,
    routes: Option<&str>,
    refill: Option<(&str, &str)>,
) -> Lifecycle {
    Lifecycle {
        expires_at: expires_at.and_then(keys::parse_time),
        routes: routes
            .filter(|r| !r.is_empty())
            .map(|r| r.split(',').map(str::to_string).collect()),
        refill: refill.and_then(|(credits, period)| {
            Some(Refill {
                credits: credits.parse().ok()?,
                period: Period::parse(period)?,
            })
        }),
    }
}

fn state_of(state: &str) -> KeyState {
    if state == "active" {
        KeyState::Active
    } else {
        KeyState::Revoked
    }
}

/// What a request needs to know of a key, from `HMGET` of
/// [`super::INFO_FIELDS`]; `None` for an unknown key.
pub(super) fn info_of(hash: &KeyHash, fields: &[Option<String>]) -> Option<KeyInfo> {
    let field = |i: usize| fields.get(i).and_then(Option::as_deref);
    Some(KeyInfo {
        id: hash.id(),
        name: field(0).unwrap_or_default().to_string(),
        rate_per_second: field(1).and_then(|r| r.parse().ok()),
        state: state_of(field(2)?),
        lifecycle: lifecycle_of(field(3), field(4), None),
    })
}

fn row_of(hash: &KeyHash, fields: &HashMap<String, String>) -> Option<KeyRow> {
    let field = |name: &str| fields.get(name).map(String::as_str);
    let refill = field("refill_credits").zip(field("refill_period"));
    Some(KeyRow {
        id: hash.id(),
        name: field("name").unwrap_or_default().to_string(),
        credits: field("credits").and_then(|c| c.parse().ok()).unwrap_or(0),
        rate_per_second: field("rate_per_second").and_then(|r| r.parse().ok()),
        state: state_of(field("state")?),
        created: field("created").and_then(|c| c.parse().ok()),
        lifecycle: lifecycle_of(field("expires_at"), field("routes"), refill),
        refilled_for: field("refilled_for").map(str::to_string),
    })
}

/// The hash fields that hold a lifecycle, for a new key; a refill counts as
/// applied for the current period.
fn lifecycle_fields(l: &Lifecycle, now: i64) -> Vec<(&'static str, String)> {
    let mut fields = Vec::new();
    if let Some(at) = l.expires_at {
        fields.push(("expires_at", keys::format_time(at)));
    }
    if let Some(routes) = &l.routes {
        fields.push(("routes", routes.join(",")));
    }
    if let Some(r) = l.refill {
        fields.push(("refill_credits", r.credits.to_string()));
        fields.push(("refill_period", r.period.as_str().to_string()));
        fields.push(("refilled_for", r.period.label(now)));
    }
    fields
}

/// A patch as (field, value) pairs for [`UPDATE_LUA`] ("" deletes).
fn patch_fields(patch: &KeyPatch, now: i64) -> Vec<(&'static str, String)> {
    let mut fields = Vec::new();
    if let Some(name) = &patch.name {
        fields.push(("name", name.clone()));
    }
    if let Some(rate) = patch.rate_per_second {
        fields.push((
            "rate_per_second",
            rate.map_or(String::new(), |r| r.to_string()),
        ));
    }
    if let Some(at) = patch.expires_at {
        fields.push(("expires_at", at.map_or(String::new(), keys::format_time)));
    }
    if let Some(routes) = &patch.routes {
        fields.push((
            "routes",
            routes.as_ref().map_or(String::new(), |r| r.join(",")),
        ));
    }
    if let Some(refill) = patch.refill {
        let (credits, period, since) = refill.map_or(Default::default(), |r| {
            (
                r.credits.to_string(),
                r.period.as_str().to_string(),
                r.period.label(now),
            )
        });
        fields.push(("refill_credits", credits));
        fields.push(("refill_period", period));
        fields.push(("refilled_for", since));
    }
    fields
}

#[async_trait]
impl KeyAdmin for RedisStore {
    async fn insert(&self, record: &KeyRecord) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let key = self.redis_key(&record.hash);
        let now = keys::now();
        let mut fields: Vec<(&str, String)> = vec![
            ("name", record.name.clone()),
            ("credits", record.credits.to_string()),
            ("state", record.state.as_str().to_string()),
            ("created", now.to_string()),
        ];
        if let Some(rate) = record.rate_per_second {
            fields.push(("rate_per_second", rate.to_string()));
        }
        fields.extend(lifecycle_fields(&record.lifecycle, now));
        let mut call = self.insert.key(key);
        for (field, value) in &fields {
            call.arg(*field).arg(value);
        }
        let fresh: i64 = self.bounded(call.invoke_async(&mut c)).await?;
        Ok(fresh == 1)
    }

    async fn row(&self, hash: &KeyHash) -> Result<Option<KeyRow>, StoreError> {
        let mut c = self.conn().await?;
        let fields: HashMap<String, String> = self.bounded(c.hgetall(self.redis_key(hash))).await?;
        Ok(row_of(hash, &fields))
    }

    async fn find_by_id(&self, id_prefix: &str) -> Result<Vec<KeyHash>, StoreError> {
        self.hashes(id_prefix).await
    }

    async fn update(&self, hash: &KeyHash, patch: &KeyPatch) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let mut call = self.update.key(self.redis_key(hash));
        for (field, value) in patch_fields(patch, keys::now()) {
            call.arg(field).arg(value);
        }
        let found: i64 = self.bounded(call.invoke_async(&mut c)).await?;
        self.forget(hash);
        Ok(found == 1)
    }

    async fn add_credits(&self, hash: &KeyHash, credits: u64) -> Result<Option<u64>, StoreError> {
        let balance: i64 = self.script(&self.add, hash, credits).await?;
        Ok(u64::try_from(balance).ok())
    }

    async fn set_state(&self, hash: &KeyHash, state: KeyState) -> Result<bool, StoreError> {
        let found: i64 = self.script(&self.set_state, hash, state.as_str()).await?;
        self.forget(hash);
        Ok(found == 1)
    }

    async fn created(&self) -> Result<(), StoreError> {
        if !self.is_set_up().await? {
            self.mark_set_up().await?;
        }
        Ok(())
    }
}
