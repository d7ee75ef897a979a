//! Attempts, retries and the deadline: which address an attempt goes to, the backoff before a
//! retry, when a failure may be retried (never once a request that is not idempotent may have
//! reached the upstream), and `upstream.total_timeout_ms`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;

use crate::config::Config;
use crate::error;
use crate::metrics::METRICS;
use crate::upstream::UpstreamPool;

/// Longest pause between connect retries.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// The retry stage's slice of the request context.
#[derive(Debug, Default)]
pub struct AttemptState {
    /// Attempts made so far (the first one included).
    pub attempts: usize,
    /// Where this request started in the address rotation; retries move on from here.
    start: Option<usize>,
    /// Whether the last attempt reused a pooled connection.
    pub reused: Option<bool>,
    /// `upstream.total_timeout_ms` from the request's arrival.
    deadline: Option<Instant>,
}

/// Retry policy and the address pool, compiled from `upstream:`.
pub struct Retries {
    pool: Arc<UpstreamPool>,
    max_retries: usize,
    total_timeout: Option<Duration>,
}

impl Retries {
    pub fn new(cfg: &Config, pool: Arc<UpstreamPool>) -> Retries {
        Retries {
            pool,
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

    /// Once per attempt: backs off before a retry, then picks the address.
    pub async fn upstream_peer(&self, st: &mut AttemptState) -> Result<Box<HttpPeer>> {
        if st.attempts > 0 {
            METRICS.retries.inc();
            let backoff = Duration::from_millis(10 << st.attempts.min(5)).min(MAX_BACKOFF);
            tokio::time::sleep(backoff).await;
        }
        let attempt = st.attempts;
        st.attempts += 1;
        let start = *st.start.get_or_insert_with(|| self.pool.start());
        let mut peer = self.pool.peer(start, attempt).ok_or_else(|| {
            Error::explain(error::NO_UPSTREAM_ADDRESS, "no resolved upstream address")
        })?;
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

    /// Nothing was sent: always safe to retry, within one budget for the whole request.
    pub fn fail_to_connect(&self, st: &AttemptState, mut e: Box<Error>) -> Box<Error> {
        METRICS.upstream_connect_failures.inc();
        if st.attempts <= self.max_retries {
            e.set_retry(true);
        } else {
            if self.max_retries > 0 {
                METRICS.retry_exhausted.inc();
            }
            e.set_retry(false);
        }
        e
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

    /// Failures after the request may have reached the upstream: never retry a request that is
    /// not idempotent; an idempotent one only when a reused connection failed and its body can
    /// be replayed as it was.
    pub fn error_while_proxy(
        &self,
        session: &Session,
        st: &AttemptState,
        mut e: Box<Error>,
        body_replayable: bool,
        client_reused: bool,
    ) -> Box<Error> {
        let idempotent = session.req_header().method.is_idempotent();
        let replayable = body_replayable && !session.as_ref().retry_buffer_truncated();
        if idempotent && replayable && client_reused && st.attempts <= self.max_retries {
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
