//! Content policies in the request's path: the request body checked before anything of it goes
//! upstream, JSON answers held whole and checked, SSE answers filtered event by event.
//!
//! The matching lives in [`crate::policy`]; this stage only feeds it and acts on its outcome:
//! - request (the planned body, after the structured-output and usage edits): `block` refuses
//!   with a 400 `content_policy_violation` (a small body was read whole in `request_filter`, so
//!   nothing reached the upstream; a held one is refused before its end leaves, so the upstream
//!   never gets a complete request), `redact` sends the new body (exact `Content-Length` for a
//!   small body; a held one goes chunked anyway);
//! - JSON answer: held whole and re-framed (no `Content-Length`); a `block` turns the body into
//!   the error object (the status already left with the header, so it stays what the upstream
//!   sent);
//! - SSE answer: one [`StreamPolicy`]; a `block` ends the stream with one error event, the rest
//!   of the upstream's stream is dropped and the connection is not kept alive.
//!
//! With no policy configured every hook returns at its first test and the state stays empty.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::Method;
use log::info;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use super::body::{self, BodyPlan, BodyState};
use crate::config::Config;
use crate::error::{self, Failure};
use crate::metrics::METRICS;
use crate::policy::{
    violation_body, Action, Outcome, PolicySet, Side, StreamPolicy, StreamSettings, VIOLATION_CODE,
};
use crate::transform::usage::BodyKind;

/// A JSON answer larger than this is forwarded unexamined (from where it got too large), so a
/// huge answer cannot hold unbounded memory.
const MAX_HELD_RESPONSE_BYTES: usize = 16 << 20;

static IDENTITY: HeaderValue = HeaderValue::from_static("identity");

/// One policy that acted on this request, for the access log.
#[derive(Debug, Clone)]
pub struct Acted {
    pub name: Arc<str>,
    pub action: Action,
    pub side: Side,
}

/// The policy stage's slice of the request context. Empty (and never allocated) when no
/// policy applies.
#[derive(Default)]
pub struct PolicyState {
    /// The policies that acted, in order.
    pub acted: Vec<Acted>,
    response: Response,
    /// Evaluation time spent on the response so far.
    response_time: Duration,
}

/// What the stage does with the response body.
#[derive(Default)]
enum Response {
    /// Forwarded as it is.
    #[default]
    Untouched,
    /// A JSON answer, held whole; the request's model.
    Json(BytesMut, Option<String>),
    /// An SSE answer, filtered event by event.
    Stream(Box<StreamPolicy>),
    /// The answer was checked (or given up on): the rest passes, or is dropped after a block.
    Done { drop_rest: bool },
}

/// The content policies, compiled from `policies:` and `policy_stream:`.
pub struct PolicyStage {
    set: Option<Arc<PolicySet>>,
    stream: StreamSettings,
}

impl PolicyStage {
    pub fn new(cfg: &Config) -> PolicyStage {
        PolicyStage {
            set: cfg.policies.set.clone(),
            stream: cfg.policies.stream,
        }
    }

    /// Whether request bodies must be read (or held) whole for the request policies.
    pub fn inspects_bodies(&self) -> bool {
        self.set.as_ref().is_some_and(|s| s.has(Side::Request))
    }

    /// After the body plan: checks a body read whole (the Replace plan) before anything goes
    /// upstream.
    pub fn request_filter(&self, body: &mut BodyState, st: &mut PolicyState) -> Result<()> {
        if !self.inspects_bodies() {
            return Ok(());
        }
        if let BodyPlan::Replace(planned) = &mut body.plan {
            if let Some(redacted) = self.check_request(planned, st)? {
                *planned = redacted;
            }
        }
        Ok(())
    }

