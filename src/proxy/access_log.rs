//! The access log: one line per sampled request (every failure, every 5xx, and a share of the
//! rest), method and path only (never the query, headers or a credential), and with
//! `logging.bodies: true` the first `body_max_bytes` of each body, quoted and escaped.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use log::{info, warn};
use pingora::prelude::*;

use super::ctx::RequestCtx;
use crate::config::Config;
use crate::metrics::METRICS;

/// The access log's slice of the request context: the body samples, when enabled.
#[derive(Default)]
pub struct LogState {
    request_sample: Option<BodySample>,
    response_sample: Option<BodySample>,
}

impl LogState {
    /// Records a piece of the request body as sent upstream.
    pub fn request_chunk(&mut self, chunk: Option<&bytes::Bytes>) {
        if let (Some(sample), Some(b)) = (self.request_sample.as_mut(), chunk) {
            sample.record(b);
        }
    }

    /// Records a piece of the response body as sent to the client.
    pub fn response_chunk(&mut self, chunk: Option<&bytes::Bytes>) {
        if let (Some(sample), Some(b)) = (self.response_sample.as_mut(), chunk) {
            sample.record(b);
        }
    }
}

/// The first `limit` bytes of a body, for the access log.
struct BodySample {
    bytes: Vec<u8>,
    limit: usize,
}

impl BodySample {
    fn new(limit: usize) -> BodySample {
        BodySample {
            bytes: Vec::new(),
            limit,
        }
    }

    fn record(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        self.bytes
            .extend_from_slice(&chunk[..room.min(chunk.len())]);
    }
}

impl fmt::Display for BodySample {
    /// Quoted, with control and non-UTF-8 bytes escaped, so a body cannot forge log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.bytes.escape_ascii())
    }
}

/// Sampling and body settings, compiled from `logging:`.
pub struct AccessLog {
    /// Log one successful request in `every` (0: none).
    every: u64,
    counter: AtomicU64,
    body_max_bytes: Option<usize>,
}

impl AccessLog {
    pub fn new(cfg: &Config) -> AccessLog {
        let rate = cfg.logging.sample_rate;
        let every = if rate <= 0.0 {
            0
        } else {
            (1.0 / rate).round().max(1.0) as u64
        };
        AccessLog {
            every,
            counter: AtomicU64::new(0),
            body_max_bytes: cfg.logging.bodies.then_some(cfg.logging.body_max_bytes),
        }
    }

    /// The state of a new request.
    pub fn new_state(&self) -> LogState {
        LogState {
            request_sample: self.body_max_bytes.map(BodySample::new),
            response_sample: self.body_max_bytes.map(BodySample::new),
        }
    }

    /// Writes the line when this request is sampled; `failed` marks a proxy failure.
    pub fn logging(&self, session: &Session, ctx: &RequestCtx, status: u16, e: Option<&Error>) {
        let failed = e.is_some() && !(400..500).contains(&status);
        if !self.should_log(status, failed) {
            return;
        }
        let line = line(session, ctx, status, e);
        if failed || status >= 500 {
            warn!(target: "arkgate::access", "{line} [{}]", METRICS.failure_summary());
        } else {
            info!(target: "arkgate::access", "{line}");
        }
    }

    fn should_log(&self, status: u16, failed: bool) -> bool {
        if failed || status >= 500 || status == 0 {
            return true;
        }
        self.every != 0
            && self
                .counter
                .fetch_add(1, Relaxed)
                .is_multiple_of(self.every)
    }
}

/// The access line; formatted only for sampled requests.
fn line(session: &Session, ctx: &RequestCtx, status: u16, e: Option<&Error>) -> String {
    let req = session.req_header();
    let t = &ctx.timing;
    let mut out = String::with_capacity(256);
    let query = if req.uri.query().is_some() {
        "?…"
    } else {
        ""
    };
    let _ = write!(
        out,
        "{} {}{query} status={status}",
        req.method,
        req.uri.path()
    );
    let _ = match t.upstream_status {
        Some(s) => write!(out, " upstream_status={s}"),
        None => write!(out, " upstream_status=-"),
    };
    let total_ms = t.started.elapsed().as_secs_f64() * 1e3;
    let _ = write!(
        out,
        " in={} out={} total_ms={total_ms:.1}",
        ctx.body.bytes_in, ctx.body.bytes_out
    );
    let _ = match t.upstream_first_byte {
        Some(first) => write!(
            out,
            " ttfb_ms={:.1}",
            (first - t.started).as_secs_f64() * 1e3
        ),
        None => write!(out, " ttfb_ms=-"),
    };
    let a = &ctx.attempt;
    let endpoint = a.endpoint().map_or("-", |e| e.name());
    let _ = write!(out, " endpoint={endpoint}");
    let reused = a.reused.map_or("-", |r| if r { "yes" } else { "no" });
    let _ = write!(
        out,
        " retries={} reused={reused} mode={}",
        a.attempts.saturating_sub(1),
        ctx.body.mode.as_str()
    );
    if let Some(err) = e {
        let _ = write!(out, " error={}", err.etype().as_str());
    }
    if let (Some(req), Some(resp)) = (&ctx.log.request_sample, &ctx.log.response_sample) {
        let _ = write!(out, " req_body={req} resp_body={resp}");
    }
    out
}
