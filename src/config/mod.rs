//! Configuration: the on-disk YAML shape and the validated, ready-to-run [`Config`].
//!
//! Parsed and validated once at start, before anything binds a socket. Request-time code only
//! reads the typed values here (precomputed header values, compiled rule sets, durations); it
//! never parses or formats configuration strings.
//!
//! Each top-level section is one file that owns its on-disk `Raw*` struct (with
//! `deny_unknown_fields`), its defaults (a `Default` impl, the only way defaults are set), its
//! validation, and the typed value it produces:
//! - `listen.rs`: `listen:`, the listeners ([`Listener`], [`TlsFiles`], h2c).
//! - `upstream.rs`: `upstream:`, HTTP version, TLS verification, timeouts ([`Upstream`]);
//!   `endpoints.rs`: its endpoints, balancing, failover, breaker, health checks, warm-up.
//! - `rules.rs`: `rewrite:`, byte rules compiled into one rule set per direction.
//! - `structured.rs`: `structured_output:`, the `json_schema` policy.
//! - `downstream.rs`: `downstream:`, client connections and header limits ([`Downstream`]).
//! - `server.rs`: `server:`, Pingora's process settings ([`Server`]).
//! - `admin.rs`: `admin:`, the admin listener's address.
//! - `logging.rs`: `logging:`, access-log sampling and format ([`Logging`]).
//! - `usage.rs`: `usage:`, how streamed requests are made to report their tokens ([`Usage`]).
//! - `limits.rs`: `limits:`, request size limits ([`Limits`]).
//! - `forwarded.rs`: `forwarded:`, trusted proxies and `Via` ([`Forwarded`]).
//! - `policies.rs`: `policies:` and `policy_stream:`, content policies ([`Policies`]).
//! - `cache.rs`: `cache:`, the response cache ([`CacheSettings`]).
//! - `redis.rs`: `redis:`, the shared Redis client's settings.
//! - `clients.rs`: `clients:`, client keys and the upstream key file ([`Clients`]).
//! - `rate_limit.rs`: `rate_limit:`, the limiter's store, subject and defaults ([`RateLimit`]).
//! - `prices.rs`: `prices:`, what each model's tokens cost ([`Prices`]).
//!
//! Besides the sections: `net.rs` holds the network values several sections share ([`Cidr`],
//! `IP:port`, `host[:port]`), and [`files`] every check that touches the filesystem.
//! [`Config::from_yaml`] is pure; [`Config::from_file`] also runs [`files::check_files`].

mod admin;
mod cache;
mod clients;
mod downstream;
mod endpoints;
pub mod files;
mod forwarded;
mod limits;
mod listen;
mod logging;
mod net;
mod policies;
mod prices;
mod rate_limit;
mod redis;
mod rules;
mod server;
mod structured;
mod upstream;
mod usage;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::transform::rewrite::RuleSet;
use crate::transform::structured::Policy;

pub use admin::read_token_file;
pub use cache::{CacheBackend, CacheSettings};
pub use clients::Clients;
pub use downstream::Downstream;
pub use endpoints::{Balance, CircuitBreaker, Endpoint, HealthCheck, Warmup};
pub use forwarded::Forwarded;
pub use limits::Limits;
pub use listen::{Listener, TlsFiles};
pub use logging::{LogFormat, Logging};
pub use net::Cidr;
pub use policies::Policies;
pub use prices::Prices;
pub use rate_limit::{LimitBy, LimitStore, RateLimit};
pub use server::Server;
pub use upstream::{HttpVersion, Upstream, DEFAULT_BASE_URL};
pub use usage::Usage;

/// A configuration that cannot be used. `main` prints it as one line, after
/// `invalid configuration: `, and exits 64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The configuration file itself cannot be read.
    Read { path: PathBuf, why: String },
    /// The text is not YAML of the expected shape (syntax, an unknown key, a wrong type), in
    /// serde_yaml's words, which name the key path and the line.
    Yaml(String),
    /// The value of `key` cannot be used.
    Invalid { key: String, why: String },
    /// The file that `key` names cannot be used.
    File {
        key: String,
        path: PathBuf,
        why: String,
    },
    /// A certificate and private key that cannot be used together.
    KeyPair {
        key: String,
        cert_path: PathBuf,
        key_path: PathBuf,
        problem: KeyPairProblem,
    },
}

/// What is wrong with a certificate and key pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPairProblem {
    /// The TLS library refused the files (not PEM, not a certificate or key), with its reason.
    Unusable(String),
    /// Both load, but the key is not the certificate's.
    Mismatch,
}

