//! The response cache: answers identical deterministic requests (chat and text completions at
//! `temperature` 0, embeddings) from a stored response, and sends identical requests in flight
//! at once upstream only once.
//!
//! A request's path through it: [`cacheable`] says whether it may be cached (otherwise
//! [`Cache::bypass`]); [`Cache::scope`] and [`CacheKey::compute`] make its key;
//! [`Cache::lookup`] answers a [`Lookup::Hit`] or a [`Lookup::Miss`] holding a [`Fill`]; the
//! caller goes upstream and hands a complete 200 answer to [`Cache::complete`], which serves the
//! requests that waited on it and stores it. Dropping the `Fill` instead (upstream failed, not
//! storable, client gone) releases the waiting requests to go upstream themselves. A backend
//! error never fails a request: it is counted and the request goes on uncached.
//!
//! - [`key`]: canonical JSON, the SHA-256 key, and which requests are cacheable.
//! - [`entry`]: a stored response and its binary form; the SSE event collector.
//! - [`backend`]: the storage trait; [`memory`] and [`redis`] implement it.
//! - [`coalesce`]: one upstream request per key in flight.
//! - [`admin_client`]: `arkgate cache stats|clear`, over the admin listener.

pub mod admin_client;
pub mod backend;
pub mod coalesce;
pub mod entry;
pub mod key;
pub mod memory;
pub mod redis;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;

pub use self::backend::{Backend, BackendError};
pub use self::coalesce::{Coalescer, Follower, Leader, Role};
pub use self::entry::{Body, Entry, SseCollector};
pub use self::key::{cacheable, canonical_json, CacheKey, Cacheability, Endpoint, Scope};
pub use self::memory::MemoryBackend;
pub use self::redis::RedisBackend;
use crate::store::{RateLimitedLog, RedisStore};

/// How long a follower waits for its leader by default.
pub const DEFAULT_COALESCE_WAIT: Duration = Duration::from_secs(30);

/// Whose entries a request may see (`cache.scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeMode {
    /// Per client credential (`api_key`).
    ApiKey,
    /// Shared by all clients (`global`).
    Global,
}

/// The cache's settings (the `cache` section, validated elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long an entry lives (`ttl_s`).
    pub ttl: Duration,
    /// The memory backend's bound (`max_entries`).
    pub max_entries: usize,
    /// Larger entries are not stored (`max_entry_bytes`).
    pub max_entry_bytes: usize,
    /// `scope`.
    pub scope: ScopeMode,
    /// How long identical requests wait for the one in flight before going upstream themselves.
    pub coalesce_wait: Duration,
}

impl Default for CacheConfig {
    /// The documented defaults: 1 h, 10 000 entries, 1 MiB, per API key, 30 s wait.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3600),
            max_entries: 10_000,
            max_entry_bytes: 1 << 20,
            scope: ScopeMode::ApiKey,
            coalesce_wait: DEFAULT_COALESCE_WAIT,
        }
    }
}

/// What a lookup found.
pub enum Lookup {
    /// A stored (or just fetched, by an identical request in flight) response.
    Hit(Arc<Entry>),
    /// Nothing: go upstream, then [`Cache::complete`] the fill or drop it.
    Miss(Fill),
}

/// The right and duty to fill one key after a miss.
pub struct Fill {
    key: CacheKey,
    model: String,
    /// `None` when this request was released by a failed leader (it stores, but serves no one).
    leader: Option<Leader<CacheKey, Arc<Entry>>>,
}

impl Fill {
    /// The key being filled.
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// Whether identical requests may be waiting on this one.
    pub fn is_leader(&self) -> bool {
        self.leader.is_some()
    }
}

/// Counters since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Entries held, where the backend knows (memory).
    pub entries: Option<u64>,
    /// Requests answered from the cache (stored entries and coalesced flights).
    pub hits: u64,
    /// Of the hits, those served by an identical request in flight.
    pub coalesced: u64,
    /// Cacheable requests that went upstream.
    pub misses: u64,
    /// Requests the cache did not consider (not cacheable).
    pub bypasses: u64,
    /// Entries stored.
    pub stores: u64,
    /// Backend failures (lookups skipped, stores lost, clears failed, corrupt entries).
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    coalesced: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    stores: AtomicU64,
    errors: AtomicU64,
}

/// The response cache.
pub struct Cache {
    config: CacheConfig,
    backend: Arc<dyn Backend>,
    flights: Arc<Coalescer<CacheKey, Arc<Entry>>>,
    counters: Counters,
    log: RateLimitedLog,
}

