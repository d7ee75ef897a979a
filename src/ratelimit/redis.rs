//! The limiter's state in Redis, shared by every arkgate instance on it.
//!
//! One check is one `EVALSHA` of [`ADMIT_LUA`]: the script reads Redis's clock (`TIME`), both
//! buckets and the day's count, decides all-or-nothing by the rules of
//! [`gcra`](super::gcra), charges what it admitted, and returns the clock and the state it
//! read. Rust then runs the same pure [`gcra::admit`] on that state for the numbers the headers
//! need, and checks that it reaches the script's decision. A script runs atomically, so no two
//! instances can both take the last unit; instance clocks play no part.
//!
//! Keys (each with the `redis.key_prefix`, `<who>` being the limiter's subject):
//! - `rl:<who>:req`, `rl:<who>:tok`: a bucket's TAT, µs since the Unix epoch, as a decimal
//!   string; it expires when the bucket is full again (`PXAT` = the TAT), so an idle caller
//!   leaves nothing behind;
//! - `rl:<who>:day`: a hash `{day, used}`, expiring a minute after the UTC day ends.
//!
//! Settlement is another single script, [`SETTLE_LUA`]. Every call runs under the shared
//! [`RedisStore`]'s timeout and back-off; failures come back as [`StoreError`] for the caller's
//! `on_store_error`.

use redis::Script;

use super::gcra::{self, Bucket, Daily, State};
use super::{Admission, Limits, Reservation};
use crate::store::{RedisStore, StoreError};

/// The admission script.
///
/// `KEYS`: request bucket, token bucket, daily hash. `ARGV`: rpm, request increment (µs), tpm,
/// token increment (µs) of the reservation, daily budget, reserved tokens. Returns
/// `{admitted 0|1, now µs, request TAT, token TAT, day (-1 if none), used}`, the last four as
/// read before any charge. Numbers are written with `%.0f`: Lua's default `%.14g` would round
/// a 16-digit TAT.
pub const ADMIT_LUA: &str = r#"
local window = 60000000
local t = redis.call('TIME')
local secs = tonumber(t[1])
local now = secs * 1000000 + tonumber(t[2])
local today = math.floor(secs / 86400)
local rpm, req_inc = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpm, tok_inc = tonumber(ARGV[3]), tonumber(ARGV[4])
local budget, reserve = tonumber(ARGV[5]), tonumber(ARGV[6])

local req_tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local tok_tat = tonumber(redis.call('GET', KEYS[2]) or '0')
local d = redis.call('HMGET', KEYS[3], 'day', 'used')
local day = tonumber(d[1] or '-1')
local used = tonumber(d[2] or '0')
local used_today = 0
if day == today then used_today = used end

local req_base = math.max(req_tat, now)
local tok_base = math.max(tok_tat, now)
local ok = 1
if rpm > 0 and req_base + req_inc > now + window then ok = 0 end
if tpm > 0 and tok_base + tok_inc > now + window then ok = 0 end
if budget > 0 and used_today >= budget then ok = 0 end

if ok == 1 then
  if rpm > 0 and req_inc > 0 then
    local tat = req_base + req_inc
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PXAT', string.format('%.0f', math.ceil(tat / 1000)))
  end
  if tpm > 0 and tok_inc > 0 then
    local tat = tok_base + tok_inc
    redis.call('SET', KEYS[2], string.format('%.0f', tat), 'PXAT', string.format('%.0f', math.ceil(tat / 1000)))
  end
  if budget > 0 and reserve > 0 then
    redis.call('HSET', KEYS[3], 'day', string.format('%.0f', today), 'used', string.format('%.0f', used_today + reserve))
    redis.call('EXPIREAT', KEYS[3], string.format('%.0f', (today + 1) * 86400 + 60))
  end
end
return {ok, now, req_tat, tok_tat, day, used}
"#;

/// The settlement script.
///
/// `KEYS`: token bucket, daily hash. `ARGV`: the token bucket's TAT change (µs, signed), the
/// reservation's day, the daily count's change (tokens, signed). The bucket moves from
/// `max(TAT, now)`, is deleted when that leaves it full and capped at `now + MAX_DEBT_US`; the
/// daily count moves only while the hash still counts the reservation's day, never below 0.
/// Returns Redis's `now` in µs.
pub const SETTLE_LUA: &str = r#"
local max_debt = 1125899906842624
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local delta = tonumber(ARGV[1])
if delta ~= 0 then
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now) + delta
  if tat > now + max_debt then tat = now + max_debt end
  if tat > now then
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PXAT', string.format('%.0f', math.ceil(tat / 1000)))
  else
    redis.call('DEL', KEYS[1])
  end
end
local dd = tonumber(ARGV[3])
if dd ~= 0 then
  local d = redis.call('HMGET', KEYS[2], 'day', 'used')
  if d[1] == ARGV[2] then
    local used = math.max(tonumber(d[2] or '0') + dd, 0)
    redis.call('HSET', KEYS[2], 'used', string.format('%.0f', used))
  end
