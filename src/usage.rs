//! Exporting the usage ledger, once for `tollgate usage` and `GET
//! /v1/usage`: a range of UTC days read one day at a time from a
//! [`UsageLedger`] and written as JSON lines or CSV (a header row, RFC 4180
//! quoting by the `csv` crate), in chunks, so that an export never holds more
//! than one day's rows. Rows carry the key's id and name and nothing else of
//! it.

use chrono::NaiveDate;
use serde::Serialize;

use std::io::Write;

use crate::config::Config;
use crate::key::KeyHash;
use crate::keyops;
use crate::store::redis::RedisStore;
use crate::store::{StoreError, Usage, UsageLedger, UsageRow};

/// The most days one export may span.
pub const MAX_DAYS: i64 = 3660;

/// How the rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "jsonl" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jsonl => "application/jsonl",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }
}

/// A day (`YYYY-MM-DD`) as days since 1970-01-01.
pub fn parse_date(s: &str) -> Option<i64> {
    if s.len() != 10 {
        return None;
    }
    let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    Some((date - epoch).num_days())
}

/// The days `from`..=`to` (`YYYY-MM-DD`, each today when absent); a problem
/// names the parameter.
pub fn range(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), String> {
    let today = Usage::now("").day;
    let day = |name: &str, text: Option<&str>| match text {
        None => Ok(today),
        Some(t) => {
            parse_date(t).ok_or_else(|| format!("{name}: expected a date YYYY-MM-DD, got \"{t}\""))
        }
    };
    let (from, to) = (day("from", from)?, day("to", to)?);
    if from > to {
        return Err("from: must not be after to".into());
    }
    if to - from >= MAX_DAYS {
        return Err(format!("to: a range spans at most {MAX_DAYS} days"));
    }
    Ok((from, to))
}

/// A row as the export writes it, in the contract's column order.
#[derive(Serialize)]
struct Line<'a> {
    date: &'a str,
    key_id: &'a str,
    name: &'a str,
    route: &'a str,
    requests: u64,
    credits: u64,
    refunded: u64,
    cache_hits: u64,
}

impl<'a> From<&'a UsageRow> for Line<'a> {
    fn from(r: &'a UsageRow) -> Line<'a> {
        Line {
            date: &r.date,
            key_id: &r.key_id,
            name: &r.name,
            route: &r.route,
            requests: r.requests,
            credits: r.credits,
            refunded: r.refunded,
            cache_hits: r.cache_hits,
        }
    }
}

/// An export in progress: call [`Export::next_chunk`] until it is `None`.
pub struct Export<'a> {
    ledger: &'a dyn UsageLedger,
    next_day: i64,
    last_day: i64,
    key: Option<KeyHash>,
    format: Format,
    header_written: bool,
}

impl<'a> Export<'a> {
    pub fn new(
        ledger: &'a dyn UsageLedger,
        (from, to): (i64, i64),
        key: Option<KeyHash>,
        format: Format,
    ) -> Export<'a> {
        Export {
            ledger,
            next_day: from,
            last_day: to,
            key,
            format,
            header_written: false,
        }
    }

    /// The next day's rows with any (the CSV header comes first, also when
    /// there are no rows); `None` when done.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        if self.format == Format::Csv && !self.header_written {
            self.header_written = true;
            let header = "date,key_id,name,route,requests,credits,refunded,cache_hits\n";
            out.extend_from_slice(header.as_bytes());
        }
        while self.next_day <= self.last_day {
            let day = self.next_day;
            self.next_day += 1;
            let rows = self.ledger.usage_day(day, self.key.as_ref()).await?;
            if !rows.is_empty() {
                self.write(&rows, &mut out)?;
                return Ok(Some(out));
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    fn write(&self, rows: &[UsageRow], out: &mut Vec<u8>) -> Result<(), StoreError> {
        let fail = |e: &dyn std::fmt::Display| StoreError(format!("usage export: {e}"));
        match self.format {
            Format::Jsonl => {
                for row in rows {
                    serde_json::to_writer(&mut *out, &Line::from(row)).map_err(|e| fail(&e))?;
                    out.push(b'\n');
                }
            }
            Format::Csv => {
                let mut csv = csv::WriterBuilder::new()
                    .has_headers(false)
                    .from_writer(&mut *out);
                for row in rows {
                    csv.serialize(Line::from(row)).map_err(|e| fail(&e))?;
                }
                csv.flush().map_err(|e| fail(&e))?;
            }
        }
        Ok(())
    }
}

/// `tollgate usage`: the export on the configured Redis, to `out`.
pub async fn run(
    config: &Config,
    (from, to): (Option<&str>, Option<&str>),
    key: Option<&str>,
    format: &str,
    out: &mut impl Write,
) -> Result<(), String> {
    let format = Format::parse(format)
        .ok_or_else(|| format!("--format: expected jsonl or csv, got \"{format}\""))?;
    let days = range(from, to).map_err(|e| format!("--{e}"))?;
    let Some(redis) = &config.store.redis else {
        return Err("the embedded store keeps its usage ledger in the gateway's memory: \
                    read it from the running gateway with GET /v1/usage on admin_listen (README, Admin API)"
            .into());
    };
    let store = RedisStore::new(redis, &config.store.key_prefix, config.store.timeout)
        .map_err(|e| format!("{}: {e}", redis.field()))?
        .with_usage_retention(config.usage_retention_days);
    let key = match key {
        Some(k) => Some(
            keyops::find_known(&store, k)
                .await
                .map_err(|e| format!("--key: {e}"))?,
        ),
        None => None,
    };
    let mut export = Export::new(&store, days, key, format);
    while let Some(chunk) = export
        .next_chunk()
        .await
        .map_err(|e| format!("redis: {e}"))?
    {
        out.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ranges() {
        assert_eq!(parse_date("1970-01-02"), Some(1));
        assert_eq!(parse_date("2026-11-01"), Some(20_758));
        assert_eq!(parse_date("2026-11-31"), None);
        assert_eq!(parse_date("26-11-01"), None);
        assert_eq!(
            range(Some("2026-11-01"), Some("2026-11-30")),
            Ok((20_758, 20_787))
        );
        assert!(range(Some("2026-12-01"), Some("2026-11-30"))
            .unwrap_err()
            .starts_with("from:"));
        assert!(range(Some("yesterday"), None)
            .unwrap_err()
            .starts_with("from:"));
        assert!(range(Some("2000-01-01"), Some("2026-01-01"))
            .unwrap_err()
            .starts_with("to:"));
    }
}
