//! `tollgate keys`: manage API keys in the configured store. With Redis every
//! subcommand works on the shared store. With the embedded store the keys file
//! is the store: `list`/`show` read it, `create` appends a hashed entry (seen
//! at the next start); `topup`, `revoke` and `import` need Redis, because
//! embedded balances live in one process's memory. `import` and `create`
//! mark a Redis as set up (`{prefix}store`); `import` into a Redis with
//! neither the marker nor keys needs `--init`, since that Redis may be one
//! that lost its data, where an import would reset every balance.

use std::io::Write;

use clap::Subcommand;
use rand::RngCore;

use crate::config::keys::{parse_keys, KeyRecord, KeyState};
use crate::config::Config;
use crate::key::KeyHash;
use crate::store::redis::{Marker, RedisStore};
use crate::store::KeyRow;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints it once, alone on the first line.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        credits: u64,
        /// Requests per second (default: rate_limit.per_second).
        #[arg(long)]
        rate: Option<u32>,
    },
    /// List keys (never the keys themselves).
    List,
    /// Show one key by key or id (the first 12 hex digits of its SHA-256).
    Show { key_or_id: String },
    /// Add credits.
    Topup {
        key_or_id: String,
        #[arg(long)]
        credits: u64,
    },
    /// Revoke a key: its requests get 403 from then on.
    Revoke { key_or_id: String },
    /// Load a keys file into Redis; keys already there are left unchanged.
    Import {
        file: String,
        /// Set up a Redis that holds no tollgate data yet. Without it, import
        /// refuses such a Redis: it may be one that lost its data, where
        /// importing would reset every balance to the file's.
        #[arg(long)]
        init: bool,
    },
    /// Move keys stored by a tollgate before the key layout's hash tag
    /// (`key:<sha256>` to `key:{<sha256>}`); run before the new gateways
    /// take traffic.
    Migrate,
}

/// A new random key: `tg_` and 192 random bits in hex.
pub fn generate() -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("tg_{}", hex::encode(bytes))
}

fn is_id(s: &str) -> bool {
    s.len() == 12
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why `keys import` refuses a Redis without the store marker.
const NOT_SET_UP: &str = "this Redis holds no tollgate data (no store marker): either it is new, \
or it lost its data (restarted without persistence). If it lost its data, restore it from a \
backup (AOF or RDB) instead: importing resets every balance to the file's and gives back \
credits already spent. To set up a new store, run `tollgate keys import --init FILE`.";

/// Why the keys commands refuse a store in the old layout.
const OLD_LAYOUT: &str = "this Redis holds keys in the layout of an older tollgate \
(key:<sha256>, without the hash tag): run `tollgate keys migrate` first (README, Stores)";

const HEADER: &str = "ID            NAME                 CREDITS        RATE  STATE";

fn print_row(out: &mut impl Write, r: &KeyRow) -> std::io::Result<()> {
    let rate = r
        .rate_per_second
        .map_or("default".to_string(), |r| r.to_string());
    writeln!(
        out,
        "{:<13} {:<20} {:>8} {:>11}  {}",
        r.id,
        r.name,
        r.credits,
        rate,
        r.state.as_str()
    )
}

fn io(e: std::io::Error) -> String {
    e.to_string()
}

/// Run a `keys` subcommand, writing what it prints to `out`.
pub async fn run(config: &Config, cmd: KeysCommand, out: &mut impl Write) -> Result<(), String> {
    match &config.store.redis {
        Some(redis) => {
            let store = RedisStore::new(redis, &config.store.key_prefix, config.store.timeout)
                .map_err(|e| format!("{}: {e}", redis.field()))?;
            run_redis(&store, cmd, out).await
        }
        None => run_embedded(config, cmd, out),
    }
}

async fn find_redis(store: &RedisStore, key_or_id: &str) -> Result<KeyHash, String> {
    if is_id(key_or_id) {
        let found = store
            .find_by_id(key_or_id)
            .await
            .map_err(|e| e.to_string())?;
        return match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!("no key with id {key_or_id}")),
            _ => Err(format!("more than one key with id {key_or_id}")),
        };
    }
    Ok(KeyHash::from_hex(key_or_id).unwrap_or_else(|| KeyHash::of(key_or_id)))
}

