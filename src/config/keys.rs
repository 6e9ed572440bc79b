//! The keys file (`store.keys_file`, and `tollgate keys import`):
//! `keys: [{key | sha256, name, credits, rate_per_second, state}]`.
//! Plaintext keys are hashed as they are read and never kept. Every store
//! loads keys in this form, so it lives with the configuration, below them.

use serde::Deserialize;

use super::{choice, limits, ConfigError};
use crate::key::KeyHash;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Revoked => "revoked",
        }
    }
}

const KEY_STATES: &[(&str, KeyState)] =
    &[("active", KeyState::Active), ("revoked", KeyState::Revoked)];

/// One key as a keys file describes it, hashed.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub hash: KeyHash,
    pub name: String,
    pub credits: u64,
    pub rate_per_second: Option<u32>,
    pub state: KeyState,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeys {
    keys: Vec<FileKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    key: Option<String>,
    sha256: Option<String>,
    name: String,
    credits: u64,
    rate_per_second: Option<u32>,
    #[serde(default)]
    state: Option<String>,
}

/// Parse a keys file; plaintext keys are hashed here and dropped.
pub fn parse_keys(text: &str) -> Result<Vec<KeyRecord>, Vec<ConfigError>> {
    let text = limits::precheck(text.as_bytes(), limits::MAX_KEYS_BYTES).map_err(|e| vec![e])?;
    let file: FileKeys = serde_yaml::from_str(text).map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            message: limits::locate(&e, text),
        }]
    })?;
    let mut errors = Vec::new();
    let mut records: Vec<KeyRecord> = Vec::new();
    for (i, k) in file.keys.into_iter().enumerate() {
        let Some(record) = convert_key(i, k, &mut errors) else {
            continue;
        };
        if records.iter().any(|r| r.hash == record.hash) {
            errors.push(ConfigError {
                path: format!("keys[{i}].key"),
                message: "the same key appears twice".into(),
            });
            continue;
        }
        records.push(record);
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(errors)
    }
}

/// One entry of the keys file (`keys[i]`); duplicates are the caller's to find.
fn convert_key(i: usize, k: FileKey, errors: &mut Vec<ConfigError>) -> Option<KeyRecord> {
    let mut fail = |field: &str, message: String| {
        errors.push(ConfigError {
            path: format!("keys[{i}].{field}"),
            message,
        })
    };
    let hash = match (&k.key, &k.sha256) {
        (Some(key), None) if !key.is_empty() => Some(KeyHash::of(key)),
        (Some(_), None) => {
            fail("key", "must not be empty".into());
            None
        }
        (None, Some(hex)) => {
            let h = KeyHash::from_hex(&hex.to_ascii_lowercase());
            if h.is_none() {
                fail("sha256", format!("expected 64 hex digits, got \"{hex}\""));
            }
            h
        }
        _ => {
            fail(
                "key",
                "give exactly one of key (plaintext) or sha256".into(),
            );
            None
        }
    };
    if k.name.is_empty() {
        fail("name", "must not be empty".into());
    }
    if let Some(e) = limits::KEY_CREDITS.problem("credits", k.credits) {
        fail("credits", e.message);
    }
    if let Some(e) = k
        .rate_per_second
        .and_then(|r| limits::KEY_RATE.problem("", r.into()))
    {
        fail("rate_per_second", e.message);
    }
    let state = k.state.as_deref().unwrap_or("active");
    let state = choice(&format!("keys[{i}].state"), state, KEY_STATES, errors);
    Some(KeyRecord {
        hash: hash?,
        name: k.name,
        credits: k.credits,
        rate_per_second: k.rate_per_second,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_and_hashed_keys_parse() {
        let text = "keys:\n  - {key: \"demo\", name: demo, credits: 10, rate_per_second: 5}\n  - {sha256: \"9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\", name: ops, credits: 50, state: revoked}\n";
        let keys = parse_keys(text).unwrap();
        assert_eq!(keys[0].hash, KeyHash::of("demo"));
        assert_eq!(keys[0].rate_per_second, Some(5));
        assert_eq!(keys[1].hash, KeyHash::of("test"));
        assert_eq!(keys[1].state, KeyState::Revoked);
        assert_eq!(keys[1].rate_per_second, None);
    }

    #[test]
    fn bad_entries_name_index_and_field() {
        let text = "keys:\n  - {key: a, name: a, credits: 1}\n  - {sha256: \"abc\", name: b, credits: 1}\n  - {key: c, sha256: \"x\", name: c, credits: 1}\n  - {key: d, name: \"\", credits: 1, state: paused}\n  - {key: a, name: again, credits: 1}\n";
        let e: Vec<String> = parse_keys(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            e,
            vec![
                "keys[1].sha256: expected 64 hex digits, got \"abc\"",
                "keys[2].key: give exactly one of key (plaintext) or sha256",
                "keys[3].name: must not be empty",
                "keys[3].state: unknown value \"paused\", expected active | revoked",
                "keys[4].key: the same key appears twice",
            ]
        );
    }

    #[test]
    fn unknown_fields_and_types_are_errors() {
        let e = parse_keys("keys:\n  - {key: a, name: a, credits: lots}\n").unwrap_err();
        assert!(
            e[0].to_string()
                .starts_with("keys[0].credits: invalid type"),
            "{e:?}"
        );
        let e = parse_keys("keys:\n  - {key: a, name: a, credits: 1, plan: gold}\n").unwrap_err();
        assert!(e[0].to_string().contains("unknown field `plan`"), "{e:?}");
    }
}
