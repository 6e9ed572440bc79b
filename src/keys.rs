//! `tollgate keys`: manage API keys in the configured store. With Redis every
//! subcommand works on the shared store, through `keyops` (the admin API
//! calls the same functions). With the embedded store the keys file is the
//! store: `list`/`show` read it, `create` appends a hashed entry (seen at the
//! next start); `update`, `topup`, `revoke` and `import` need Redis, because
//! embedded balances live in one process's memory (the running gateway's
//! admin API changes them there). `import` and `create`
//! mark a Redis as set up (`{prefix}store`); `import` into a Redis with
//! neither the marker nor keys needs `--init`, since that Redis may be one
//! that lost its data, where an import would reset every balance.

use std::io::Write;

use clap::{Args, Subcommand};

use crate::config::keys::{self, parse_keys, KeyRecord, Lifecycle, Refill};
use crate::config::Config;
use crate::key::KeyHash;
use crate::keyops::{self, is_id, NewKey};
use crate::store::redis::{Marker, RedisStore};
use crate::store::{KeyAdmin, KeyPatch, KeyRow};

/// The settings `create` and `update` take beside the name.
#[derive(Debug, Args, Default)]
pub struct PlanArgs {
    /// When the key stops working: an RFC 3339 time, or `never`.
    #[arg(long, value_name = "RFC3339|never")]
    expires: Option<String>,
    /// The routes the key may call, by name, or `all`.
    #[arg(long, value_name = "NAME,NAME|all")]
    routes: Option<String>,
    /// The allowance that comes back each UTC day or month, or `none`.
    #[arg(long, value_name = "CREDITS/daily|CREDITS/monthly|none")]
    refill: Option<String>,
}

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
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Change a key's name, rate, expiry, routes or refill.
    Update {
        key_or_id: String,
        #[arg(long)]
        name: Option<String>,
        /// Requests per second, or `default` (rate_limit.per_second).
        #[arg(long, value_name = "N|default")]
        rate: Option<String>,
        #[command(flatten)]
        plan: PlanArgs,
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
    /// Make a new admin API token: prints it, then the `admin.token_sha256`
    /// line for the configuration (only the hash is kept there).
    AdminToken,
    /// Move keys stored by a tollgate before the key layout's hash tag
    /// (`key:<sha256>` to `key:{<sha256>}`); run before the new gateways
    /// take traffic.
    Migrate,
}

/// Why `keys import` refuses a Redis without the store marker.
const NOT_SET_UP: &str = "this Redis holds no tollgate data (no store marker): either it is new, \
or it lost its data (restarted without persistence). If it lost its data, restore it from a \
backup (AOF or RDB) instead: importing resets every balance to the file's and gives back \
credits already spent. To set up a new store, run `tollgate keys import --init FILE`.";

/// Why the keys commands refuse a store in the old layout.
const OLD_LAYOUT: &str = "this Redis holds keys in the layout of an older tollgate \
(key:<sha256>, without the hash tag): run `tollgate keys migrate` first (README, Stores)";

const HEADER: &str = "ID            NAME                 CREDITS        RATE  STATE    EXPIRES               ROUTES  REFILL";

fn print_row(out: &mut impl Write, r: &KeyRow) -> std::io::Result<()> {
    let rate = r
        .rate_per_second
        .map_or("default".to_string(), |r| r.to_string());
    let l = &r.lifecycle;
    writeln!(
        out,
        "{:<13} {:<20} {:>8} {:>11}  {:<8} {:<21} {:<7} {}",
        r.id,
        r.name,
        r.credits,
        rate,
        r.state.as_str(),
        l.expires_at.map_or("never".into(), keys::format_time),
        l.routes.as_ref().map_or("all".into(), |r| r.join(",")),
        l.refill.map_or("none".into(), |r| r.to_string()),
    )
}

