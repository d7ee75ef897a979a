//! The `upstream:` section: where requests go (the base URL or the endpoints, see
//! `endpoints.rs`) and how (HTTP version, TLS verification, timeouts, retries).
//!
//! Whether `ca_file` can be used is checked in [`super::files`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::endpoints::{
    self, Balance, CircuitBreaker, Endpoint, HealthCheck, RawBreaker, RawEndpoint, RawHealthCheck,
    RawWarmup, Warmup, DEFAULT_ENDPOINT_NAME,
};
use super::ConfigError;

/// The default upstream: Volcengine ARK, Beijing region, OpenAI-compatible API root.
pub const DEFAULT_BASE_URL: &str = "https://ark.cn-beijing.volces.com/api/v3";

/// On-disk shape of `upstream:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    /// None: [`DEFAULT_BASE_URL`], unless `endpoints` is set.
    base_url: Option<String>,
    /// None: derived from the base URL.
    host: Option<String>,
    endpoints: Option<Vec<RawEndpoint>>,
    balance: Balance,
    failover_on: Vec<u16>,
    retry_after_max_s: u64,
    circuit_breaker: RawBreaker,
    health_check: Option<RawHealthCheck>,
    warmup: Option<RawWarmup>,
    max_lifetime_ms: u64,
    http_version: HttpVersion,
    tls_verify: bool,
    ca_file: Option<PathBuf>,
    connect_timeout_ms: u64,
    read_timeout_ms: u64,
    write_timeout_ms: u64,
    /// None: no deadline for the whole request.
    total_timeout_ms: Option<u64>,
    idle_timeout_ms: u64,
    max_retries: usize,
    max_h2_streams: usize,
    dns_refresh_ms: u64,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            base_url: None,
            host: None,
            endpoints: None,
            balance: Balance::RoundRobin,
            failover_on: vec![429, 503],
            retry_after_max_s: 60,
            circuit_breaker: RawBreaker::default(),
            health_check: None,
            warmup: None,
            max_lifetime_ms: 300_000,
            http_version: HttpVersion::Auto,
            tls_verify: true,
            ca_file: None,
            connect_timeout_ms: 5_000,
            read_timeout_ms: 30_000,
            write_timeout_ms: 10_000,
            total_timeout_ms: None,
            idle_timeout_ms: 60_000,
            max_retries: 3,
            max_h2_streams: 100,
            dns_refresh_ms: 30_000,
        }
    }
}

/// Which HTTP version to speak to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    /// HTTP/2 when ALPN offers it, else HTTP/1.1 (plain upstreams: HTTP/1.1).
    Auto,
    /// HTTP/1.1 only.
    H1,
    /// HTTP/2 only (TLS with ALPN h2, or prior knowledge on plain upstreams).
    H2,
}

/// Where requests go and how. Every setting but the endpoint list applies to all endpoints.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// At least one; a single `base_url` is one endpoint named `default`.
    pub endpoints: Vec<Endpoint>,
    pub balance: Balance,
    /// Statuses that say the request was not processed: tried on another endpoint.
    pub failover_on: Vec<u16>,
    /// Cap on how long a `Retry-After` keeps an endpoint out of rotation.
    pub retry_after_max: Duration,
    pub circuit_breaker: CircuitBreaker,
    pub health_check: Option<HealthCheck>,
    pub warmup: Option<Warmup>,
    /// A pooled connection older than this is not reused.
    pub max_lifetime: Duration,
    pub http_version: HttpVersion,
    pub tls_verify: bool,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub total_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub max_retries: usize,
    pub max_h2_streams: usize,
    pub dns_refresh: Duration,
}

