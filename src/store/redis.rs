//! The Redis store, shared by every gateway node. A key is a hash at
//! `{prefix}key:{sha256}` (name, credits, rate_per_second, state, created).
//! The credit decision is one Lua script per request (EVALSHA, reloaded on
//! NOSCRIPT), so nodes never overspend; key metadata is cached in process for
//! at most [`META_TTL`]. The connection is made on first use, i.e. inside the
//! service after Pingora daemonized, and the connection manager reconnects by
//! itself. Every call is bounded by `store.timeout_ms`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::OnceCell;

use super::{Charge, KeyInfo, KeyRecord, KeyRow, KeyState, Store, StoreError};
use crate::auth::KeyHash;

/// How long key metadata (state, rate) may be served from the process cache:
/// a revocation or a rate change shows on every node within this time.
pub const META_TTL: Duration = Duration::from_secs(1);
/// The metadata cache is cleared when it holds more entries than this.
const META_CACHE_MAX: usize = 100_000;

/// Check state and balance, take the cost. Returns {code, balance}:
/// 0 unknown, 1 revoked, 2 insufficient, 3 charged.
const CHARGE_LUA: &str = r"
local h = redis.call('HMGET', KEYS[1], 'state', 'credits')
if not h[1] then return {0, 0} end
if h[1] ~= 'active' then return {1, 0} end
local credits = tonumber(h[2]) or 0
local cost = tonumber(ARGV[1])
if credits < cost then return {2, credits} end
if cost == 0 then return {3, credits} end
return {3, redis.call('HINCRBY', KEYS[1], 'credits', -cost)}
";

/// Add credits to an existing key. Returns the new balance, or -1 if unknown.
const ADD_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'credits', ARGV[1])
";

/// Set an existing key's state. Returns 1, or 0 if unknown.
const STATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
";

/// Key metadata as last read from Redis (`None`: unknown key), and when.
type CachedInfo = (Instant, Option<Arc<KeyInfo>>);

pub struct RedisStore {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    meta: Mutex<HashMap<KeyHash, CachedInfo>>,
    charge: Script,
    add: Script,
    set_state: Script,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl RedisStore {
    /// Parse the URL; nothing connects until the first call.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<RedisStore, StoreError> {
        Ok(RedisStore {
            client: redis::Client::open(url).map_err(err)?,
            conn: OnceCell::new(),
            prefix: prefix.to_string(),
            timeout,
            meta: Mutex::new(HashMap::new()),
            charge: Script::new(CHARGE_LUA),
            add: Script::new(ADD_LUA),
            set_state: Script::new(STATE_LUA),
        })
    }

    fn redis_key(&self, hash: &KeyHash) -> String {
        format!("{}key:{}", self.prefix, hash.hex())
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let manager = self
            .conn
            .get_or_try_init(|| async {
                ConnectionManager::new_lazy_with_config(self.client.clone(), config).map_err(err)
            })
            .await?;
        Ok(manager.clone())
    }