    /// The last chunk of a held body (the Hold plan), before it leaves: a refusal here means
    /// the upstream has the request head and no end of body, so it never sees a complete
    /// request.
    pub fn request_body_filter(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        body: &BodyState,
        st: &mut PolicyState,
    ) -> Result<()> {
        if !(end_of_stream && self.inspects_bodies() && matches!(body.plan, BodyPlan::Hold(_))) {
            return Ok(());
        }
        if let Some(whole) = chunk.as_ref() {
            if let Some(redacted) = self.check_request(whole, st)? {
                *chunk = Some(redacted);
            }
        }
        Ok(())
    }

    /// Runs the request policies over a whole body: the redacted body, or a refusal.
    fn check_request(&self, whole: &Bytes, st: &mut PolicyState) -> Result<Option<Bytes>> {
        let Some(set) = self.set.as_ref() else {
            return Ok(None);
        };
        let started = Instant::now();
        let checked = set.check_request(whole);
        METRICS
            .policy_time
            .with([Side::Request.as_str()])
            .observe(started.elapsed());
        // A body that is not a JSON object has no messages to check; the upstream refuses it.
        let Ok(outcome) = checked else {
            return Ok(None);
        };
        record(&outcome, Side::Request, st);
        if let Some(name) = outcome.blocked_by {
            return Err(error::refuse(error::refusal(
                400,
                "invalid_request_error",
                VIOLATION_CODE,
                format!("request blocked by content policy {name}"),
                Failure::PolicyBlocked,
            )));
        }
        Ok(outcome.body.map(Bytes::from))
    }

    /// The answer is read as it is (a policy cannot see through compression).
    pub fn upstream_request_filter(&self, req: &mut RequestHeader) -> Result<()> {
        if self.set.as_ref().is_some_and(|s| s.has(Side::Response)) {
            req.insert_header(header::ACCEPT_ENCODING, IDENTITY.clone())?;
        }
        Ok(())
    }

    /// The response header: starts holding a JSON answer or filtering a stream when a response
    /// policy applies to the request's model; re-frames the body, whose length may change.
    pub fn response_filter(
        &self,
        session: &Session,
        resp: &mut ResponseHeader,
        model: Option<&str>,
        from_upstream: bool,
        st: &mut PolicyState,
    ) -> Result<()> {
        let Some(set) = self.set.as_ref() else {
            return Ok(());
        };
        let checked = from_upstream
            && resp.status.is_success()
            && !body::is_bodiless(resp.status)
            && !body::is_encoded(&resp.headers)
            && session.req_header().method != Method::HEAD
            && set.applies(Side::Response, model);
        if !checked {
            return Ok(());
        }
        let kind = resp
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(BodyKind::from_content_type);
        st.response = match kind {
            Some(BodyKind::Json) => Response::Json(BytesMut::new(), model.map(str::to_string)),
            Some(BodyKind::EventStream) => {
                match StreamPolicy::new(Arc::clone(set), model, self.stream) {
                    Some(filter) => Response::Stream(Box::new(filter)),
                    None => return Ok(()),
                }
            }
            None => return Ok(()),
        };
        resp.remove_header(&header::CONTENT_LENGTH);
        resp.remove_header(&header::ACCEPT_RANGES);
        if !session.is_http2() {
            resp.insert_header(header::TRANSFER_ENCODING, body::CHUNKED.clone())?;
        }
        body::weaken_etag(resp)
    }

