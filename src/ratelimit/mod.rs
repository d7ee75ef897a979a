//! The rate limiter: requests and tokens per minute and tokens per UTC day, per caller.
//!
//! - [`gcra`]: the arithmetic, pure (explicit `now`, no store).
//! - [`memory`]: the state in this process (sharded maps, idle entries dropped).
//! - [`redis`]: the state in Redis, one Lua script per check, on Redis's clock, so every arkgate
//!   instance sharing the Redis shares the counts.
//!
//! A request's path through it: [`Limiter::admit`] with the caller's [`Limits`] and a token
//! estimate ([`estimate_tokens`]) before it is forwarded; when refused, a 429 with
//! [`Refused::code`] and [`headers`]; when admitted, [`headers`] on the response and, once the
//! response has ended, [`Limiter::settle`] with the real usage. A store error
//! ([`StoreError`]) leaves the choice to the caller's [`OnStoreError`].

pub mod gcra;
pub mod memory;
pub mod redis;

use std::net::IpAddr;
use std::time::Duration;

pub use self::memory::MemoryStore;
pub use self::redis::RedisLimiter;
pub use crate::store::StoreError;

/// One caller's limits; 0 turns a limit off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: u64,
    /// Tokens per minute.
    pub tpm: u64,
    /// Tokens per UTC day.
    pub daily_tokens: u64,
}

impl Limits {
    /// Whether every limit is off (the limiter need not be asked).
    pub fn is_unlimited(&self) -> bool {
        self.rpm == 0 && self.tpm == 0 && self.daily_tokens == 0
    }
}

/// The limit that refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Requests per minute.
    Rpm,
    /// Tokens per minute.
    Tpm,
    /// The day's token budget.
    Daily,
}

impl Refused {
    /// The OpenAI error code for the 429: `rate_limit_exceeded`, or `insufficient_quota` for
    /// the daily budget.
    pub fn code(self) -> &'static str {
        match self {
            Self::Rpm | Self::Tpm => "rate_limit_exceeded",
            Self::Daily => "insufficient_quota",
        }
    }

    /// A message for the error body (names the limit, never the caller's key).
    pub fn message(self) -> &'static str {
        match self {
            Self::Rpm => "Rate limit reached for requests per minute",
            Self::Tpm => "Rate limit reached for tokens per minute",
            Self::Daily => "Daily token quota exceeded; it resets at 00:00 UTC",
        }
    }
}

/// One limit's standing after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// The limit; 0 when it is off (then `remaining` and `reset_after` mean nothing).
    pub limit: u64,
    /// What still fits now.
    pub remaining: u64,
    /// Until the limit is whole again (a full bucket, or the next UTC midnight).
    pub reset_after: Duration,
}

impl Quota {
    /// A limit that is off.
    pub const UNLIMITED: Quota = Quota {
        limit: 0,
        remaining: 0,
        reset_after: Duration::ZERO,
    };
}

/// What an admission reserved, for [`Limiter::settle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    /// Tokens reserved (charged to the token bucket and the daily count); 0 when refused.
    pub tokens: u64,
    /// The UTC day they were counted on.
    pub day: u64,
}

/// The answer to [`Limiter::admit`]: the decision and everything the response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Whether the request may go on.
    pub allowed: bool,
    /// When refused, which limit refused it.
    pub refused: Option<Refused>,
    /// Requests per minute.
    pub requests: Quota,
    /// Tokens per minute.
    pub tokens: Quota,
    /// Tokens per UTC day.
    pub daily: Quota,
    /// When refused, how long until the request would be admitted; zero when admitted.
    pub retry_after: Duration,
    /// What to settle when the response ends.
    pub reservation: Reservation,
}

/// What to do with a request when the store cannot be asked (Redis slow or down).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnStoreError {
    /// Let it through unlimited (the default: a limiter outage is not an API outage).
    #[default]
    Allow,
    /// Refuse it (a 503 is the caller's choice).
    Deny,
}

/// The tokens a request is expected to use, reserved at admission: a quarter of the prompt's
/// bytes (about a token per 4 bytes of English or JSON) plus the completion allowance, which is
/// the request's `max_tokens` or, without one, `default_completion`.
pub fn estimate_tokens(prompt_bytes: u64, max_tokens: Option<u64>, default_completion: u64) -> u64 {
    (prompt_bytes / 4).saturating_add(max_tokens.unwrap_or(default_completion))
}

/// The limiter's subject for a client key (`rate_limit.by: key`): its configured name.
pub fn subject_for_key(name: &str) -> String {
    format!("key:{name}")
}

/// The limiter's subject for a client address (`rate_limit.by: client_ip`).
pub fn subject_for_ip(ip: IpAddr) -> String {
    format!("ip:{ip}")
}

/// The limiter over one of its stores.
#[derive(Debug)]
pub enum Limiter {
    /// State in this process.
    Memory(MemoryStore),
    /// State in Redis, shared by every instance.
    Redis(RedisLimiter),
}

impl Limiter {
    /// Admits one request of `who` reserving `estimate` tokens. Only the Redis store fails, with
    /// a [`StoreError`] that is already counted and logged by the store.
    pub async fn admit(
        &self,
        who: &str,
        limits: &Limits,
        estimate: u64,
    ) -> Result<Admission, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.admit(who, limits, estimate)),
            Self::Redis(r) => r.admit(who, limits, estimate).await,
        }
    }

    /// Tokens `who` used (and holds reserved) today, UTC, as the store counts them.
    pub async fn daily_used(&self, who: &str) -> Result<u64, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.daily_used(who)),
            Self::Redis(r) => r.daily_used(who, crate::clients::gate::utc_day()).await,
        }
    }

    /// Settles an admitted request's `reservation` against the `actual` tokens it used.
    pub async fn settle(
        &self,
        who: &str,
        limits: &Limits,
        reservation: &Reservation,
        actual: u64,
    ) -> Result<(), StoreError> {
        match self {
            Self::Memory(m) => {
                m.settle(who, limits, reservation, actual);
                Ok(())
            }
            Self::Redis(r) => r.settle(who, limits, reservation, actual).await,
        }
    }
}

