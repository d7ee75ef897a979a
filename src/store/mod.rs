//! State kept outside one arkgate process, shared by the features that need it (the response
//! cache, the rate limiter).
//!
//! - [`redis`]: the one Redis client every feature with a Redis backend uses: lazy connection,
//!   a timeout on every command, automatic reconnection, and an error log that never floods.

pub mod redis;

pub use self::redis::{RateLimitedLog, RedisConfig, RedisStore, StoreError};