/// A flag that sets a value, or clears it when given the word `clear`
/// (`never`, `all`, `none`, `default`): `None` when the flag is absent.
fn set_or_clear<T>(
    flag: Option<&str>,
    clear: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<Option<T>>, String> {
    match flag {
        None => Ok(None),
        Some(text) if text == clear => Ok(Some(None)),
        Some(text) => parse(text).map(|v| Some(Some(v))),
    }
}

/// `--expires`, `--routes`, `--refill` as a patch of those three.
fn plan_patch(plan: &PlanArgs) -> Result<KeyPatch, String> {
    Ok(KeyPatch {
        expires_at: set_or_clear(plan.expires.as_deref(), "never", |t| {
            keys::parse_time(t).ok_or_else(|| {
                format!("--expires: expected an RFC 3339 time or never, got \"{t}\"")
            })
        })?,
        routes: set_or_clear(plan.routes.as_deref(), "all", |names| {
            Ok(names.split(',').map(|n| n.trim().to_string()).collect())
        })?,
        refill: set_or_clear(plan.refill.as_deref(), "none", |text| {
            Refill::parse(text).ok_or_else(|| {
                format!("--refill: expected CREDITS/daily, CREDITS/monthly or none, got \"{text}\"")
            })
        })?,
        ..KeyPatch::default()
    })
}

fn lifecycle_of(plan: &PlanArgs) -> Result<Lifecycle, String> {
    let patch = plan_patch(plan)?;
    Ok(Lifecycle {
        expires_at: patch.expires_at.flatten(),
        routes: patch.routes.flatten(),
        refill: patch.refill.flatten(),
    })
}

fn io(e: std::io::Error) -> String {
    e.to_string()
}

/// Run a `keys` subcommand, writing what it prints to `out`.
pub async fn run(config: &Config, cmd: KeysCommand, out: &mut impl Write) -> Result<(), String> {
    if let KeysCommand::AdminToken = cmd {
        let token = keyops::generate().replacen("tg_", "tga_", 1);
        let hash = KeyHash::of(&token).hex();
        writeln!(out, "{token}").map_err(io)?;
        return writeln!(out, "admin:\n  token_sha256: \"{hash}\"").map_err(io);
    }
    match &config.store.redis {
        Some(redis) => {
            let store = RedisStore::new(redis, &config.store.key_prefix, config.store.timeout)
                .map_err(|e| format!("{}: {e}", redis.field()))?;
            run_redis(&store, &config.route_names(), cmd, out).await
        }
        None => run_embedded(config, cmd, out),
    }
}

/// A subcommand on the Redis store: refused while the store is in the old
/// layout (but `migrate`, which moves it out of it).
async fn run_redis(
    store: &RedisStore,
    routes: &[&str],
    cmd: KeysCommand,
    out: &mut impl Write,
) -> Result<(), String> {
    let marker = store.marker_state().await.map_err(redis_error)?;
    if marker == Marker::OldLayout && !matches!(cmd, KeysCommand::Migrate) {
        return Err(OLD_LAYOUT.into());
    }
    let op = |e: keyops::OpError| e.to_string();
    match cmd {
        KeysCommand::Migrate => migrate_redis(store, out).await,
        KeysCommand::Create {
            name,
            credits,
            rate,
            plan,
        } => {
            let new = NewKey {
                name,
                credits,
                rate_per_second: rate,
                lifecycle: lifecycle_of(&plan)?,
            };
            create_redis(store, new, routes, out).await
        }
        KeysCommand::Update {
            key_or_id,
            name,
            rate,
            plan,
        } => {
            let patch = update_patch(name, rate.as_deref(), &plan)?;
            let row = keyops::update(store, &key_or_id, &patch, routes)
                .await
                .map_err(op)?;
            print_table(out, [row])
        }
        KeysCommand::List => {
            let (mut rows, _) = keyops::page(store, None, usize::MAX).await.map_err(op)?;
            rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
            print_table(out, rows)
        }
        KeysCommand::Show { key_or_id } => {
            let row = keyops::show(store, &key_or_id).await.map_err(op)?;
            print_table(out, [row])
        }
        KeysCommand::Topup { key_or_id, credits } => {
            let (id, balance) = keyops::topup(store, &key_or_id, credits)
                .await
                .map_err(op)?;
            writeln!(out, "id {id} credits {balance}").map_err(io)
        }
        KeysCommand::Revoke { key_or_id } => {
            let row = keyops::revoke(store, &key_or_id).await.map_err(op)?;
            writeln!(out, "id {} revoked", row.id).map_err(io)
        }
        KeysCommand::Import { file, init } => import_redis(store, routes, &file, init, out).await,
        KeysCommand::AdminToken => Ok(()),
    }
}

/// The key table: the header, then a row per key.
fn print_table(out: &mut impl Write, rows: impl IntoIterator<Item = KeyRow>) -> Result<(), String> {
    writeln!(out, "{HEADER}").map_err(io)?;
    for row in rows {
        print_row(out, &row).map_err(io)?;
    }
    Ok(())
}

/// `keys migrate`: move keys of the old layout under their hash-tagged names.
async fn migrate_redis(store: &RedisStore, out: &mut impl Write) -> Result<(), String> {
    let (moved, kept) = store.migrate().await.map_err(redis_error)?;
    writeln!(
        out,
        "moved {moved} key(s) to the current layout; {kept} already there under the new name, old entry left"
    )
    .map_err(io)
}

/// `keys create` on Redis: prints the key alone on the first line, as it is
/// shown only this once.
async fn create_redis(
    store: &RedisStore,
    new: NewKey,
    routes: &[&str],
    out: &mut impl Write,
) -> Result<(), String> {
    let (key, row) = keyops::create(store, new, routes)
        .await
        .map_err(|e| e.to_string())?;
    writeln!(out, "{key}").map_err(io)?;
    writeln!(
        out,
        "id {} name {} credits {}",
        row.id, row.name, row.credits
    )
    .map_err(io)
}

/// `keys update`'s flags as a patch; one that changes nothing is refused.
fn update_patch(
    name: Option<String>,
    rate: Option<&str>,
    plan: &PlanArgs,
) -> Result<KeyPatch, String> {
    let mut patch = plan_patch(plan)?;
    patch.name = name;
    patch.rate_per_second = set_or_clear(rate, "default", |n| {
        n.parse()
            .map_err(|_| format!("--rate: expected a number or default, got \"{n}\""))
    })?;
    if patch.is_empty() {
        return Err(
            "nothing to change: give --name, --rate, --expires, --routes or --refill".into(),
        );
    }
    Ok(patch)
}

fn redis_error(e: crate::store::StoreError) -> String {
    format!("redis: {e}")
}

/// `keys import` on Redis: adds the file's keys, never changes present ones.
/// An empty, never set-up store needs `--init` (a wrong `redis_url` must not
/// look like a fresh store).
async fn import_redis(
    store: &RedisStore,
    routes: &[&str],
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
    let unknown: Vec<String> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let problem = keys::routes_problem(r.lifecycle.routes.as_deref()?, Some(routes))?;
            Some(format!("{file}: keys[{i}].routes: {problem}"))
        })
        .collect();
    if !unknown.is_empty() {
        return Err(unknown.join("\n"));
    }
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

