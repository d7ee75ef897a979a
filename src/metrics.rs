//! Process-wide counters and histograms, registered once, rendered in the Prometheus text format.
//!
//! Everything is a relaxed atomic in one static, so the request path pays one atomic add per
//! event and never locks or allocates. The admin listener renders [`render`] on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Latency bucket upper bounds, in microseconds (100 µs … 60 s).
const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000, 10_000_000, 60_000_000,
];

/// A fixed-bucket latency histogram.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS_US.len()],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1), or None with no data.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= rank {
                return Some(Duration::from_micros(BUCKETS_US[i]));
            }
        }
        Some(Duration::from_micros(u64::MAX))
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = BUCKETS_US[i] as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// A monotonically increasing counter.
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
pub struct Gauge(AtomicU64);

impl Gauge {
    const fn new() -> Gauge {
        Gauge(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// All of arkgate's metrics.
pub struct Metrics {
    pub requests_1xx: Counter,
    pub requests_2xx: Counter,
    pub requests_3xx: Counter,
    pub requests_4xx: Counter,
    pub requests_5xx: Counter,
    pub requests_aborted: Counter,
    pub in_flight: Gauge,
    pub total_time: Histogram,
    pub overhead_time: Histogram,
    pub stream_first_byte: Histogram,
    pub upstream_connections_new: Counter,
    pub upstream_connections_reused: Counter,
    pub upstream_5xx: Counter,
    pub upstream_connect_failures: Counter,
    pub retries: Counter,
    pub connection_timeout: Counter,
    pub read_timeout: Counter,
    pub retry_exhausted: Counter,
    pub unexpected_error: Counter,
    pub connect_failed: Counter,
    pub upstream_broken: Counter,
    pub bad_request: Counter,
    pub client_gone: Counter,
    pub bytes_rewritten: Counter,
    pub replacements: Counter,
    pub structured_downgraded: Counter,
    pub structured_skipped: Counter,
    pub body_too_large: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    draining: AtomicBool,
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics {
    requests_1xx: Counter::new(),
    requests_2xx: Counter::new(),
    requests_3xx: Counter::new(),
    requests_4xx: Counter::new(),
    requests_5xx: Counter::new(),
    requests_aborted: Counter::new(),
    in_flight: Gauge::new(),
    total_time: Histogram::new(),
    overhead_time: Histogram::new(),
    stream_first_byte: Histogram::new(),
    upstream_connections_new: Counter::new(),
    upstream_connections_reused: Counter::new(),
    upstream_5xx: Counter::new(),
    upstream_connect_failures: Counter::new(),
    retries: Counter::new(),
    connection_timeout: Counter::new(),
    read_timeout: Counter::new(),
    retry_exhausted: Counter::new(),
    unexpected_error: Counter::new(),
    connect_failed: Counter::new(),
    upstream_broken: Counter::new(),
    bad_request: Counter::new(),
    client_gone: Counter::new(),
    bytes_rewritten: Counter::new(),
    replacements: Counter::new(),
    structured_downgraded: Counter::new(),
    structured_skipped: Counter::new(),
    body_too_large: Counter::new(),
    bytes_in: Counter::new(),
    bytes_out: Counter::new(),
    draining: AtomicBool::new(false),
};

impl Metrics {
    /// Counts a finished request by status class (0: no response was sent).
    pub fn count_status(&self, status: u16) {
        match status {
            100..=199 => self.requests_1xx.inc(),
            200..=299 => self.requests_2xx.inc(),
            300..=399 => self.requests_3xx.inc(),
            400..=499 => self.requests_4xx.inc(),
            500..=599 => self.requests_5xx.inc(),
            _ => self.requests_aborted.inc(),
        }
    }

    /// Marks the process as draining (the `arkgate_draining` gauge).
    pub fn set_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// True once shutdown or a graceful upgrade has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// One line for the error log: the four reliability counters.
    pub fn failure_summary(&self) -> String {
        format!(
            "CONNECTION_TIMEOUT={} READ_TIMEOUT={} RETRY_EXHAUSTED={} UNEXPECTED_ERROR={}",
            self.connection_timeout.get(),
            self.read_timeout.get(),
            self.retry_exhausted.get(),
            self.unexpected_error.get()
        )
    }
}

/// Renders every metric in the Prometheus text exposition format.
pub fn render() -> String {
    let m = &METRICS;
    let mut out = String::with_capacity(8 * 1024);
    let _ = writeln!(
        out,
        "# HELP arkgate_requests_total Requests answered, by status class.\n# TYPE arkgate_requests_total counter"
    );
    for (class, c) in [
        ("1xx", &m.requests_1xx),
        ("2xx", &m.requests_2xx),
        ("3xx", &m.requests_3xx),
        ("4xx", &m.requests_4xx),
        ("5xx", &m.requests_5xx),
        ("aborted", &m.requests_aborted),
    ] {
        let _ = writeln!(
            out,
            "arkgate_requests_total{{class=\"{class}\"}} {}",
            c.get()
        );
    }
    let _ = writeln!(
        out,
        "# HELP arkgate_in_flight_requests Requests being proxied now.\n# TYPE arkgate_in_flight_requests gauge\narkgate_in_flight_requests {}",
        m.in_flight.get()
    );
    m.total_time.render(
        &mut out,
        "arkgate_request_duration_seconds",
        "Total time per request.",
    );
    m.overhead_time.render(
        &mut out,
        "arkgate_overhead_duration_seconds",
        "Total time minus time waiting on the upstream.",
    );
    m.stream_first_byte.render(
        &mut out,
        "arkgate_upstream_first_byte_seconds",
        "Time from request start to the first upstream response byte.",
    );
    let counters: [(&str, &str, &Counter); 20] = [
        (
            "arkgate_upstream_connections_new_total",
            "Upstream connections opened.",
            &m.upstream_connections_new,
        ),
        (
            "arkgate_upstream_connections_reused_total",
            "Requests sent on a pooled upstream connection.",
            &m.upstream_connections_reused,
        ),
        (
            "arkgate_upstream_5xx_total",
            "Upstream responses with a 5xx status.",
            &m.upstream_5xx,
        ),
        (
            "arkgate_upstream_connect_failures_total",
            "Failed upstream connection attempts.",
            &m.upstream_connect_failures,
        ),
        (
            "arkgate_retries_total",
            "Upstream attempts retried.",
            &m.retries,
        ),
        (
            "arkgate_connection_timeout_total",
            "CONNECTION_TIMEOUT: upstream connect timeouts.",
            &m.connection_timeout,
        ),
        (
            "arkgate_read_timeout_total",
            "READ_TIMEOUT: upstream read/write timeouts.",
            &m.read_timeout,
        ),
        (
            "arkgate_retry_exhausted_total",
            "RETRY_EXHAUSTED: requests that failed after using every retry.",
            &m.retry_exhausted,
        ),
        (
            "arkgate_unexpected_error_total",
            "UNEXPECTED_ERROR: internal errors answered with 500.",
            &m.unexpected_error,
        ),
        (
            "arkgate_connect_failed_total",
            "Requests answered 502 because no upstream connection could be made.",
            &m.connect_failed,
        ),
        (
            "arkgate_upstream_broken_total",
            "Requests answered 502 because the upstream connection failed after connecting.",
            &m.upstream_broken,
        ),
        (
            "arkgate_bad_request_total",
            "Requests refused as malformed or over a header limit (400, 431).",
            &m.bad_request,
        ),
        (
            "arkgate_client_gone_total",
            "Requests whose client went away before the response was complete.",
            &m.client_gone,
        ),
        (
            "arkgate_bytes_rewritten_total",
            "Body bytes matched by a rewrite rule.",
            &m.bytes_rewritten,
        ),
        (
            "arkgate_replacements_total",
            "Rewrite rule replacements made.",
            &m.replacements,
        ),
        (
            "arkgate_structured_downgraded_total",
            "json_schema requests downgraded with the schema in a system message.",
            &m.structured_downgraded,
        ),
        (
            "arkgate_structured_skipped_total",
            "Candidate bodies forwarded untouched (invalid JSON or unexpected shape).",
            &m.structured_skipped,
        ),
        (
            "arkgate_body_too_large_total",
            "Requests refused with 413.",
            &m.body_too_large,
        ),
        (
            "arkgate_downstream_bytes_in_total",
            "Request body bytes read from clients.",
            &m.bytes_in,
        ),
        (
            "arkgate_downstream_bytes_out_total",
            "Response body bytes sent to clients.",
            &m.bytes_out,
        ),
    ];
    for (name, help, c) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            c.get()
        );
    }
    let _ = writeln!(
        out,
        "# HELP arkgate_draining 1 while the process drains before exit.\n# TYPE arkgate_draining gauge\narkgate_draining {}",
        u8::from(m.is_draining())
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_use_bucket_bounds() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..90 {
            h.observe(Duration::from_micros(80));
        }
        for _ in 0..10 {
            h.observe(Duration::from_millis(3));
        }
        assert_eq!(h.quantile(0.5), Some(Duration::from_micros(100)));
        assert_eq!(h.quantile(0.99), Some(Duration::from_millis(5)));
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn render_has_the_reliability_counters() {
        let text = render();
        for name in [
            "arkgate_connection_timeout_total",
            "arkgate_read_timeout_total",
            "arkgate_retry_exhausted_total",
            "arkgate_unexpected_error_total",
            "arkgate_requests_total{class=\"2xx\"}",
            "arkgate_request_duration_seconds_bucket{le=\"+Inf\"}",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
