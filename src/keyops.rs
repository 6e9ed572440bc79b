//! The key operations, once: create, update, top-up, revoke, show and list,
//! with their checks. `tollgate keys` (on Redis) and the admin API both call
//! these on a [`KeyAdmin`] store, so the two cannot disagree; each only turns
//! its input into these calls and the results into its own output.

use crate::config::keys::{self, KeyRecord, KeyState, Lifecycle};
use crate::config::limits;
use crate::key::KeyHash;
use crate::store::{KeyAdmin, KeyPatch, KeyRow, StoreError};

/// Why a key operation did not happen.
#[derive(Debug)]
pub enum OpError {
    /// No such key; with the id asked for, if it was asked by id.
    NotFound(Option<String>),
    /// An id prefix that more than one key shares.
    Ambiguous,
    /// A field's value is not acceptable: the field (as the admin API's JSON
    /// names it) and why.
    Invalid(&'static str, String),
    /// The store could not answer.
    Store(StoreError),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::NotFound(None) => f.write_str("no such key"),
            OpError::NotFound(Some(id)) => write!(f, "no key with id {id}"),
            OpError::Ambiguous => f.write_str("more than one key has this id"),
            OpError::Invalid(field, why) => write!(f, "{field}: {why}"),
            OpError::Store(e) => write!(f, "store: {e}"),
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::Store(e)
    }
}

/// A key to create.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub credits: u64,
    pub rate_per_second: Option<u32>,
    pub lifecycle: Lifecycle,
}

/// A new random key: `tg_` and 192 random bits in hex.
pub fn generate() -> String {
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    format!("tg_{}", hex::encode(bytes))
}

