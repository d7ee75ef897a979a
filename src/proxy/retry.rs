//! Attempts, retries and the deadline: which endpoint and address an attempt goes to, the
//! backoff before a retry, when a failure may be retried (never once a request that is not
//! idempotent may have reached the upstream, never once a response byte has gone to the
//! client), and `upstream.total_timeout_ms`.
//!
//! A connect failure (refused, TLS, timeout) moves the next attempt to another endpoint when
//! one can take it, else to the same endpoint's next address; it counts against
//! `upstream.max_retries` like every retry. The failover on a response status is decided in
//! [`super::failover`]; it reaches here as [`error::UPSTREAM_FAILOVER`], the one error that is
//! replayed whatever the method, because the upstream said it did not process the request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;

use crate::config::Config;
use crate::error;
use crate::metrics::METRICS;
use crate::upstream::endpoint::AttemptClass;
use crate::upstream::warmup::WARMUP_HEADER;
use crate::upstream::{Endpoint, InFlight, Pick, Upstreams};

/// Longest pause between connect retries.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// The retry stage's slice of the request context.
#[derive(Debug, Default)]
pub struct AttemptState {
    /// Attempts made so far (the first one included).
    pub attempts: usize,
    /// Where this request started in the address rotation; retries move on from here.
    rotation: Option<usize>,
    /// Whether the last attempt reused a pooled connection.
    pub reused: Option<bool>,
    /// `upstream.total_timeout_ms` from the request's arrival.
    deadline: Option<Instant>,
    /// Endpoints this request failed on or failed over from (by index).
    pub(super) tried: Vec<usize>,
    /// The current attempt's endpoint, counted in flight until the next attempt or the end.
    current: Option<InFlight>,
    /// Whether the current attempt's outcome (success or failure) has been recorded.
    pub(super) settled: bool,
    /// A warm-up request: this endpoint and address only, no retry.
    pub(super) pinned: Option<(usize, usize)>,
    /// Set when no endpoint could take the request: the 503's `Retry-After`.
    pub retry_after_s: Option<u64>,
    /// Failovers on a response status so far.
    pub failovers: usize,
}

impl AttemptState {
    /// The current (or last) attempt's endpoint.
    pub fn endpoint(&self) -> Option<&Arc<Endpoint>> {
        self.current.as_ref().map(InFlight::endpoint)
    }

    /// Whether this is a warm-up request.
    pub fn is_warmup(&self) -> bool {
        self.pinned.is_some()
    }
}

/// Retry policy and the endpoints, compiled from `upstream:`.
pub struct Retries {
    upstreams: Arc<Upstreams>,
    max_retries: usize,
    total_timeout: Option<Duration>,
}

impl Retries {
    pub fn new(cfg: &Config, upstreams: Arc<Upstreams>) -> Retries {
        Retries {
            upstreams,
            max_retries: cfg.upstream.max_retries,
            total_timeout: cfg.upstream.total_timeout,
        }
    }

    /// The state of a request that arrived at `started`.
    pub fn new_state(&self, started: Instant) -> AttemptState {
        AttemptState {
            deadline: self.total_timeout.map(|t| started + t),
            ..AttemptState::default()
        }
    }

    /// Reads and strips the warm-up header: a request carrying this process's token is pinned
    /// to the endpoint and address it names; any other value is dropped and ignored.
    pub fn request_filter(&self, session: &mut Session, st: &mut AttemptState) {
        let req = session.req_header_mut();
        let Some(value) = req.remove_header(WARMUP_HEADER) else {
            return;
        };
        st.pinned = self.upstreams.warmup_token().check(value.as_bytes());
    }

