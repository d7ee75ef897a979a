//! Token usage along the request's path: the request's model (sniffed from the body), streamed
//! chat requests made to report usage (`stream_options.include_usage`, with the usage-only
//! chunk removed again for a client that had not asked for it), the upstream's `usage` read
//! from JSON answers and SSE streams, and the time to the first SSE event sent to the client.
//!
//! The parsing lives in [`crate::transform::usage`] and [`crate::transform::model`]; this stage
//! only feeds them. The metrics are moved once per request by the `observe` stage.

use std::time::Instant;

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;

use super::body::{BodyPlan, BodyState};
use crate::config::Config;
use crate::transform::model::{self, ModelSniffer};
use crate::transform::usage::{
    ensure_include_usage, BodyKind, StreamUsage, Usage, UsageChunkFilter, UsageExtractor,
};

/// The usage stage's slice of the request context.
#[derive(Default)]
pub struct UsageState {
    /// A completion or embedding call, whose answer should carry `usage`.
    pub counted: bool,
    /// The request's top-level `model`, once known.
    pub model: Option<String>,
    /// The request asked for a stream (`"stream": true`).
    pub stream: bool,
    sniffer: Option<ModelSniffer>,
    /// arkgate added `include_usage`: the usage-only chunk is not the client's.
    strip: bool,
    extractor: Option<UsageExtractor>,
    filter: Option<UsageChunkFilter>,
    /// The first SSE data event left for the client.
    pub first_event: Option<Instant>,
    /// The usage the upstream reported, once the answer ended.
    pub usage: Option<Usage>,
    /// The answer was a 200 the usage should have come with.
    pub expected: bool,
}

/// Usage settings, compiled from `usage:`.
pub struct UsageStage {
    include_usage: bool,
}

impl UsageStage {
    /// A token limit needs every stream's usage: `include_usage` is then on whatever
    /// `usage.stream_include_usage` says.
    pub fn new(cfg: &Config) -> UsageStage {
        UsageStage {
            include_usage: cfg.usage.stream_include_usage || cfg.counts_tokens(),
        }
    }

    /// Whether this stage needs small JSON bodies read whole (to edit `stream_options`).
    pub fn needs_whole_body(&self) -> bool {
        self.include_usage
    }

    /// After the body plan: the model, and the `include_usage` edit of a body read whole.
    pub fn request_filter(&self, path: &str, body: &mut BodyState, st: &mut UsageState) {
        st.counted = ["/chat/completions", "/completions", "/embeddings"]
            .iter()
            .any(|p| path.ends_with(p));
        if !st.counted {
            return;
        }
        match &mut body.plan {
            BodyPlan::Replace(planned) => {
                if let Some(edited) = self.plan_whole(planned, path, st) {
                    *planned = edited;
                }
            }
            BodyPlan::Stream => st.sniffer = Some(ModelSniffer::new()),
            BodyPlan::Hold(_) => {}
        }
    }

    /// Each request chunk as it leaves: sniffs a streamed body's model; edits a held body.
    pub fn request_body_filter(
        &self,
        path: &str,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        body: &BodyState,
        st: &mut UsageState,
    ) {
        if let (Some(sniffer), Some(b)) = (st.sniffer.as_mut(), chunk.as_ref()) {
            sniffer.push(b);
            if sniffer.is_done() {
                st.model = sniffer.model().map(str::to_string);
                st.sniffer = None;
            }
        }
        let held_whole = end_of_stream && matches!(body.plan, BodyPlan::Hold(_));
        if st.counted && held_whole {
            if let Some(whole) = chunk.as_ref() {
                if let Some(edited) = self.plan_whole(whole, path, st) {
                    *chunk = Some(edited);
                }
            }
        }
    }

    /// A complete body: its model and stream flag; the edited body when usage was added.
    fn plan_whole(&self, whole: &Bytes, path: &str, st: &mut UsageState) -> Option<Bytes> {
        st.model = model::sniff(whole);
        let edit = ensure_include_usage(whole);
        st.stream = matches!(edit, StreamUsage::Added(_) | StreamUsage::Requested);
        if !(self.include_usage && path.ends_with("/chat/completions")) {
            return None;
        }
        st.strip = edit.strips_usage_chunk();
        match edit {
            StreamUsage::Added(edited) => Some(Bytes::from(edited)),
            _ => None,
        }
    }

    /// The response header: starts reading usage from a 200 JSON or SSE answer.
    pub fn response_filter(&self, resp: &ResponseHeader, from_upstream: bool, st: &mut UsageState) {
        if !(st.counted && from_upstream && resp.status == http::StatusCode::OK) {
            return;
        }
        let kind = resp
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(BodyKind::from_content_type);
        let Some(kind) = kind else {
            return;
        };
        st.expected = true;
        if kind == BodyKind::EventStream {
            st.stream = true;
            if st.strip {
                st.filter = Some(UsageChunkFilter::new());
            }
        }
        st.extractor = Some(UsageExtractor::new(kind));
    }

    /// Each response chunk: read for usage first, then the usage-only event removed when it is
    /// not the client's.
    pub fn response_body_filter(
        &self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
        st: &mut UsageState,
    ) {
        if let (Some(x), Some(b)) = (st.extractor.as_mut(), chunk.as_ref()) {
            if x.push(b).first_data && st.first_event.is_none() {
                st.first_event = Some(Instant::now());
            }
        }
        if let Some(f) = st.filter.as_mut() {
            let out = f.push(chunk.take().unwrap_or_default(), end_of_stream);
            *chunk = (!out.is_empty()).then_some(out);
        }
        if end_of_stream {
            self.finish(st);
        }
    }

    /// The answer ended (or the request is over): keep what the extractor found.
    pub fn finish(&self, st: &mut UsageState) {
        if let Some(x) = st.extractor.take() {
            st.usage = x.finish().usage;
        }
    }
}
