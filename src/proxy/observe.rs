//! Request metrics and timing, moved once per request from `logging`: status class, total time,
//! the time spent in arkgate (total minus the upstream wait), the upstream's time to its
//! response header, time to the first token of a stream, and the tokens the upstream reported.
//! The response carries the same split in a `Server-Timing` header.

use std::fmt::Write as _;
use std::time::Duration;

use http::header::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use super::ctx::{RequestCtx, Timing};
use super::usage::UsageState;
use crate::metrics::METRICS;

/// Time spent before the request went upstream, and the upstream's time to its header.
pub fn split(t: &Timing) -> Option<(Duration, Duration)> {
    let sent = t.upstream_sent?;
    let header = t.upstream_first_byte?;
    Some((sent - t.started, header.saturating_duration_since(sent)))
}

/// `Server-Timing: arkgate;dur=…, upstream;dur=…` on responses that came from the upstream.
pub fn response_filter(resp: &mut ResponseHeader, t: &Timing) -> Result<()> {
    let Some((ours, upstream)) = split(t) else {
        return Ok(());
    };
    // Milliseconds with three decimals, from whole microseconds: integer formatting only.
    let (ours, upstream) = (ours.as_micros(), upstream.as_micros());
    let mut v = String::with_capacity(48);
    let _ = write!(
        v,
        "arkgate;dur={}.{:03}, upstream;dur={}.{:03}",
        ours / 1000,
        ours % 1000,
        upstream / 1000,
        upstream % 1000
    );
    if let Ok(value) = HeaderValue::from_str(&v) {
        resp.insert_header("Server-Timing", value)?;
    }
    Ok(())
}

/// Records the finished request's metrics; `status` is what the client got (0: nothing).
pub fn request_done(ctx: &RequestCtx, status: u16) {
    let t = &ctx.timing;
    let total = t.started.elapsed();
    METRICS.count_status(status);
    METRICS.observe_request(status, total);
    let upstream_wait = match (t.upstream_sent, t.upstream_done.or(t.upstream_first_byte)) {
        (Some(sent), Some(done)) if done > sent => done - sent,
        _ => Duration::ZERO,
    };
    METRICS
        .overhead_time
        .observe(total.saturating_sub(upstream_wait));
    if let Some(first) = t.upstream_first_byte {
        METRICS.stream_first_byte.observe(first - t.started);
    }
    if let Some((_, upstream)) = split(t) {
        METRICS.upstream_duration.observe(upstream);
    }
    METRICS.bytes_in.add(ctx.body.bytes_in);
    METRICS.bytes_out.add(ctx.body.bytes_out);
    usage_done(&ctx.usage, t, ctx.auth.key_name());
}

/// Tokens, missing usage and time to first token.
fn usage_done(u: &UsageState, t: &Timing, key: &str) {
    let model = u.model.as_deref().unwrap_or("-");
    if let Some(first) = u.first_event {
        METRICS.ttft.with([model]).observe(first - t.started);
    }
    match u.usage {
        Some(usage) => {
            METRICS
                .tokens
                .with([key, model, "prompt"])
                .add(usage.prompt_tokens);
            METRICS
                .tokens
                .with([key, model, "completion"])
                .add(usage.completion_tokens);
        }
        None if u.expected => METRICS.usage_missing.inc(),
        None => {}
    }
}
