//! The one Redis client of an arkgate process, shared by every feature with a Redis backend.
//!
//! A request never waits on Redis for longer than `redis.timeout_ms`, and Redis being slow,
//! down or restarted never fails one: every command runs under [`tokio::time::timeout`] and
//! returns a [`StoreError`] the caller treats as "skip". Behind it sits redis-rs's
//! `ConnectionManager`, made on the first command (so start never waits for Redis), which
//! reconnects by itself after a disconnect. After a few failures in a row the store stops
//! sending for a short back-off, so a hung Redis costs one timeout per back-off rather than
//! one per request. Errors are logged at most once a second per store, with the count of the
//! lines held back.
//!
//! Keys: every helper that takes a key name prefixes it with `redis.key_prefix`; [`RedisStore::key`]
//! does the same for raw commands and scripts.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, ScriptInvocation};

/// Consecutive failures after which the store stops sending for [`BACKOFF`].
const FAILURES_BEFORE_BACKOFF: u32 = 3;
/// How long the store answers [`StoreError::Skipped`] at once once Redis looks unreachable.
const BACKOFF: Duration = Duration::from_millis(500);
/// At most one error line per this interval per store.
const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Keys per `SCAN` step and per `UNLINK` in [`RedisStore::scan_delete`].
const SCAN_BATCH: usize = 500;
/// How long one (re)connection attempt may take; retries follow with exponential back-off.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where Redis is and how arkgate uses it: the `redis` section of the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` or `unix:///path` (`redis+unix://` too).
    pub url: String,
    /// Prepended to every key arkgate writes, so one Redis can serve several deployments.
    pub key_prefix: String,
    /// The longest any one command may take before it is given up.
    pub timeout: Duration,
}

impl RedisConfig {
    /// The default `redis.key_prefix`.
    pub const DEFAULT_KEY_PREFIX: &'static str = "arkgate:";
    /// The default `redis.timeout_ms`.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

    /// A validated config. Errors name the offending key and never echo the URL (it may carry
    /// a password).
    pub fn new(url: &str, key_prefix: &str, timeout: Duration) -> Result<Self, String> {
        Self::parse_url(url)?;
        if timeout.is_zero() {
            return Err("redis.timeout_ms: must be at least 1".to_owned());
        }
        Ok(Self {
            url: url.to_owned(),
            key_prefix: key_prefix.to_owned(),
            timeout,
        })
    }

    /// Checks `redis.url`: a scheme this build speaks (`redis`, `unix`, `redis+unix`; TLS is
    /// not built in) and a URL redis-rs accepts.
    pub fn parse_url(url: &str) -> Result<redis::Client, String> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        match scheme {
            "redis" | "unix" | "redis+unix" => {}
            "rediss" => {
                return Err("redis.url: rediss:// (TLS) is not supported by this build".to_owned())
            }
            _ => {
                return Err(
                    "redis.url: must start with redis://, unix:// or redis+unix://".to_owned(),
                )
            }
        }
        redis::Client::open(url).map_err(|e| format!("redis.url: not a valid Redis URL ({e:?})"))
    }
}

/// Why a Redis command gave no answer. Callers treat every variant as "skip Redis this time".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The command did not finish within `redis.timeout_ms`.
    Timeout,
    /// Not sent: Redis failed several times in a row and the store is backing off.
    Skipped,
    /// No connection (refused, dropped, or no Tokio runtime to run one); reconnection goes on.
    Unavailable(String),
    /// Redis answered with an error, or with a reply of an unexpected type.
    Reply(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timed out"),
            Self::Skipped => f.write_str("skipped while backing off"),
            Self::Unavailable(why) => write!(f, "unavailable: {why}"),
            Self::Reply(why) => write!(f, "error reply: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    fn from_redis(e: &redis::RedisError) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            Self::Unavailable(e.to_string())
        } else {
            Self::Reply(e.to_string())
        }
    }

    /// Whether the failure says something about Redis's reachability (and so counts towards
    /// the back-off), as opposed to one command's bad reply.
    fn is_reachability(&self) -> bool {
        matches!(self, Self::Timeout | Self::Unavailable(_))
    }
}

/// A log that writes at most one line per interval and counts the lines it held back.
#[derive(Debug)]
pub struct RateLimitedLog {
    interval: Duration,
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// A log allowing one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(LogState::default()),
        }
    }

    /// Decides for an event at `now`: `Some(n)` when a line may be written, `n` being how many
    /// events were held back since the last line; `None` when this one is held back.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }

    /// Logs `message` at warn level unless a line was written less than an interval ago.
    pub fn warn(&self, message: fmt::Arguments<'_>) {
        if let Some(held_back) = self.admit(Instant::now()) {
            if held_back > 0 {
                log::warn!("{message} ({held_back} similar lines held back)");
            } else {
                log::warn!("{message}");
            }
        }
    }
}

