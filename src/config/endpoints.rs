//! The parts of `upstream:` that concern several endpoints: the endpoint list (or the single
//! `base_url`), balancing, failover statuses, the circuit breaker, active health checks and
//! warm-up. The rest of `upstream:` (timeouts, TLS, HTTP version, retries) is in `upstream.rs`
//! and applies to every endpoint.

use std::time::Duration;

use http::HeaderValue;
use serde::Deserialize;

use super::{net, ConfigError};

/// The name a single `upstream.base_url` gets as an endpoint.
pub const DEFAULT_ENDPOINT_NAME: &str = "default";

/// Longest endpoint name (names are metric labels).
const MAX_NAME_LEN: usize = 64;
/// Largest `weight`.
const MAX_WEIGHT: u32 = 1000;
/// Largest `warmup.connections` per endpoint.
const MAX_WARMUP_CONNECTIONS: usize = 64;

/// On-disk shape of one `upstream.endpoints[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    name: String,
    base_url: String,
    #[serde(default = "one")]
    weight: u32,
    /// None: derived from the base URL.
    #[serde(default)]
    host: Option<String>,
}

fn one() -> u32 {
    1
}

/// How requests are spread over the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round-robin.
    RoundRobin,
    /// The endpoint with the fewest requests in flight relative to its weight.
    LeastInFlight,
}

/// On-disk shape of `upstream.circuit_breaker`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBreaker {
    failures: u32,
    open_ms: u64,
}

impl Default for RawBreaker {
    fn default() -> Self {
        RawBreaker {
            failures: 5,
            open_ms: 30_000,
        }
    }
}

/// On-disk shape of `upstream.health_check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHealthCheck {
    path: String,
    interval_ms: u64,
    timeout_ms: u64,
    unhealthy_after: u32,
    healthy_after: u32,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        RawHealthCheck {
            path: "/models".into(),
            interval_ms: 5_000,
            timeout_ms: 2_000,
            unhealthy_after: 3,
            healthy_after: 2,
        }
    }
}

/// On-disk shape of `upstream.warmup`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWarmup {
    connections: usize,
    path: String,
}

impl Default for RawWarmup {
    fn default() -> Self {
        RawWarmup {
            connections: 4,
            path: "/models".into(),
        }
    }
}

/// One upstream endpoint, ready to use.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Unique name (`default` for a single `upstream.base_url`); a metrics label.
    pub name: String,
    /// The base URL as configured (shown by the admin view).
    pub base_url: String,
    pub tls: bool,
    /// Host name or IP literal from the base URL (used for DNS and SNI).
    pub hostname: String,
    pub port: u16,
    /// Path prefix from the base URL, without a trailing slash ("" or "/api/v3").
    pub base_path: String,
    /// Host header (and `:authority`) sent to this endpoint.
    pub host_header: HeaderValue,
    /// Share of the traffic, relative to the other endpoints' weights (≥ 1).
    pub weight: u32,
}

/// `upstream.circuit_breaker`: consecutive failures that open the circuit, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    pub failures: u32,
    pub open: Duration,
}

/// `upstream.health_check`: an HTTP GET of `path` (under each endpoint's base path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Starts with `/`; appended to the endpoint's base path.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

/// `upstream.warmup`: connections opened per endpoint at start by requests to `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warmup {
    pub connections: usize,
    /// Starts with `/`; sent as the client path (the endpoint's base path is prepended).
    pub path: String,
}

/// The parts of one `base_url`.
struct BaseUrl {
    tls: bool,
    hostname: String,
    port: u16,
    base_path: String,
}