impl Cache {
    /// A cache on `backend`.
    pub fn new(config: CacheConfig, backend: Arc<dyn Backend>) -> Self {
        Self {
            flights: Coalescer::new(config.coalesce_wait),
            config,
            backend,
            counters: Counters::default(),
            log: RateLimitedLog::new(Duration::from_secs(1)),
        }
    }

    /// A cache in process memory, bounded by `config.max_entries`.
    pub fn memory(config: CacheConfig) -> Self {
        let backend = Arc::new(MemoryBackend::new(config.max_entries));
        Self::new(config, backend)
    }

    /// A cache on the shared Redis `store`.
    pub fn redis(config: CacheConfig, store: RedisStore) -> Self {
        Self::new(config, Arc::new(RedisBackend::new(store)))
    }

    /// The settings.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// `memory` or `redis`.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The scope of a request whose client presented `credential` (`None`: no credential; with
    /// `scope: api_key` all such requests share one scope).
    pub fn scope(&self, credential: Option<&[u8]>) -> Scope {
        match self.config.scope {
            ScopeMode::Global => Scope::Global,
            ScopeMode::ApiKey => Scope::for_credential(credential.unwrap_or_default()),
        }
    }

    /// Counts a request the cache did not consider.
    pub fn bypass(&self) {
        self.counters.bypasses.fetch_add(1, Ordering::Relaxed);
    }

    /// Looks `key` up for `model`; on a miss, joins or leads the flight for it. A backend error
    /// counts as a miss (and an error).
    pub async fn lookup(&self, key: CacheKey, model: &str) -> Lookup {
        let reachable = match self.get(&key, model).await {
            Ok(Some(entry)) => return Lookup::Hit(entry),
            Ok(None) => true,
            Err(()) => false,
        };
        let leader = match self.flights.join(key) {
            Role::Leader(leader) => {
                // An identical flight may have ended (stored) between the get and the join:
                // look again, now that any later identical request waits on this one.
                if reachable {
                    if let Ok(Some(entry)) = self.get(&key, model).await {
                        leader.complete(Arc::clone(&entry));
                        return Lookup::Hit(entry);
                    }
                }
                Some(leader)
            }
            Role::Follower(follower) => match follower.wait().await {
                Some(entry) => {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                    return Lookup::Hit(entry);
                }
                None => None,
            },
        };
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Miss(Fill {
            key,
            model: model.to_owned(),
            leader,
        })
    }

    /// A fill for `key` without a lookup (`Cache-Control: no-cache`): the request goes upstream
    /// and its answer is stored, but serves no waiting request. Counted as a miss.
    pub fn refill(&self, key: CacheKey, model: &str) -> Fill {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        Fill {
            key,
            model: model.to_owned(),
            leader: None,
        }
    }