/// A key's id: the first 12 hex digits of its SHA-256.
pub fn is_id(s: &str) -> bool {
    s.len() == 12
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Check the fields a create or an update sets; `routes` is checked against
/// the configuration's route names.
fn check(
    name: Option<&str>,
    rate: Option<u32>,
    lifecycle: &Lifecycle,
    known_routes: &[&str],
) -> Result<(), OpError> {
    if name.is_some_and(|n| n.trim().is_empty()) {
        return Err(OpError::Invalid("name", "must not be empty".into()));
    }
    if let Some(e) = rate.and_then(|r| limits::KEY_RATE.problem("", r.into())) {
        return Err(OpError::Invalid("rate_per_second", e.message));
    }
    if let Some(routes) = &lifecycle.routes {
        if let Some(why) = keys::routes_problem(routes, Some(known_routes)) {
            return Err(OpError::Invalid("routes", why));
        }
    }
    if let Some(e) = lifecycle
        .refill
        .and_then(|r| limits::KEY_CREDITS.problem("", r.credits))
    {
        return Err(OpError::Invalid("refill", e.message));
    }
    Ok(())
}

/// Create a key: the new key (shown only now) and its row.
pub async fn create(
    store: &dyn KeyAdmin,
    new: NewKey,
    known_routes: &[&str],
) -> Result<(String, KeyRow), OpError> {
    check(
        Some(&new.name),
        new.rate_per_second,
        &new.lifecycle,
        known_routes,
    )?;
    if let Some(e) = limits::KEY_CREDITS.problem("", new.credits) {
        return Err(OpError::Invalid("credits", e.message));
    }
    let key = generate();
    let hash = KeyHash::of(&key);
    let record = KeyRecord {
        hash,
        name: new.name,
        credits: new.credits,
        rate_per_second: new.rate_per_second,
        state: KeyState::Active,
        lifecycle: new.lifecycle,
    };
    if !store.insert(&record).await? {
        // 192 random bits: only a broken random source gets here.
        return Err(OpError::Store(StoreError(
            "a key with this hash exists already; try again".into(),
        )));
    }
    store.created().await?;
    let row = store.row(&hash).await?.ok_or(OpError::NotFound(None))?;
    Ok((key, row))
}

/// The key a key or an id names.
pub async fn find(store: &dyn KeyAdmin, key_or_id: &str) -> Result<KeyHash, OpError> {
    if !is_id(key_or_id) {
        return Ok(KeyHash::from_hex(key_or_id).unwrap_or_else(|| KeyHash::of(key_or_id)));
    }
    match store.find_by_id(key_or_id).await?.as_slice() {
        [one] => Ok(*one),
        [] => Err(OpError::NotFound(Some(key_or_id.to_string()))),
        _ => Err(OpError::Ambiguous),
    }
}

/// [`find`], for a key that must exist: a key or a full hash that matches
/// no key is [`OpError::NotFound`], as an unknown id is (and the error does
/// not repeat what was asked, which may be a key).
pub async fn find_known(store: &dyn KeyAdmin, key_or_id: &str) -> Result<KeyHash, OpError> {
    let hash = find(store, key_or_id).await?;
    match store.row(&hash).await? {
        Some(_) => Ok(hash),
        None => Err(OpError::NotFound(None)),
    }
}

pub async fn show(store: &dyn KeyAdmin, key_or_id: &str) -> Result<KeyRow, OpError> {
    let hash = find(store, key_or_id).await?;
    store.row(&hash).await?.ok_or(OpError::NotFound(None))
}

/// Change a key's settings; its row after the change.
pub async fn update(
    store: &dyn KeyAdmin,
    key_or_id: &str,
    patch: &KeyPatch,
    known_routes: &[&str],
) -> Result<KeyRow, OpError> {
    let lifecycle = Lifecycle {
        expires_at: None,
        routes: patch.routes.clone().flatten(),
        refill: patch.refill.flatten(),
    };
    check(
        patch.name.as_deref(),
        patch.rate_per_second.flatten(),
        &lifecycle,
        known_routes,
    )?;
    let hash = find(store, key_or_id).await?;
    if !store.update(&hash, patch).await? {
        return Err(OpError::NotFound(None));
    }
    store.row(&hash).await?.ok_or(OpError::NotFound(None))
}

/// Add credits (more than 0); the key's id and new balance.
pub async fn topup(
    store: &dyn KeyAdmin,
    key_or_id: &str,
    credits: u64,
) -> Result<(String, u64), OpError> {
    if credits == 0 {
        return Err(OpError::Invalid("credits", "must be more than 0".into()));
    }
    if let Some(e) = limits::KEY_CREDITS.problem("", credits) {
        return Err(OpError::Invalid("credits", e.message));
    }
    let hash = find(store, key_or_id).await?;
    let balance = store
        .add_credits(&hash, credits)
        .await?
        .ok_or(OpError::NotFound(None))?;
    Ok((hash.id(), balance))
}

/// Revoke a key: its requests get 403 from then on (within a second on every
/// node). Its row after the change.
pub async fn revoke(store: &dyn KeyAdmin, key_or_id: &str) -> Result<KeyRow, OpError> {
    let hash = find(store, key_or_id).await?;
    if !store.set_state(&hash, KeyState::Revoked).await? {
        return Err(OpError::NotFound(None));
    }
    store.row(&hash).await?.ok_or(OpError::NotFound(None))
}

/// Up to `limit` keys in id order, after the key with id `after`; the id to
/// continue after when there may be more. Each page lists the store's key
/// names (SCAN on Redis), so a page costs one pass over them.
pub async fn page(
    store: &dyn KeyAdmin,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<KeyRow>, Option<String>), OpError> {
    let mut hashes = store.find_by_id("").await?;
    hashes.sort_by_key(|h| h.0);
    let start = after.map_or(0, |a| hashes.partition_point(|h| h.id().as_str() <= a));
    let mut rows = Vec::new();
    let mut last = None;
    for hash in &hashes[start..] {
        if rows.len() == limit {
            return Ok((rows, last));
        }
        if let Some(row) = store.row(hash).await? {
            last = Some(row.id.clone());
            rows.push(row);
        }
    }
    Ok((rows, None))
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
