//! tollgate: an API gateway for metered data APIs on Cloudflare Pingora.
//!
//! Each request is checked, routed by longest prefix and raced across the
//! route's interchangeable backends; the first successful answer wins and the
//! rest are cancelled. See `SPEC.md` (shared) for the contract.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod answer;
pub mod auth;
pub mod cache;
pub mod config;
pub mod connections;
pub mod credits;
pub mod drain;
pub mod front;
pub mod key;
pub mod keyops;
pub mod keys;
pub mod limits;
pub mod listeners;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod race;
pub mod reject;
pub mod reload;
pub mod request;
pub mod respond;
pub mod router;
pub mod store;
pub mod target;
pub mod tls;
pub mod usage;
