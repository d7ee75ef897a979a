//! What the proxy apps and the admin listener share, built once at start from the `Config`:
//! the endpoints, the drain signal and the one Redis client. Features with state of their own
//! that the admin listener also reads (the cache, the limiter) keep it here.

use std::sync::Arc;

use crate::cache::Cache;
use crate::config::{CacheBackend, Config, ConfigError};
use crate::lifecycle::DrainSignal;
use crate::store::RedisStore;
use crate::upstream::Upstreams;

/// State shared by every proxy app and the admin listener of one server.
pub struct Shared {
    pub upstreams: Arc<Upstreams>,
    pub drain: Arc<DrainSignal>,
    /// The `redis:` section's client; None without one. It connects on its first command.
    pub redis: Option<RedisStore>,
    /// The response cache (`cache:`); None without one.
    pub cache: Option<Arc<Cache>>,
    /// The admin token (`admin.token_file`, read at start); None: the admin listener is open.
    pub admin_token: Option<crate::admin::AdminToken>,
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
        let cache = cfg.cache.as_ref().map(|c| {
            let mut config = c.config.clone();
            // An identical request waits for the one in flight as long as it would for the upstream.
            config.coalesce_wait = cfg.upstream.read_timeout;
            match (c.backend, &redis) {
                (CacheBackend::Redis, Some(store)) => Arc::new(Cache::redis(config, store.clone())),
                _ => Arc::new(Cache::memory(config)),
            }
        });
        let admin_token = match &cfg.admin_token_file {
            Some(path) => Some(crate::admin::AdminToken::read(path)?),
            None => None,
        };
        Ok(Arc::new(Shared {
            upstreams: Upstreams::new(&cfg.upstream),
            drain: Arc::new(DrainSignal::default()),
            redis,
            cache,
            admin_token,
        }))
    }
}