    /// Appends the cache's Prometheus families to `out`: `arkgate_cache_requests_total{result}`,
    /// `arkgate_cache_errors_total`, `arkgate_cache_stores_total` and, with the memory backend,
    /// `arkgate_cache_entries`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let s = self.stats();
        out.push_str(
            "# HELP arkgate_cache_requests_total Cacheable-path requests by cache result.\n",
        );
        out.push_str("# TYPE arkgate_cache_requests_total counter\n");
        for (result, n) in [("hit", s.hits), ("miss", s.misses), ("bypass", s.bypasses)] {
            let _ = writeln!(
                out,
                "arkgate_cache_requests_total{{result=\"{result}\"}} {n}"
            );
        }
        out.push_str("# HELP arkgate_cache_errors_total Cache backend failures (the request went on uncached).\n");
        out.push_str("# TYPE arkgate_cache_errors_total counter\n");
        let _ = writeln!(out, "arkgate_cache_errors_total {}", s.errors);
        out.push_str("# HELP arkgate_cache_stores_total Responses stored in the cache.\n");
        out.push_str("# TYPE arkgate_cache_stores_total counter\n");
        let _ = writeln!(out, "arkgate_cache_stores_total {}", s.stores);
        if let Some(n) = s.entries {
            out.push_str("# HELP arkgate_cache_entries Entries held by the memory backend.\n");
            out.push_str("# TYPE arkgate_cache_entries gauge\n");
            let _ = writeln!(out, "arkgate_cache_entries {n}");
        }
    }

    /// The stats as the admin `GET /cache` JSON.
    pub fn stats_json(&self) -> serde_json::Value {
        let s = self.stats();
        serde_json::json!({
            "backend": self.backend_name(),
            "entries": s.entries,
            "hits": s.hits,
            "coalesced": s.coalesced,
            "misses": s.misses,
            "bypasses": s.bypasses,
            "stores": s.stores,
            "errors": s.errors,
        })
    }

    /// One backend read; a hit is counted, an error counted and logged.
    async fn get(&self, key: &CacheKey, model: &str) -> Result<Option<Arc<Entry>>, ()> {
        match self.backend.get(key, model).await {
            Ok(Some(entry)) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(entry))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.error(&e);
                Err(())
            }
        }
    }

    /// Stores a complete upstream answer and hands it to the requests waiting on `fill`;
    /// returns whether it was stored. Only a 200 is used; one over `max_entry_bytes` serves the
    /// waiting requests but is not stored. With Redis this waits for the store (at most
    /// `redis.timeout_ms`) before the waiting requests are served.
    pub async fn complete(&self, fill: Fill, status: u16, headers: &HeaderMap, body: Body) -> bool {
        if status != 200 {
            return false; // dropping `fill` releases the followers
        }
        let entry = Arc::new(Entry::new(fill.key, &fill.model, status, headers, body));
        // Stored before the flight ends, so an identical request arriving meanwhile either
        // waits on the flight or finds the entry: never a second upstream request.
        let stored = entry.size() <= self.config.max_entry_bytes
            && match self.backend.put(Arc::clone(&entry), self.config.ttl).await {
                Ok(()) => {
                    self.counters.stores.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(e) => {
                    self.error(&e);
                    false
                }
            };
        if let Some(leader) = fill.leader {
            leader.complete(entry);
        }
        stored
    }

    /// Removes every entry (with Redis: every `cache:` key under the prefix, for the whole
    /// fleet).
    pub async fn clear(&self) -> Result<(), BackendError> {
        self.backend.clear().await.inspect_err(|e| self.error(e))
    }

    /// Makes every entry of `model` stored so far unreachable (for the whole fleet with Redis).
    pub async fn clear_model(&self, model: &str) -> Result<(), BackendError> {
        self.backend
            .clear_model(model)
            .await
            .inspect_err(|e| self.error(e))
    }

    /// The counters now.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            entries: self.backend.entries(),
            hits: c.hits.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            bypasses: c.bypasses.load(Ordering::Relaxed),
            stores: c.stores.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    fn error(&self, e: &BackendError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        // The Redis store logs its own failures; log only what it cannot see.
        if let BackendError::Corrupt(_) = e {
            self.log
                .warn(format_args!("cache ({}): {e}", self.backend.name()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn body_key(cache: &Cache, credential: &[u8], content: &str) -> (CacheKey, String) {
        let body = json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": content}]});
        let c = cacheable("/chat/completions", &body).expect("cacheable");
        let key = CacheKey::compute(
            "/chat/completions",
            &cache.scope(Some(credential)),
            b"",
            c.stream,
            &body,
        );
        (key, c.model)
    }

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        h
    }

    #[tokio::test]
    async fn a_miss_then_a_hit() {
        let cache = Cache::memory(CacheConfig::default());
        let (key, model) = body_key(&cache, b"k1", "hi");
        let Lookup::Miss(fill) = cache.lookup(key, &model).await else {
            panic!("empty cache")
        };
        assert!(fill.is_leader());
        assert!(
            cache
                .complete(
                    fill,
                    200,
                    &json_headers(),
                    Body::Whole(Bytes::from_static(b"{}"))
                )
                .await
        );
        let Lookup::Hit(entry) = cache.lookup(key, &model).await else {
            panic!("stored")
        };
        assert_eq!(entry.body, Body::Whole(Bytes::from_static(b"{}")));
        assert_eq!(entry.key, key);
        cache.bypass();
        let s = cache.stats();
        assert_eq!(
            (s.entries, s.hits, s.misses, s.stores, s.bypasses, s.errors),
            (Some(1), 1, 1, 1, 1, 0)
        );
    }

    #[tokio::test]
    async fn credentials_do_not_share_entries_unless_global() {
        let cache = Cache::memory(CacheConfig::default());
        let (k1, model) = body_key(&cache, b"key-1", "hi");
        let (k2, _) = body_key(&cache, b"key-2", "hi");
        assert_ne!(k1, k2);
        let global = Cache::memory(CacheConfig {
            scope: ScopeMode::Global,
            ..CacheConfig::default()
        });
        let (g1, _) = body_key(&global, b"key-1", "hi");
        let (g2, _) = body_key(&global, b"key-2", "hi");
        assert_eq!(g1, g2);
        let Lookup::Miss(fill) = cache.lookup(k1, &model).await else {
            panic!("empty")
        };
        cache
            .complete(
                fill,
                200,
                &json_headers(),
                Body::Whole(Bytes::from_static(b"1")),
            )
            .await;
        assert!(matches!(cache.lookup(k2, &model).await, Lookup::Miss(_)));
    }

    #[tokio::test]
    async fn errors_and_large_answers_are_not_stored() {
        let cache = Cache::memory(CacheConfig {
            max_entry_bytes: 1000,
            ..CacheConfig::default()
        });
        let (key, model) = body_key(&cache, b"k", "x");
        let Lookup::Miss(fill) = cache.lookup(key, &model).await else {
            panic!("empty")
        };
        assert!(
            !cache
                .complete(fill, 500, &json_headers(), Body::Whole(Bytes::new()))
                .await
        );
        let Lookup::Miss(fill) = cache.lookup(key, &model).await else {
            panic!("nothing stored from a 500")
        };
        let big = Bytes::from(vec![b'x'; 2000]);
        assert!(
            !cache
                .complete(fill, 200, &json_headers(), Body::Whole(big))
                .await
        );
        assert!(matches!(cache.lookup(key, &model).await, Lookup::Miss(_)));
        assert_eq!(cache.stats().stores, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_identical_requests_reach_the_upstream_once() {
        let cache = Arc::new(Cache::memory(CacheConfig::default()));
        let (key, model) = body_key(&cache, b"k", "same");
        let upstream = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, upstream, barrier, model) = (
                    Arc::clone(&cache),
                    Arc::clone(&upstream),
                    Arc::clone(&barrier),
                    model.clone(),
                );
                tokio::spawn(async move {
                    barrier.wait().await;
                    match cache.lookup(key, &model).await {
                        Lookup::Hit(e) => e.body.clone(),
                        Lookup::Miss(fill) => {
                            upstream.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let body = Body::Whole(Bytes::from_static(b"answer"));
                            cache
                                .complete(fill, 200, &json_headers(), body.clone())
                                .await;
                            body
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(
                t.await.expect("task"),
                Body::Whole(Bytes::from_static(b"answer"))
            );
        }
        assert_eq!(upstream.load(Ordering::SeqCst), 1);
        let s = cache.stats();
        assert_eq!((s.misses, s.hits, s.stores), (1, 49, 1));
        assert!(s.coalesced >= 1);
    }

    #[tokio::test]
    async fn a_failed_leader_sends_the_waiting_requests_upstream() {
        let cache = Arc::new(Cache::memory(CacheConfig::default()));
        let (key, model) = body_key(&cache, b"k", "fails");
        let Lookup::Miss(leader) = cache.lookup(key, &model).await else {
            panic!("empty")
        };
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let (cache, model) = (Arc::clone(&cache), model.clone());
                tokio::spawn(async move { cache.lookup(key, &model).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(leader); // the upstream failed, or the client went away
        for w in waiting {
            match w.await.expect("task") {
                Lookup::Miss(fill) => assert!(!fill.is_leader()),
                Lookup::Hit(_) => panic!("nothing to hit"),
            }
        }
        assert_eq!(cache.stats().misses, 6);
    }

    #[tokio::test]
    async fn clear_and_clear_model() {
        let cache = Cache::memory(CacheConfig::default());
        let mut keys = Vec::new();
        for (i, model) in ["a", "a", "b"].iter().enumerate() {
            let key = CacheKey([i as u8; 32]);
            let Lookup::Miss(fill) = cache.lookup(key, model).await else {
                panic!("empty")
            };
            cache
                .complete(
                    fill,
                    200,
                    &json_headers(),
                    Body::Whole(Bytes::from_static(b"x")),
                )
                .await;
            keys.push((key, *model));
        }
        cache.clear_model("a").await.expect("clear a");
        let mut found = Vec::new();
        for (key, model) in &keys {
            found.push(matches!(cache.lookup(*key, model).await, Lookup::Hit(_)));
        }
        assert_eq!(found, [false, false, true]);
        cache.clear().await.expect("clear");
        assert_eq!(cache.stats().entries, Some(0));
    }
}