async fn run_redis(
    store: &RedisStore,
    cmd: KeysCommand,
    out: &mut impl Write,
) -> Result<(), String> {
    let e = redis_error;
    let marker = store.marker_state().await.map_err(e)?;
    if marker == Marker::OldLayout && !matches!(cmd, KeysCommand::Migrate) {
        return Err(OLD_LAYOUT.into());
    }
    match cmd {
        KeysCommand::Migrate => {
            let (moved, kept) = store.migrate().await.map_err(e)?;
            writeln!(
                out,
                "moved {moved} key(s) to the current layout; {kept} already there under the new name, old entry left"
            )
            .map_err(io)?;
        }
        KeysCommand::Create {
            name,
            credits,
            rate,
        } => create_redis(store, name, credits, rate, out).await?,
        KeysCommand::List => {
            writeln!(out, "{HEADER}").map_err(io)?;
            for row in store.rows().await.map_err(e)? {
                print_row(out, &row).map_err(io)?;
            }
        }
        KeysCommand::Show { key_or_id } => {
            let hash = find_redis(store, &key_or_id).await?;
            let row = store.row(&hash).await.map_err(e)?.ok_or("no such key")?;
            writeln!(out, "{HEADER}").map_err(io)?;
            print_row(out, &row).map_err(io)?;
        }
        KeysCommand::Topup { key_or_id, credits } => {
            let hash = find_redis(store, &key_or_id).await?;
            let balance = store
                .add_credits(&hash, credits)
                .await
                .map_err(e)?
                .ok_or("no such key")?;
            writeln!(out, "id {} credits {balance}", hash.id()).map_err(io)?;
        }
        KeysCommand::Revoke { key_or_id } => {
            let hash = find_redis(store, &key_or_id).await?;
            if !store.set_state(&hash, KeyState::Revoked).await.map_err(e)? {
                return Err("no such key".into());
            }
            writeln!(out, "id {} revoked", hash.id()).map_err(io)?;
        }
        KeysCommand::Import { file, init } => import_redis(store, &file, init, out).await?,
    }
    Ok(())
}

fn redis_error(e: crate::store::StoreError) -> String {
    format!("redis: {e}")
}

/// `keys create` on Redis: a new key, printed once; the store counts as set up.
async fn create_redis(
    store: &RedisStore,
    name: String,
    credits: u64,
    rate: Option<u32>,
    out: &mut impl Write,
) -> Result<(), String> {
    let e = redis_error;
    let key = generate();
    let record = KeyRecord {
        hash: KeyHash::of(&key),
        name,
        credits,
        rate_per_second: rate,
        state: KeyState::Active,
    };
    if !store.insert(&record).await.map_err(e)? {
        return Err("a key with this hash exists already; run create again".into());
    }
    if !store.is_set_up().await.map_err(e)? {
        store.mark_set_up().await.map_err(e)?;
    }
    writeln!(out, "{key}").map_err(io)?;
    writeln!(
        out,
        "id {} name {} credits {credits}",
        record.hash.id(),
        record.name
    )
    .map_err(io)
}

/// `keys import` on Redis: adds the file's keys, never changes present ones.
/// An empty, never set-up store needs `--init` (a wrong `redis_url` must not
/// look like a fresh store).
async fn import_redis(
    store: &RedisStore,
    file: &str,
    init: bool,
    out: &mut impl Write,
) -> Result<(), String> {
    let e = redis_error;
    let text = std::fs::read_to_string(file).map_err(|err| format!("cannot read {file}: {err}"))?;
    let records = parse_keys(&text).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|er| format!("{file}: {er}")).collect();
        lines.join("\n")
    })?;
    let set_up = store.is_set_up().await.map_err(e)?;
    if !set_up && !init && !store.has_keys().await.map_err(e)? {
        return Err(NOT_SET_UP.into());
    }
    let (mut added, mut kept) = (0, 0);
    for r in &records {
        if store.insert(r).await.map_err(e)? {
            added += 1;
        } else {
            kept += 1;
        }
    }
    store.mark_set_up().await.map_err(e)?;
    writeln!(
        out,
        "imported {added} key(s); {kept} already present, left unchanged"
    )
    .map_err(io)
}