/// The shared Redis client. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    manager: OnceLock<ConnectionManager>,
    consecutive_failures: AtomicU32,
    /// Milliseconds after `epoch` until which commands are skipped.
    skip_until_ms: AtomicU64,
    epoch: Instant,
    errors: AtomicU64,
    log: RateLimitedLog,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: show only the prefix.
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for `config`. Connects nothing: the connection is made by the first command
    /// (see [`RedisStore::warm_up`] to start it early).
    pub fn new(config: &RedisConfig) -> Result<Self, String> {
        let client = RedisConfig::parse_url(&config.url)?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                prefix: config.key_prefix.clone(),
                timeout: config.timeout,
                manager: OnceLock::new(),
                consecutive_failures: AtomicU32::new(0),
                skip_until_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                errors: AtomicU64::new(0),
                log: RateLimitedLog::new(LOG_INTERVAL),
            }),
        })
    }

    /// `redis.key_prefix` + `name`: the full key for raw commands and scripts.
    pub fn key(&self, name: &str) -> String {
        let mut key = String::with_capacity(self.inner.prefix.len() + name.len());
        key.push_str(&self.inner.prefix);
        key.push_str(name);
        key
    }

    /// `redis.key_prefix`.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The per-command timeout (`redis.timeout_ms`).
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Commands that failed since start (timeouts, skips, connection and reply errors).
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// Starts connecting in the background (a `PING` on a spawned task), so the first request
    /// finds a connection. Does nothing outside a Tokio runtime.
    pub fn warm_up(&self) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let store = self.clone();
            handle.spawn(async move {
                let _ = store.ping().await;
            });
        }
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let reply: String = self.query(&redis::cmd("PING")).await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Reply(format!("PING answered {reply:?}")))
        }
    }

    /// `GET prefix+name`.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.query(redis::cmd("GET").arg(self.key(name))).await
    }

    /// `SET prefix+name value PX ttl` (the TTL rounded up to whole milliseconds, at least 1).
    pub async fn set_ex(&self, name: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let ttl_ms = ttl_millis(ttl);
        self.query(
            redis::cmd("SET")
                .arg(self.key(name))
                .arg(value)
                .arg("PX")
                .arg(ttl_ms),
        )
        .await
    }

    /// `DEL` of the prefixed names; returns how many existed.
    pub async fn del(&self, names: &[&str]) -> Result<u64, StoreError> {
        if names.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("DEL");
        for name in names {
            cmd.arg(self.key(name));
        }
        self.query(&cmd).await
    }

    /// Runs a Lua script (`EVALSHA`, loading it on `NOSCRIPT`) under the timeout. The caller
    /// builds the invocation with keys from [`RedisStore::key`].
    pub async fn eval<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        let fut = invocation.invoke_async(&mut conn);
        self.finish(tokio::time::timeout(self.inner.timeout, fut).await)
    }

    /// Runs any command under the timeout. Its keys must already carry the prefix
    /// ([`RedisStore::key`]).
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        let fut = cmd.query_async::<T>(&mut conn);
        self.finish(tokio::time::timeout(self.inner.timeout, fut).await)
    }

    /// Deletes every key that starts with prefix+`name_prefix` (`SCAN MATCH` + `UNLINK` in
    /// batches, each step under the timeout); returns how many were deleted. Keys written while
    /// it runs may survive.
    pub async fn scan_delete(&self, name_prefix: &str) -> Result<u64, StoreError> {
        let pattern = format!("{}*", glob_escape(&self.key(name_prefix)));
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(SCAN_BATCH),
                )
                .await?;
            if !keys.is_empty() {
                let n: u64 = self.query(redis::cmd("UNLINK").arg(&keys)).await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// The connection manager, made on first use, or `Skipped` while backing off.
    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let now_ms = self.now_ms();
        if now_ms < self.inner.skip_until_ms.load(Ordering::Relaxed) {
            self.inner.errors.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Skipped);
        }
        if let Some(manager) = self.inner.manager.get() {
            return Ok(manager.clone());
        }
        if tokio::runtime::Handle::try_current().is_err() {
            let err = StoreError::Unavailable("no Tokio runtime".to_owned());
            return Err(self.failed(err));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(self.inner.client.clone(), config)
            .map_err(|e| self.failed(StoreError::from_redis(&e)))?;
        // Two first commands at once may both make one; the loser's is dropped unused.
        Ok(self.inner.manager.get_or_init(|| manager).clone())
    }

    fn finish<T>(
        &self,
        outcome: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match outcome {
            Ok(Ok(value)) => {
                self.inner.consecutive_failures.store(0, Ordering::Relaxed);
                Ok(value)
            }
            Ok(Err(e)) => Err(self.failed(StoreError::from_redis(&e))),
            Err(_elapsed) => Err(self.failed(StoreError::Timeout)),
        }
    }

    /// Counts and logs a failure, and starts a back-off after several in a row.
    fn failed(&self, err: StoreError) -> StoreError {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
        if err.is_reachability() {
            let failures = self
                .inner
                .consecutive_failures
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if failures >= FAILURES_BEFORE_BACKOFF {
                let until = self.now_ms() + BACKOFF.as_millis() as u64;
                self.inner.skip_until_ms.store(until, Ordering::Relaxed);
            }
        }
        self.inner
            .log
            .warn(format_args!("redis ({}): command {err}", self.inner.prefix));
        err
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }
}

