//! What the proxy apps and the admin listener share, built once at start from the `Config`:
//! the endpoints, the drain signal and the one Redis client. Features with state of their own
//! that the admin listener also reads (the cache, the limiter) keep it here.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::lifecycle::DrainSignal;
use crate::store::RedisStore;
use crate::upstream::Upstreams;

/// State shared by every proxy app and the admin listener of one server.
pub struct Shared {
    pub upstreams: Arc<Upstreams>,
    pub drain: Arc<DrainSignal>,
    /// The `redis:` section's client; None without one. It connects on its first command.
    pub redis: Option<RedisStore>,
}

impl Shared {
    /// Builds the shared state. Connects nothing.
    pub fn new(cfg: &Config) -> Result<Arc<Shared>, ConfigError> {
        let redis = match &cfg.redis {
            Some(r) => {
                Some(RedisStore::new(r).map_err(|why| ConfigError::invalid("redis.url", why))?)
            }
            None => None,
        };
        Ok(Arc::new(Shared {
            upstreams: Upstreams::new(&cfg.upstream),
            drain: Arc::new(DrainSignal::default()),
            redis,
        }))
    }
}
