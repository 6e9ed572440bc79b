//! Runtime configuration values that name a choice: how a route's backends
//! are tried and what wins, where access lines go. They are read by the
//! modules that act on them (`race`, `logging`) but belong to the
//! configuration, which must not depend on those modules.

use std::path::PathBuf;

/// How a route's backends are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every backend at once.
    Race,
    /// Backend i starts `i × hedge_after` after the first (or at once when
    /// every started attempt has already failed).
    Hedge,
    /// One at a time, in order; the next starts when the previous failed.
    Failover,
}

/// When a `hedge` route starts its next backend (`hedge_after_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeAfter {
    /// This long after the previous start.
    Fixed(std::time::Duration),
    /// The route's observed 95th percentile of answer latency (`auto`).
    Auto,
}

/// What makes a backend answer a winner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuccessRule {
    /// 2xx and a JSON body whose top-level `status` is `true`.
    JsonStatus,
    /// Any 2xx.
    Http2xx,
}

/// Where access lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessTarget {
    Stderr,
    File(PathBuf),
    Off,
}
