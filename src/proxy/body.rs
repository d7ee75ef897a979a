//! Request and response bodies: which structured-output mode applies, how the request body goes
//! out (streamed through the byte rules, read ahead and replaced, or held until complete), the
//! response byte rules while the response streams, and the framing and validators that a changed
//! body needs.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::Method;
use log::info;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use super::limits::Limits;
use crate::config::Config;
use crate::metrics::METRICS;
use crate::transform::rewrite::{Replacer, RuleSet};
use crate::transform::structured::{self, Mode, Policy};

/// Bodies up to this size are read whole in `request_filter` when they may need a structured
/// rewrite, so the rewritten body goes out with an exact Content-Length. Equal to Pingora's retry
/// buffer, which replays them through `request_body_filter`.
const PREREAD_LIMIT_BYTES: u64 = 64 * 1024;

static IDENTITY: HeaderValue = HeaderValue::from_static("identity");
pub(super) static CHUNKED: HeaderValue = HeaderValue::from_static("chunked");

/// What happens to the request body.
#[derive(Debug, Default)]
pub enum BodyPlan {
    /// Forwarded as it streams in (through the request byte rules when they apply).
    #[default]
    Stream,
    /// Read whole in `request_filter` and already rewritten; substituted at the end of the body.
    Replace(Bytes),
    /// A large or chunked JSON body that may need a structured rewrite: held until complete,
    /// then rewritten; sent chunked because its final length is unknown when headers go out.
    Hold(BytesMut),
}

/// The body stage's slice of the request context.
pub struct BodyState {
    pub mode: Mode,
    pub plan: BodyPlan,
    request_rw: Option<Replacer>,
    response_rw: Option<Replacer>,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// The client's body as received, when it was read whole in `request_filter`.
    pub raw: Option<Bytes>,
}

impl Default for BodyState {
    fn default() -> BodyState {
        BodyState {
            mode: Mode::Bytes,
            plan: BodyPlan::Stream,
            request_rw: None,
            response_rw: None,
            bytes_in: 0,
            bytes_out: 0,
            raw: None,
        }
    }
}

impl BodyState {
    /// False once the body was held whole and rewritten: it cannot be replayed as it was.
    pub fn replayable(&self) -> bool {
        !matches!(self.plan, BodyPlan::Hold(_))
    }
}

/// The body rules, compiled from `structured_output:` and `rewrite:`.
pub struct Bodies {
    structured: Arc<Policy>,
    request_rules: Arc<RuleSet>,
    response_rules: Arc<RuleSet>,
    /// Another stage wants small JSON bodies (with a known length) read whole.
    read_whole: bool,
    /// Another stage inspects every candidate body, small or large (content policies).
    inspect_all: bool,
}

impl Bodies {
    /// `whole_for_others`: another stage needs small JSON bodies read whole; `inspect_all`:
    /// another stage needs every candidate body whole (held when it is large).
    pub fn new(cfg: &Config, whole_for_others: bool, inspect_all: bool) -> Bodies {
        Bodies {
            read_whole: whole_for_others,
            inspect_all,
            structured: cfg.structured.clone(),
            request_rules: cfg.request_rules.clone(),
            response_rules: cfg.response_rules.clone(),
        }
    }

    /// Chooses the body plan; reads a small structured-output candidate whole.
    pub async fn request_filter(
        &self,
        session: &mut Session,
        st: &mut BodyState,
        content_length: Option<u64>,
        limits: &Limits,
    ) -> Result<()> {
        let has_body = !session.as_downstream_mut().is_body_empty();
        // Structured output and content policies need every candidate body whole (held when it
        // is large); another stage only gets the small ones with a known length, so the rest
        // still stream and stay replayable.
        let small = content_length.is_some_and(|n| n <= PREREAD_LIMIT_BYTES);
        let inspects = self.structured.inspects_bodies() || self.inspect_all;
        let wanted = inspects || self.read_whole && small;
        if !wanted || !has_body || !is_structured_candidate(session.req_header()) {
            st.mode = self.structured.mode_for(None);
            // A byte rule cannot see through a compressed body: leave it as it is.
            let encoded = is_encoded(&session.req_header().headers);
            if st.mode == Mode::Bytes && !self.request_rules.is_empty() && !encoded {
                st.request_rw = Some(Replacer::new(self.request_rules.clone()));
            }
            return Ok(());
        }
        match content_length {
            Some(n) if n <= PREREAD_LIMIT_BYTES => {
                let body = read_whole_body(session, n, limits).await?;
                st.bytes_in = body.len() as u64;
                st.raw = Some(body.clone());
                let planned = self.plan_json_body(body, st);
                st.plan = BodyPlan::Replace(planned);
            }
            _ => st.plan = BodyPlan::Hold(BytesMut::new()),
        }
        Ok(())
    }

