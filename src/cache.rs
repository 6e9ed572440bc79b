//! The response cache: what may be stored and for how long
//! (the backend's Cache-Control), the in-process tier (pingora-memory-cache,
//! TinyUFO) in front of the shared Redis tier (the entry and its encoding
//! for Redis: `entry.rs`), and coalescing of concurrent misses for one key
//! into one race. The key itself is the request target's
//! ([`Target::cache_key`](crate::target::Target::cache_key)).
//!
//! An entry lives `ttl + stale_if_error` in both tiers; within `ttl` it is
//! served (HIT), after it only when every backend fails (STALE). A Redis
//! error or an entry that does not decode is a miss, never a failed request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use pingora::cache::cache_control::CacheControl;
use pingora_memory_cache::MemoryCache;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::answer::Answer;
use crate::config::CacheConfig;
use crate::store::SharedCache;

mod entry;

pub use entry::Entry;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whole milliseconds of `d`, saturating at `u64::MAX`.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How long a backend answer may be served from cache, or `None` if it must
/// not be stored: `no-store`/`private`, a `Set-Cookie` (the answer may be
/// meant for one client; nginx and Varnish do not store these either), or a
/// body over the route's limit.
/// `s-maxage` (else `max-age`) shortens the route's TTL; it never lengthens it.
pub fn freshness(answer: &Answer, cfg: &CacheConfig) -> Option<Duration> {
    if answer.sets_cookie || answer.body.len() > cfg.max_body_bytes {
        return None;
    }
    let mut ttl = cfg.ttl;
    if let Some(value) = &answer.cache_control {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CACHE_CONTROL, value.clone());
        if let Some(cc) = CacheControl::from_headers_named("cache-control", &headers) {
            if cc.no_store() || cc.private() {
                return None;
            }
            let limit = cc
                .s_maxage()
                .ok()
                .flatten()
                .or_else(|| cc.max_age().ok().flatten());
            if let Some(secs) = limit {
                ttl = ttl.min(Duration::from_secs(u64::from(secs)));
            }
        }
    }
    (!ttl.is_zero()).then_some(ttl)
}

/// What a lookup found.
pub enum Found {
    Fresh(Arc<Entry>),
    /// Expired, but within its stale-if-error window.
    Stale(Arc<Entry>),
    Miss,
}

/// Whether this request races for its key or waits for another's race.
pub enum Turn {
    Leader(LeaderGuard),
    /// Resolves when the leader is done (its guard dropped).
    Follower(watch::Receiver<()>),
}

type Inflight = Arc<Mutex<HashMap<String, watch::Receiver<()>>>>;

/// Held by the request racing for a key; dropping it wakes the followers.
pub struct LeaderGuard {
    key: String,
    inflight: Inflight,
    _done: watch::Sender<()>,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.inflight.lock() {
            map.remove(&self.key);
        }
    }
}

pub struct Cache {
    memory: MemoryCache<String, Arc<Entry>>,
    shared: Option<Arc<dyn SharedCache>>,
    inflight: Inflight,
}

/// The outcome of the tiers, with whether a tier failed (counted as an
/// error) and when the lookup was made (unix ms: an entry's `Age` is counted
/// to then).
pub struct Lookup {
    pub found: Found,
    pub error: bool,
    pub at: u64,
}

impl Cache {
    /// `memory_entries` bounds the in-process tier; `shared` is the tier
    /// (Redis) behind it, if the store has one.
    pub fn new(memory_entries: usize, shared: Option<Arc<dyn SharedCache>>) -> Cache {
        Cache {
            memory: MemoryCache::new(memory_entries),
            shared,
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn classify(entry: Arc<Entry>, now: u64) -> Found {
        if entry.is_fresh(now) {
            Found::Fresh(entry)
        } else if now < entry.stale_until {
            Found::Stale(entry)
        } else {
            Found::Miss
        }
    }

    /// In-process tier first; on a miss or a stale entry, the shared tier
    /// (whose fresh entry then fills the in-process tier).
    pub async fn lookup(&self, key: &str) -> Lookup {
        let now = now_ms();
        let local = match self.memory.get(key).0 {
            Some(entry) => Cache::classify(entry, now),
            None => Found::Miss,
        };
        let (found, error) = match &self.shared {
            Some(shared) if !matches!(local, Found::Fresh(_)) => {
                self.shared_lookup(shared.as_ref(), key, local, now).await
            }
            _ => (local, false),
        };
        Lookup {
            found,
            error,
            at: now,
        }
    }

    /// The shared tier's entry for `key` when it is better than `local`,
    /// and whether the tier failed.
    async fn shared_lookup(
        &self,
        shared: &dyn SharedCache,
        key: &str,
        local: Found,
        now: u64,
    ) -> (Found, bool) {
        let bytes = match shared.cache_get(&shared_key(key)).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return (local, false),
            Err(e) => {
                log::debug!("cache: shared tier lookup failed: {e}");
                return (local, true);
            }
        };
        let Some(entry) = Entry::decode(&bytes) else {
            return (local, true);
        };
        let entry = Arc::new(entry);
        match Cache::classify(entry.clone(), now) {
            Found::Miss => (local, false),
            found => {
                if let Found::Fresh(_) = found {
                    let left = entry.stale_until.saturating_sub(now);
                    self.memory
                        .put(key, entry, Some(Duration::from_millis(left)));
                }
                (found, false)
            }
        }
    }

    /// Store a winning answer for `fresh`, kept `stale_if_error` longer.
    /// The shared tier is written in the background, off the request path.
    pub fn store(&self, key: &str, answer: &Answer, fresh: Duration, stale_if_error: Duration) {
        let now = now_ms();
        // Saturating: `check` bounds both, but no TTL may panic a request.
        let keep = fresh.saturating_add(stale_if_error);
        let entry = Arc::new(Entry {
            answer: Answer {
                cache_control: None,
                ..answer.clone()
            },
            stored_at: now,
            fresh_until: now.saturating_add(millis(fresh)),
            stale_until: now.saturating_add(millis(keep)),
        });
        self.memory.put(key, entry.clone(), Some(keep));
        if let Some(shared) = &self.shared {
            let (shared, skey, bytes) = (shared.clone(), shared_key(key), entry.encode());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = shared.cache_put(&skey, bytes, keep).await {
                        log::debug!("cache: shared tier store failed: {e}");
                    }
                });
            }
        }
    }

    /// Race for `key`, or wait for the request already racing for it.
    pub fn turn(&self, key: &str) -> Turn {
        let Ok(mut map) = self.inflight.lock() else {
            // A poisoned map only loses coalescing, never the request.
            let (tx, _) = watch::channel(());
            return Turn::Leader(LeaderGuard {
                key: String::new(),
                inflight: Arc::new(Mutex::new(HashMap::new())),
                _done: tx,
            });
        };
        if let Some(rx) = map.get(key) {
            return Turn::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(());
        map.insert(key.to_string(), rx);
        Turn::Leader(LeaderGuard {
            key: key.to_string(),
            inflight: self.inflight.clone(),
            _done: tx,
        })
    }
}