impl RawUpstream {
    pub(super) fn validate(self) -> Result<Upstream, ConfigError> {
        let endpoints = match (self.base_url, self.endpoints) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "upstream.endpoints",
                    "set either upstream.base_url or upstream.endpoints, not both",
                ))
            }
            (_, Some(_)) if self.host.is_some() => {
                return Err(ConfigError::invalid(
                    "upstream.host",
                    "applies to upstream.base_url only; use upstream.endpoints[].host",
                ))
            }
            (_, Some(list)) => endpoints::endpoints(list)?,
            (url, None) => vec![endpoints::endpoint(
                "upstream",
                DEFAULT_ENDPOINT_NAME.to_string(),
                url.unwrap_or_else(|| DEFAULT_BASE_URL.to_string()),
                self.host,
                1,
            )?],
        };
        for (key, v) in [
            ("upstream.connect_timeout_ms", self.connect_timeout_ms),
            ("upstream.read_timeout_ms", self.read_timeout_ms),
            ("upstream.write_timeout_ms", self.write_timeout_ms),
            ("upstream.dns_refresh_ms", self.dns_refresh_ms),
            ("upstream.max_lifetime_ms", self.max_lifetime_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be greater than 0"));
            }
        }
        if self.total_timeout_ms == Some(0) {
            return Err(ConfigError::invalid(
                "upstream.total_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.max_h2_streams == 0 {
            return Err(ConfigError::invalid(
                "upstream.max_h2_streams",
                "must be at least 1",
            ));
        }
        if self.max_retries > 16 {
            return Err(ConfigError::invalid(
                "upstream.max_retries",
                "must be at most 16",
            ));
        }
        if self.retry_after_max_s == 0 {
            return Err(ConfigError::invalid(
                "upstream.retry_after_max_s",
                "must be at least 1",
            ));
        }
        Ok(Upstream {
            endpoints,
            balance: self.balance,
            failover_on: endpoints::failover_on(self.failover_on)?,
            retry_after_max: Duration::from_secs(self.retry_after_max_s),
            circuit_breaker: self.circuit_breaker.validate()?,
            health_check: self
                .health_check
                .map(RawHealthCheck::validate)
                .transpose()?,
            warmup: self.warmup.map(RawWarmup::validate).transpose()?,
            max_lifetime: Duration::from_millis(self.max_lifetime_ms),
            http_version: self.http_version,
            tls_verify: self.tls_verify,
            ca_file: self.ca_file,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            read_timeout: Duration::from_millis(self.read_timeout_ms),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            total_timeout: self.total_timeout_ms.map(Duration::from_millis),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_retries: self.max_retries,
            max_h2_streams: self.max_h2_streams,
            dns_refresh: Duration::from_millis(self.dns_refresh_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn minimal_config_gets_ark_defaults() {
        let c = Config::from_yaml(MINIMAL).expect("valid");
        assert!(c.upstream.endpoints[0].tls);
        assert_eq!(
            c.upstream.endpoints[0].hostname,
            "ark.cn-beijing.volces.com"
        );
        assert_eq!(c.upstream.endpoints[0].port, 443);
        assert_eq!(c.upstream.endpoints[0].base_path, "/api/v3");
        assert_eq!(
            c.upstream.endpoints[0].host_header,
            "ark.cn-beijing.volces.com"
        );
        assert_eq!(c.upstream.connect_timeout, Duration::from_millis(5000));
        assert_eq!(c.upstream.read_timeout, Duration::from_millis(30000));
        assert_eq!(c.upstream.write_timeout, Duration::from_millis(10000));
        assert_eq!(c.upstream.max_retries, 3);
    }

    #[test]
    fn base_url_with_port_and_trailing_slash() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}upstream: {{base_url: \"http://127.0.0.1:9000/v1/\"}}\n"
        ))
        .expect("valid");
        assert!(!c.upstream.endpoints[0].tls);
        assert_eq!(c.upstream.endpoints[0].port, 9000);
        assert_eq!(c.upstream.endpoints[0].base_path, "/v1");
        assert_eq!(c.upstream.endpoints[0].host_header, "127.0.0.1:9000");
    }

    #[test]
    fn ipv6_base_url_gets_a_bracketed_host_header() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}upstream: {{base_url: \"https://[::1]:8443\"}}\n"
        ))
        .expect("valid");
        assert_eq!(c.upstream.endpoints[0].hostname, "::1");
        assert_eq!(c.upstream.endpoints[0].host_header, "[::1]:8443");
    }

    #[test]
    fn host_override_is_used() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}upstream: {{base_url: \"http://127.0.0.1:9000\", host: \"api.example\"}}\n"
        ))
        .expect("valid");
        assert_eq!(c.upstream.endpoints[0].host_header, "api.example");
        assert_eq!(c.upstream.endpoints[0].base_path, "");
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let e = err(&format!("{MINIMAL}upstream: {{bsae_url: \"http://x\"}}\n"));
        assert!(e.contains("unknown field `bsae_url`"), "{e}");
    }

    #[test]
    fn base_url_scheme_is_checked() {
        let e = err(&format!("{MINIMAL}upstream: {{base_url: \"ftp://x\"}}\n"));
        assert_eq!(
            e,
            "upstream.base_url: `ftp://x` must start with http:// or https://"
        );
    }

    #[test]
    fn base_url_without_host_or_with_a_query_is_rejected() {
        let e = err(&format!(
            "{MINIMAL}upstream: {{base_url: \"https:///v1\"}}\n"
        ));
        assert_eq!(e, "upstream.base_url: `https:///v1` has no usable host");
        let e = err(&format!(
            "{MINIMAL}upstream: {{base_url: \"https://a/v1?x=1\"}}\n"
        ));
        assert_eq!(e, "upstream.base_url: must not carry a query or fragment");
        let e = err(&format!(
            "{MINIMAL}upstream: {{base_url: \"https://a:x/v1\"}}\n"
        ));
        assert_eq!(e, "upstream.base_url: bad host:port `a:x`");
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let e = err(&format!("{MINIMAL}upstream: {{read_timeout_ms: 0}}\n"));
        assert_eq!(e, "upstream.read_timeout_ms: must be greater than 0");
    }

    #[test]
    fn wrong_type_is_rejected() {
        let e = err(&format!(
            "{MINIMAL}upstream: {{connect_timeout_ms: soon}}\n"
        ));
        assert!(e.contains("connect_timeout_ms"), "{e}");
    }

    #[test]
    fn bad_http_version_is_rejected() {
        let e = err(&format!("{MINIMAL}upstream: {{http_version: h3}}\n"));
        assert!(e.contains("unknown variant `h3`"), "{e}");
    }
}
