//! Tests of the limiter's arithmetic: the bucket, settlement, the daily budget and the combined
//! all-or-nothing admission, by hand and as properties.

use proptest::prelude::*;

use super::*;
use crate::ratelimit::{Limits, Refused};

/// 2025-06-15T15:06:40Z, in µs: an arbitrary instant, mid-day UTC.
const T0: u64 = 1_750_000_000 * 1_000_000;
const SEC: u64 = 1_000_000;

fn admit_n(mut state: Bucket, now: u64, n: u64, limit: u64) -> (Bucket, u64) {
    let mut admitted = 0;
    for _ in 0..n {
        let d = check(state, now, 1, limit);
        if d.allowed {
            admitted += 1;
            state = d.new_state;
        }
    }
    (state, admitted)
}

#[test]
fn a_full_bucket_admits_the_whole_minute_at_once_then_refuses() {
    let (state, admitted) = admit_n(Bucket::FULL, T0, 30, 10);
    assert_eq!(admitted, 10);
    let refused = check(state, T0, 1, 10);
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    assert_eq!(
        refused.retry_after_us,
        6 * SEC,
        "one request refills in 6 s"
    );
    assert_eq!(refused.reset_after_us, 60 * SEC, "full again in a minute");
    assert_eq!(refused.new_state, state, "a refusal charges nothing");
}

#[test]
fn limits_that_do_not_divide_a_minute_still_fit_whole() {
    for limit in [7, 13, 1000, 1999] {
        let (_, admitted) = admit_n(Bucket::FULL, T0, limit + 5, limit);
        assert_eq!(admitted, limit, "limit {limit}");
    }
    // About one unit per µs (one rounds to 1 µs, the other to 0): a burst of 2000 fits.
    for limit in [59_999_999, 60_000_001] {
        let (_, admitted) = admit_n(Bucket::FULL, T0, 2000, limit);
        assert_eq!(admitted, 2000, "limit {limit}");
    }
    let d = check(Bucket::FULL, T0, 1, 7);
    assert_eq!(d.remaining, 6);
    assert_eq!(check(Bucket::FULL, T0, 0, 7).remaining, 7);
}

#[test]
fn refill_is_continuous() {
    let (state, _) = admit_n(Bucket::FULL, T0, 10, 10);
    assert!(!check(state, T0 + 6 * SEC - 1, 1, 10).allowed);
    let one = check(state, T0 + 6 * SEC, 1, 10);
    assert!(one.allowed, "one request back after 6 s");
    assert_eq!(one.remaining, 0);
    assert_eq!(check(state, T0 + 30 * SEC, 0, 10).remaining, 5);
    assert_eq!(check(state, T0 + 60 * SEC, 0, 10).remaining, 10);
    assert!(state.is_full(T0 + 60 * SEC));
}

#[test]
fn a_cost_above_the_limit_waits_for_a_full_bucket() {
    let d = check(Bucket::FULL, T0, 5000, 1000);
    assert!(d.allowed, "counts as the whole minute");
    assert_eq!(d.remaining, 0);
    let again = check(d.new_state, T0 + 30 * SEC, 5000, 1000);
    assert!(!again.allowed);
    assert_eq!(again.retry_after_us, 30 * SEC);
    assert_eq!(reservation_for(5000, 1000), 1000);
    assert_eq!(reservation_for(5000, 0), 5000);
}

#[test]
fn a_zero_limit_is_unlimited() {
    let d = check(Bucket { tat_us: T0 * 2 }, T0, u64::MAX, 0);
    assert!(d.allowed);
    assert_eq!(d.new_state, Bucket { tat_us: T0 * 2 });
    assert_eq!(increment_us(123, 0), 0);
    assert_eq!(settle(Bucket::FULL, T0, 0, 1 << 40, 0), Bucket::FULL);
}

#[test]
fn settlement_refunds_an_overestimate_and_charges_an_underestimate() {
    let reserved = check(Bucket::FULL, T0, 800, 1000);
    assert_eq!(reserved.remaining, 200);
    let refunded = settle(reserved.new_state, T0, 800, 300, 1000);
    assert_eq!(check(refunded, T0, 0, 1000).remaining, 700);
    let charged = settle(reserved.new_state, T0, 800, 1000, 1000);
    assert_eq!(check(charged, T0, 0, 1000).remaining, 0);
    // A refund larger than the debt leaves a full bucket, nothing more.
    assert_eq!(settle(reserved.new_state, T0, 800, 0, 1000), Bucket::FULL);
}

