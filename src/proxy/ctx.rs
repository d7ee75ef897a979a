//! The per-request context: one slice per stage, each owned and documented by its stage.
//!
//! Created once per request in `new_ctx`; Pingora keeps it across retries, so each stage resets
//! in `upstream_peer` what an attempt replays.

use std::time::Instant;

use super::access_log::LogState;
use super::auth::AuthState;
use super::body::BodyState;
use super::cache::CacheState;
use super::policy::PolicyState;
use super::ratelimit::LimitState;
use super::retry::AttemptState;
use super::usage::UsageState;

/// Per-request state, one field per stage.
pub struct RequestCtx {
    /// The caller's client key (the `auth` stage).
    pub auth: AuthState,
    /// The rate limiter's admission (the `ratelimit` stage).
    pub limit: LimitState,
    /// When the request arrived, when it went upstream and when the upstream answered.
    pub timing: Timing,
    /// Attempts, the chosen endpoint and address, the deadline, the failover state (the `retry`
    /// and `failover` stages).
    pub attempt: AttemptState,
    /// The body plan and rewriters (the `body` stage).
    pub body: BodyState,
    /// Body samples for the access log (the `access_log` stage).
    pub log: LogState,
    /// Model, stream flag, usage and time to first token (the `usage` stage).
    pub usage: UsageState,
    /// The cache result and the fill of a miss (the `cache` stage).
    pub cache: CacheState,
    /// The policies that acted and the response filter (the `policy` stage).
    pub policy: PolicyState,
}

/// Timestamps along the request's path; read by the access log and metrics.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub started: Instant,
    /// The upstream request head was handed to the upstream connection (last attempt).
    pub upstream_sent: Option<Instant>,
    /// The upstream's response header arrived.
    pub upstream_first_byte: Option<Instant>,
    /// The upstream's response body ended.
    pub upstream_done: Option<Instant>,
    /// The upstream's response status (last attempt).
    pub upstream_status: Option<u16>,
}

impl Timing {
    /// Timing for a request that arrived now.
    pub fn start() -> Timing {
        Timing {
            started: Instant::now(),
            upstream_sent: None,
            upstream_first_byte: None,
            upstream_done: None,
            upstream_status: None,
        }
    }
}
