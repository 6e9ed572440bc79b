//! The admin API's bodies and answers as JSON: a key as the API shows it
//! (never the key, nor its full hash), and what each endpoint takes, with
//! unknown fields refused.

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::keys::{self, Period, Refill};
use crate::store::KeyRow;

/// A key as JSON: never the key, nor its full hash.
#[derive(Serialize)]
pub(super) struct KeyJson {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) credits: u64,
    pub(super) rate_per_second: Option<u32>,
    pub(super) state: &'static str,
    pub(super) created: Option<String>,
    pub(super) expires_at: Option<String>,
    pub(super) routes: Option<Vec<String>>,
    pub(super) refill: Option<RefillJson>,
}

/// `POST /v1/keys`' answer: the key, shown only here, then its JSON.
#[derive(Serialize)]
pub(super) struct Created {
    pub(super) key: String,
    #[serde(flatten)]
    pub(super) row: KeyJson,
}

#[derive(Serialize)]
pub(super) struct Page {
    pub(super) keys: Vec<KeyJson>,
    pub(super) next_cursor: Option<String>,
}

#[derive(Serialize)]
pub(super) struct Balance {
    pub(super) id: String,
    pub(super) credits: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(super) struct RefillJson {
    pub(super) credits: u64,
    pub(super) period: PeriodJson,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum PeriodJson {
    Daily,
    Monthly,
}

impl From<RefillJson> for Refill {
    fn from(r: RefillJson) -> Refill {
        let period = match r.period {
            PeriodJson::Daily => Period::Daily,
            PeriodJson::Monthly => Period::Monthly,
        };
        Refill {
            credits: r.credits,
            period,
        }
    }
}

pub(super) fn key_json(r: &KeyRow) -> KeyJson {
    KeyJson {
        id: r.id.clone(),
        name: r.name.clone(),
        credits: r.credits,
        rate_per_second: r.rate_per_second,
        state: r.state.as_str(),
        created: r
            .created
            .and_then(|c| i64::try_from(c).ok())
            .map(keys::format_time),
        expires_at: r.lifecycle.expires_at.map(keys::format_time),
        routes: r.lifecycle.routes.clone(),
        refill: r.lifecycle.refill.map(|f| RefillJson {
            credits: f.credits,
            period: match f.period {
                Period::Daily => PeriodJson::Daily,
                Period::Monthly => PeriodJson::Monthly,
            },
        }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBody {
    pub(super) name: String,
    pub(super) credits: u64,
    pub(super) rate_per_second: Option<u32>,
    pub(super) expires_at: Option<String>,
    pub(super) routes: Option<Vec<String>>,
    pub(super) refill: Option<RefillJson>,
}

/// `null` clears a field; a field left out stays as it is. A key always has
/// a name: `"name": null` is refused, not ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchBody {
    #[serde(default, deserialize_with = "not_null")]
    pub(super) name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub(super) rate_per_second: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    pub(super) expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub(super) routes: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub(super) refill: Option<Option<RefillJson>>,
}

/// A field that, when there, must hold a value (`null` is an error).
fn not_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A field that is there, `null` or not.
pub(super) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TopupBody {
    pub(super) credits: u64,
}