    /// A new attempt replays the raw body from the start: forget what the last one held.
    pub fn new_attempt(&self, st: &mut BodyState) {
        if let Some(rw) = st.request_rw.as_mut() {
            rw.reset();
        }
        if let BodyPlan::Hold(buf) = &mut st.plan {
            buf.clear();
        }
    }

    /// Framing and `Accept-Encoding` of the upstream request.
    pub fn upstream_request_filter(&self, req: &mut RequestHeader, st: &BodyState) -> Result<()> {
        let rewrites_responses = st.mode == Mode::Bytes && !self.response_rules.is_empty();
        let may_rewrite_responses = rewrites_responses
            || matches!(st.plan, BodyPlan::Hold(_)) && self.structured.has_bytes_mode();
        if may_rewrite_responses {
            // A byte rule cannot see through compression: ask for the body as is.
            req.insert_header("Accept-Encoding", IDENTITY.clone())?;
        }
        match &st.plan {
            BodyPlan::Replace(body) => {
                // The body was already read (after answering any `Expect` ourselves). Looked up
                // first: most requests have neither field, and their length is unchanged.
                for name in [&header::EXPECT, &header::TRANSFER_ENCODING] {
                    if req.headers.contains_key(name) {
                        req.remove_header(name);
                    }
                }
                let length = req.headers.get(header::CONTENT_LENGTH);
                if length.and_then(|v| v.to_str().ok()?.parse::<usize>().ok()) != Some(body.len()) {
                    req.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
                }
            }
            BodyPlan::Hold(_) => {
                // The final length is known only at the end: re-framed as chunked on HTTP/1.1.
                req.remove_header(&header::CONTENT_LENGTH);
            }
            BodyPlan::Stream => {
                if st.request_rw.is_some() && self.request_rules.changes_length() {
                    req.remove_header(&header::CONTENT_LENGTH);
                }
            }
        }
        Ok(())
    }

    /// The request body plan applied to one chunk (see [`BodyPlan`]).
    pub fn request_body_filter(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        st: &mut BodyState,
        limits: &Limits,
    ) -> Result<()> {
        match &mut st.plan {
            BodyPlan::Replace(planned) => {
                // The raw body is replayed from the retry buffer; send the planned one instead.
                *body = Some(if end_of_stream {
                    planned.clone()
                } else {
                    Bytes::new()
                });
                Ok(())
            }
            BodyPlan::Hold(buf) => {
                if let Some(chunk) = body.take() {
                    st.bytes_in += chunk.len() as u64;
                    buf.extend_from_slice(&chunk);
                }
                limits.check_body(buf.len() as u64)?;
                if !end_of_stream {
                    // Never `None` mid-stream: Pingora would take it as the end of the body.
                    *body = Some(Bytes::new());
                    return Ok(());
                }
                let whole = std::mem::take(buf).freeze();
                *body = Some(self.plan_json_body(whole, st));
                Ok(())
            }
            BodyPlan::Stream => {
                if let Some(chunk) = body.as_ref() {
                    st.bytes_in += chunk.len() as u64;
                    limits.check_body(st.bytes_in)?;
                }
                if let Some(rw) = st.request_rw.as_mut() {
                    let out = rewrite_chunk(rw, body.take(), end_of_stream);
                    *body = (!out.is_empty() || !end_of_stream).then_some(out);
                }
                Ok(())
            }
        }
    }

    /// Re-framing and a weakened `ETag` when the response body will be rewritten.
    pub fn response_filter(
        &self,
        session: &Session,
        resp: &mut ResponseHeader,
        st: &mut BodyState,
        from_upstream: bool,
    ) -> Result<()> {
        let rules = &self.response_rules;
        let rewrite = st.mode == Mode::Bytes
            && !rules.is_empty()
            && !is_bodiless(resp.status)
            && !is_encoded(&resp.headers)
            && from_upstream;
        if !rewrite {
            return Ok(());
        }
        // A HEAD response describes the body a GET would get, but has none to rewrite.
        let head = session.req_header().method == Method::HEAD;
        if !head {
            st.response_rw = Some(Replacer::new(rules.clone()));
        }
        if rules.changes_length() {
            // The rewritten length is unknown until the end: re-frame.
            resp.remove_header(&header::CONTENT_LENGTH);
            resp.remove_header(&header::ACCEPT_RANGES);
            if !head && !session.is_http2() {
                resp.insert_header(header::TRANSFER_ENCODING, CHUNKED.clone())?;
            }
        }
        weaken_etag(resp)
    }

