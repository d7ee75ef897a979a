//! The `cache:` section: the response cache ([`crate::cache`]). No section: no cache.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::cache::{CacheConfig, ScopeMode};

/// Where entries are kept (`cache.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheBackend {
    /// In this process (TinyUFO, bounded by `max_entries`).
    Memory,
    /// In the shared Redis of the `redis:` section, for the whole fleet.
    Redis,
}

/// `cache.scope` on disk.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawScope {
    ApiKey,
    Global,
}

/// On-disk shape of `cache:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCache {
    backend: CacheBackend,
    ttl_s: u64,
    max_entries: usize,
    max_entry_bytes: usize,
    scope: RawScope,
}

impl Default for RawCache {
    fn default() -> Self {
        let d = CacheConfig::default();
        RawCache {
            backend: CacheBackend::Memory,
            ttl_s: d.ttl.as_secs(),
            max_entries: d.max_entries,
            max_entry_bytes: d.max_entry_bytes,
            scope: RawScope::ApiKey,
        }
    }
}

/// The validated `cache:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// `memory` or `redis`.
    pub backend: CacheBackend,
    /// TTL, bounds, scope.
    pub config: CacheConfig,
}

impl RawCache {
    /// `has_redis`: whether the file has a `redis:` section (required by `backend: redis`).
    pub(super) fn validate(self, has_redis: bool) -> Result<CacheSettings, ConfigError> {
        if self.backend == CacheBackend::Redis && !has_redis {
            return Err(ConfigError::invalid(
                "cache.backend",
                "`redis` needs a `redis:` section (redis.url)",
            ));
        }
        if self.ttl_s == 0 {
            return Err(ConfigError::invalid("cache.ttl_s", "must be at least 1"));
        }
        if self.max_entries == 0 {
            return Err(ConfigError::invalid(
                "cache.max_entries",
                "must be at least 1",
            ));
        }
        if self.max_entry_bytes == 0 {
            return Err(ConfigError::invalid(
                "cache.max_entry_bytes",
                "must be at least 1",
            ));
        }
        Ok(CacheSettings {
            backend: self.backend,
            config: CacheConfig {
                ttl: Duration::from_secs(self.ttl_s),
                max_entries: self.max_entries,
                max_entry_bytes: self.max_entry_bytes,
                scope: match self.scope {
                    RawScope::ApiKey => ScopeMode::ApiKey,
                    RawScope::Global => ScopeMode::Global,
                },
                ..CacheConfig::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::CacheBackend;
    use crate::cache::ScopeMode;
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn no_section_no_cache_and_defaults_otherwise() {
        assert!(Config::from_yaml(MINIMAL).expect("valid").cache.is_none());
        let c = Config::from_yaml(&format!("{MINIMAL}cache: {{}}\n")).expect("valid");
        let c = c.cache.expect("cache");
        assert_eq!(c.backend, CacheBackend::Memory);
        assert_eq!(c.config.ttl.as_secs(), 3600);
        assert_eq!(c.config.scope, ScopeMode::ApiKey);
        let c = Config::from_yaml(&format!(
            "{MINIMAL}cache: {{ttl_s: 5, scope: global, max_entries: 3}}\n"
        ))
        .expect("valid");
        let c = c.cache.expect("cache");
        assert_eq!(
            (c.config.ttl.as_secs(), c.config.scope, c.config.max_entries),
            (5, ScopeMode::Global, 3)
        );
    }

    #[test]
    fn redis_backend_needs_a_redis_section() {
        let e = err(&format!("{MINIMAL}cache: {{backend: redis}}\n"));
        assert!(e.starts_with("cache.backend: "), "{e}");
        let ok =
            format!("{MINIMAL}cache: {{backend: redis}}\nredis: {{url: \"redis://127.0.0.1\"}}\n");
        assert_eq!(
            Config::from_yaml(&ok)
                .expect("valid")
                .cache
                .expect("cache")
                .backend,
            CacheBackend::Redis
        );
        assert!(err(&format!("{MINIMAL}cache: {{ttl_s: 0}}\n")).starts_with("cache.ttl_s: "));
    }
}