#[test]
fn a_negative_balance_makes_the_next_requests_wait() {
    let reserved = check(Bucket::FULL, T0, 100, 1000);
    // The request used 2500 tokens: 1.6 minutes of debt.
    let owed = settle(reserved.new_state, T0, 100, 2500, 1000);
    assert_eq!(owed.debt_us(T0), 150 * SEC);
    let next = check(owed, T0, 0, 1000);
    assert!(!next.allowed, "even a request reserving nothing waits");
    assert_eq!(next.retry_after_us, 90 * SEC);
    assert_eq!(next.remaining, 0);
    assert!(check(owed, T0 + 90 * SEC, 0, 1000).allowed);
    assert!(!check(owed, T0 + 90 * SEC, 1, 1000).allowed);
    assert!(check(owed, T0 + 90 * SEC + 60_000, 1, 1000).allowed);
}

#[test]
fn debt_is_capped_so_numbers_stay_exact_in_lua() {
    let huge = settle(Bucket::FULL, T0, 0, u64::MAX, 1);
    assert_eq!(huge.debt_us(T0), MAX_DEBT_US);
    assert!(huge.tat_us < 1 << 53);
    assert_eq!(increment_us(u64::MAX, 1), MAX_DEBT_US);
}

#[test]
fn days_are_utc() {
    assert_eq!(day_index(0), 0);
    assert_eq!(day_index(86_399), 0);
    assert_eq!(day_index(86_400), 1);
    // 2024-01-01T00:00:00Z.
    assert_eq!(day_index(1_704_067_200), 19_723);
    assert_eq!(until_next_day_us(1_704_067_200 * SEC), 86_400 * SEC);
    assert_eq!(until_next_day_us(1_704_067_200 * SEC - 1), 1);
}

#[test]
fn the_daily_budget_refuses_once_spent_until_the_day_turns() {
    let mut state = Daily::default();
    let mut admitted = 0;
    for _ in 0..5 {
        let d = check_daily(state, T0, 400, 1000);
        if d.allowed {
            admitted += 1;
            state = settle_daily(d.new_state, day_index(T0 / SEC), 400, 400);
        }
    }
    assert_eq!(admitted, 3, "400, 800, then 1200 ≥ 1000 refuses");
    assert_eq!(state.used, 1200);
    let refused = check_daily(state, T0, 0, 1000);
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    let tomorrow = T0 + refused.reset_after_us;
    let fresh = check_daily(state, tomorrow, 400, 1000);
    assert!(fresh.allowed);
    assert_eq!(fresh.remaining, 600);
    // A settlement of yesterday's reservation leaves today's count alone.
    let today = settle_daily(fresh.new_state, day_index(T0 / SEC), 400, 5000);
    assert_eq!(today, fresh.new_state);
}

#[test]
fn admission_is_all_or_nothing() {
    let limits = Limits {
        rpm: 10,
        tpm: 1000,
        daily_tokens: 0,
    };
    let (a, state) = admit(&State::default(), T0, &limits, 900);
    assert!(a.allowed);
    assert_eq!(a.requests.remaining, 9);
    assert_eq!(a.tokens.remaining, 100);
    assert_eq!(a.reservation.tokens, 900);
    let (b, after) = admit(&state, T0, &limits, 200);
    assert!(!b.allowed);
    assert_eq!(b.refused, Some(Refused::Tpm));
    assert_eq!(after, state, "the request bucket was not charged either");
    assert_eq!(b.requests.remaining, 9);
    assert_eq!(b.tokens.remaining, 100);
    assert_eq!(b.retry_after, std::time::Duration::from_secs(6));
    assert_eq!(b.reservation.tokens, 0);
}

#[test]
fn the_refusal_names_the_limit_with_the_longest_wait_and_daily_first() {
    let limits = Limits {
        rpm: 1,
        tpm: 1000,
        daily_tokens: 500,
    };
    let (_, state) = admit(&State::default(), T0, &limits, 600);
    let (b, _) = admit(&state, T0, &limits, 600);
    assert_eq!(b.refused, Some(Refused::Daily));
    assert_eq!(b.retry_after.as_micros() as u64, until_next_day_us(T0));
    assert_eq!(b.daily.remaining, 0);

    let limits = Limits {
        daily_tokens: 0,
        ..limits
    };
    let (_, state) = admit(&State::default(), T0, &limits, 100);
    // Requests wait 60 s, tokens (100 of 1000 used, 1000 wanted) 6 s.
    let (b, _) = admit(&state, T0, &limits, 1000);
    assert_eq!(b.refused, Some(Refused::Rpm));
    assert_eq!(b.retry_after.as_secs(), 60);
}

#[test]
fn settling_the_whole_state_moves_tokens_and_the_day_by_the_difference() {
    let limits = Limits {
        rpm: 0,
        tpm: 1000,
        daily_tokens: 10_000,
    };
    let (a, state) = admit(&State::default(), T0, &limits, 500);
    let settled = settle_state(&state, T0, &limits, &a.reservation, 200);
    assert_eq!(settled.daily.used, 200);
    assert_eq!(check(settled.tokens, T0, 0, 1000).remaining, 800);
    assert!(!settled.is_idle(T0));
}

