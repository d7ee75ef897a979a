//! Request metrics and timing, moved once per request from `logging`: status class, total time,
//! the time spent in arkgate (total minus the upstream wait), the upstream's time to its
//! response header, time to the first token of a stream, and the tokens the upstream reported.
//! The response carries the same split in a `Server-Timing` header.

use std::time::Duration;

use bytes::Bytes;
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
    let mut v = Vec::with_capacity(48);
    v.extend_from_slice(b"arkgate;dur=");
    push_millis(&mut v, ours);
    v.extend_from_slice(b", upstream;dur=");
    push_millis(&mut v, upstream);
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(v)) {
        resp.insert_header("Server-Timing", value)?;
    }
    Ok(())
}

/// `d` in milliseconds with three decimals (whole microseconds), written without `core::fmt`
/// (its machinery cost more than the rest of this header): 1,234 µs → `1.234`.
fn push_millis(out: &mut Vec<u8>, d: Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(micros / 1000).as_bytes());
    let frac = micros % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(micros: u64) -> String {
        let mut out = Vec::new();
        push_millis(&mut out, Duration::from_micros(micros));
        String::from_utf8(out).expect("ascii")
    }

    #[test]
    fn milliseconds_carry_three_decimals() {
        assert_eq!(millis(0), "0.000");
        assert_eq!(millis(7), "0.007");
        assert_eq!(millis(40), "0.040");
        assert_eq!(millis(1_234), "1.234");
        assert_eq!(millis(1_000), "1.000");
        assert_eq!(millis(987_654_321), "987654.321");
    }

    #[test]
    fn sub_microsecond_parts_are_dropped() {
        let mut out = Vec::new();
        push_millis(&mut out, Duration::from_nanos(1_999));
        assert_eq!(out, b"0.001");
    }
}
