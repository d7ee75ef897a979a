//! The access log: one line per sampled request (every failure, every 5xx, and a share of the
//! rest), method and path only (never the query, headers or a credential), and with
//! `logging.bodies: true` the first `body_max_bytes` of each body, quoted and escaped.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use log::{info, warn};
use pingora::prelude::*;

use super::ctx::RequestCtx;
use crate::config::{Config, LogFormat};
use crate::error::classify;
use crate::metrics::METRICS;

/// The access log's slice of the request context: the body samples, when enabled.
#[derive(Default)]
pub struct LogState {
    request_sample: Option<BodySample>,
    response_sample: Option<BodySample>,
    /// What the response cache did (`hit`, `miss`, `bypass`), for requests it looked at.
    pub cache: Option<&'static str>,
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
    format: LogFormat,
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
            format: cfg.logging.format,
        }
    }

    /// The state of a new request.
    pub fn new_state(&self) -> LogState {
        LogState {
            request_sample: self.body_max_bytes.map(BodySample::new),
            response_sample: self.body_max_bytes.map(BodySample::new),
            cache: None,
        }
    }

    /// Writes the line when this request is sampled; `failed` marks a proxy failure.
    pub fn logging(&self, session: &Session, ctx: &RequestCtx, status: u16, e: Option<&Error>) {
        let failed = e.is_some() && !(400..500).contains(&status);
        if !self.should_log(status, failed) {
            return;
        }
        let line = match self.format {
            LogFormat::Text => line(session, ctx, status, e),
            LogFormat::Json => json_event(session, ctx, status, e),
        };
        if self.format == LogFormat::Json {
            // One object per line, nothing around it, so a log pipeline can parse every line.
            info!(target: "arkgate::access", "{line}");
        } else if failed || status >= 500 {
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
    for (i, a) in ctx.policy.acted.iter().enumerate() {
        let sep = if i == 0 { " policies=" } else { "," };
        let (action, side) = (a.action.as_str(), a.side.as_str());
        let _ = write!(out, "{sep}{}:{action}:{side}", a.name);
    }
    if let (Some(req), Some(resp)) = (&ctx.log.request_sample, &ctx.log.response_sample) {
        let _ = write!(out, " req_body={req} resp_body={resp}");
    }
    out
}

/// Milliseconds with microsecond resolution, for JSON.
fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1e3
}

/// The access event as one JSON object (`logging.format: json`). Method and path only (never
/// the query or a header); the body samples only with `logging.bodies: true`.
fn json_event(session: &Session, ctx: &RequestCtx, status: u16, e: Option<&Error>) -> String {
    let req = session.req_header();
    let t = &ctx.timing;
    let total = t.started.elapsed();
    let split = super::observe::split(t);
    let upstream_wait = match (t.upstream_sent, t.upstream_done.or(t.upstream_first_byte)) {
        (Some(sent), Some(done)) if done > sent => done - sent,
        _ => Duration::ZERO,
    };
    let u = &ctx.usage;
    let mut event = json!({
        "ts": rfc3339(SystemTime::now()),
        "method": req.method.as_str(),
        "path": req.uri.path(),
        "status": status,
        "model": u.model,
        "stream": u.stream,
        "endpoint": ctx.attempt.endpoint().map(|e| e.name()),
        "cache": ctx.log.cache,
        "prompt_tokens": u.usage.map(|x| x.prompt_tokens),
        "completion_tokens": u.usage.map(|x| x.completion_tokens),
        "ttft_ms": u.first_event.map(|f| ms(f - t.started)),
        "duration_ms": ms(total),
        "upstream_ms": split.map(|(_, up)| ms(up)),
        "overhead_ms": ms(total.saturating_sub(upstream_wait)),
        "bytes_in": ctx.body.bytes_in,
        "bytes_out": ctx.body.bytes_out,
        "retries": ctx.attempt.attempts.saturating_sub(1),
        "error": e.map(|err| classify(err).code),
    });
    if !ctx.policy.acted.is_empty() {
        let acted = ctx.policy.acted.iter().map(
            |a| json!({"policy": &*a.name, "action": a.action.as_str(), "side": a.side.as_str()}),
        );
        event["policies"] = Value::Array(acted.collect());
    }
    if let (Some(req), Some(resp)) = (&ctx.log.request_sample, &ctx.log.response_sample) {
        event["req_body"] = Value::String(String::from_utf8_lossy(&req.bytes).into_owned());
        event["resp_body"] = Value::String(String::from_utf8_lossy(&resp.bytes).into_owned());
    }
    event.to_string()
}

/// `2026-12-01T20:06:42.123Z` (UTC, milliseconds).
fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (the standard era-based
/// conversion: 400-year eras of 146,097 days, years starting in March).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_155_602_123);
        assert_eq!(rfc3339(t), "2026-12-01T20:06:42.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