fn run_embedded(config: &Config, cmd: KeysCommand, out: &mut impl Write) -> Result<(), String> {
    let records = &config.store.keys;
    let find = |key_or_id: &str| -> Result<&KeyRecord, String> {
        let hit: Vec<&KeyRecord> = if is_id(key_or_id) {
            records
                .iter()
                .filter(|r| r.hash.id() == key_or_id)
                .collect()
        } else {
            let h = KeyHash::from_hex(key_or_id).unwrap_or_else(|| KeyHash::of(key_or_id));
            records.iter().filter(|r| r.hash == h).collect()
        };
        match hit.as_slice() {
            [one] => Ok(one),
            [] => Err("no such key in store.keys_file".into()),
            _ => Err(format!("more than one key with id {key_or_id}")),
        }
    };
    match cmd {
        KeysCommand::List => {
            writeln!(out, "{HEADER}").map_err(io)?;
            for r in records {
                print_row(out, &KeyRow::of(r)).map_err(io)?;
            }
            Ok(())
        }
        KeysCommand::Show { key_or_id } => {
            let r = find(&key_or_id)?;
            writeln!(out, "{HEADER}").map_err(io)?;
            print_row(out, &KeyRow::of(r)).map_err(io)
        }
        KeysCommand::Create { name, credits, rate } => {
            let file = config
                .store
                .keys_file
                .as_deref()
                .ok_or("the embedded store needs store.keys_file to create keys in")?;
            let key = generate();
            append_entry(file, &KeyHash::of(&key), &name, credits, rate)?;
            writeln!(out, "{key}").map_err(io)?;
            writeln!(
                out,
                "id {} name {name} credits {credits} (added to {file}; active after the next start or reload)",
                KeyHash::of(&key).id()
            )
            .map_err(io)
        }
        KeysCommand::Topup { .. }
        | KeysCommand::Revoke { .. }
        | KeysCommand::Import { .. }
        | KeysCommand::Migrate => Err(
            "this needs the Redis store (store.redis_url, redis_sentinel or redis_cluster): embedded balances live in the gateway's memory. \
             With the embedded store, edit store.keys_file and restart or reload the gateway."
                .into(),
        ),
    }
}

/// Append a hashed entry to a keys file, keeping its text (and comments);
/// the file is checked after the change and restored if it no longer parses.
fn append_entry(
    file: &str,
    hash: &KeyHash,
    name: &str,
    credits: u64,
    rate: Option<u32>,
) -> Result<(), String> {
    let before = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let name_json = serde_json::to_string(name).map_err(|e| e.to_string())?;
    let rate = rate.map_or(String::new(), |r| format!(", rate_per_second: {r}"));
    let mut after = before.clone();
    if !after.ends_with('\n') {
        after.push('\n');
    }
    after.push_str(&format!(
        "  - {{sha256: \"{}\", name: {name_json}, credits: {credits}{rate}}}\n",
        hash.hex()
    ));
    if parse_keys(&after).map(|r| r.len()) != parse_keys(&before).map(|r| r.len() + 1) {
        return Err(format!(
            "cannot append to {file}: it must end with its `keys:` list in block style"
        ));
    }
    std::fs::write(file, after).map_err(|e| format!("cannot write {file}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_prefixed_long_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(a.starts_with("tg_") && a.len() == 3 + 48, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn ids_are_twelve_lower_hex_digits() {
        assert!(is_id("9f86d081884c"));
        assert!(!is_id("9F86D081884C"));
        assert!(!is_id("tg_123456789"));
        assert!(!is_id("9f86d081884"));
    }
}
