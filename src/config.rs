//! Configuration: the on-disk YAML shape and the validated, ready-to-run [`Config`].
//!
//! Parsed and validated once at start, before anything binds a socket. Request-time code only
//! reads the typed values here (precomputed header values, compiled rule sets, durations); it
//! never parses or formats configuration strings.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use serde::Deserialize;

use crate::transform::rewrite::RuleSet;
use crate::transform::structured::{Mode, Policy};

/// The default upstream: Volcengine ARK, Beijing region, OpenAI-compatible API root.
pub const DEFAULT_BASE_URL: &str = "https://ark.cn-beijing.volces.com/api/v3";

/// A configuration that cannot be used, with the key it concerns. Printed as one line by `main`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn invalid(key: &str, why: impl fmt::Display) -> ConfigError {
    ConfigError(format!("{key}: {why}"))
}

// ---------------------------------------------------------------------------------------------
// On-disk shape. Never used at runtime: see `Config`.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Vec<RawListener>,
    #[serde(default)]
    upstream: RawUpstream,
    rewrite: Option<Vec<RawRule>>,
    #[serde(default)]
    structured_output: RawStructured,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    forwarded: RawForwarded,
    #[serde(default)]
    downstream: RawDownstream,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: String,
    tls: Option<RawTls>,
    #[serde(default)]
    h2c: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_path: PathBuf,
    key_path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    base_url: String,
    host: Option<String>,
    http_version: HttpVersion,
    tls_verify: bool,
    ca_file: Option<PathBuf>,
    connect_timeout_ms: u64,
    read_timeout_ms: u64,
    write_timeout_ms: u64,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    find: String,
    replace: String,
    #[serde(default = "both_directions")]
    on: Vec<Direction>,
}

