//! What the proxy apps and the admin listener share, built once at start from the `Config`:
//! the endpoints, the drain signal and the one Redis client. Features with state of their own
//! that the admin listener also reads (the cache, the limiter) keep it here.

use std::sync::Arc;

use crate::cache::Cache;
use crate::clients::ClientKeys;
use crate::config::{CacheBackend, Config, ConfigError, LimitStore};
use crate::lifecycle::DrainSignal;
use crate::ratelimit::{Limiter, MemoryStore, RedisLimiter};
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
    /// The client keys (`clients:`); None: the client's own `Authorization` is forwarded.
    pub clients: Option<Arc<ClientKeys>>,
    /// The rate limiter (see [`Config::limiter`]); None: nothing is limited.
    pub limiter: Option<Arc<Limiter>>,
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
        let clients = match &cfg.clients {
            Some(c) => {
                // `Config::from_file` checked (and warned about) the file; read it once more here
                // so the key in use is the one on disk now.
                let key =
                    crate::clients::read_upstream_key(&c.upstream_key_file).map_err(|why| {
                        ConfigError::invalid(
                            "clients.upstream_key_file",
                            why.trim_start_matches("clients.upstream_key_file: "),
                        )
                    })?;
                let keys = ClientKeys::new(c.table.clone(), &key)
                    .map_err(|why| ConfigError::invalid("clients.upstream_key_file", why))?;
                Some(Arc::new(keys))
            }
            None => None,
        };
        let limiter = match cfg.limiter().map(|l| l.store) {
            Some(LimitStore::Redis) => {
                let store = redis.clone().ok_or_else(|| {
                    ConfigError::invalid("rate_limit.store", "redis needs a redis: section")
                })?;
                Some(Arc::new(Limiter::Redis(RedisLimiter::new(store))))
            }
            Some(LimitStore::Memory) => Some(Arc::new(Limiter::Memory(MemoryStore::new()))),
            None => None,
        };
        Ok(Arc::new(Shared {
            upstreams: Upstreams::new(&cfg.upstream),
            drain: Arc::new(DrainSignal::default()),
            redis,
            cache,
            admin_token,
            clients,
            limiter,
        }))
    }
}
