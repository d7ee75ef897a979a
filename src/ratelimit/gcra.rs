//! The rate limiter's arithmetic, pure: no clock, no store, no Pingora types. Both stores (memory
//! and the Redis script) run exactly these rules, so they admit the same requests.
//!
//! # Buckets (requests and tokens per minute)
//! A GCRA, which is a token bucket written as one number: the *theoretical arrival time* (TAT),
//! in microseconds since the Unix epoch. The bucket holds `limit` units and refills continuously
//! at `limit` per minute; a cost of `c` units moves the TAT forward by
//! [`increment_us`]`(c, limit)` = ⌊c · 60 s / limit⌋. A cost is admitted at `now` when
//! `max(tat, now) + increment ≤ now + 60 s`: the debt after it (`tat − now`) must not exceed one
//! minute, the bucket's capacity. An empty TAT (or one in the past) is a full bucket, so a
//! client may spend its whole minute at once.
//!
//! What this bounds: over any window of length `w`, admitted cost ≤ `limit + limit · w / 60 s`
//! (a full bucket plus what refilled meanwhile); within one increment of time, at most `limit`.
//! It does not promise "at most `limit` in every 60 s window": that needs a window log, and a
//! bucket that let a client spend a minute at once can be spent again as it refills.
//!
//! Rounding is downwards, so a bucket refills at most 1 µs per admitted cost early; the admission
//! test and every remaining count use the same increments, so `limit` unit costs always fit a
//! full bucket.
//!
//! # Token reservations
//! At admission a request reserves an estimate of its tokens ([`reservation_for`]); when it ends,
//! [`settle`] moves the TAT by the difference `increment(actual) − increment(reserved)`: a refund
//! when the estimate was high, a further charge when it was low. A charge can push the debt past
//! one minute (a negative balance): then every request, even one reserving nothing, waits until
//! the debt is back under a minute. Debt is capped at [`MAX_DEBT_US`] so the numbers stay exact
//! in Redis's Lua (doubles, exact below 2^53).
//!
//! # Daily budget
//! Tokens used per UTC day ([`day_index`]): a request is refused once the day's count has reached
//! the budget; admission adds the reservation, settlement the difference (to the day it was
//! reserved in: a request that crosses midnight corrects a day that is over, so its correction
//! is dropped).

use std::time::Duration;

use super::{Admission, Limits, Quota, Refused, Reservation};

/// The bucket's period and capacity: one minute, in microseconds.
pub const WINDOW_US: u64 = 60_000_000;
/// The most debt a bucket can carry (about 35 years); keeps every number below 2^53.
pub const MAX_DEBT_US: u64 = 1 << 50;
/// Seconds in a UTC day.
pub const DAY_SECS: u64 = 86_400;
const US_PER_SEC: u64 = 1_000_000;

/// How far a cost of `cost` units moves a bucket of `limit` per minute: ⌊cost · 60 s / limit⌋ µs,
/// capped at [`MAX_DEBT_US`]. Zero when `limit` is 0 (unlimited).
pub fn increment_us(cost: u64, limit: u64) -> u64 {
    if limit == 0 {
        return 0;
    }
    let inc = u128::from(cost) * u128::from(WINDOW_US) / u128::from(limit);
    u64::try_from(inc).unwrap_or(u64::MAX).min(MAX_DEBT_US)
}

/// The tokens a request reserves for an estimate: the estimate, but never more than the whole
/// per-minute limit, so a request larger than a minute's tokens waits for a full bucket rather
/// than being refused forever (its real usage is charged when it settles).
pub fn reservation_for(estimate: u64, tpm: u64) -> u64 {
    if tpm == 0 {
        estimate
    } else {
        estimate.min(tpm)
    }
}

/// The UTC day a Unix time falls in: days since 1970-01-01.
pub fn day_index(now_unix_secs: u64) -> u64 {
    now_unix_secs / DAY_SECS
}

/// Microseconds from `now_us` to the next UTC midnight.
pub fn until_next_day_us(now_us: u64) -> u64 {
    let next = (day_index(now_us / US_PER_SEC) + 1) * DAY_SECS * US_PER_SEC;
    next - now_us
}

/// One GCRA bucket: its theoretical arrival time. `tat_us ≤ now` (0 included) is a full bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Theoretical arrival time, µs since the Unix epoch.
    pub tat_us: u64,
}

impl Bucket {
    /// A full bucket.
    pub const FULL: Bucket = Bucket { tat_us: 0 };

    /// How far the bucket is from full at `now_us`, in µs of refill.
    pub fn debt_us(self, now_us: u64) -> u64 {
        self.tat_us.saturating_sub(now_us)
    }

    /// Whether it holds its whole capacity at `now_us` (and so needs no storing).
    pub fn is_full(self, now_us: u64) -> bool {
        self.tat_us <= now_us
    }
}

