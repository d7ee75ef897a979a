//! The storage behind the cache, as one async trait: a bounded in-process map
//! ([`super::memory`]) or Redis shared by every arkgate instance ([`super::redis`]).
//!
//! A backend stores whole [`Entry`]s under their [`CacheKey`], expires them after the TTL it is
//! given, and clears all of them or one model's. It checks the full key (and model) of what it
//! found before returning it, so a hash collision or a stale entry is a miss, never a wrong
//! answer.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::entry::{DecodeError, Entry};
use super::key::CacheKey;
use crate::store::StoreError;

/// Why a backend operation gave no answer. The cache counts it and carries on without caching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The shared store failed (timeout, unreachable, error reply).
    Store(StoreError),
    /// What was stored under the key is not a readable entry.
    Corrupt(DecodeError),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(e) => write!(f, "cache store {e}"),
            Self::Corrupt(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for BackendError {}

impl From<StoreError> for BackendError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Storage for cache entries.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The live entry stored under `key` for `model`, if any. An expired entry, one from before
    /// a clear of its model, or one whose stored key differs from `key` is `None`.
    async fn get(&self, key: &CacheKey, model: &str) -> Result<Option<Arc<Entry>>, BackendError>;

    /// Stores `entry` under its own key for `ttl`, replacing what was there.
    async fn put(&self, entry: Arc<Entry>, ttl: Duration) -> Result<(), BackendError>;

    /// Removes every entry.
    async fn clear(&self) -> Result<(), BackendError>;

    /// Makes every entry of `model` stored so far unreachable.
    async fn clear_model(&self, model: &str) -> Result<(), BackendError>;

    /// Entries held, where the backend knows it cheaply (memory: yes; Redis: no).
    fn entries(&self) -> Option<u64>;

    /// `memory` or `redis`, for stats and logs.
    fn name(&self) -> &'static str;
}