    /// Each response chunk, after the usage stage and before the byte rules.
    pub fn response_body_filter(
        &self,
        session: &mut Session,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        st: &mut PolicyState,
    ) {
        match &mut st.response {
            Response::Untouched => return,
            Response::Done { drop_rest } => {
                if *drop_rest {
                    *chunk = None;
                }
                return;
            }
            _ => {}
        }
        let started = Instant::now();
        match &mut st.response {
            Response::Untouched | Response::Done { .. } => {}
            Response::Json(held, _) => {
                if let Some(b) = chunk.take() {
                    held.extend_from_slice(&b);
                }
                if held.len() > MAX_HELD_RESPONSE_BYTES {
                    *chunk = Some(std::mem::take(held).freeze());
                    st.response = Response::Done { drop_rest: false };
                } else if end_of_stream {
                    *chunk = Some(self.finish_json(st));
                }
            }
            Response::Stream(filter) => {
                let mut out = filter.push(chunk.take().unwrap_or_default(), started);
                if end_of_stream {
                    out = join(out, filter.finish(started));
                }
                *chunk = (!out.is_empty()).then_some(out);
                if filter.blocked_by().is_some() {
                    // The client has the error event; nothing more of this answer reaches it.
                    session.set_keepalive(None);
                }
                if end_of_stream || filter.blocked_by().is_some() {
                    self.finish_stream(st);
                }
            }
        }
        st.response_time += started.elapsed();
        if matches!(st.response, Response::Done { .. }) {
            let time = std::mem::take(&mut st.response_time);
            METRICS
                .policy_time
                .with([Side::Response.as_str()])
                .observe(time);
        }
    }

    /// An HTTP/2 upstream that ends with trailers never sends a final body chunk: what the
    /// policies still hold, to be sent as the last chunk.
    pub fn response_trailer_filter(
        &self,
        session: &mut Session,
        st: &mut PolicyState,
    ) -> Option<Bytes> {
        if matches!(st.response, Response::Untouched | Response::Done { .. }) {
            return None;
        }
        let mut tail = None;
        self.response_body_filter(session, &mut tail, true, st);
        tail
    }

    /// The whole JSON answer, checked: as it was, redacted, or the error object.
    fn finish_json(&self, st: &mut PolicyState) -> Bytes {
        let Response::Json(held, model) =
            std::mem::replace(&mut st.response, Response::Done { drop_rest: false })
        else {
            return Bytes::new();
        };
        let whole = held.freeze();
        let Some(set) = self.set.as_ref() else {
            return whole;
        };
        let Ok(outcome) = set.check_response(model.as_deref(), &whole) else {
            return whole;
        };
        record(&outcome, Side::Response, st);
        if let Some(name) = &outcome.blocked_by {
            return Bytes::from(violation_body(Side::Response, name));
        }
        outcome.body.map_or(whole, Bytes::from)
    }

    /// The stream ended or was blocked: records what its policies did.
    fn finish_stream(&self, st: &mut PolicyState) {
        let Response::Stream(filter) =
            std::mem::replace(&mut st.response, Response::Done { drop_rest: false })
        else {
            return;
        };
        let outcome = Outcome {
            blocked_by: filter.blocked_by().cloned(),
            flagged: filter.flagged().to_vec(),
            redacted_by: filter.redacted_by().to_vec(),
            body: None,
        };
        record(&outcome, Side::Response, st);
        st.response = Response::Done {
            drop_rest: outcome.blocked_by.is_some(),
        };
    }

    /// The request is over: a stream cut short still has its policies counted.
    pub fn logging(&self, st: &mut PolicyState) {
        if matches!(st.response, Response::Stream(_)) {
            self.finish_stream(st);
        }
    }
}

/// Counts and notes every policy that acted on one body; flags are logged (names only).
fn record(outcome: &Outcome, side: Side, st: &mut PolicyState) {
    let acted = outcome
        .blocked_by
        .iter()
        .map(|n| (n, Action::Block))
        .chain(outcome.redacted_by.iter().map(|n| (n, Action::Redact)))
        .chain(outcome.flagged.iter().map(|n| (n, Action::Flag)));
    for (name, action) in acted {
        METRICS
            .policy_actions
            .with([name, action.as_str(), side.as_str()])
            .inc();
        if action == Action::Flag {
            info!("content policy {name} flagged a {}", side.as_str());
        }
        st.acted.push(Acted {
            name: Arc::clone(name),
            action,
            side,
        });
    }
}

/// `a` then `b`, copying only when both hold bytes.
fn join(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let mut out = BytesMut::with_capacity(a.len() + b.len());
    out.extend_from_slice(&a);
    out.extend_from_slice(&b);
    out.freeze()
}
