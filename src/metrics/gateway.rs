//! The gateway's own metrics in one static, [`METRICS`]: request classes, latencies, upstream
//! connections, retries and failure counters, body rewrites and traffic.
//!
//! Each field is a named metric listed in the registry (`super::REGISTRY`); the request path moves
//! them with `METRICS.retries.inc()`, `METRICS.count_status(..)`, `METRICS.observe_request(..)`.

use super::family::Family;
use super::family::{CounterVec, HistogramVec, Named};
use super::value::{Counter, FloatCounter, Gauge, Histogram};

/// The gateway's metrics, named as `/metrics` shows them.
pub struct Metrics {
    /// `arkgate_requests_total{class}`: 1xx … 5xx, or `aborted` when no response was sent.
    pub requests: CounterVec<1>,
    /// `arkgate_upstream_duration_seconds`: from sending the request to the upstream's header.
    pub upstream_duration: Named<Histogram>,
    /// `arkgate_ttft_seconds{model}`: arrival to the first SSE data event sent to the client.
    pub ttft: HistogramVec<1>,
    /// `arkgate_tokens_total{key,model,type}`: tokens the upstream reported, by client key name
    /// (`-` without client keys).
    pub tokens: CounterVec<3>,
    /// `arkgate_cost_total{key,model}`: the tokens' cost by `prices:`.
    pub cost: Family<FloatCounter, 2>,
    /// `arkgate_rate_limited_total{key,reason}`: requests refused by a limit (rpm, tpm, daily).
    pub rate_limited: CounterVec<2>,
    /// `arkgate_rate_limit_store_errors_total{action}`: checks the limit store could not answer,
    /// by what `on_store_error` did (allow, deny).
    pub limit_store_errors: CounterVec<1>,
    /// `arkgate_usage_missing_total`: answers that should have carried usage and did not.
    pub usage_missing: Named<Counter>,
    /// `arkgate_in_flight_requests`.
    pub in_flight: Named<Gauge>,
    /// `arkgate_request_duration_seconds{class}`: total time per request, by status class.
    pub total_time: HistogramVec<1>,
    /// `arkgate_overhead_duration_seconds`: total time minus upstream wait.
    pub overhead_time: Named<Histogram>,
    /// `arkgate_upstream_first_byte_seconds`.
    pub stream_first_byte: Named<Histogram>,
    /// `arkgate_upstream_connections_new_total`.
    pub upstream_connections_new: Named<Counter>,
    /// `arkgate_upstream_connections_reused_total`.
    pub upstream_connections_reused: Named<Counter>,
    /// `arkgate_upstream_5xx_total`.
    pub upstream_5xx: Named<Counter>,
    /// `arkgate_upstream_connect_failures_total`.
    pub upstream_connect_failures: Named<Counter>,
    /// `arkgate_retries_total`.
    pub retries: Named<Counter>,
    /// `arkgate_connection_timeout_total` (CONNECTION_TIMEOUT).
    pub connection_timeout: Named<Counter>,
    /// `arkgate_read_timeout_total` (READ_TIMEOUT).
    pub read_timeout: Named<Counter>,
    /// `arkgate_retry_exhausted_total` (RETRY_EXHAUSTED).
    pub retry_exhausted: Named<Counter>,
    /// `arkgate_unexpected_error_total` (UNEXPECTED_ERROR).
    pub unexpected_error: Named<Counter>,
    /// `arkgate_failures_total{failure}`: every failed request, by `error::Failure`.
    pub failures: CounterVec<1>,
    /// `arkgate_bytes_rewritten_total`.
    pub bytes_rewritten: Named<Counter>,
    /// `arkgate_replacements_total`.
    pub replacements: Named<Counter>,
    /// `arkgate_structured_downgraded_total`.
    pub structured_downgraded: Named<Counter>,
    /// `arkgate_structured_skipped_total`.
    pub structured_skipped: Named<Counter>,
    /// `arkgate_policy_actions_total{policy,action,side}`: content policies that acted.
    pub policy_actions: CounterVec<3>,
    /// `arkgate_policy_seconds{side}`: time spent evaluating content policies, per body.
    pub policy_time: HistogramVec<1>,
    /// `arkgate_body_too_large_total`: requests refused with 413.
    pub body_too_large: Named<Counter>,
    /// `arkgate_downstream_bytes_in_total`.
    pub bytes_in: Named<Counter>,
    /// `arkgate_downstream_bytes_out_total`.
    pub bytes_out: Named<Counter>,
}

/// The status classes of `arkgate_requests_total`, all shown from the first scrape on.
/// The sides a content policy looks at.
const SIDES: [[&str; 1]; 2] = [["request"], ["response"]];

const CLASSES: [[&str; 1]; 6] = [["1xx"], ["2xx"], ["3xx"], ["4xx"], ["5xx"], ["aborted"]];

/// The failure kinds of `arkgate_failures_total`, as `error::Failure::as_str` names them.
const FAILURES: [[&str; 1]; 12] = [
    ["connection_timeout"],
    ["read_timeout"],
    ["connect_failed"],
    ["upstream_broken"],
    ["bad_request"],
    ["body_too_large"],
    ["client_gone"],
    ["unexpected"],
    ["unauthorized"],
    ["rate_limited"],
    ["policy_blocked"],
    ["limit_store_unavailable"],
];

const fn counter(name: &'static str, help: &'static str) -> Named<Counter> {
    Named::new(name, help, Counter::new())
}