    /// Once per attempt: backs off before a retry, then picks the endpoint and address.
    pub async fn upstream_peer(&self, st: &mut AttemptState) -> Result<Box<HttpPeer>> {
        if st.attempts > 0 {
            METRICS.retries.inc();
            // A failover on a status goes on at once: the other endpoint is not the one
            // that is struggling.
            if st.failovers < st.attempts {
                let backoff = Duration::from_millis(10 << st.attempts.min(5)).min(MAX_BACKOFF);
                tokio::time::sleep(backoff).await;
            }
        }
        let attempt = st.attempts;
        st.attempts += 1;
        st.current = None;
        st.settled = false;
        let rotation = *st.rotation.get_or_insert_with(|| self.upstreams.rotation());
        let (ep, address) = match st.pinned {
            Some((e, a)) => match self.upstreams.get(e) {
                Some(ep) => (ep.clone(), a),
                None => return Error::e_explain(error::NO_UPSTREAM_ADDRESS, "no such endpoint"),
            },
            None => match self.upstreams.pick(&st.tried, Instant::now()) {
                Pick::Endpoint(ep) => (ep, rotation.wrapping_add(attempt)),
                Pick::Unavailable { retry_after_s } => {
                    let unresolved = self
                        .upstreams
                        .endpoints()
                        .iter()
                        .all(|e| e.peers.is_empty());
                    if unresolved {
                        return Error::e_explain(
                            error::NO_UPSTREAM_ADDRESS,
                            "no resolved upstream address",
                        );
                    }
                    st.retry_after_s = Some(retry_after_s);
                    return Error::e_explain(
                        error::NO_ENDPOINT_AVAILABLE,
                        "every endpoint is skipped, open or down",
                    );
                }
            },
        };
        let mut peer = ep.peers.peer(address).ok_or_else(|| {
            Error::explain(error::NO_UPSTREAM_ADDRESS, "no resolved upstream address")
        })?;
        st.current = Some(ep.begin());
        if let Some(deadline) = st.deadline {
            // Let the wait for the response header end at the deadline, not a read timeout later.
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or(Duration::from_millis(1));
            let o = &mut peer.options;
            o.read_timeout = o.read_timeout.map(|t| t.min(left)).or(Some(left));
        }
        Ok(peer)
    }

    /// Nothing was sent: always safe to retry (on another endpoint when one can take it),
    /// within one budget for the whole request.
    pub fn fail_to_connect(&self, st: &mut AttemptState, mut e: Box<Error>) -> Box<Error> {
        METRICS.upstream_connect_failures.inc();
        self.settle_failure(st);
        if st.attempts <= self.max_retries && st.pinned.is_none() {
            e.set_retry(true);
        } else {
            if self.max_retries > 0 && st.pinned.is_none() {
                METRICS.retry_exhausted.inc();
            }
            e.set_retry(false);
        }
        e
    }

    /// Records the current attempt as failed (once) and leaves its endpoint for this request.
    fn settle_failure(&self, st: &mut AttemptState) {
        if st.settled {
            return;
        }
        st.settled = true;
        if let Some(ep) = st.endpoint() {
            let index = ep.index;
            if ep.failure(Instant::now()) {
                log::warn!("endpoint {}: circuit open", ep.name());
            }
            ep.count_attempt(AttemptClass::Failure);
            if !st.tried.contains(&index) {
                st.tried.push(index);
            }
        }
    }

    /// Counts the connection an attempt got.
    pub fn connected(&self, st: &mut AttemptState, reused: bool) {
        st.reused = Some(reused);
        if reused {
            METRICS.upstream_connections_reused.inc();
        } else {
            METRICS.upstream_connections_new.inc();
        }
    }

    /// Failures after the request may have reached the upstream. A failover on a status
    /// ([`error::UPSTREAM_FAILOVER`]) is retried: the upstream said it did not process the
    /// request, and the body is replayable (checked when it was decided). Anything else: never
    /// retry once a response has started or when the request is not idempotent; an idempotent
    /// one only when a reused connection failed and its body can be replayed as it was.
    pub fn error_while_proxy(
        &self,
        session: &Session,
        st: &mut AttemptState,
        mut e: Box<Error>,
        body_replayable: bool,
        client_reused: bool,
    ) -> Box<Error> {
        if *e.etype() == error::UPSTREAM_FAILOVER {
            e.set_retry(true);
            return e;
        }
        if *e.esource() == ErrorSource::Upstream {
            self.settle_failure(st);
        }
        let idempotent = session.req_header().method.is_idempotent();
        let replayable = body_replayable && !session.as_ref().retry_buffer_truncated();
        let started = session.response_written().is_some();
        if idempotent
            && replayable
            && client_reused
            && !started
            && st.pinned.is_none()
            && st.attempts <= self.max_retries
        {
            e.retry.decide_reuse(client_reused);
        } else {
            e.set_retry(false);
        }
        e
    }

    /// Fails once the request has run past `upstream.total_timeout_ms`.
    pub fn check_deadline(&self, st: &AttemptState) -> Result<()> {
        match st.deadline {
            Some(d) if Instant::now() > d => {
                Error::e_explain(error::DEADLINE_EXCEEDED, "total request deadline")
            }
            _ => Ok(()),
        }
    }
}
