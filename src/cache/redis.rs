//! The Redis backend: entries shared by every arkgate instance on one Redis, expired by Redis
//! TTL.
//!
//! Keys, under `redis.key_prefix`: `cache:e:<hex key>` holds an entry as
//! `<generation>:<Entry::encode bytes>`; `cache:g:<model>` holds the model's generation (absent
//! means 0), bumped by `INCR` to clear that model. A lookup reads both in one `MGET` and
//! accepts the entry only when its generation is the model's current one and its stored key
//! and model are the ones asked for. A store stamps the current generation inside Redis (one
//! Lua script), so no instance needs to know it beforehand. Clearing everything deletes
//! `cache:*` with `SCAN` + `UNLINK`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use memchr::memchr;

use super::backend::{Backend, BackendError};
use super::entry::{DecodeError, Entry};
use super::key::CacheKey;
use crate::store::RedisStore;

/// What `clear` deletes, under the key prefix.
const NAMESPACE: &str = "cache:";

/// `SET entry-key (generation .. ':' .. bytes) PX ttl`, the generation read in the same step.
const PUT_SCRIPT: &str = r"
local g = redis.call('GET', KEYS[1]) or '0'
redis.call('SET', KEYS[2], g .. ':' .. ARGV[1], 'PX', ARGV[2])
return 1
";

/// The Redis backend.
pub struct RedisBackend {
    store: RedisStore,
    put_script: redis::Script,
}

impl RedisBackend {
    /// A backend on the shared `store`.
    pub fn new(store: RedisStore) -> Self {
        Self {
            store,
            put_script: redis::Script::new(PUT_SCRIPT),
        }
    }

    fn entry_key(&self, key: &CacheKey) -> String {
        self.store.key(&format!("{NAMESPACE}e:{}", key.to_hex()))
    }

    fn generation_key(&self, model: &str) -> String {
        self.store.key(&format!("{NAMESPACE}g:{model}"))
    }
}

/// Splits `<generation>:<entry>`.
fn split_stamp(stored: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    let colon = memchr(b':', stored).ok_or(DecodeError("no generation stamp"))?;
    let generation = std::str::from_utf8(&stored[..colon])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(DecodeError("bad generation stamp"))?;
    Ok((generation, &stored[colon + 1..]))
}

fn parse_generation(raw: Option<Vec<u8>>) -> Result<u64, DecodeError> {
    match raw {
        None => Ok(0),
        Some(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(DecodeError("bad model generation")),
    }
}

#[async_trait]
impl Backend for RedisBackend {
    async fn get(&self, key: &CacheKey, model: &str) -> Result<Option<Arc<Entry>>, BackendError> {
        let (generation, stored): (Option<Vec<u8>>, Option<Vec<u8>>) = self
            .store
            .query(
                redis::cmd("MGET")
                    .arg(self.generation_key(model))
                    .arg(self.entry_key(key)),
            )
            .await?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let current = parse_generation(generation).map_err(BackendError::Corrupt)?;
        let (stamp, bytes) = split_stamp(&stored).map_err(BackendError::Corrupt)?;
        if stamp != current {
            return Ok(None);
        }
        let entry = Entry::decode(bytes).map_err(BackendError::Corrupt)?;
        if entry.key != *key || entry.model != model {
            return Ok(None);
        }
        Ok(Some(Arc::new(entry)))
    }

    async fn put(&self, entry: Arc<Entry>, ttl: Duration) -> Result<(), BackendError> {
        if ttl.is_zero() {
            return Ok(());
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let bytes = entry.encode();
        let _: i64 = self
            .store
            .eval(
                self.put_script
                    .key(self.generation_key(&entry.model))
                    .key(self.entry_key(&entry.key))
                    .arg(bytes)
                    .arg(ttl_ms),
            )
            .await?;
        Ok(())
    }

    async fn clear(&self) -> Result<(), BackendError> {
        self.store.scan_delete(NAMESPACE).await?;
        Ok(())
    }

    async fn clear_model(&self, model: &str) -> Result<(), BackendError> {
        let _: i64 = self
            .store
            .query(redis::cmd("INCR").arg(self.generation_key(model)))
            .await?;
        Ok(())
    }

    fn entries(&self) -> Option<u64> {
        None
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_split_at_the_first_colon() {
        assert_eq!(split_stamp(b"12:AK:C"), Ok((12, &b"AK:C"[..])));
        assert!(split_stamp(b"nocolon").is_err());
        assert!(split_stamp(b"x:abc").is_err());
        assert_eq!(parse_generation(None), Ok(0));
        assert_eq!(parse_generation(Some(b"3".to_vec())), Ok(3));
        assert!(parse_generation(Some(b"three".to_vec())).is_err());
    }
}
