//! One endpoint at run time: its peers, its load and counters, its circuit breaker, its
//! `Retry-After` skip and its active-health verdict.
//!
//! Guards (breaker, skip) apply only when the upstream has more than one endpoint: with a
//! single endpoint there is nowhere else to go, and its answers reach the client as before.
//! Active health checks, when configured, apply either way.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::breaker::{Breaker, BreakerState};
use super::peers::PeerSet;
use crate::config::{Endpoint as EndpointConfig, Upstream};

/// What the admin view and the state gauge say about an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    Up,
    /// Failed its active health checks.
    Down,
    /// Circuit open.
    Open,
    /// Circuit half-open: one probe request at a time.
    HalfOpen,
}

impl EndpointState {
    /// Every state, in label order.
    pub const ALL: [EndpointState; 4] = [
        EndpointState::Up,
        EndpointState::Down,
        EndpointState::Open,
        EndpointState::HalfOpen,
    ];

    /// The label (`up`, `down`, `open`, `half_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Up => "up",
            EndpointState::Down => "down",
            EndpointState::Open => "open",
            EndpointState::HalfOpen => "half_open",
        }
    }
}

/// How an attempt on an endpoint ended (the `class` label of
/// `arkgate_upstream_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptClass {
    /// An answer below 400.
    Ok,
    /// A 4xx answer.
    ClientError,
    /// A 5xx answer.
    ServerError,
    /// No answer: connect failure, timeout, broken connection.
    Failure,
}

impl AttemptClass {
    /// Every class, in label order.
    pub const ALL: [AttemptClass; 4] = [
        AttemptClass::Ok,
        AttemptClass::ClientError,
        AttemptClass::ServerError,
        AttemptClass::Failure,
    ];

    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptClass::Ok => "ok",
            AttemptClass::ClientError => "4xx",
            AttemptClass::ServerError => "5xx",
            AttemptClass::Failure => "failure",
        }
    }
}

/// What happened to a failover status (the `reason` label of `arkgate_failovers_total`): a
/// failover to another endpoint, or why the response was passed through instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverReason {
    /// Failed over on a 429.
    Status429,
    /// Failed over on a 503.
    Status503,
    /// Failed over on another `failover_on` status.
    StatusOther,
    /// Passed through: the body is larger than Pingora's retry buffer.
    BodyNotReplayable,
    /// Passed through: no other endpoint could take the request.
    NoOtherEndpoint,
    /// Passed through: `upstream.max_retries` used up.
    RetriesExhausted,
}

impl FailoverReason {
    /// Every reason, in label order.
    pub const ALL: [FailoverReason; 6] = [
        FailoverReason::Status429,
        FailoverReason::Status503,
        FailoverReason::StatusOther,
        FailoverReason::BodyNotReplayable,
        FailoverReason::NoOtherEndpoint,
        FailoverReason::RetriesExhausted,
    ];

    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverReason::Status429 => "status_429",
            FailoverReason::Status503 => "status_503",
            FailoverReason::StatusOther => "status_other",
            FailoverReason::BodyNotReplayable => "body_not_replayable",
            FailoverReason::NoOtherEndpoint => "no_other_endpoint",
            FailoverReason::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// One endpoint of the upstream.
pub struct Endpoint {
    /// Position in `upstream.endpoints`.
    pub index: usize,
    pub cfg: EndpointConfig,
    pub peers: PeerSet,
    /// Whether the breaker and skips apply (more than one endpoint).
    guarded: bool,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    failures: AtomicU64,
    by_class: [AtomicU64; AttemptClass::ALL.len()],
    by_reason: [AtomicU64; FailoverReason::ALL.len()],
    /// Active health verdict; true until checks say otherwise.
    healthy: AtomicBool,
    guards: Mutex<Guards>,
}

/// The endpoint's time-based exclusions, under one lock.
struct Guards {
    breaker: Breaker,
    /// Out of rotation until then (a failover status and its `Retry-After`).
    skip_until: Option<Instant>,
}

/// Why an endpoint cannot take a request now, and until when (None: unknown, e.g. down by
/// health checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    pub until: Option<Instant>,
}