impl BaseUrl {
    fn parse(key: &str, url: &str) -> Result<BaseUrl, ConfigError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            let why = format!("`{url}` must start with http:// or https://");
            return Err(ConfigError::invalid(key, why));
        };
        if rest.contains(['?', '#']) {
            return Err(ConfigError::invalid(
                key,
                "must not carry a query or fragment",
            ));
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() || authority.contains('@') {
            return Err(ConfigError::invalid(
                key,
                format!("`{url}` has no usable host"),
            ));
        }
        let (hostname, port) = net::split_host_port(authority, default_port(tls))
            .ok_or_else(|| ConfigError::invalid(key, format!("bad host:port `{authority}`")))?;
        Ok(BaseUrl {
            tls,
            hostname,
            port,
            base_path: path.trim_end_matches('/').to_string(),
        })
    }

    /// `Host` as a client would send it for this URL: the port only when it is not the default.
    fn default_host(&self) -> String {
        let host = net::bracket_v6(&self.hostname);
        if self.port == default_port(self.tls) {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

fn default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

/// One endpoint from its base URL and optional `Host` override; `prefix` names the keys
/// (`upstream` or `upstream.endpoints[i]`) in errors.
pub(super) fn endpoint(
    prefix: &str,
    name: String,
    base_url: String,
    host: Option<String>,
    weight: u32,
) -> Result<Endpoint, ConfigError> {
    let url = BaseUrl::parse(&format!("{prefix}.base_url"), &base_url)?;
    let host = host.unwrap_or_else(|| url.default_host());
    let host_header = HeaderValue::from_str(&host).map_err(|_| {
        ConfigError::invalid(
            format!("{prefix}.host"),
            format!("`{host}` is not a valid header value"),
        )
    })?;
    Ok(Endpoint {
        name,
        base_url,
        tls: url.tls,
        hostname: url.hostname,
        port: url.port,
        base_path: url.base_path,
        host_header,
        weight,
    })
}

/// Validates `upstream.endpoints`: at least one, unique names usable as labels, weights in
/// 1..=1000, each base URL and host as for `upstream.base_url`.
pub(super) fn endpoints(raw: Vec<RawEndpoint>) -> Result<Vec<Endpoint>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::invalid(
            "upstream.endpoints",
            "must list at least one endpoint",
        ));
    }
    let mut out: Vec<Endpoint> = Vec::with_capacity(raw.len());
    for (i, e) in raw.into_iter().enumerate() {
        let prefix = format!("upstream.endpoints[{i}]");
        let name_ok = !e.name.is_empty()
            && e.name.len() <= MAX_NAME_LEN
            && e.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(ConfigError::invalid(
                format!("{prefix}.name"),
                format!(
                    "`{}` must be 1 to {MAX_NAME_LEN} letters, digits, `-`, `_` or `.`",
                    e.name
                ),
            ));
        }
        if out.iter().any(|o| o.name == e.name) {
            return Err(ConfigError::invalid(
                format!("{prefix}.name"),
                format!("`{}` is used by another endpoint", e.name),
            ));
        }
        if !(1..=MAX_WEIGHT).contains(&e.weight) {
            return Err(ConfigError::invalid(
                format!("{prefix}.weight"),
                format!("must be between 1 and {MAX_WEIGHT}"),
            ));
        }
        out.push(endpoint(&prefix, e.name, e.base_url, e.host, e.weight)?);
    }
    Ok(out)
}

/// Validates `upstream.failover_on`: statuses from 400 to 599.
pub(super) fn failover_on(statuses: Vec<u16>) -> Result<Vec<u16>, ConfigError> {
    if let Some(bad) = statuses.iter().find(|s| !(400..=599).contains(*s)) {
        return Err(ConfigError::invalid(
            "upstream.failover_on",
            format!("{bad} is not an error status (400 to 599)"),
        ));
    }
    Ok(statuses)
}

impl RawBreaker {
    pub(super) fn validate(self) -> Result<CircuitBreaker, ConfigError> {
        if self.failures == 0 {
            return Err(ConfigError::invalid(
                "upstream.circuit_breaker.failures",
                "must be at least 1",
            ));
        }
        if self.open_ms == 0 {
            return Err(ConfigError::invalid(
                "upstream.circuit_breaker.open_ms",
                "must be greater than 0",
            ));
        }
        Ok(CircuitBreaker {
            failures: self.failures,
            open: Duration::from_millis(self.open_ms),
        })
    }
}

fn check_path(key: &str, path: &str) -> Result<(), ConfigError> {
    let printable = path.bytes().all(|b| b.is_ascii_graphic());
    if !path.starts_with('/') || !printable {
        return Err(ConfigError::invalid(
            key,
            format!("`{path}` must be a path starting with / (no spaces)"),
        ));
    }
    Ok(())
}