impl ConfigError {
    /// The key the error concerns (`upstream.base_url`, `rewrite[2].find`), when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } | ConfigError::Yaml(_) => None,
            ConfigError::Invalid { key, .. }
            | ConfigError::File { key, .. }
            | ConfigError::KeyPair { key, .. } => Some(key),
        }
    }

    pub(crate) fn invalid(key: impl Into<String>, why: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            why: why.to_string(),
        }
    }

    pub(crate) fn file(key: &str, path: &Path, why: &str) -> ConfigError {
        ConfigError::File {
            key: key.to_string(),
            path: path.to_path_buf(),
            why: why.to_string(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, why } => write!(f, "cannot read {}: {why}", path.display()),
            ConfigError::Yaml(message) => f.write_str(message),
            ConfigError::Invalid { key, why } => write!(f, "{key}: {why}"),
            ConfigError::File { key, path, why } => write!(f, "{key}: {} {why}", path.display()),
            ConfigError::KeyPair {
                key,
                cert_path,
                key_path,
                problem,
            } => {
                let (cert, private) = (cert_path.display(), key_path.display());
                match problem {
                    KeyPairProblem::Unusable(cause) => write!(
                        f,
                        "{key}: cannot use certificate {cert} with key {private}: {cause}"
                    ),
                    KeyPairProblem::Mismatch => {
                        write!(f, "{key}: key {private} does not match certificate {cert}")
                    }
                }
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// On-disk shape of the whole file. Never used at runtime: see [`Config`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Vec<listen::RawListener>,
    #[serde(default)]
    upstream: upstream::RawUpstream,
    #[serde(default)]
    rewrite: rules::RawRewrite,
    #[serde(default)]
    structured_output: structured::RawStructured,
    #[serde(default)]
    limits: limits::RawLimits,
    #[serde(default)]
    logging: logging::RawLogging,
    #[serde(default)]
    admin: admin::RawAdmin,
    #[serde(default)]
    server: server::RawServer,
    #[serde(default)]
    forwarded: forwarded::RawForwarded,
    #[serde(default)]
    downstream: downstream::RawDownstream,
    #[serde(default)]
    usage: usage::RawUsage,
    #[serde(default)]
    policies: Vec<policies::RawPolicy>,
    #[serde(default)]
    policy_stream: policies::RawPolicyStream,
    cache: Option<cache::RawCache>,
    redis: Option<redis::RawRedis>,
    clients: Option<clients::RawClients>,
    rate_limit: Option<rate_limit::RawRateLimit>,
    #[serde(default)]
    prices: Vec<prices::RawPrice>,
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
    /// `admin.token_file`: the mutating admin endpoints require its token.
    pub admin_token_file: Option<std::path::PathBuf>,
    pub server: Server,
    pub forwarded: Forwarded,
    pub downstream: Downstream,
    pub usage: Usage,
    /// Content policies (`policies:`, `policy_stream:`).
    pub policies: Policies,
    /// The response cache; None: no cache.
    pub cache: Option<CacheSettings>,
    /// The shared Redis (`redis:`); None: no feature may use a Redis backend.
    pub redis: Option<crate::store::RedisConfig>,
    /// Client keys; None: the client's own `Authorization` is forwarded.
    pub clients: Option<Clients>,
    /// The limiter; None: no `rate_limit:` section (client keys with limits still get one, see
    /// [`Config::limiter`]).
    pub rate_limit: Option<RateLimit>,
    /// Prices per model (empty: no cost counted).
    pub prices: Prices,
}

impl Config {
    /// Reads and validates a configuration file, then checks every file it names
    /// ([`files::check_files`]): what `arkgate -t` and a start both run.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let cfg = Config::from_yaml(&text)?;
        files::check_files(&cfg)?;
        Ok(cfg)
    }

    /// Parses and validates YAML text. Pure (it reads no file the text names), so tests feed
    /// it string literals.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        // serde_yaml's messages name the key path ("upstream: unknown field `x`, expected one
        // of … at line 3 column 5"); keep them on one line.
        let raw: RawConfig = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::Yaml(e.to_string().replace('\n', " ")))?;
        raw.validate()
    }
}

impl Config {
    /// The limiter's settings: `rate_limit:`, or memory-store defaults when only `clients`
    /// entries carry limits; None when nothing is limited.
    pub fn limiter(&self) -> Option<RateLimit> {
        let keys_limited = self
            .clients
            .as_ref()
            .is_some_and(|c| c.table.keys().iter().any(|k| !k.limits.is_unlimited()));
        self.rate_limit
            .or_else(|| keys_limited.then(RateLimit::for_keys_only))
    }

