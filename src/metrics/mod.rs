//! Process-wide metrics, declared next to the code that moves them and rendered in the Prometheus
//! text format (0.0.4) on the admin listener's `/metrics`.
//!
//! - [`Counter`], [`Gauge`], [`Histogram`]: the values, relaxed atomics; an update never locks or
//!   allocates. Histograms count durations in [`BUCKET_BOUNDS_NS`] (50 µs … 120 s).
//! - [`Named`]: one metric without labels. [`CounterVec`], [`GaugeVec`], [`HistogramVec`]: a
//!   family with a fixed list of label names, bounded to [`DEFAULT_MAX_SERIES`] series unless
//!   declared otherwise; label sets past the bound count under `"other"`.
//! - [`METRICS`]: the gateway's own metrics (requests, latencies, upstream, failures, rewrites).
//!
//! # Adding a metric
//! Declare it as a static in the module that moves it, and name it in [`REGISTRY`]:
//! ```
//! use arkgate::metrics::CounterVec;
//!
//! pub static TOKENS: CounterVec<2> =
//!     CounterVec::new("arkgate_tokens_total", "Tokens reported by the upstream.", ["model", "type"]);
//!
//! TOKENS.with(["deepseek-v3", "prompt"]).add(12); // one hashed lookup, no allocation
//! let completion = TOKENS.with(["deepseek-v3", "completion"]); // or resolve once and keep it
//! completion.add(30);
//! ```
//! Label values are escaped when rendered, so they may come from clients (a model name); never
//! put a secret, a raw token, a hash or a path in one.

mod family;
mod gateway;
mod value;

pub use family::{
    CounterVec, Family, GaugeVec, HistogramVec, Named, Render, DEFAULT_MAX_SERIES,
    MAX_LABEL_VALUE_BYTES, OVERFLOW_LABEL_VALUE,
};
pub use gateway::{Metrics, METRICS};
pub use value::{Counter, FloatCounter, Gauge, Histogram, Metric, BUCKET_BOUNDS_NS};

/// Every metric `/metrics` shows, in this order. A new metric is one line here.
pub static REGISTRY: &[&dyn Render] = &[
    &METRICS.requests,
    &METRICS.in_flight,
    &METRICS.total_time,
    &METRICS.overhead_time,
    &METRICS.stream_first_byte,
    &METRICS.upstream_duration,
    &METRICS.ttft,
    &METRICS.tokens,
    &METRICS.usage_missing,
    &METRICS.cost,
    &METRICS.rate_limited,
    &METRICS.limit_store_errors,
    &METRICS.upstream_connections_new,
    &METRICS.upstream_connections_reused,
    &METRICS.upstream_5xx,
    &METRICS.upstream_connect_failures,
    &METRICS.retries,
    &METRICS.connection_timeout,
    &METRICS.read_timeout,
    &METRICS.retry_exhausted,
    &METRICS.unexpected_error,
    &METRICS.failures,
    &METRICS.bytes_rewritten,
    &METRICS.replacements,
    &METRICS.structured_downgraded,
    &METRICS.structured_skipped,
    &METRICS.policy_actions,
    &METRICS.policy_time,
    &METRICS.body_too_large,
    &METRICS.bytes_in,
    &METRICS.bytes_out,
];

/// Renders every metric in [`REGISTRY`], then `arkgate_draining` from the calling server's own
/// drain state (servers embedded side by side in one process drain independently).
pub fn render(draining: bool) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for metric in REGISTRY {
        metric.render(&mut out);
    }
    family::write_header(
        &mut out,
        "arkgate_draining",
        "1 while the server drains before exit.",
        "gauge",
    );
    out.push_str(if draining {
        "arkgate_draining 1\n"
    } else {
        "arkgate_draining 0\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn render_has_the_reliability_counters() {
        let text = render(false);
        for name in [
            "arkgate_connection_timeout_total",
            "arkgate_read_timeout_total",
            "arkgate_retry_exhausted_total",
            "arkgate_unexpected_error_total",
            "arkgate_requests_total{class=\"2xx\"}",
            "arkgate_requests_total{class=\"aborted\"}",
            "arkgate_request_duration_seconds_bucket{class=\"2xx\",le=\"+Inf\"}",
            "arkgate_draining 0\n",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        assert!(render(true).contains("arkgate_draining 1\n"));
    }

    #[test]
    fn every_metric_is_registered_once_with_help_and_type_once() {
        let names: HashSet<&str> = REGISTRY.iter().map(|m| m.name()).collect();
        assert_eq!(names.len(), REGISTRY.len(), "a name registered twice");
        let text = render(false);
        for name in names.iter().copied().chain(["arkgate_draining"]) {
            assert_eq!(
                text.matches(&format!("# HELP {name} ")).count(),
                1,
                "{name}"
            );
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
    }

    #[test]
    fn statuses_count_by_class() {
        let before = METRICS.requests.with(["4xx"]).get();
        METRICS.count_status(404);
        METRICS.count_status(429);
        assert_eq!(METRICS.requests.with(["4xx"]).get(), before + 2);
    }

    #[test]
    fn every_sample_line_is_name_labels_and_a_number() {
        METRICS.observe_request(200, std::time::Duration::from_millis(3));
        for line in render(false).lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.starts_with("arkgate_"), "{line}");
            assert_eq!(series.contains('{'), series.ends_with('}'), "{line}");
        }
    }
}