fn both_directions() -> Vec<Direction> {
    vec![Direction::Request, Direction::Response]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Direction {
    Request,
    Response,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStructured {
    default: String,
    models: Vec<RawModelRule>,
}

impl Default for RawStructured {
    fn default() -> Self {
        RawStructured {
            default: "bytes".to_string(),
            models: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelRule {
    #[serde(rename = "match")]
    pattern: String,
    mode: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_body_bytes: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_body_bytes: 10 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLogging {
    sample_rate: f64,
    bodies: bool,
    body_max_bytes: usize,
}

impl Default for RawLogging {
    fn default() -> Self {
        RawLogging {
            sample_rate: 0.01,
            bodies: false,
            body_max_bytes: 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    addr: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            addr: Some("127.0.0.1:9091".to_string()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    threads: Option<usize>,
    pid_file: Option<String>,
    upgrade_sock: Option<String>,
    daemon: bool,
    error_log: Option<String>,
    grace_period_seconds: Option<u64>,
    graceful_shutdown_timeout_seconds: Option<u64>,
    upstream_keepalive_pool_size: Option<usize>,
    work_stealing: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawForwarded {
    trusted_proxies: Vec<String>,
    via_header: bool,
}

impl Default for RawForwarded {
    fn default() -> Self {
        RawForwarded {
            trusted_proxies: Vec::new(),
            via_header: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDownstream {
    /// 0 turns client keep-alive off.
    keepalive_timeout_s: u64,
    client_timeout_ms: u64,
    h2_idle_timeout_s: u64,
    h2_max_concurrent_streams: u32,
    max_header_bytes: usize,
    max_headers: usize,
}

impl Default for RawDownstream {
    fn default() -> Self {
        RawDownstream {
            keepalive_timeout_s: 75,
            client_timeout_ms: 60_000,
            h2_idle_timeout_s: 300,
            h2_max_concurrent_streams: 128,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validated, typed configuration.
// ---------------------------------------------------------------------------------------------

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

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub upstream: Upstream,
    /// Byte rules applied to request bodies (empty: none).
    pub request_rules: Arc<RuleSet>,
    /// Byte rules applied to response bodies (empty: none).
    pub response_rules: Arc<RuleSet>,
    pub structured: Arc<Policy>,
    pub limits: Limits,
    pub logging: Logging,
    /// Admin listener (metrics, health); None disables it.
    pub admin_addr: Option<SocketAddr>,
    pub server: Server,
    pub forwarded: Forwarded,
    pub downstream: Downstream,
}

/// One listening socket.
#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Accept HTTP/2 with prior knowledge on a plain listener.
    pub h2c: bool,
}

/// Certificate chain and private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
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

/// Request size limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted; 0 means unlimited.
    pub max_body_bytes: u64,
}

/// Access log settings.
#[derive(Debug, Clone, Copy)]
pub struct Logging {
    /// Fraction of successful requests that get an access line (errors always do).
    pub sample_rate: f64,
    pub bodies: bool,
    pub body_max_bytes: usize,
}

/// Pingora server settings, from the `server:` section.
#[derive(Debug, Clone)]
pub struct Server {
    pub threads: usize,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub daemon: bool,
    pub error_log: Option<String>,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub upstream_keepalive_pool_size: usize,
    pub work_stealing: bool,
}

/// How `X-Forwarded-*` headers are produced.
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub trusted_proxies: Vec<Cidr>,
    /// Add `Via: 1.1 arkgate` to responses.
    pub via_header: bool,
}

/// Client-facing connection settings.
#[derive(Debug, Clone, Copy)]
pub struct Downstream {
    pub keepalive_timeout: Duration,
    pub client_timeout: Duration,
    pub h2_idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    /// Largest request header section (names + values) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Most request header fields accepted; more gets 431.
    pub max_headers: usize,
}

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a host route).
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr.trim().parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { net, prefix })
    }

    /// True when `ip` lies inside this network (IPv4-mapped IPv6 addresses match IPv4 networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Config::from_yaml(&text)
    }

    /// Parses and validates YAML text. Pure, so tests feed it string literals.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError(yaml_error(&e)))?;
        raw.validate()
    }
}

/// serde_yaml's messages name the key path ("upstream: unknown field `x`, expected one of …
/// at line 3 column 5"); keep them on one line.
fn yaml_error(e: &serde_yaml::Error) -> String {
    e.to_string().replace('\n', " ")
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        if self.listen.is_empty() {
            return Err(invalid("listen", "at least one listener is required"));
        }
        let mut listeners = Vec::with_capacity(self.listen.len());
        for (i, l) in self.listen.into_iter().enumerate() {
            let key = format!("listen[{i}].addr");
            let addr: SocketAddr = l
                .addr
                .parse()
                .map_err(|_| invalid(&key, format!("`{}` is not an IP:port address", l.addr)))?;
            if l.h2c && l.tls.is_some() {
                return Err(invalid(
                    &format!("listen[{i}].h2c"),
                    "h2c is for plain listeners; TLS listeners offer h2 by ALPN",
                ));
            }
            let tls = l.tls.map(|t| TlsFiles {
                cert_path: t.cert_path,
                key_path: t.key_path,
            });
            listeners.push(Listener {
                addr,
                tls,
                h2c: l.h2c,
            });
        }
        let upstream = self.upstream.validate()?;

        let rules = self.rewrite.unwrap_or_else(|| {
            vec![RawRule {
                find: "json_schema".into(),
                replace: "json_object".into(),
                on: both_directions(),
            }]
        });
        let (request_rules, response_rules) = compile_rules(rules)?;

        let default: Mode = self
            .structured_output
            .default
            .parse()
            .map_err(|e| invalid("structured_output.default", e))?;
        let mut models = Vec::new();
        for (i, m) in self.structured_output.models.into_iter().enumerate() {
            let mode: Mode = m
                .mode
                .parse()
                .map_err(|e| invalid(&format!("structured_output.models[{i}].mode"), e))?;
            if m.pattern.is_empty() {
                return Err(invalid(
                    &format!("structured_output.models[{i}].match"),
                    "must not be empty",
                ));
            }
            models.push((m.pattern, mode));
        }

        let logging = &self.logging;
        if !(0.0..=1.0).contains(&logging.sample_rate) {
            return Err(invalid(
                "logging.sample_rate",
                format!("{} is not between 0 and 1", logging.sample_rate),
            ));
        }
        let admin_addr =
            match self.admin.addr {
                None => None,
                Some(a) => Some(a.parse().map_err(|_| {
                    invalid("admin.addr", format!("`{a}` is not an IP:port address"))
                })?),
            };
        let server = self.server.validate()?;
        let mut trusted_proxies = Vec::new();
        for (i, c) in self.forwarded.trusted_proxies.iter().enumerate() {
            trusted_proxies.push(Cidr::parse(c).ok_or_else(|| {
                invalid(
                    &format!("forwarded.trusted_proxies[{i}]"),
                    format!("`{c}` is not a CIDR such as 10.0.0.0/8"),
                )
            })?);
        }
        let d = self.downstream;
        if d.max_header_bytes == 0 || d.max_headers == 0 {
            return Err(invalid(
                "downstream.max_header_bytes",
                "header limits must be at least 1",
            ));
        }
        if d.h2_idle_timeout_s == 0 {
            return Err(invalid(
                "downstream.h2_idle_timeout_s",
                "must be at least 1",
            ));
        }
        if d.h2_max_concurrent_streams == 0 {
            return Err(invalid(
                "downstream.h2_max_concurrent_streams",
                "must be at least 1",
            ));
        }
        Ok(Config {
            listeners,
            upstream,
            request_rules: Arc::new(request_rules),
            response_rules: Arc::new(response_rules),
            structured: Arc::new(Policy::new(default, models)),
            limits: Limits {
                max_body_bytes: self.limits.max_body_bytes,
            },
            logging: Logging {
                sample_rate: self.logging.sample_rate,
                bodies: self.logging.bodies,
                body_max_bytes: self.logging.body_max_bytes,
            },
            admin_addr,
            server,
            forwarded: Forwarded {
                trusted_proxies,
                via_header: self.forwarded.via_header,
            },
            downstream: Downstream {
                keepalive_timeout: Duration::from_secs(d.keepalive_timeout_s),
                client_timeout: Duration::from_millis(d.client_timeout_ms),
                h2_idle_timeout: Duration::from_secs(d.h2_idle_timeout_s),
                h2_max_concurrent_streams: d.h2_max_concurrent_streams,
                max_header_bytes: d.max_header_bytes,
                max_headers: d.max_headers,
            },
        })
    }
}

fn compile_rules(rules: Vec<RawRule>) -> Result<(RuleSet, RuleSet), ConfigError> {
    let mut request = Vec::new();
    let mut response = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        if r.on.is_empty() {
            return Err(invalid(
                &format!("rewrite[{i}].on"),
                "must name request, response or both",
            ));
        }
        if r.find.is_empty() {
            return Err(invalid(&format!("rewrite[{i}].find"), "must not be empty"));
        }
        let shares_direction = |other: &RawRule| r.on.iter().any(|d| other.on.contains(d));
        if let Some(j) = rules[..i]
            .iter()
            .position(|earlier| shares_direction(earlier) && r.find.starts_with(&earlier.find))
        {
            return Err(invalid(
                &format!("rewrite[{i}].find"),
                format!(
                    "can never match: rewrite[{j}] (`{}`) matches at the same place first",
                    rules[j].find
                ),
            ));
        }
    }
    for r in rules {
        let pair = (r.find.into_bytes(), r.replace.into_bytes());
        if r.on.contains(&Direction::Request) {
            request.push(pair.clone());
        }
        if r.on.contains(&Direction::Response) {
            response.push(pair);
        }
    }
    let request = RuleSet::new(request).map_err(|e| invalid("rewrite", e))?;
    let response = RuleSet::new(response).map_err(|e| invalid("rewrite", e))?;
    Ok((request, response))
}

impl RawUpstream {
    fn validate(self) -> Result<Upstream, ConfigError> {
        let url = &self.base_url;
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(invalid(
                "upstream.base_url",
                format!("`{url}` must start with http:// or https://"),
            ));
        };
        if rest.contains(['?', '#']) {
            return Err(invalid(
                "upstream.base_url",
                "must not carry a query or fragment",
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(invalid(
                "upstream.base_url",
                format!("`{url}` has no usable host"),
            ));
        }
        let (hostname, port) = split_host_port(authority, if tls { 443 } else { 80 })
            .ok_or_else(|| invalid("upstream.base_url", format!("bad host:port `{authority}`")))?;
        let base_path = path.trim_end_matches('/').to_string();
        let default_host = if (tls && port == 443) || (!tls && port == 80) {
            bracket_v6(&hostname)
        } else {
            format!("{}:{port}", bracket_v6(&hostname))
        };
        let host = self.host.unwrap_or(default_host);
        let host_header = HeaderValue::from_str(&host).map_err(|_| {
            invalid(
                "upstream.host",
                format!("`{host}` is not a valid header value"),
            )
        })?;
        if self.http_version == HttpVersion::H2 && !tls {
            // Plain h2 upstreams are spoken with prior knowledge; allowed.
        }
        for (key, v) in [
            ("upstream.connect_timeout_ms", self.connect_timeout_ms),
            ("upstream.read_timeout_ms", self.read_timeout_ms),
            ("upstream.write_timeout_ms", self.write_timeout_ms),
            ("upstream.dns_refresh_ms", self.dns_refresh_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.total_timeout_ms == Some(0) {
            return Err(invalid(
                "upstream.total_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.max_h2_streams == 0 {
            return Err(invalid("upstream.max_h2_streams", "must be at least 1"));
        }
        if self.max_retries > 16 {
            return Err(invalid("upstream.max_retries", "must be at most 16"));
        }
        if let Some(ca) = &self.ca_file {
            if !ca.is_file() {
                return Err(invalid(
                    "upstream.ca_file",
                    format!("{} is not a readable file", ca.display()),
                ));
            }
        }
        Ok(Upstream {
            tls,
            hostname,
            port,
            base_path,
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
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Splits `host[:port]` / `[v6][:port]`, applying `default_port`.
fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((authority.to_string(), default_port)),
    }
}

impl RawServer {
    fn validate(self) -> Result<Server, ConfigError> {
        let threads = match self.threads {
            Some(0) => return Err(invalid("server.threads", "must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        Ok(Server {
            threads,
            pid_file: self
                .pid_file
                .unwrap_or_else(|| "/tmp/arkgate.pid".to_string()),
            upgrade_sock: self
                .upgrade_sock
                .unwrap_or_else(|| "/tmp/arkgate_upgrade.sock".to_string()),
            daemon: self.daemon,
            error_log: self.error_log,
            grace_period_seconds: self.grace_period_seconds.unwrap_or(60),
            graceful_shutdown_timeout_seconds: self.graceful_shutdown_timeout_seconds.unwrap_or(10),
            upstream_keepalive_pool_size: self.upstream_keepalive_pool_size.unwrap_or(128),
            work_stealing: self.work_stealing.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listen: [{addr: \"127.0.0.1:8000\"}]\n";

    fn err(yaml: &str) -> String {
        Config::from_yaml(yaml)
            .expect_err("config should be rejected")
            .0
    }

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
        assert_eq!(c.limits.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.request_rules.len(), 1);
        assert_eq!(c.response_rules.len(), 1);
        assert_eq!(c.logging.sample_rate, 0.01);
        assert_eq!(c.admin_addr, Some("127.0.0.1:9091".parse().expect("addr")));
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
    fn unknown_top_level_key_is_rejected() {
        let e = err(&format!("{MINIMAL}upstreams: {{}}\n"));
        assert!(e.contains("unknown field `upstreams`"), "{e}");
    }

    #[test]
    fn bad_listen_address_names_the_key() {
        let e = err("listen: [{addr: \"localhost\"}]\n");
        assert_eq!(e, "listen[0].addr: `localhost` is not an IP:port address");
    }

    #[test]
    fn empty_listen_is_rejected() {
        assert_eq!(
            err("listen: []\n"),
            "listen: at least one listener is required"
        );
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

    #[test]
    fn empty_find_is_rejected() {
        let e = err(&format!("{MINIMAL}rewrite: [{{find: \"\", replace: x}}]\n"));
        assert_eq!(e, "rewrite[0].find: must not be empty");
    }

    #[test]
    fn shadowed_rule_is_rejected_with_its_index() {
        let e = err(&format!(
            "{MINIMAL}rewrite:\n  - {{find: a, replace: b, on: [response]}}\n  - {{find: json, replace: x, on: [request]}}\n  - {{find: json_schema, replace: y}}\n"
        ));
        assert_eq!(
            e,
            "rewrite[2].find: can never match: rewrite[1] (`json`) matches at the same place first"
        );
    }

    #[test]
    fn same_find_in_other_directions_is_allowed() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}rewrite:\n  - {{find: a, replace: b, on: [request]}}\n  - {{find: a, replace: c, on: [response]}}\n"
        ))
        .expect("valid");
        assert_eq!(c.request_rules.len(), 1);
        assert_eq!(c.response_rules.len(), 1);
    }

    #[test]
    fn rules_split_by_direction() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}rewrite:\n  - {{find: a, replace: b, on: [request]}}\n  - {{find: c, replace: dd, on: [response]}}\n"
        ))
        .expect("valid");
        assert_eq!(c.request_rules.len(), 1);
        assert_eq!(c.response_rules.len(), 1);
        assert!(!c.request_rules.changes_length());
        assert!(c.response_rules.changes_length());
    }

    #[test]
    fn empty_rewrite_list_disables_rules() {
        let c = Config::from_yaml(&format!("{MINIMAL}rewrite: []\n")).expect("valid");
        assert!(c.request_rules.is_empty());
        assert!(c.response_rules.is_empty());
    }

    #[test]
    fn bad_structured_mode_names_the_key() {
        let e = err(&format!(
            "{MINIMAL}structured_output: {{default: downgrade, models: [{{match: \"x*\", mode: fancy}}]}}\n"
        ));
        assert!(e.starts_with("structured_output.models[0].mode: "), "{e}");
    }

    #[test]
    fn sample_rate_out_of_range() {
        let e = err(&format!("{MINIMAL}logging: {{sample_rate: 2}}\n"));
        assert_eq!(e, "logging.sample_rate: 2 is not between 0 and 1");
    }

    #[test]
    fn trusted_proxies_are_cidrs() {
        let e = err(&format!(
            "{MINIMAL}forwarded: {{trusted_proxies: [\"10.0.0.0/33\"]}}\n"
        ));
        assert_eq!(
            e,
            "forwarded.trusted_proxies[0]: `10.0.0.0/33` is not a CIDR such as 10.0.0.0/8"
        );
    }

    #[test]
    fn h2c_on_tls_listener_is_rejected() {
        let e =
            err("listen: [{addr: \"127.0.0.1:1\", h2c: true, tls: {cert_path: a, key_path: b}}]\n");
        assert!(e.starts_with("listen[0].h2c:"), "{e}");
    }

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("10.0.0.0/8").expect("cidr");
        assert!(c.contains("10.1.2.3".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        assert!(c.contains("::ffff:10.0.0.1".parse().expect("ip")));
        let all = Cidr::parse("0.0.0.0/0").expect("cidr");
        assert!(all.contains("1.2.3.4".parse().expect("ip")));
        let v6 = Cidr::parse("::1").expect("cidr");
        assert!(v6.contains("::1".parse().expect("ip")));
        assert!(!v6.contains("::2".parse().expect("ip")));
    }

    #[test]
    fn server_section_maps_to_settings() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}server: {{threads: 3, pid_file: /run/a.pid, upgrade_sock: /run/a.sock, grace_period_seconds: 5, graceful_shutdown_timeout_seconds: 2}}\n"
        ))
        .expect("valid");
        assert_eq!(c.server.threads, 3);
        assert_eq!(c.server.pid_file, "/run/a.pid");
        assert_eq!(c.server.upgrade_sock, "/run/a.sock");
        assert_eq!(c.server.grace_period_seconds, 5);
        assert_eq!(c.server.graceful_shutdown_timeout_seconds, 2);
    }
}