/// Wait until the leader is done, at most `limit`. Returns whether it finished.
pub async fn wait_for_leader(mut rx: watch::Receiver<()>, limit: Duration) -> bool {
    // `changed` fails as soon as the leader's sender is dropped.
    tokio::time::timeout(limit, async { while rx.changed().await.is_ok() {} })
        .await
        .is_ok()
}

/// The shared tier's name for a cache key: hashed, so any key fits.
fn shared_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderValue;

    fn answer(cc: Option<&str>, body: &str) -> Answer {
        Answer {
            status: 200,
            content_type: Some(HeaderValue::from_static("application/json")),
            cache_control: cc.map(|c| HeaderValue::from_str(c).unwrap()),
            content_encoding: None,
            sets_cookie: false,
            body: Bytes::from(body.to_string()),
        }
    }

    fn cfg() -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_secs(3600),
            stale_if_error: Duration::from_secs(60),
            max_body_bytes: 16,
        }
    }

    #[test]
    fn cache_control_decides_storing_and_ttl() {
        assert_eq!(
            freshness(&answer(None, "{}"), &cfg()),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(freshness(&answer(Some("no-store"), "{}"), &cfg()), None);
        assert_eq!(
            freshness(&answer(Some("private, max-age=60"), "{}"), &cfg()),
            None
        );
        assert_eq!(
            freshness(&answer(Some("max-age=1"), "{}"), &cfg()),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            freshness(&answer(Some("max-age=100, s-maxage=10"), "{}"), &cfg()),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            freshness(&answer(Some("max-age=99999"), "{}"), &cfg()),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(freshness(&answer(Some("max-age=0"), "{}"), &cfg()), None);
        assert_eq!(
            freshness(&answer(None, "this body is over sixteen"), &cfg()),
            None
        );
    }

    #[test]
    fn answers_that_set_a_cookie_are_not_stored() {
        let mut a = answer(None, "{}");
        assert!(freshness(&a, &cfg()).is_some());
        a.sets_cookie = true;
        assert_eq!(freshness(&a, &cfg()), None);
    }

    #[tokio::test]
    async fn one_leader_per_key_and_followers_wake_when_it_is_done() {
        let cache = Cache::new(100, None);
        let Turn::Leader(guard) = cache.turn("k") else {
            panic!("first should lead")
        };
        let Turn::Follower(rx) = cache.turn("k") else {
            panic!("second should follow")
        };
        assert!(matches!(cache.turn("other"), Turn::Leader(_)));
        let waiter = tokio::spawn(wait_for_leader(rx, Duration::from_secs(5)));
        drop(guard);
        assert!(waiter.await.unwrap());
        let Turn::Leader(_second) = cache.turn("k") else {
            panic!("the key should be free again")
        };
        let Turn::Follower(rx) = cache.turn("k") else {
            panic!("the new leader should hold the key")
        };
        assert!(!wait_for_leader(rx, Duration::from_millis(20)).await);
    }

    #[tokio::test]
    async fn memory_tier_serves_fresh_then_stale() {
        let cache = Cache::new(100, None);
        cache.store(
            "k",
            &answer(None, "{}"),
            Duration::from_millis(30),
            Duration::from_secs(60),
        );
        assert!(matches!(cache.lookup("k").await.found, Found::Fresh(_)));
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !matches!(cache.lookup("k").await.found, Found::Stale(_)) {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(matches!(cache.lookup("missing").await.found, Found::Miss));
    }

    #[tokio::test]
    async fn huge_ttls_saturate_instead_of_panicking() {
        let cache = Cache::new(100, None);
        cache.store("k", &answer(None, "{}"), Duration::MAX, Duration::MAX);
        let Found::Fresh(entry) = cache.lookup("k").await.found else {
            panic!("a stored entry should be fresh")
        };
        assert_eq!(entry.fresh_until, u64::MAX);
        assert_eq!(entry.stale_until, u64::MAX);
    }
}