proptest! {
    /// Over any window [t_a, t_b] between two admissions, the admitted cost fits a full bucket
    /// plus the refill over the window: Σ increment ≤ (t_b − t_a) + 60 s. With a limit that
    /// divides a minute that is `limit + limit·w/60 s` units.
    #[test]
    fn admitted_cost_never_exceeds_capacity_plus_refill(
        limit in 1u64..200,
        steps in prop::collection::vec((0u64..3 * SEC, 1u64..5), 1..300),
    ) {
        let mut state = Bucket::FULL;
        let mut now = T0;
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        for (gap, cost) in steps {
            now += gap;
            let d = check(state, now, cost, limit);
            if d.allowed {
                state = d.new_state;
                admitted.push((now, increment_us(cost.min(limit), limit)));
            }
        }
        for a in 0..admitted.len() {
            let mut spent = 0;
            for b in a..admitted.len() {
                spent += admitted[b].1;
                let window = admitted[b].0 - admitted[a].0;
                prop_assert!(spent <= window + WINDOW_US, "{spent} µs of cost in {window} µs");
            }
        }
    }

    /// Remaining grows with time, never by more than the refill since (plus one unit of
    /// rounding), and reaches the limit once the debt is repaid.
    #[test]
    fn refill_is_continuous_and_monotonic(
        limit in 1u64..100_000,
        debt in 0u64..2 * WINDOW_US,
        dt in prop::collection::vec(0u64..10 * SEC, 1..20),
    ) {
        let state = Bucket { tat_us: T0 + debt };
        let mut now = T0;
        let mut last = check(state, now, 0, limit).remaining;
        for step in dt {
            now += step;
            let r = check(state, now, 0, limit).remaining;
            prop_assert!(r >= last);
            let refill = u128::from(step) * u128::from(limit) / u128::from(WINDOW_US);
            prop_assert!(u128::from(r - last) <= refill + 1, "{last} → {r} in {step} µs");
            last = r;
        }
        prop_assert_eq!(check(state, T0 + debt, 0, limit).remaining, limit);
    }

    /// A settlement moves the debt by exactly increment(actual) − increment(reserved), clipped
    /// only at a full bucket: a reservation settled at once equals charging the real usage, and
    /// settling the estimate is a no-op.
    #[test]
    fn settle_never_loses_or_doubles_tokens(
        limit in 1u64..10_000_000,
        debt in 0u64..WINDOW_US,
        reserved in 0u64..20_000_000,
        actual in 0u64..20_000_000,
        later in 0u64..120 * SEC,
    ) {
        let start = Bucket { tat_us: T0 + debt };
        let reserved = reservation_for(reserved, limit);
        let held = Bucket { tat_us: T0 + debt + increment_us(reserved, limit) };
        // Settled at once: the same as charging `actual` directly.
        let at_once = settle(held, T0, reserved, actual, limit);
        let direct = apply_delta(start, T0, increment_us(actual, limit) as i64);
        prop_assert_eq!(at_once, direct);
        // Settled later: the debt then moves by the difference, never below zero.
        let now = T0 + later;
        let before = i128::from(held.debt_us(now));
        let after = i128::from(settle(held, now, reserved, actual, limit).debt_us(now));
        let delta = i128::from(settle_delta_us(reserved, actual, limit));
        prop_assert_eq!(after, (before + delta).max(0));
        prop_assert_eq!(settle(held, now, reserved, reserved, limit), held);
    }

    /// Many reservations settled in any order leave the sum of real usage (no clipping while
    /// the debt stays positive), for the bucket and for the day's count.
    #[test]
    fn settlements_add_up_in_any_order(
        requests in prop::collection::vec((1u64..500, 0u64..500), 1..20),
        order in any::<prop::sample::Index>(),
    ) {
        let limit = 1_000_000;
        let day = day_index(T0 / SEC);
        let mut bucket = Bucket::FULL;
        let mut daily = Daily::default();
        for (reserved, _) in &requests {
            let d = check(bucket, T0, *reserved, limit);
            prop_assert!(d.allowed);
            bucket = d.new_state;
            daily = check_daily(daily, T0, *reserved, u64::MAX).new_state;
        }
        let mut pending = requests.clone();
        pending.rotate_left(order.index(requests.len()));
        for (reserved, actual) in pending {
            bucket = settle(bucket, T0, reserved, actual, limit);
            daily = settle_daily(daily, day, reserved, actual);
        }
        let used: u64 = requests.iter().map(|r| r.1).sum();
        let charged: u64 = requests.iter().map(|r| increment_us(r.1, limit)).sum();
        prop_assert_eq!(bucket.debt_us(T0), charged);
        prop_assert_eq!(daily.used, used);
    }
}
