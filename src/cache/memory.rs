//! The in-process backend: at most `max_entries` entries, each with its own TTL, evicted by
//! TinyUFO (S3-FIFO queues with TinyLFU admission), which keeps entries that are hit often over
//! ones seen once.
//!
//! TinyUFO is the engine of `pingora-memory-cache`; it is used directly because it reports what
//! each insert evicted (so the entry count is exact) and because a cache we can clear needs a
//! fresh map swapped in, which the wrapper does not offer. TinyUFO hashes keys to 64 bits, so a
//! hit is checked against the entry's full key. One model's entries are cleared by bumping that
//! model's generation: entries stamped with an older one are misses (and removed when seen).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tinyufo::TinyUfo;

use super::backend::{Backend, BackendError};
use super::entry::Entry;
use super::key::CacheKey;

#[derive(Clone)]
struct Slot {
    entry: Arc<Entry>,
    expires_at: Instant,
    generation: u64,
}

/// The memory backend.
pub struct MemoryBackend {
    map: RwLock<Arc<TinyUfo<CacheKey, Slot>>>,
    max_entries: usize,
    entries: AtomicI64,
    /// Per-model generation, only for models cleared at least once.
    generations: RwLock<HashMap<String, u64>>,
}

impl MemoryBackend {
    /// A backend holding at most `max_entries` (at least 1).
    pub fn new(max_entries: usize) -> Self {
        let max_entries = max_entries.max(1);
        Self {
            map: RwLock::new(Arc::new(TinyUfo::new(max_entries, max_entries))),
            max_entries,
            entries: AtomicI64::new(0),
            generations: RwLock::new(HashMap::new()),
        }
    }