impl Endpoint {
    /// The endpoint at `index` of `upstream.endpoints`.
    pub fn new(index: usize, upstream: &Arc<Upstream>) -> Endpoint {
        let cfg = upstream.endpoints[index].clone();
        let b = upstream.circuit_breaker;
        Endpoint {
            index,
            peers: PeerSet::new(cfg.clone(), upstream.clone()),
            cfg,
            guarded: upstream.endpoints.len() > 1,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            by_class: Default::default(),
            by_reason: Default::default(),
            healthy: AtomicBool::new(true),
            guards: Mutex::new(Guards {
                breaker: Breaker::new(b.failures, b.open),
                skip_until: None,
            }),
        }
    }

    /// The endpoint's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    fn guards(&self) -> MutexGuard<'_, Guards> {
        self.guards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether it could take a request at `now` (healthy, circuit not open, not skipped, an
    /// address known); otherwise until when it cannot.
    pub fn check(&self, now: Instant) -> Result<(), Unavailable> {
        if !self.healthy.load(Relaxed) || self.peers.is_empty() {
            return Err(Unavailable { until: None });
        }
        if !self.guarded {
            return Ok(());
        }
        let g = self.guards();
        if let Some(until) = g.skip_until.filter(|u| now < *u) {
            return Err(Unavailable { until: Some(until) });
        }
        if !g.breaker.available(now) {
            return Err(Unavailable {
                until: g.breaker.open_until(now),
            });
        }
        Ok(())
    }

    /// Takes the breaker's permission for one request at `now` (the probe when half-open).
    pub fn acquire(&self, now: Instant) -> bool {
        !self.guarded || self.guards().breaker.acquire(now)
    }

    /// Counts a request as started on this endpoint; it is in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Attempts sent to it so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    /// Failed attempts so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// Counts an attempt's outcome.
    pub fn count_attempt(&self, class: AttemptClass) {
        self.by_class[class as usize].fetch_add(1, Relaxed);
    }

    /// Attempts that ended as `class` so far.
    pub fn attempts(&self, class: AttemptClass) -> u64 {
        self.by_class[class as usize].load(Relaxed)
    }

    /// Counts a failover decision.
    pub fn count_failover(&self, reason: FailoverReason) {
        self.by_reason[reason as usize].fetch_add(1, Relaxed);
    }

    /// Failover decisions for `reason` so far.
    pub fn failovers(&self, reason: FailoverReason) -> u64 {
        self.by_reason[reason as usize].load(Relaxed)
    }

    /// An attempt succeeded (an answer below 500).
    pub fn success(&self) {
        if self.guarded {
            self.guards().breaker.success();
        }
    }

    /// An attempt failed at `now` (connect failure, timeout, 5xx). Returns true when this
    /// failure opened the circuit.
    pub fn failure(&self, now: Instant) -> bool {
        self.failures.fetch_add(1, Relaxed);
        self.guarded && self.guards().breaker.failure(now)
    }

    /// Keeps the endpoint out of rotation for `wait` from `now` (never shortens a longer skip).
    pub fn skip(&self, now: Instant, wait: Duration) {
        if !self.guarded {
            return;
        }
        let until = now + wait;
        let mut g = self.guards();
        if g.skip_until.is_none_or(|u| u < until) {
            g.skip_until = Some(until);
        }
    }

    /// When the current skip ends, if one is set at `now`.
    pub fn skip_until(&self, now: Instant) -> Option<Instant> {
        self.guards().skip_until.filter(|u| now < *u)
    }

    /// Sets the active health verdict; returns true when it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Relaxed) != healthy
    }

    /// The state at `now`: down (health checks) first, then the circuit.
    pub fn state(&self, now: Instant) -> EndpointState {
        if !self.healthy.load(Relaxed) {
            return EndpointState::Down;
        }
        if !self.guarded {
            return EndpointState::Up;
        }
        match self.guards().breaker.state(now) {
            BreakerState::Closed => EndpointState::Up,
            BreakerState::Open => EndpointState::Open,
            BreakerState::HalfOpen => EndpointState::HalfOpen,
        }
    }
}

/// A request in flight on an endpoint; dropping it ends the count.
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    /// The endpoint it counts on.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InFlight({})", self.0.name())
    }
}