    /// Run one Redis call under the store's timeout.
    async fn bounded<T, F>(&self, call: F) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(err),
            Err(_) => Err(StoreError(format!(
                "no answer from Redis within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Run one of the scripts on a key (EVALSHA, reloaded on NOSCRIPT).
    async fn script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        hash: &KeyHash,
        arg: impl redis::ToRedisArgs,
    ) -> Result<T, StoreError> {
        let mut c = self.conn().await?;
        let mut call = script.key(self.redis_key(hash));
        call.arg(arg);
        self.bounded(call.invoke_async(&mut c)).await
    }

    fn forget(&self, hash: &KeyHash) {
        if let Ok(mut meta) = self.meta.lock() {
            meta.remove(hash);
        }
    }

    /// All of a key's fields, `None` if unknown.
    pub async fn row(&self, hash: &KeyHash) -> Result<Option<KeyRow>, StoreError> {
        let mut c = self.conn().await?;
        let fields: HashMap<String, String> = self.bounded(c.hgetall(self.redis_key(hash))).await?;
        Ok(row_of(*hash, &fields))
    }

    /// Every key, for `tollgate keys list`.
    pub async fn rows(&self) -> Result<Vec<KeyRow>, StoreError> {
        let mut c = self.conn().await?;
        let pattern = format!("{}key:*", self.prefix);
        let names: Vec<String> = {
            let mut iter = self.bounded(c.scan_match::<_, String>(&pattern)).await?;
            let mut names = Vec::new();
            while let Some(item) = futures::StreamExt::next(&mut iter).await {
                names.push(item.map_err(err)?);
            }
            names
        };
        let mut rows = Vec::new();
        for name in names {
            let Some(hash) = name.rsplit(':').next().and_then(KeyHash::from_hex) else {
                continue;
            };
            if let Some(row) = self.row(&hash).await? {
                rows.push(row);
            }
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(rows)
    }

    /// Store a new key; `false` if it exists already (nothing changed).
    pub async fn insert(&self, record: &KeyRecord) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let key = self.redis_key(&record.hash);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut fields: Vec<(&str, String)> = vec![
            ("name", record.name.clone()),
            ("credits", record.credits.to_string()),
            ("state", record.state.as_str().to_string()),
            ("created", created.to_string()),
        ];
        if let Some(rate) = record.rate_per_second {
            fields.push(("rate_per_second", rate.to_string()));
        }
        // HSETNX on the state field decides atomically whether the key is new.
        let fresh: bool = self
            .bounded(c.hset_nx(&key, "state", record.state.as_str()))
            .await?;
        if fresh {
            let () = self.bounded(c.hset_multiple(&key, &fields)).await?;
        }
        Ok(fresh)
    }

    /// Add credits; the new balance, `None` if the key is unknown.
    pub async fn add_credits(
        &self,
        hash: &KeyHash,
        credits: u64,
    ) -> Result<Option<u64>, StoreError> {
        let balance: i64 = self.script(&self.add, hash, credits).await?;
        Ok(u64::try_from(balance).ok())
    }

    /// Set a key's state; `false` if the key is unknown.
    pub async fn set_state(&self, hash: &KeyHash, state: KeyState) -> Result<bool, StoreError> {
        let found: i64 = self.script(&self.set_state, hash, state.as_str()).await?;
        self.forget(hash);
        Ok(found == 1)
    }

    /// The hashes of keys whose id starts with `id_prefix` (hex).
    pub async fn find_by_id(&self, id_prefix: &str) -> Result<Vec<KeyHash>, StoreError> {
        let mut c = self.conn().await?;
        let pattern = format!("{}key:{id_prefix}*", self.prefix);
        let mut iter = self.bounded(c.scan_match::<_, String>(&pattern)).await?;
        let mut found = Vec::new();
        while let Some(item) = futures::StreamExt::next(&mut iter).await {
            if let Some(h) = item
                .map_err(err)?
                .rsplit(':')
                .next()
                .and_then(KeyHash::from_hex)
            {
                found.push(h);
            }
        }
        Ok(found)
    }
}

fn row_of(hash: KeyHash, fields: &HashMap<String, String>) -> Option<KeyRow> {
    let state = match fields.get("state")?.as_str() {
        "active" => KeyState::Active,
        _ => KeyState::Revoked,
    };
    Some(KeyRow {
        id: hash.id(),
        name: fields.get("name").cloned().unwrap_or_default(),
        credits: fields
            .get("credits")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        rate_per_second: fields.get("rate_per_second").and_then(|r| r.parse().ok()),
        state,
        created: fields.get("created").and_then(|c| c.parse().ok()),
    })
}

#[async_trait]
impl Store for RedisStore {
    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyInfo>>, StoreError> {
        if let Ok(meta) = self.meta.lock() {
            if let Some((at, info)) = meta.get(hash) {
                if at.elapsed() < META_TTL {
                    return Ok(info.clone());
                }
            }
        }
        let mut c = self.conn().await?;
        let (name, rate, state): (Option<String>, Option<u32>, Option<String>) = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(self.redis_key(hash))
                    .arg(&["name", "rate_per_second", "state"])
                    .query_async(&mut c),
            )
            .await?;
        let info = state.map(|s| {
            Arc::new(KeyInfo {
                id: hash.id(),
                name: name.unwrap_or_default(),
                rate_per_second: rate,
                state: if s == "active" {
                    KeyState::Active
                } else {
                    KeyState::Revoked
                },
            })
        });
        if let Ok(mut meta) = self.meta.lock() {
            if meta.len() >= META_CACHE_MAX {
                meta.clear();
            }
            meta.insert(*hash, (Instant::now(), info.clone()));
        }
        Ok(info)
    }

    async fn charge(&self, hash: &KeyHash, cost: u64) -> Result<Charge, StoreError> {
        let (code, balance): (i64, i64) = self.script(&self.charge, hash, cost).await?;
        let balance = u64::try_from(balance).unwrap_or(0);
        Ok(match code {
            3 => Charge::Charged { remaining: balance },
            2 => Charge::Insufficient { remaining: balance },
            1 => {
                self.forget(hash);
                Charge::Revoked
            }
            _ => {
                self.forget(hash);
                Charge::Unknown
            }
        })
    }

    async fn refund(&self, hash: &KeyHash, amount: u64) -> Result<Option<u64>, StoreError> {
        self.add_credits(hash, amount).await
    }

    fn has_shared_cache(&self) -> bool {
        true
    }

    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut c = self.conn().await?;
        self.bounded(c.get(format!("{}cache:{key}", self.prefix)))
            .await
    }

    async fn cache_put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let opts = redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(millis));
        self.bounded(c.set_options(format!("{}cache:{key}", self.prefix), value, opts))
            .await
    }
}