/// Milliseconds for `PX`: rounded up, at least 1 (Redis rejects 0).
fn ttl_millis(ttl: Duration) -> u64 {
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// Escapes the characters `SCAN MATCH` treats as glob syntax.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_key_and_hides_the_url() {
        let err = RedisConfig::new("http://u:secret@h/", "p:", Duration::from_millis(50))
            .expect_err("http scheme");
        assert!(err.starts_with("redis.url:"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let err = RedisConfig::new("rediss://h/", "p:", Duration::from_millis(50))
            .expect_err("tls scheme");
        assert!(err.contains("TLS"), "{err}");
        let err = RedisConfig::new(
            "redis://u:secret@h:notaport/",
            "p:",
            Duration::from_millis(5),
        )
        .expect_err("bad port");
        assert!(
            err.starts_with("redis.url:") && !err.contains("secret"),
            "{err}"
        );
        let err = RedisConfig::new("redis://127.0.0.1:6379/0", "p:", Duration::ZERO)
            .expect_err("zero timeout");
        assert!(err.starts_with("redis.timeout_ms"), "{err}");
        let ok = RedisConfig::new(
            "redis://127.0.0.1:6379/0",
            "arkgate:",
            Duration::from_millis(50),
        )
        .expect("valid");
        assert_eq!(ok.key_prefix, RedisConfig::DEFAULT_KEY_PREFIX);
    }

    #[test]
    fn keys_carry_the_prefix() {
        let config = RedisConfig::new("redis://127.0.0.1:1/0", "ag:", Duration::from_millis(5))
            .expect("valid");
        let store = RedisStore::new(&config).expect("store");
        assert_eq!(store.key("cache:x"), "ag:cache:x");
        assert_eq!(store.prefix(), "ag:");
        assert!(!format!("{store:?}").contains("127.0.0.1"));
    }

    #[test]
    fn log_writes_one_line_per_interval_and_counts_the_rest() {
        let log = RateLimitedLog::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(log.admit(t0), Some(0));
        assert_eq!(log.admit(t0 + Duration::from_millis(10)), None);
        assert_eq!(log.admit(t0 + Duration::from_millis(999)), None);
        assert_eq!(log.admit(t0 + Duration::from_millis(1000)), Some(2));
        assert_eq!(log.admit(t0 + Duration::from_millis(1500)), None);
        assert_eq!(log.admit(t0 + Duration::from_millis(2500)), Some(1));
    }

    #[test]
    fn ttl_rounds_up_to_a_millisecond() {
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_millis(Duration::from_secs(3600)), 3_600_000);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(glob_escape("arkgate:cache:"), "arkgate:cache:");
    }

    #[test]
    fn outside_a_runtime_commands_fail_without_panicking() {
        let config = RedisConfig::new("redis://127.0.0.1:1/0", "ag:", Duration::from_millis(5))
            .expect("valid");
        let store = RedisStore::new(&config).expect("store");
        let err = store.connection().expect_err("no runtime");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert_eq!(store.errors(), 1);
    }

    #[tokio::test]
    async fn refused_connections_back_off_then_retry() {
        // Port 1 on loopback: nothing listens, the connect is refused at once.
        let config = RedisConfig::new("redis://127.0.0.1:1/0", "ag:", Duration::from_millis(200))
            .expect("valid");
        let store = RedisStore::new(&config).expect("store");
        let mut seen = Vec::new();
        for _ in 0..FAILURES_BEFORE_BACKOFF + 1 {
            seen.push(store.get("k").await.expect_err("nothing listens"));
        }
        assert!(seen[..FAILURES_BEFORE_BACKOFF as usize]
            .iter()
            .all(|e| matches!(e, StoreError::Unavailable(_) | StoreError::Timeout)));
        assert_eq!(seen.last(), Some(&StoreError::Skipped));
        assert_eq!(store.errors(), u64::from(FAILURES_BEFORE_BACKOFF) + 1);
    }
}