const fn histogram(name: &'static str, help: &'static str) -> Named<Histogram> {
    Named::new(name, help, Histogram::new())
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics {
    requests: CounterVec::new(
        "arkgate_requests_total",
        "Requests answered, by status class.",
        ["class"],
    )
    .initial(&CLASSES),
    upstream_duration: histogram(
        "arkgate_upstream_duration_seconds",
        "Time from sending the request upstream to the upstream's response header.",
    ),
    ttft: HistogramVec::new(
        "arkgate_ttft_seconds",
        "Time from the request's arrival to the first SSE data event sent to the client.",
        ["model"],
    ),
    tokens: CounterVec::new(
        "arkgate_tokens_total",
        "Tokens reported by the upstream's usage, by client key, model and type (prompt, completion).",
        ["key", "model", "type"],
    ),
    cost: Family::new(
        "arkgate_cost_total",
        "Cost of the tokens reported, by client key and model, at the configured prices.",
        ["key", "model"],
    ),
    rate_limited: CounterVec::new(
        "arkgate_rate_limited_total",
        "Requests refused by a rate limit, by client key and limit (rpm, tpm, daily).",
        ["key", "reason"],
    ),
    limit_store_errors: CounterVec::new(
        "arkgate_rate_limit_store_errors_total",
        "Limit checks the store (Redis) could not answer, by the on_store_error action taken.",
        ["action"],
    ),
    usage_missing: counter(
        "arkgate_usage_missing_total",
        "Completion or embedding answers (200) without usage (never counted as zero tokens).",
    ),
    in_flight: Named::new(
        "arkgate_in_flight_requests",
        "Requests being proxied now.",
        Gauge::new(),
    ),
    total_time: HistogramVec::new(
        "arkgate_request_duration_seconds",
        "Total time per request, by status class.",
        ["class"],
    )
    .initial(&CLASSES),
    overhead_time: histogram(
        "arkgate_overhead_duration_seconds",
        "Total time minus time waiting on the upstream.",
    ),
    stream_first_byte: histogram(
        "arkgate_upstream_first_byte_seconds",
        "Time from request start to the first upstream response byte.",
    ),
    upstream_connections_new: counter(
        "arkgate_upstream_connections_new_total",
        "Upstream connections opened.",
    ),
    upstream_connections_reused: counter(
        "arkgate_upstream_connections_reused_total",
        "Requests sent on a pooled upstream connection.",
    ),
    upstream_5xx: counter(
        "arkgate_upstream_5xx_total",
        "Upstream responses with a 5xx status.",
    ),
    upstream_connect_failures: counter(
        "arkgate_upstream_connect_failures_total",
        "Failed upstream connection attempts.",
    ),
    retries: counter("arkgate_retries_total", "Upstream attempts retried."),
    connection_timeout: counter(
        "arkgate_connection_timeout_total",
        "CONNECTION_TIMEOUT: upstream connect timeouts.",
    ),
    read_timeout: counter(
        "arkgate_read_timeout_total",
        "READ_TIMEOUT: upstream read/write timeouts.",
    ),
    retry_exhausted: counter(
        "arkgate_retry_exhausted_total",
        "RETRY_EXHAUSTED: requests that failed after using every retry.",
    ),
    unexpected_error: counter(
        "arkgate_unexpected_error_total",
        "UNEXPECTED_ERROR: internal errors answered with 500.",
    ),
    failures: CounterVec::new(
        "arkgate_failures_total",
        "Failed requests, by failure kind (one per request, counted where it is answered).",
        ["failure"],
    )
    .initial(&FAILURES),
    bytes_rewritten: counter(
        "arkgate_bytes_rewritten_total",
        "Body bytes matched by a rewrite rule.",
    ),
    replacements: counter(
        "arkgate_replacements_total",
        "Rewrite rule replacements made.",
    ),
    structured_downgraded: counter(
        "arkgate_structured_downgraded_total",
        "json_schema requests downgraded with the schema in a system message.",
    ),
    structured_skipped: counter(
        "arkgate_structured_skipped_total",
        "Candidate bodies forwarded untouched (invalid JSON or unexpected shape).",
    ),
    policy_actions: CounterVec::new(
        "arkgate_policy_actions_total",
        "Content policies that acted (block, redact, flag), by policy name and side.",
        ["policy", "action", "side"],
    ),
    policy_time: HistogramVec::new(
        "arkgate_policy_seconds",
        "Time spent evaluating content policies: per request body, per response body or stream.",
        ["side"],
    )
    .initial(&SIDES),
    body_too_large: counter("arkgate_body_too_large_total", "Requests refused with 413."),
    bytes_in: counter(
        "arkgate_downstream_bytes_in_total",
        "Request body bytes read from clients.",
    ),
    bytes_out: counter(
        "arkgate_downstream_bytes_out_total",
        "Response body bytes sent to clients.",
    ),
};

impl Metrics {
    /// Counts a finished request by status class (0: no response was sent).
    pub fn count_status(&self, status: u16) {
        self.requests.with([status_class(status)]).inc();
    }

    /// Records a finished request's total time under its status class.
    pub fn observe_request(&self, status: u16, total: std::time::Duration) {
        self.total_time.with([status_class(status)]).observe(total);
    }
}

/// The status class label: `1xx` … `5xx`, or `aborted` when no response was sent.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "aborted",
    }
}

impl Metrics {
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