/// The outcome of [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the cost fits now.
    pub allowed: bool,
    /// Units that still fit now, after this cost if it was admitted (at most `limit`).
    pub remaining: u64,
    /// Time until the bucket is full again, in µs.
    pub reset_after_us: u64,
    /// When refused, time until this cost would fit, in µs; 0 when admitted.
    pub retry_after_us: u64,
    /// The bucket after the decision (unchanged when refused).
    pub new_state: Bucket,
}

/// Decides whether `cost` units fit a bucket of `limit` per minute at `now_us`. A limit of 0 is
/// unlimited: always admitted, state unchanged, `remaining` = `u64::MAX`. A cost above `limit`
/// counts as `limit` (see [`reservation_for`]).
pub fn check(state: Bucket, now_us: u64, cost: u64, limit: u64) -> Decision {
    if limit == 0 {
        return Decision {
            allowed: true,
            remaining: u64::MAX,
            reset_after_us: 0,
            retry_after_us: 0,
            new_state: state,
        };
    }
    let inc = increment_us(cost.min(limit), limit);
    let base = state.tat_us.max(now_us);
    let new_tat = base + inc;
    if new_tat <= now_us + WINDOW_US {
        Decision {
            allowed: true,
            remaining: remaining(new_tat - now_us, limit),
            reset_after_us: new_tat - now_us,
            retry_after_us: 0,
            new_state: Bucket { tat_us: new_tat },
        }
    } else {
        Decision {
            allowed: false,
            remaining: remaining(base - now_us, limit),
            reset_after_us: base - now_us,
            retry_after_us: new_tat - (now_us + WINDOW_US),
            new_state: state,
        }
    }
}

/// The largest cost that fits a bucket with `debt_us` of debt: the largest `n` with
/// `increment_us(n) ≤ 60 s − debt`, at most `limit`.
fn remaining(debt_us: u64, limit: u64) -> u64 {
    let slack = u128::from(WINDOW_US.saturating_sub(debt_us));
    // ⌊n·W/L⌋ ≤ s ⇔ n·W < (s+1)·L ⇔ n ≤ ((s+1)·L − 1) / W.
    let n = ((slack + 1) * u128::from(limit) - 1) / u128::from(WINDOW_US);
    u64::try_from(n).unwrap_or(u64::MAX).min(limit)
}

/// The TAT change that settles a reservation of `reserved` units against `actual` ones:
/// positive charges more, negative refunds.
pub fn settle_delta_us(reserved: u64, actual: u64, limit: u64) -> i64 {
    // Both increments are at most MAX_DEBT_US (2^50), so they and their difference fit an i64.
    increment_us(actual, limit) as i64 - increment_us(reserved, limit) as i64
}

/// Settles a reservation of `reserved` units that really cost `actual`: refunds or charges the
/// difference from `max(tat, now)`. A refund past a full bucket is not kept (a bucket never
/// holds more than its capacity); a charge may leave a debt over a minute, which later requests
/// wait out. Unlimited (`limit` 0) leaves the state as is.
pub fn settle(state: Bucket, now_us: u64, reserved: u64, actual: u64, limit: u64) -> Bucket {
    apply_delta(state, now_us, settle_delta_us(reserved, actual, limit))
}

/// Moves a bucket's TAT by `delta_us` from `max(tat, now)`; what the settle script does.
pub fn apply_delta(state: Bucket, now_us: u64, delta_us: i64) -> Bucket {
    if delta_us == 0 {
        return state;
    }
    let base = i128::from(state.tat_us.max(now_us)) + i128::from(delta_us);
    if base <= i128::from(now_us) {
        return Bucket::FULL;
    }
    let capped = base.min(i128::from(now_us) + i128::from(MAX_DEBT_US));
    Bucket {
        tat_us: u64::try_from(capped).unwrap_or(u64::MAX),
    }
}

/// Tokens counted against one UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Daily {
    /// The day the count belongs to ([`day_index`]).
    pub day: u64,
    /// Tokens used (and reserved) on that day.
    pub used: u64,
}

impl Daily {
    /// The count for `day`: 0 when the state is another day's.
    pub fn used_on(self, day: u64) -> u64 {
        if self.day == day {
            self.used
        } else {
            0
        }
    }
}

/// The outcome of [`check_daily`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyDecision {
    /// Whether the day's budget still has room.
    pub allowed: bool,
    /// Tokens left today after this reservation (`u64::MAX` when unlimited).
    pub remaining: u64,
    /// Time until the next UTC midnight, in µs.
    pub reset_after_us: u64,
    /// The count after the decision (unchanged when refused).
    pub new_state: Daily,
}

/// Whether a request may start against a daily budget of `limit` tokens (0 = unlimited), and the
/// count with its `reserve` added. Refused once today's count has reached the budget.
pub fn check_daily(state: Daily, now_us: u64, reserve: u64, limit: u64) -> DailyDecision {
    let reset_after_us = until_next_day_us(now_us);
    if limit == 0 {
        return DailyDecision {
            allowed: true,
            remaining: u64::MAX,
            reset_after_us,
            new_state: state,
        };
    }
    let day = day_index(now_us / US_PER_SEC);
    let used = state.used_on(day);
    if used >= limit {
        return DailyDecision {
            allowed: false,
            remaining: 0,
            reset_after_us,
            new_state: state,
        };
    }
    let used = used.saturating_add(reserve);
    DailyDecision {
        allowed: true,
        remaining: limit.saturating_sub(used),
        reset_after_us,
        new_state: Daily { day, used },
    }
}