    fn map(&self) -> Arc<TinyUfo<CacheKey, Slot>> {
        Arc::clone(&self.map.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn generation(&self, model: &str) -> u64 {
        let generations = self.generations.read().unwrap_or_else(|p| p.into_inner());
        generations.get(model).copied().unwrap_or(0)
    }

    fn remove(&self, map: &TinyUfo<CacheKey, Slot>, key: &CacheKey) {
        if map.remove(key).is_some() {
            self.entries.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn get(&self, key: &CacheKey, model: &str) -> Result<Option<Arc<Entry>>, BackendError> {
        let map = self.map();
        let Some(slot) = map.get(key) else {
            return Ok(None);
        };
        if slot.entry.key != *key {
            // Another key with the same 64-bit hash: not ours, leave it.
            return Ok(None);
        }
        if slot.expires_at <= Instant::now()
            || slot.entry.model != model
            || slot.generation != self.generation(model)
        {
            self.remove(&map, key);
            return Ok(None);
        }
        Ok(Some(slot.entry))
    }

    async fn put(&self, entry: Arc<Entry>, ttl: Duration) -> Result<(), BackendError> {
        if ttl.is_zero() {
            return Ok(());
        }
        let map = self.map();
        let key = entry.key;
        // A replaced entry must not be counted twice.
        self.remove(&map, &key);
        let slot = Slot {
            generation: self.generation(&entry.model),
            expires_at: Instant::now() + ttl,
            entry,
        };
        let evicted = map.put(key, slot, 1);
        // `evicted` may hold the new entry itself when TinyLFU found it less popular.
        self.entries
            .fetch_add(1 - evicted.len() as i64, Ordering::Relaxed);
        Ok(())
    }

    async fn clear(&self) -> Result<(), BackendError> {
        let fresh = Arc::new(TinyUfo::new(self.max_entries, self.max_entries));
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        self.entries.store(0, Ordering::Relaxed);
        self.generations
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    async fn clear_model(&self, model: &str) -> Result<(), BackendError> {
        let mut generations = self.generations.write().unwrap_or_else(|p| p.into_inner());
        *generations.entry(model.to_owned()).or_insert(0) += 1;
        Ok(())
    }

    fn entries(&self) -> Option<u64> {
        Some(self.entries.load(Ordering::Relaxed).max(0) as u64)
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::entry::Body;
    use bytes::Bytes;
    use http::HeaderMap;

    fn entry(n: u32, model: &str) -> Arc<Entry> {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&n.to_le_bytes());
        Arc::new(Entry::new(
            CacheKey(k),
            model,
            200,
            &HeaderMap::new(),
            Body::Whole(Bytes::from(format!("body {n}"))),
        ))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn a_put_entry_is_found_by_its_key_only() {
        let m = MemoryBackend::new(100);
        let e = entry(1, "m");
        m.put(Arc::clone(&e), HOUR).await.expect("put");
        assert_eq!(m.get(&e.key, "m").await, Ok(Some(Arc::clone(&e))));
        assert_eq!(m.get(&entry(2, "m").key, "m").await, Ok(None));
        assert_eq!(m.get(&e.key, "other").await, Ok(None), "model must match");
        assert_eq!(m.entries(), Some(0), "a model mismatch removes it");
    }

    #[tokio::test]
    async fn entries_expire_after_their_ttl() {
        let m = MemoryBackend::new(100);
        let e = entry(1, "m");
        m.put(Arc::clone(&e), Duration::from_millis(30))
            .await
            .expect("put");
        assert!(m.get(&e.key, "m").await.expect("get").is_some());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(m.get(&e.key, "m").await, Ok(None));
        assert_eq!(m.entries(), Some(0));
        m.put(Arc::clone(&e), Duration::ZERO).await.expect("put");
        assert_eq!(
            m.get(&e.key, "m").await,
            Ok(None),
            "zero TTL stores nothing"
        );
    }

    #[tokio::test]
    async fn max_entries_bounds_the_map_and_the_count_is_exact() {
        let m = MemoryBackend::new(20);
        for n in 0..500 {
            m.put(entry(n, "m"), HOUR).await.expect("put");
        }
        let mut present = 0;
        for n in 0..500 {
            if m.get(&entry(n, "m").key, "m").await.expect("get").is_some() {
                present += 1;
            }
        }
        assert!(present <= 20 && present > 0, "{present} present");
        assert_eq!(m.entries(), Some(present));
        // Replacing an entry does not count it twice.
        let e = entry(1000, "m");
        m.put(Arc::clone(&e), HOUR).await.expect("put");
        let before = m.entries();
        m.put(Arc::clone(&e), HOUR).await.expect("put");
        assert!(m.entries() <= before);
    }

    #[tokio::test]
    async fn hot_entries_survive_a_scan_of_cold_ones() {
        let m = MemoryBackend::new(50);
        let hot: Vec<_> = (0..10).map(|n| entry(n, "m")).collect();
        for e in &hot {
            m.put(Arc::clone(e), HOUR).await.expect("put");
        }
        for _ in 0..5 {
            for e in &hot {
                assert!(m.get(&e.key, "m").await.expect("get").is_some());
            }
        }
        for n in 1000..3000 {
            m.put(entry(n, "m"), HOUR).await.expect("put");
        }
        let mut kept = 0;
        for e in &hot {
            if m.get(&e.key, "m").await.expect("get").is_some() {
                kept += 1;
            }
        }
        assert!(kept >= 8, "only {kept} of 10 hot entries kept");
    }

    #[tokio::test]
    async fn clear_model_hides_only_that_models_entries() {
        let m = MemoryBackend::new(100);
        let a = entry(1, "a");
        let b = entry(2, "b");
        m.put(Arc::clone(&a), HOUR).await.expect("put");
        m.put(Arc::clone(&b), HOUR).await.expect("put");
        m.clear_model("a").await.expect("clear_model");
        assert_eq!(m.get(&a.key, "a").await, Ok(None));
        assert!(m.get(&b.key, "b").await.expect("get").is_some());
        // New entries of the cleared model are found again.
        m.put(Arc::clone(&a), HOUR).await.expect("put");
        assert!(m.get(&a.key, "a").await.expect("get").is_some());
        assert_eq!(m.entries(), Some(2));
    }

    #[tokio::test]
    async fn clear_empties_everything() {
        let m = MemoryBackend::new(100);
        for n in 0..10 {
            m.put(entry(n, "m"), HOUR).await.expect("put");
        }
        assert_eq!(m.entries(), Some(10));
        m.clear().await.expect("clear");
        assert_eq!(m.entries(), Some(0));
        for n in 0..10 {
            assert_eq!(m.get(&entry(n, "m").key, "m").await, Ok(None));
        }
    }
}
