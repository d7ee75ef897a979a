//! Request metrics, moved once per request from `logging`: status class, total time, the time
//! spent in arkgate (total minus the upstream wait), time to the upstream's first byte, bytes.

use std::time::Duration;

use super::ctx::RequestCtx;
use crate::metrics::METRICS;

/// Records the finished request's metrics; `status` is what the client got (0: nothing).
pub fn request_done(ctx: &RequestCtx, status: u16) {
    let t = &ctx.timing;
    let total = t.started.elapsed();
    METRICS.count_status(status);
    METRICS.total_time.observe(total);
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
    METRICS.bytes_in.add(ctx.body.bytes_in);
    METRICS.bytes_out.add(ctx.body.bytes_out);
}
