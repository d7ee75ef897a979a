//! Failover on a response status, before any byte reaches the client.
//!
//! When an endpoint answers a status in `upstream.failover_on` (default 429 and 503: "not
//! processed"), the endpoint is skipped for its `Retry-After` (capped by
//! `upstream.retry_after_max_s`; 1 s without one) and, if another endpoint can take the request
//! and its body can be replayed byte for byte, the response is dropped and the request goes to
//! the next endpoint: `upstream_response_filter` returns [`error::UPSTREAM_FAILOVER`], which
//! Pingora hands to `error_while_proxy` ([`super::retry`]) and retries. Nothing has been written
//! to the client at that point (this hook runs before `response_filter`).
//!
//! Body replay is Pingora's retry buffer (64 KiB of raw request body): a larger body cannot be
//! sent again, so such a response is passed through to the client and counted as
//! `body_not_replayable`. A body the body stage holds until complete (its `Hold` plan)
//! is not replayable at all, so such a response passes through too; a body it read ahead and
//! replaced is substituted on every attempt, within the same 64 KiB rule.
//!
//! Every attempt's outcome feeds the endpoint's circuit breaker here too: an answer below 500
//! is a success, a 5xx a failure.

use std::sync::Arc;
use std::time::Instant;

use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use super::retry::AttemptState;
use crate::error;
use crate::upstream::endpoint::{AttemptClass, FailoverReason};
use crate::upstream::Upstreams;

/// The failover stage, compiled from `upstream:`.
pub struct Failover {
    upstreams: Arc<Upstreams>,
    max_retries: usize,
}

/// What was decided about a failover status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not a failover status, or nothing to decide.
    Forward,
    /// Go to another endpoint.
    Failover,
    /// A failover status passed through, and why.
    PassThrough(FailoverReason),
}

impl Failover {
    pub fn new(upstreams: Arc<Upstreams>, max_retries: usize) -> Failover {
        Failover {
            upstreams,
            max_retries,
        }
    }

    /// The upstream's response header: records the attempt's outcome and decides a failover.
    /// `body_replayable`: the body stage can send the same bytes again.
    pub fn upstream_response_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        st: &mut AttemptState,
        body_replayable: bool,
    ) -> Result<()> {
        let buffer_complete = !session.as_ref().retry_buffer_truncated();
        match self.decide(resp, st, body_replayable && buffer_complete) {
            Decision::Failover => Error::e_explain(
                error::UPSTREAM_FAILOVER,
                format!("endpoint answered {}", resp.status.as_u16()),
            ),
            Decision::Forward | Decision::PassThrough(_) => Ok(()),
        }
    }

    /// The decision, without Pingora's session (the retry buffer's state is `replayable`).
    fn decide(&self, resp: &ResponseHeader, st: &mut AttemptState, replayable: bool) -> Decision {
        let Some(ep) = st.endpoint().cloned() else {
            return Decision::Forward;
        };
        let now = Instant::now();
        let status = resp.status.as_u16();
        if !st.settled {
            st.settled = true;
            if status >= 500 {
                if ep.failure(now) {
                    log::warn!("endpoint {}: circuit open after {status}", ep.name());
                }
                ep.count_attempt(AttemptClass::ServerError);
            } else {
                ep.success();
                ep.count_attempt(if status >= 400 {
                    AttemptClass::ClientError
                } else {
                    AttemptClass::Ok
                });
            }
        }
        if !self.upstreams.fails_over(status) {
            return Decision::Forward;
        }
        let retry_after = resp.headers.get(header::RETRY_AFTER).map(|v| v.as_bytes());
        ep.skip(now, self.upstreams.skip_for(retry_after));
        if !st.tried.contains(&ep.index) {
            st.tried.push(ep.index);
        }
        if st.is_warmup() {
            return Decision::Forward;
        }
        let reason = if st.attempts > self.max_retries {
            FailoverReason::RetriesExhausted
        } else if !self.upstreams.other_available(ep.index, now) {
            FailoverReason::NoOtherEndpoint
        } else if !replayable {
            FailoverReason::BodyNotReplayable
        } else {
            st.failovers += 1;
            ep.count_failover(status_reason(status));
            return Decision::Failover;
        };
        ep.count_failover(reason);
        Decision::PassThrough(reason)
    }
}

/// The reason of a failover on `status`.
fn status_reason(status: u16) -> FailoverReason {
    match status {
        429 => FailoverReason::Status429,
        503 => FailoverReason::Status503,
        _ => FailoverReason::StatusOther,
    }
}