    /// Whether some limit counts tokens, so every answer's usage is needed.
    pub fn counts_tokens(&self) -> bool {
        let by_key = self.clients.as_ref().is_some_and(|c| {
            c.table
                .keys()
                .iter()
                .any(|k| k.limits.tpm > 0 || k.limits.daily_tokens > 0)
        });
        let by_default = self
            .rate_limit
            .is_some_and(|r| r.defaults.tpm > 0 || r.defaults.daily_tokens > 0);
        by_key || by_default
    }
}

impl RawConfig {
    /// Validates each section in file order; the first error wins.
    fn validate(self) -> Result<Config, ConfigError> {
        let listeners = listen::validate(self.listen)?;
        let upstream = self.upstream.validate()?;
        let rules = self.rewrite.validate()?;
        let structured = self.structured_output.validate()?;
        let has_redis = self.redis.is_some();
        let cache = self.cache.map(|c| c.validate(has_redis)).transpose()?;
        let redis = self.redis.map(redis::RawRedis::validate).transpose()?;
        let (admin_addr, admin_token_file) = self.admin.validate()?;
        let clients = self
            .clients
            .map(clients::RawClients::validate)
            .transpose()?;
        let rate_limit = self.rate_limit.map(|r| r.validate(has_redis)).transpose()?;
        let prices = prices::validate(self.prices)?;
        let policies = policies::validate(self.policies, self.policy_stream)?;
        Ok(Config {
            listeners,
            upstream,
            request_rules: Arc::new(rules.request),
            response_rules: Arc::new(rules.response),
            structured: Arc::new(structured),
            limits: self.limits.validate(),
            logging: self.logging.validate()?,
            admin_addr,
            admin_token_file,
            server: self.server.validate()?,
            forwarded: self.forwarded.validate()?,
            downstream: self.downstream.validate()?,
            usage: self.usage.validate(),
            policies,
            cache,
            redis,
            clients,
            rate_limit,
            prices,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const MINIMAL: &str = "listen: [{addr: \"127.0.0.1:8000\"}]\n";

    /// The message a user sees for a rejected `yaml`.
    pub(crate) fn err(yaml: &str) -> String {
        Config::from_yaml(yaml)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn minimal_config_gets_defaults_in_every_section() {
        let c = Config::from_yaml(MINIMAL).expect("valid");
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].addr, "127.0.0.1:8000".parse().expect("addr"));
        assert!(c.listeners[0].tls.is_none() && !c.listeners[0].h2c);
        assert_eq!(
            c.upstream.endpoints[0].hostname,
            "ark.cn-beijing.volces.com"
        );
        assert_eq!(c.limits.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.request_rules.len(), 1);
        assert_eq!(c.response_rules.len(), 1);
        assert_eq!(c.logging.sample_rate, 0.01);
        assert_eq!(c.admin_addr, Some("127.0.0.1:9091".parse().expect("addr")));
    }

    #[test]
    fn unknown_top_level_key_is_rejected() {
        let e = err(&format!("{MINIMAL}upstreams: {{}}\n"));
        assert!(e.contains("unknown field `upstreams`"), "{e}");
    }

    #[test]
    fn missing_listen_is_rejected() {
        let e = err("upstream: {}\n");
        assert!(e.contains("missing field `listen`"), "{e}");
    }

    #[test]
    fn errors_name_their_key() {
        let e = Config::from_yaml(&format!("{MINIMAL}upstream: {{max_retries: 17}}\n"))
            .expect_err("too many retries");
        assert_eq!(e.key(), Some("upstream.max_retries"));
        assert_eq!(e.to_string(), "upstream.max_retries: must be at most 16");
        let e = Config::from_yaml("listen: [").expect_err("not YAML");
        assert!(
            matches!(e, ConfigError::Yaml(_)) && e.key().is_none(),
            "{e:?}"
        );
    }

    #[test]
    fn unreadable_file_is_named() {
        let e = Config::from_file(Path::new("/nonexistent/arkgate.yaml")).expect_err("missing");
        assert!(
            e.to_string()
                .starts_with("cannot read /nonexistent/arkgate.yaml: "),
            "{e}"
        );
    }

    #[test]
    fn key_pair_errors_read_as_before() {
        let e = |problem| ConfigError::KeyPair {
            key: "listen tls".into(),
            cert_path: "/c.pem".into(),
            key_path: "/k.pem".into(),
            problem,
        };
        assert_eq!(
            e(KeyPairProblem::Mismatch).to_string(),
            "listen tls: key /k.pem does not match certificate /c.pem"
        );
        assert_eq!(
            e(KeyPairProblem::Unusable("bad PEM".into())).to_string(),
            "listen tls: cannot use certificate /c.pem with key /k.pem: bad PEM"
        );
    }
}
