//! The `redis:` section: where the shared Redis is and how arkgate uses it (the cache's Redis
//! backend; any other feature with a Redis backend shares the same client).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::store::RedisConfig;

/// On-disk shape of `redis:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    url: String,
    #[serde(default = "default_prefix")]
    key_prefix: String,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
}

fn default_prefix() -> String {
    RedisConfig::DEFAULT_KEY_PREFIX.to_string()
}

fn default_timeout_ms() -> u64 {
    RedisConfig::DEFAULT_TIMEOUT.as_millis() as u64
}

impl RawRedis {
    pub(super) fn validate(self) -> Result<RedisConfig, ConfigError> {
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            return Err(ConfigError::invalid(
                "redis.timeout_ms",
                "must be between 1 and 60000",
            ));
        }
        RedisConfig::new(
            &self.url,
            &self.key_prefix,
            Duration::from_millis(self.timeout_ms),
        )
        .map_err(|why| ConfigError::invalid("redis.url", why.trim_start_matches("redis.url: ")))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn redis_section_is_optional_and_has_defaults() {
        assert!(Config::from_yaml(MINIMAL).expect("valid").redis.is_none());
        let c = Config::from_yaml(&format!(
            "{MINIMAL}redis: {{url: \"redis://127.0.0.1:6379\"}}\n"
        ))
        .expect("valid");
        let r = c.redis.expect("redis");
        assert_eq!(r.key_prefix, "arkgate:");
        assert_eq!(r.timeout.as_millis(), 50);
    }

    #[test]
    fn bad_redis_values_name_their_key() {
        let e = err(&format!("{MINIMAL}redis: {{url: \"http://x\"}}\n"));
        assert!(e.starts_with("redis.url: "), "{e}");
        let e = err(&format!(
            "{MINIMAL}redis: {{url: \"redis://h\", timeout_ms: 0}}\n"
        ));
        assert!(e.starts_with("redis.timeout_ms: "), "{e}");
    }
}