    /// Each response chunk, forwarded as soon as it arrives (held back only for a split match).
    pub fn response_body_filter(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        st: &mut BodyState,
    ) {
        if let Some(rw) = st.response_rw.as_mut() {
            let out = rewrite_chunk(rw, body.take(), end_of_stream);
            *body = (!out.is_empty()).then_some(out);
        }
        if let Some(b) = body.as_ref() {
            st.bytes_out += b.len() as u64;
        }
    }

    /// An HTTP/2 upstream that ends with trailers never sends a final body chunk: the held-back
    /// bytes, to be sent in place of the trailers.
    pub fn response_trailer_filter(&self, st: &mut BodyState) -> Option<Bytes> {
        let rw = st.response_rw.as_mut().filter(|rw| rw.held() > 0)?;
        let tail = rewrite_chunk(rw, None, true);
        st.bytes_out += tail.len() as u64;
        Some(tail)
    }

    /// Decides the mode for a complete JSON body and returns the bytes to send.
    fn plan_json_body(&self, body: Bytes, st: &mut BodyState) -> Bytes {
        let policy = &self.structured;
        // Only a mode other than bytes needs the body parsed: with bytes everywhere, the mode is
        // bytes whatever the model, and the byte rules need no parse.
        let mentions = policy.inspects_bodies() && structured::mentions_json_schema(&body);
        let inspection = if mentions || policy.inspects_bodies() && policy.has_model_rules() {
            match structured::inspect(&body) {
                Ok(i) => Some(i),
                Err(skip) => {
                    if mentions {
                        skipped(skip);
                    }
                    None
                }
            }
        } else {
            None
        };
        let model = inspection.as_ref().and_then(|i| i.model.as_deref());
        st.mode = policy.mode_for(model);
        match st.mode {
            Mode::Passthrough => body,
            Mode::Bytes if self.request_rules.is_empty() => body,
            Mode::Bytes => rewrite_chunk(
                &mut Replacer::new(self.request_rules.clone()),
                Some(body),
                true,
            ),
            Mode::Downgrade => match inspection.map(|i| i.downgrade()) {
                Some(Ok(v)) => {
                    METRICS.structured_downgraded.inc();
                    Bytes::from(v)
                }
                Some(Err(structured::Skip::NoJsonSchema)) | None => body,
                Some(Err(skip)) => {
                    skipped(skip);
                    body
                }
            },
        }
    }
}

fn skipped(skip: structured::Skip) {
    METRICS.structured_skipped.inc();
    info!("structured output left untouched: {}", skip.as_str());
}

/// Reads a body of declared length `n` now, so its rewrite can go out with an exact
/// Content-Length. Pingora's retry buffer keeps the raw bytes and replays them (with end of
/// stream) through `request_body_filter`, where the planned body is substituted.
async fn read_whole_body(session: &mut Session, n: u64, limits: &Limits) -> Result<Bytes> {
    session.as_downstream_mut().enable_retry_buffering();
    if session.req_header().headers.contains_key(header::EXPECT) {
        // The client waits for an invitation before sending the body we read here.
        session
            .as_downstream_mut()
            .write_continue_response()
            .await?;
    }
    let mut buf = BytesMut::with_capacity(usize::try_from(n).unwrap_or(0));
    while let Some(chunk) = session.read_request_body().await? {
        buf.extend_from_slice(&chunk);
        limits.check_body(buf.len() as u64)?;
    }
    Ok(buf.freeze())
}

/// A request that may carry `response_format: json_schema`: a JSON POST with a body.
fn is_structured_candidate(req: &RequestHeader) -> bool {
    if req.method != Method::POST || req.headers.contains_key(header::CONTENT_ENCODING) {
        return false;
    }
    match req.headers.get(header::CONTENT_TYPE) {
        None => true,
        Some(ct) => memchr::memmem::find(ct.as_bytes(), b"json").is_some(),
    }
}

/// 1xx, 204 and 304 never have a body.
pub(super) fn is_bodiless(status: http::StatusCode) -> bool {
    status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
}

/// The bytes may differ from what the upstream's strong validator describes.
pub(super) fn weaken_etag(resp: &mut ResponseHeader) -> Result<()> {
    if let Some(etag) = resp.headers.get(header::ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                resp.insert_header(header::ETAG, v)?;
            }
        }
    }
    Ok(())
}

/// Feeds one chunk (None: no bytes, only the end flag) and counts what was replaced.
fn rewrite_chunk(rw: &mut Replacer, chunk: Option<Bytes>, end: bool) -> Bytes {
    let (replacements, matched) = (rw.replacements(), rw.matched_bytes());
    let out = rw.push(chunk.unwrap_or_default(), end);
    METRICS.replacements.add(rw.replacements() - replacements);
    METRICS.bytes_rewritten.add(rw.matched_bytes() - matched);
    out
}

/// True when a body is sent with a content coding (gzip, br, …): byte rules cannot apply to it.
pub(super) fn is_encoded(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}