/// Settles a daily reservation made on `reserved_day`: adds `actual − reserved` (never below 0)
/// when the state still counts that day; otherwise that day is over and nothing changes.
pub fn settle_daily(state: Daily, reserved_day: u64, reserved: u64, actual: u64) -> Daily {
    if state.day != reserved_day || reserved == actual {
        return state;
    }
    let used = i128::from(state.used) + i128::from(actual) - i128::from(reserved);
    Daily {
        day: state.day,
        used: u64::try_from(used.max(0)).unwrap_or(u64::MAX),
    }
}

/// Everything one caller's limits keep: the two buckets and the day's count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    /// Requests per minute.
    pub requests: Bucket,
    /// Tokens per minute.
    pub tokens: Bucket,
    /// Tokens per UTC day.
    pub daily: Daily,
}

impl State {
    /// Whether the state equals a fresh one at `now_us` (full buckets, nothing used today), so a
    /// store may forget it.
    pub fn is_idle(&self, now_us: u64) -> bool {
        self.requests.is_full(now_us)
            && self.tokens.is_full(now_us)
            && self.daily.used_on(day_index(now_us / US_PER_SEC)) == 0
    }
}

/// Admits one request reserving `estimate` tokens, all or nothing: it is admitted only when the
/// request bucket, the token bucket and the daily budget all have room, and only then is any of
/// them charged. Returns what the response headers need and the new state.
pub fn admit(state: &State, now_us: u64, limits: &Limits, estimate: u64) -> (Admission, State) {
    let reserve = reservation_for(estimate, limits.tpm);
    let req = check(state.requests, now_us, 1, limits.rpm);
    let tok = check(state.tokens, now_us, reserve, limits.tpm);
    let day = check_daily(state.daily, now_us, reserve, limits.daily_tokens);
    let allowed = req.allowed && tok.allowed && day.allowed;

    // The daily budget answers first (a different error, and the longest wait); otherwise the
    // bucket that makes the caller wait longer.
    let refused = if allowed {
        None
    } else if !day.allowed {
        Some(Refused::Daily)
    } else if !tok.allowed && (req.allowed || tok.retry_after_us > req.retry_after_us) {
        Some(Refused::Tpm)
    } else {
        Some(Refused::Rpm)
    };
    let retry_after_us = if allowed {
        0
    } else {
        let mut wait = req.retry_after_us.max(tok.retry_after_us);
        if !day.allowed {
            wait = wait.max(day.reset_after_us);
        }
        wait
    };
    // When refused, nothing is charged: report the buckets as they stand.
    let (req, tok, day) = if allowed {
        (req, tok, day)
    } else {
        (
            check(state.requests, now_us, 0, limits.rpm),
            check(state.tokens, now_us, 0, limits.tpm),
            DailyDecision {
                remaining: limits
                    .daily_tokens
                    .saturating_sub(state.daily.used_on(day_index(now_us / US_PER_SEC))),
                ..day
            },
        )
    };
    let new_state = if allowed {
        State {
            requests: req.new_state,
            tokens: tok.new_state,
            daily: day.new_state,
        }
    } else {
        *state
    };
    let admission = Admission {
        allowed,
        refused,
        requests: quota(limits.rpm, req.remaining, req.reset_after_us),
        tokens: quota(limits.tpm, tok.remaining, tok.reset_after_us),
        daily: quota(limits.daily_tokens, day.remaining, day.reset_after_us),
        retry_after: Duration::from_micros(retry_after_us),
        reservation: Reservation {
            tokens: if allowed { reserve } else { 0 },
            day: day_index(now_us / US_PER_SEC),
        },
    };
    (admission, new_state)
}

fn quota(limit: u64, remaining: u64, reset_after_us: u64) -> Quota {
    if limit == 0 {
        return Quota::UNLIMITED;
    }
    Quota {
        limit,
        remaining,
        reset_after: Duration::from_micros(reset_after_us),
    }
}

/// Settles `reservation` against the `actual` tokens the response used: the token bucket and
/// the daily count move by the difference (each only when its limit is on).
pub fn settle_state(
    state: &State,
    now_us: u64,
    limits: &Limits,
    reservation: &Reservation,
    actual: u64,
) -> State {
    let mut next = *state;
    if limits.tpm > 0 {
        next.tokens = settle(state.tokens, now_us, reservation.tokens, actual, limits.tpm);
    }
    if limits.daily_tokens > 0 {
        next.daily = settle_daily(state.daily, reservation.day, reservation.tokens, actual);
    }
    next
}

#[cfg(test)]
#[path = "gcra_tests.rs"]
mod tests;