/// A subcommand on the embedded store, whose keys file is the store: only
/// `list`, `show` and `create` work on it.
fn run_embedded(config: &Config, cmd: KeysCommand, out: &mut impl Write) -> Result<(), String> {
    let records = &config.store.keys;
    match cmd {
        KeysCommand::List => print_table(out, records.iter().map(KeyRow::of)),
        KeysCommand::Show { key_or_id } => {
            let r = find(records, &key_or_id)?;
            print_table(out, [KeyRow::of(r)])
        }
        KeysCommand::Create {
            name,
            credits,
            rate,
            plan,
        } => create_embedded(config, name, credits, rate, &plan, out),
        KeysCommand::Topup { .. }
        | KeysCommand::Update { .. }
        | KeysCommand::AdminToken
        | KeysCommand::Revoke { .. }
        | KeysCommand::Import { .. }
        | KeysCommand::Migrate => Err(
            "this needs the Redis store (store.redis_url, redis_sentinel or redis_cluster): embedded balances live in the gateway's memory. \
             With the embedded store, edit store.keys_file and restart or reload the gateway."
                .into(),
        ),
    }
}

/// The one record of the keys file with this key or id.
fn find<'a>(records: &'a [KeyRecord], key_or_id: &str) -> Result<&'a KeyRecord, String> {
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
}

/// `keys create` on the embedded store: appends the hashed key to the keys
/// file, which the gateway reads at its next start or reload.
fn create_embedded(
    config: &Config,
    name: String,
    credits: u64,
    rate: Option<u32>,
    plan: &PlanArgs,
    out: &mut impl Write,
) -> Result<(), String> {
    let file = config
        .store
        .keys_file
        .as_deref()
        .ok_or("the embedded store needs store.keys_file to create keys in")?;
    let key = keyops::generate();
    let record = KeyRecord {
        hash: KeyHash::of(&key),
        name,
        credits,
        rate_per_second: rate,
        state: keys::KeyState::Active,
        lifecycle: lifecycle_of(plan)?,
    };
    let routes = record.lifecycle.routes.as_deref().unwrap_or_default();
    if let Some(problem) = (!routes.is_empty())
        .then(|| keys::routes_problem(routes, Some(&config.route_names())))
        .flatten()
    {
        return Err(format!("--routes: {problem}"));
    }
    append_entry(file, &record)?;
    writeln!(out, "{key}").map_err(io)?;
    writeln!(
        out,
        "id {} name {} credits {credits} (added to {file}; active after the next start or reload)",
        record.hash.id(),
        record.name
    )
    .map_err(io)
}

/// Append a hashed entry to a keys file, keeping its text (and comments);
/// the file is checked after the change and restored if it no longer parses.
fn append_entry(file: &str, record: &KeyRecord) -> Result<(), String> {
    let before = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let json = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let mut entry = format!(
        "  - {{sha256: \"{}\", name: {}, credits: {}",
        record.hash.hex(),
        json(&record.name),
        record.credits
    );
    if let Some(rate) = record.rate_per_second {
        entry.push_str(&format!(", rate_per_second: {rate}"));
    }
    let l = &record.lifecycle;
    if let Some(at) = l.expires_at {
        entry.push_str(&format!(", expires_at: \"{}\"", keys::format_time(at)));
    }
    if let Some(routes) = &l.routes {
        let names: Vec<String> = routes.iter().map(|r| json(r)).collect();
        entry.push_str(&format!(", routes: [{}]", names.join(", ")));
    }
    if let Some(r) = l.refill {
        entry.push_str(&format!(
            ", refill: {{credits: {}, period: {}}}",
            r.credits,
            r.period.as_str()
        ));
    }
    entry.push_str("}\n");
    let mut after = before.clone();
    if !after.ends_with('\n') {
        after.push('\n');
    }
    after.push_str(&entry);
    if parse_keys(&after).map(|r| r.len()) != parse_keys(&before).map(|r| r.len() + 1) {
        return Err(format!(
            "cannot append to {file}: it must end with its `keys:` list in block style"
        ));
    }
    std::fs::write(file, after).map_err(|e| format!("cannot write {file}: {e}"))
}
