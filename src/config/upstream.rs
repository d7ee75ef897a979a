//! The `upstream:` section: where requests go (the base URL) and how (HTTP version, TLS
//! verification, timeouts, retries).
//!
//! Whether `ca_file` can be used is checked in [`super::files`].

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderValue;
use serde::Deserialize;

use super::{net, ConfigError};

/// The default upstream: Volcengine ARK, Beijing region, OpenAI-compatible API root.
pub const DEFAULT_BASE_URL: &str = "https://ark.cn-beijing.volces.com/api/v3";

/// On-disk shape of `upstream:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    base_url: String,
    /// None: derived from the base URL.
    host: Option<String>,
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
            base_url: DEFAULT_BASE_URL.to_string(),
            host: None,
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

/// Where requests go and how.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub tls: bool,
    /// Host name or IP literal from the base URL (used for DNS and SNI).
    pub hostname: String,
    pub port: u16,
    /// Path prefix from the base URL, without a trailing slash ("" or "/api/v3").
    pub base_path: String,
    /// Host header (and `:authority`) sent upstream.
    pub host_header: HeaderValue,
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

/// The parts of `upstream.base_url`.
struct BaseUrl {
    tls: bool,
    hostname: String,
    port: u16,
    base_path: String,
}

impl BaseUrl {
    fn parse(url: &str) -> Result<BaseUrl, ConfigError> {
        let key = "upstream.base_url";
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

impl RawUpstream {
    pub(super) fn validate(self) -> Result<Upstream, ConfigError> {
        let url = BaseUrl::parse(&self.base_url)?;
        let host = self.host.clone().unwrap_or_else(|| url.default_host());
        let host_header = HeaderValue::from_str(&host).map_err(|_| {
            ConfigError::invalid(
                "upstream.host",
                format!("`{host}` is not a valid header value"),
            )
        })?;
        self.check_numbers()?;
        Ok(Upstream {
            tls: url.tls,
            hostname: url.hostname,
            port: url.port,
            base_path: url.base_path,
            host_header,
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

    fn check_numbers(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("upstream.connect_timeout_ms", self.connect_timeout_ms),
            ("upstream.read_timeout_ms", self.read_timeout_ms),
            ("upstream.write_timeout_ms", self.write_timeout_ms),
            ("upstream.dns_refresh_ms", self.dns_refresh_ms),
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
        Ok(())
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
        assert!(c.upstream.tls);
        assert_eq!(c.upstream.hostname, "ark.cn-beijing.volces.com");
        assert_eq!(c.upstream.port, 443);
        assert_eq!(c.upstream.base_path, "/api/v3");
        assert_eq!(c.upstream.host_header, "ark.cn-beijing.volces.com");
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
        assert!(!c.upstream.tls);
        assert_eq!(c.upstream.port, 9000);
        assert_eq!(c.upstream.base_path, "/v1");
        assert_eq!(c.upstream.host_header, "127.0.0.1:9000");
    }

    #[test]
    fn ipv6_base_url_gets_a_bracketed_host_header() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}upstream: {{base_url: \"https://[::1]:8443\"}}\n"
        ))
        .expect("valid");
        assert_eq!(c.upstream.hostname, "::1");
        assert_eq!(c.upstream.host_header, "[::1]:8443");
    }

    #[test]
    fn host_override_is_used() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}upstream: {{base_url: \"http://127.0.0.1:9000\", host: \"api.example\"}}\n"
        ))
        .expect("valid");
        assert_eq!(c.upstream.host_header, "api.example");
        assert_eq!(c.upstream.base_path, "");
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