/// The OpenAI rate-limit headers for an admission: the `x-ratelimit-{limit,remaining,reset}-`
/// `{requests,tokens}` trios (each trio only when its limit is on) and, when refused,
/// `retry-after` in whole seconds (rounded up, at least 1).
pub fn headers(a: &Admission) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(7);
    const REQUESTS: [&str; 3] = [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ];
    const TOKENS: [&str; 3] = [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ];
    for (names, q) in [(REQUESTS, &a.requests), (TOKENS, &a.tokens)] {
        if q.limit > 0 {
            out.push((names[0], q.limit.to_string()));
            out.push((names[1], q.remaining.to_string()));
            out.push((names[2], format_reset(q.reset_after)));
        }
    }
    if !a.allowed {
        let secs = a.retry_after.as_micros().div_ceil(1_000_000).max(1);
        out.push(("retry-after", secs.to_string()));
    }
    out
}

/// A duration as OpenAI writes its reset headers: `250ms` under a second, otherwise hours,
/// minutes and seconds with up to three decimals (`1.5s`, `6m0s`, `1h2m3s`).
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_micros().div_ceil(1000);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let frac = format!("{frac:03}");
        out.push_str(&format!("{s}.{}s", frac.trim_end_matches('0')));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(allowed: bool) -> Admission {
        Admission {
            allowed,
            refused: (!allowed).then_some(Refused::Rpm),
            requests: Quota {
                limit: 10,
                remaining: 0,
                reset_after: Duration::from_secs(6),
            },
            tokens: Quota {
                limit: 1000,
                remaining: 400,
                reset_after: Duration::from_millis(36_000),
            },
            daily: Quota::UNLIMITED,
            retry_after: Duration::from_millis(5_200),
            reservation: Reservation::default(),
        }
    }

    #[test]
    fn headers_name_both_trios_and_retry_after_when_refused() {
        let h = headers(&admission(false));
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("x-ratelimit-limit-requests"), Some("10"));
        assert_eq!(get("x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(get("x-ratelimit-reset-requests"), Some("6s"));
        assert_eq!(get("x-ratelimit-limit-tokens"), Some("1000"));
        assert_eq!(get("x-ratelimit-remaining-tokens"), Some("400"));
        assert_eq!(get("x-ratelimit-reset-tokens"), Some("36s"));
        assert_eq!(get("retry-after"), Some("6"), "5.2 s rounds up");
        assert_eq!(h.len(), 7);
    }

    #[test]
    fn headers_skip_limits_that_are_off_and_retry_after_when_admitted() {
        let mut a = admission(true);
        a.tokens = Quota::UNLIMITED;
        let h = headers(&a);
        assert_eq!(h.len(), 3);
        assert!(h.iter().all(|(n, _)| n.ends_with("-requests")));
        a.requests = Quota::UNLIMITED;
        assert!(headers(&a).is_empty());
    }

    #[test]
    fn resets_are_written_like_openai() {
        assert_eq!(format_reset(Duration::ZERO), "0ms");
        assert_eq!(format_reset(Duration::from_micros(1)), "1ms");
        assert_eq!(format_reset(Duration::from_millis(250)), "250ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_millis(6_020)), "6.02s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn codes_distinguish_the_daily_quota() {
        assert_eq!(Refused::Rpm.code(), "rate_limit_exceeded");
        assert_eq!(Refused::Tpm.code(), "rate_limit_exceeded");
        assert_eq!(Refused::Daily.code(), "insufficient_quota");
    }

    #[test]
    fn estimates_add_a_quarter_of_the_prompt_to_the_completion_allowance() {
        assert_eq!(estimate_tokens(400, Some(50), 1000), 150);
        assert_eq!(estimate_tokens(400, None, 1000), 1100);
        assert_eq!(estimate_tokens(3, None, 0), 0);
        assert_eq!(estimate_tokens(u64::MAX, Some(u64::MAX), 0), u64::MAX);
    }

    #[test]
    fn subjects_keep_keys_and_addresses_apart() {
        assert_eq!(subject_for_key("team-a"), "key:team-a");
        assert_eq!(subject_for_ip("::1".parse().expect("ip")), "ip:::1");
        assert!(Limits::default().is_unlimited());
    }

    #[tokio::test]
    async fn the_memory_limiter_admits_then_refuses() {
        let limiter = Limiter::Memory(MemoryStore::new());
        let limits = Limits {
            rpm: 2,
            ..Limits::default()
        };
        assert!(
            limiter
                .admit("a", &limits, 0)
                .await
                .expect("memory")
                .allowed
        );
        assert!(
            limiter
                .admit("a", &limits, 0)
                .await
                .expect("memory")
                .allowed
        );
        let third = limiter.admit("a", &limits, 0).await.expect("memory");
        assert_eq!(third.refused, Some(Refused::Rpm));
        assert!(
            limiter
                .admit("b", &limits, 0)
                .await
                .expect("memory")
                .allowed
        );
        limiter
            .settle("a", &limits, &third.reservation, 0)
            .await
            .expect("memory settle");
    }
}