end
return now
"#;

/// The Redis-backed limiter: the shared [`RedisStore`] and the two scripts.
#[derive(Debug, Clone)]
pub struct RedisLimiter {
    store: RedisStore,
    admit: Script,
    settle: Script,
}

impl RedisLimiter {
    /// A limiter on `store` (which owns the connection, the timeout and the error log).
    pub fn new(store: RedisStore) -> Self {
        Self {
            store,
            admit: Script::new(ADMIT_LUA),
            settle: Script::new(SETTLE_LUA),
        }
    }

    /// The store underneath (for its error count).
    pub fn store(&self) -> &RedisStore {
        &self.store
    }

    /// The three keys of `who`, prefixed.
    pub fn keys(&self, who: &str) -> [String; 3] {
        [
            self.store.key(&format!("rl:{who}:req")),
            self.store.key(&format!("rl:{who}:tok")),
            self.store.key(&format!("rl:{who}:day")),
        ]
    }

    /// Admits one request of `who` reserving `estimate` tokens: one script run.
    pub async fn admit(
        &self,
        who: &str,
        limits: &Limits,
        estimate: u64,
    ) -> Result<Admission, StoreError> {
        let reserve = gcra::reservation_for(estimate, limits.tpm);
        let [req, tok, day] = self.keys(who);
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .key(req)
            .key(tok)
            .key(day)
            .arg(limits.rpm)
            .arg(gcra::increment_us(1, limits.rpm))
            .arg(limits.tpm)
            .arg(gcra::increment_us(reserve, limits.tpm))
            .arg(limits.daily_tokens)
            .arg(reserve);
        let reply: Vec<i64> = self.store.eval(&invocation).await?;
        let [ok, now, req_tat, tok_tat, day, used] = reply[..] else {
            return Err(StoreError::Reply(format!(
                "rate limit script returned {} values, expected 6",
                reply.len()
            )));
        };
        let as_u64 = |v: i64| u64::try_from(v).unwrap_or(0);
        let before = State {
            requests: Bucket {
                tat_us: as_u64(req_tat),
            },
            tokens: Bucket {
                tat_us: as_u64(tok_tat),
            },
            daily: if day < 0 {
                Daily::default()
            } else {
                Daily {
                    day: as_u64(day),
                    used: as_u64(used),
                }
            },
        };
        let (admission, _) = gcra::admit(&before, as_u64(now), limits, estimate);
        if admission.allowed != (ok == 1) {
            return Err(StoreError::Reply(
                "rate limit script and arithmetic disagree".to_owned(),
            ));
        }
        Ok(admission)
    }

    /// Tokens `who` used (and holds reserved) on UTC day `day`: one `HMGET`.
    pub async fn daily_used(&self, who: &str, day: u64) -> Result<u64, StoreError> {
        let [_, _, key] = self.keys(who);
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key).arg("day").arg("used");
        let (d, used): (Option<u64>, Option<u64>) = self.store.query(&cmd).await?;
        Ok(if d == Some(day) { used.unwrap_or(0) } else { 0 })
    }

    /// Settles an admitted request of `who`: one script run, skipped when nothing changes.
    pub async fn settle(
        &self,
        who: &str,
        limits: &Limits,
        reservation: &Reservation,
        actual: u64,
    ) -> Result<(), StoreError> {
        let bucket_delta = if limits.tpm > 0 {
            gcra::settle_delta_us(reservation.tokens, actual, limits.tpm)
        } else {
            0
        };
        let daily_delta = if limits.daily_tokens > 0 {
            i128::from(actual) - i128::from(reservation.tokens)
        } else {
            0
        };
        if bucket_delta == 0 && daily_delta == 0 {
            return Ok(());
        }
        // Lua numbers are exact below 2^53; a day's count never gets near it.
        let daily_delta = daily_delta.clamp(-(1 << 53), 1 << 53) as i64;
        let [_, tok, day] = self.keys(who);
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(tok)
            .key(day)
            .arg(bucket_delta)
            .arg(reservation.day)
            .arg(daily_delta);
        let _now: i64 = self.store.eval(&invocation).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_use_the_rust_constants() {
        assert!(ADMIT_LUA.contains(&format!("local window = {}", gcra::WINDOW_US)));
        assert!(SETTLE_LUA.contains(&format!("local max_debt = {}", gcra::MAX_DEBT_US)));
        assert!(ADMIT_LUA.contains(&format!("/ {}", gcra::DAY_SECS)));
    }

    #[test]
    fn keys_carry_the_prefix_and_the_subject() {
        let config = crate::store::RedisConfig::new(
            "redis://127.0.0.1:1/0",
            "ag:",
            std::time::Duration::from_millis(5),
        )
        .expect("valid");
        let limiter = RedisLimiter::new(RedisStore::new(&config).expect("store"));
        assert_eq!(
            limiter.keys("key:a"),
            ["ag:rl:key:a:req", "ag:rl:key:a:tok", "ag:rl:key:a:day"]
        );
    }
}