impl RawHealthCheck {
    pub(super) fn validate(self) -> Result<HealthCheck, ConfigError> {
        check_path("upstream.health_check.path", &self.path)?;
        for (key, v) in [
            ("upstream.health_check.interval_ms", self.interval_ms),
            ("upstream.health_check.timeout_ms", self.timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be greater than 0"));
            }
        }
        for (key, v) in [
            (
                "upstream.health_check.unhealthy_after",
                self.unhealthy_after,
            ),
            ("upstream.health_check.healthy_after", self.healthy_after),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        Ok(HealthCheck {
            path: self.path,
            interval: Duration::from_millis(self.interval_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            unhealthy_after: self.unhealthy_after,
            healthy_after: self.healthy_after,
        })
    }
}

impl RawWarmup {
    pub(super) fn validate(self) -> Result<Warmup, ConfigError> {
        check_path("upstream.warmup.path", &self.path)?;
        if !(1..=MAX_WARMUP_CONNECTIONS).contains(&self.connections) {
            return Err(ConfigError::invalid(
                "upstream.warmup.connections",
                format!("must be between 1 and {MAX_WARMUP_CONNECTIONS}"),
            ));
        }
        Ok(Warmup {
            connections: self.connections,
            path: self.path,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::{err, MINIMAL};
    use crate::config::{Balance, Config};

    fn up(body: &str) -> String {
        format!("{MINIMAL}upstream: {{{body}}}\n")
    }

    const TWO: &str = "endpoints: [{name: a, base_url: \"http://127.0.0.1:1/v1\", weight: 3}, \
                       {name: b, base_url: \"https://b.example/api/v3\", host: h.example}]";

    #[test]
    fn two_endpoints_with_defaults() {
        let c = Config::from_yaml(&up(TWO)).expect("valid");
        let u = &c.upstream;
        assert_eq!(u.endpoints.len(), 2);
        assert_eq!(u.endpoints[0].name, "a");
        assert_eq!(u.endpoints[0].weight, 3);
        assert_eq!(u.endpoints[0].base_path, "/v1");
        assert_eq!(u.endpoints[1].weight, 1);
        assert!(u.endpoints[1].tls);
        assert_eq!(u.endpoints[1].host_header, "h.example");
        assert_eq!(u.balance, Balance::RoundRobin);
        assert_eq!(u.failover_on, vec![429, 503]);
        assert_eq!(u.retry_after_max, Duration::from_secs(60));
        assert_eq!(u.circuit_breaker.failures, 5);
        assert_eq!(u.circuit_breaker.open, Duration::from_secs(30));
        assert!(u.health_check.is_none() && u.warmup.is_none());
        assert_eq!(u.max_lifetime, Duration::from_secs(300));
    }

    #[test]
    fn base_url_is_one_endpoint_named_default() {
        let c = Config::from_yaml(MINIMAL).expect("valid");
        assert_eq!(c.upstream.endpoints.len(), 1);
        assert_eq!(c.upstream.endpoints[0].name, "default");
        assert_eq!(c.upstream.endpoints[0].weight, 1);
    }

    #[test]
    fn health_check_and_warmup_take_defaults() {
        let c = Config::from_yaml(&up(&format!(
            "{TWO}, balance: least_in_flight, health_check: {{}}, warmup: {{connections: 2}}"
        )))
        .expect("valid");
        let u = &c.upstream;
        assert_eq!(u.balance, Balance::LeastInFlight);
        let h = u.health_check.as_ref().expect("health check");
        assert_eq!(h.path, "/models");
        assert_eq!(h.interval, Duration::from_secs(5));
        assert_eq!(h.timeout, Duration::from_secs(2));
        assert_eq!((h.unhealthy_after, h.healthy_after), (3, 2));
        let w = u.warmup.as_ref().expect("warmup");
        assert_eq!((w.connections, w.path.as_str()), (2, "/models"));
    }

    #[test]
    fn base_url_and_endpoints_together_are_rejected() {
        let e = err(&up(&format!("base_url: \"http://127.0.0.1:1\", {TWO}")));
        assert_eq!(
            e,
            "upstream.endpoints: set either upstream.base_url or upstream.endpoints, not both"
        );
    }

    #[test]
    fn top_level_host_with_endpoints_is_rejected() {
        let e = err(&up(&format!("host: x.example, {TWO}")));
        assert_eq!(
            e,
            "upstream.host: applies to upstream.base_url only; use upstream.endpoints[].host"
        );
    }

    #[test]
    fn empty_endpoint_list_is_rejected() {
        let e = err(&up("endpoints: []"));
        assert_eq!(e, "upstream.endpoints: must list at least one endpoint");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let e = err(&up("endpoints: [{name: a, base_url: \"http://x\"}, \
                          {name: a, base_url: \"http://y\"}]"));
        assert_eq!(
            e,
            "upstream.endpoints[1].name: `a` is used by another endpoint"
        );
    }

    #[test]
    fn unusable_name_is_rejected() {
        let e = err(&up("endpoints: [{name: \"a b\", base_url: \"http://x\"}]"));
        assert_eq!(
            e,
            "upstream.endpoints[0].name: `a b` must be 1 to 64 letters, digits, `-`, `_` or `.`"
        );
    }

    #[test]
    fn zero_weight_is_rejected() {
        let e = err(&up(
            "endpoints: [{name: a, base_url: \"http://x\", weight: 0}]",
        ));
        assert_eq!(
            e,
            "upstream.endpoints[0].weight: must be between 1 and 1000"
        );
    }

    #[test]
    fn bad_endpoint_url_names_its_entry() {
        let e = err(&up("endpoints: [{name: a, base_url: \"ftp://x\"}]"));
        assert_eq!(
            e,
            "upstream.endpoints[0].base_url: `ftp://x` must start with http:// or https://"
        );
    }

    #[test]
    fn missing_endpoint_url_is_rejected() {
        let e = err(&up("endpoints: [{name: a}]"));
        assert!(e.contains("missing field `base_url`"), "{e}");
    }

    #[test]
    fn unknown_balance_is_rejected() {
        let e = err(&up("balance: random"));
        assert!(e.contains("unknown variant `random`"), "{e}");
    }

    #[test]
    fn failover_on_a_success_status_is_rejected() {
        let e = err(&up("failover_on: [429, 200]"));
        assert_eq!(
            e,
            "upstream.failover_on: 200 is not an error status (400 to 599)"
        );
    }

    #[test]
    fn zero_retry_after_cap_is_rejected() {
        let e = err(&up("retry_after_max_s: 0"));
        assert_eq!(e, "upstream.retry_after_max_s: must be at least 1");
    }

    #[test]
    fn breaker_values_are_checked() {
        let e = err(&up("circuit_breaker: {failures: 0}"));
        assert_eq!(e, "upstream.circuit_breaker.failures: must be at least 1");
        let e = err(&up("circuit_breaker: {open_ms: 0}"));
        assert_eq!(
            e,
            "upstream.circuit_breaker.open_ms: must be greater than 0"
        );
    }

    #[test]
    fn health_check_values_are_checked() {
        let e = err(&up("health_check: {path: models}"));
        assert_eq!(
            e,
            "upstream.health_check.path: `models` must be a path starting with / (no spaces)"
        );
        let e = err(&up("health_check: {interval_ms: 0}"));
        assert_eq!(
            e,
            "upstream.health_check.interval_ms: must be greater than 0"
        );
        let e = err(&up("health_check: {healthy_after: 0}"));
        assert_eq!(e, "upstream.health_check.healthy_after: must be at least 1");
    }

    #[test]
    fn warmup_values_are_checked() {
        let e = err(&up("warmup: {connections: 0}"));
        assert_eq!(e, "upstream.warmup.connections: must be between 1 and 64");
        let e = err(&up("warmup: {path: \"/a b\"}"));
        assert!(e.starts_with("upstream.warmup.path: "), "{e}");
    }

    #[test]
    fn zero_max_lifetime_is_rejected() {
        let e = err(&up("max_lifetime_ms: 0"));
        assert_eq!(e, "upstream.max_lifetime_ms: must be greater than 0");
    }
}
