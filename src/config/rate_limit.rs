//! The `rate_limit:` section: where the limiter keeps its counts (this process or the shared
//! Redis), whom it counts (the client key or the client address), the limits of callers
//! without a `clients` entry of their own, and what happens when Redis cannot be asked.

use serde::Deserialize;

use super::ConfigError;
use crate::ratelimit::{Limits, OnStoreError};

/// On-disk shape of `rate_limit:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRateLimit {
    store: String,
    by: String,
    rpm: u64,
    tpm: u64,
    daily_tokens: u64,
    on_store_error: String,
    default_completion_tokens: u64,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        RawRateLimit {
            store: "memory".into(),
            by: "key".into(),
            rpm: 0,
            tpm: 0,
            daily_tokens: 0,
            on_store_error: "allow".into(),
            default_completion_tokens: RateLimit::DEFAULT_COMPLETION_TOKENS,
        }
    }
}

/// Where the limiter's counts live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitStore {
    /// In this process.
    Memory,
    /// In the `redis:` section's Redis, shared by every instance on it.
    Redis,
}

/// Whom a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitBy {
    /// The `clients` entry, or the bearer token's hash without `clients`.
    Key,
    /// The client's address.
    ClientIp,
}

/// Validated `rate_limit:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub store: LimitStore,
    pub by: LimitBy,
    /// Limits of callers without a `clients` entry of their own.
    pub defaults: Limits,
    pub on_store_error: OnStoreError,
    /// Completion tokens reserved for a request without `max_tokens`.
    pub default_completion_tokens: u64,
}

impl RateLimit {
    /// Completion tokens reserved when a request names no `max_tokens`.
    pub const DEFAULT_COMPLETION_TOKENS: u64 = 256;

    /// The settings used when `clients` entries carry limits but there is no `rate_limit:`.
    pub fn for_keys_only() -> RateLimit {
        RateLimit {
            store: LimitStore::Memory,
            by: LimitBy::Key,
            defaults: Limits::default(),
            on_store_error: OnStoreError::Allow,
            default_completion_tokens: Self::DEFAULT_COMPLETION_TOKENS,
        }
    }
}

impl RawRateLimit {
    pub(super) fn validate(self, has_redis: bool) -> Result<RateLimit, ConfigError> {
        let store = match self.store.as_str() {
            "memory" => LimitStore::Memory,
            "redis" if has_redis => LimitStore::Redis,
            "redis" => {
                return Err(ConfigError::invalid(
                    "rate_limit.store",
                    "redis needs a redis: section",
                ))
            }
            _ => {
                return Err(ConfigError::invalid(
                    "rate_limit.store",
                    "must be memory or redis",
                ))
            }
        };
        let by = match self.by.as_str() {
            "key" => LimitBy::Key,
            "client_ip" => LimitBy::ClientIp,
            _ => {
                return Err(ConfigError::invalid(
                    "rate_limit.by",
                    "must be key or client_ip",
                ))
            }
        };
        let on_store_error = match self.on_store_error.as_str() {
            "allow" => OnStoreError::Allow,
            "deny" => OnStoreError::Deny,
            _ => {
                return Err(ConfigError::invalid(
                    "rate_limit.on_store_error",
                    "must be allow or deny",
                ))
            }
        };
        Ok(RateLimit {
            store,
            by,
            defaults: Limits {
                rpm: self.rpm,
                tpm: self.tpm,
                daily_tokens: self.daily_tokens,
            },
            on_store_error,
            default_completion_tokens: self.default_completion_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn rate_limit_defaults_and_choices() {
        let c = Config::from_yaml(&format!("{MINIMAL}rate_limit: {{rpm: 60}}\n")).expect("valid");
        let r = c.rate_limit.expect("set");
        assert_eq!(r.store, LimitStore::Memory);
        assert_eq!(r.by, LimitBy::Key);
        assert_eq!(r.defaults.rpm, 60);
        assert_eq!(r.on_store_error, OnStoreError::Allow);
        let c = Config::from_yaml(&format!(
            "{MINIMAL}redis: {{url: \"redis://127.0.0.1:1\"}}\nrate_limit: {{store: redis, by: client_ip, on_store_error: deny}}\n"
        ))
        .expect("valid");
        let r = c.rate_limit.expect("set");
        assert_eq!((r.store, r.by), (LimitStore::Redis, LimitBy::ClientIp));
        assert_eq!(r.on_store_error, OnStoreError::Deny);
    }

    #[test]
    fn rate_limit_rejections_name_their_key() {
        let e = err(&format!("{MINIMAL}rate_limit: {{store: redis}}\n"));
        assert_eq!(e, "rate_limit.store: redis needs a redis: section");
        let e = err(&format!("{MINIMAL}rate_limit: {{by: user}}\n"));
        assert_eq!(e, "rate_limit.by: must be key or client_ip");
        let e = err(&format!("{MINIMAL}rate_limit: {{on_store_error: maybe}}\n"));
        assert_eq!(e, "rate_limit.on_store_error: must be allow or deny");
    }
}
