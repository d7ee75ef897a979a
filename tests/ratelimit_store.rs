//! The Redis-backed rate limiter against a real `redis-server` on 127.0.0.1: two limiters on two
//! separate `RedisStore`s stand for two arkgate instances sharing one Redis. They must admit
//! exactly the limit between them, settle tokens from usage, count a daily budget, let idle keys
//! expire, agree with the memory store, and fail fast (then recover by themselves) when Redis is
//! killed, restarted or frozen.

mod common;

use std::time::{Duration, Instant};

use arkgate::ratelimit::{
    headers, Limiter, Limits, MemoryStore, RedisLimiter, Refused, StoreError,
};
use arkgate::store::{RedisConfig, RedisStore};
use common::redis::RedisServer;

/// Generous for the concurrency tests: a 2-core machine under load must not turn a slow
/// reply into a refusal.
const SLOW_OK: Duration = Duration::from_millis(1000);
/// Short, for the failure tests.
const TIMEOUT: Duration = Duration::from_millis(100);
/// What a failure may take beyond the timeout (scheduling on a loaded machine).
const SLACK: Duration = Duration::from_millis(150);

fn limiter(server: &RedisServer, timeout: Duration) -> RedisLimiter {
    let config = RedisConfig::new(&server.url(), "test:", timeout).expect("valid config");
    RedisLimiter::new(RedisStore::new(&config).expect("store"))
}

fn limits(rpm: u64, tpm: u64, daily_tokens: u64) -> Limits {
    Limits {
        rpm,
        tpm,
        daily_tokens,
    }
}

/// Admits until Redis answers again, or panics after `limit`.
async fn wait_until_admitting(l: &RedisLimiter, who: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        match l.admit(who, &limits(1000, 0, 0), 0).await {
            Ok(a) if a.allowed => return,
            Ok(a) => panic!("refused after recovery: {a:?}"),
            Err(_) => {}
        }
        assert!(start.elapsed() < limit, "no admission within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_admit_exactly_the_limit() {
    let server = RedisServer::start();
    let a = limiter(&server, SLOW_OK);
    let b = limiter(&server, SLOW_OK);
    let rpm10 = limits(10, 0, 0);
    let mut tasks = Vec::new();
    for i in 0..30 {
        let l = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            l.admit("key:shared", &rpm10, 0).await
        }));
    }
    let mut remaining = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let admission = t.await.expect("task").expect("Redis answers");
        if admission.allowed {
            remaining.push(admission.requests.remaining);
        } else {
            refused += 1;
            assert_eq!(admission.refused, Some(Refused::Rpm));
            assert!(admission.retry_after > Duration::ZERO);
            assert!(admission.retry_after <= Duration::from_secs(6));
            let h = headers(&admission);
            assert!(h
                .iter()
                .any(|(n, v)| *n == "retry-after" && v.parse::<u64>().is_ok()));
        }
    }
    assert_eq!(remaining.len(), 10, "exactly the limit is admitted");
    assert_eq!(refused, 20);
    // One script at a time: each admission saw the one before it.
    remaining.sort_unstable();
    assert_eq!(remaining, (0..10).collect::<Vec<u64>>());
}

#[tokio::test]
async fn tokens_are_reserved_then_settled_from_usage_across_instances() {
    let server = RedisServer::start();
    let a = limiter(&server, SLOW_OK);
    let b = limiter(&server, SLOW_OK);
    let tpm = limits(0, 1000, 0);

    let first = a.admit("key:t", &tpm, 600).await.expect("admit");
    assert!(first.allowed);
    assert_eq!(first.tokens.remaining, 400);
    assert_eq!(first.reservation.tokens, 600);
    let too_big = b.admit("key:t", &tpm, 500).await.expect("admit");
    assert_eq!(too_big.refused, Some(Refused::Tpm));

    // The first request used only 100 tokens: 500 come back, for the other instance too.
    a.settle("key:t", &tpm, &first.reservation, 100)
        .await
        .expect("settle");
    let second = b.admit("key:t", &tpm, 500).await.expect("admit");
    assert!(second.allowed, "{second:?}");
    // 1000 − 100 − 500, plus at most a few tokens refilled meanwhile.
    assert!((400..=410).contains(&second.tokens.remaining), "{second:?}");

    // The second used 1500: a debt past the minute, so even a request reserving nothing waits.
    b.settle("key:t", &tpm, &second.reservation, 1500)
        .await
        .expect("settle");
    let owed = a.admit("key:t", &tpm, 0).await.expect("admit");
    assert_eq!(owed.refused, Some(Refused::Tpm));
    assert_eq!(owed.tokens.remaining, 0);
    // Debt 1600 tokens = 96 s; admitted again once it is back under 60 s, in about 36 s.
    let wait = owed.retry_after.as_secs_f64();
    assert!((35.0..=36.1).contains(&wait), "retry after {wait} s");
}

#[tokio::test]
async fn the_daily_budget_counts_settled_usage_until_midnight() {
    let server = RedisServer::start();
    let a = limiter(&server, SLOW_OK);
    let b = limiter(&server, SLOW_OK);
    let daily = limits(0, 0, 1000);

    let one = a.admit("key:d", &daily, 100).await.expect("admit");
    assert!(one.allowed);
    assert_eq!(one.daily.remaining, 900);
    a.settle("key:d", &daily, &one.reservation, 600)
        .await
        .expect("settle");
    let two = b.admit("key:d", &daily, 100).await.expect("admit");
    assert!(two.allowed);
    assert_eq!(two.daily.remaining, 300);
    b.settle("key:d", &daily, &two.reservation, 500)
        .await
        .expect("settle");

    let over = a.admit("key:d", &daily, 1).await.expect("admit");
    assert_eq!(over.refused, Some(Refused::Daily));
    assert_eq!(over.refused.map(Refused::code), Some("insufficient_quota"));
    assert_eq!(over.daily.remaining, 0);
    assert!(over.retry_after > Duration::ZERO && over.retry_after <= Duration::from_secs(86_400));
    assert_eq!(over.retry_after, over.daily.reset_after);

    // The day's hash expires a minute after midnight, whichever instance wrote it.
    let store = a.store();
    let key = a.keys("key:d")[2].clone();
    let pttl: i64 = store
        .query(redis::cmd("PTTL").arg(&key))
        .await
        .expect("pttl");
    let until_midnight = over.daily.reset_after.as_millis() as i64;
    assert!(
        pttl > until_midnight && pttl <= until_midnight + 61_000,
        "PTTL {pttl} ms, midnight in {until_midnight} ms"
    );
    let used: Option<String> = store
        .query(redis::cmd("HGET").arg(&key).arg("used"))
        .await
        .expect("hget");
    assert_eq!(used.as_deref(), Some("1100"));
}

#[tokio::test]
async fn idle_buckets_expire_once_full() {
    let server = RedisServer::start();
    let l = limiter(&server, SLOW_OK);
    // 600 rpm: one request refills in 100 ms.
    let admission = l
        .admit("ip:127.0.0.1", &limits(600, 0, 0), 0)
        .await
        .expect("admit");
    assert!(admission.allowed);
    let key = l.keys("ip:127.0.0.1")[0].clone();
    let pttl: i64 = l
        .store()
        .query(redis::cmd("PTTL").arg(&key))
        .await
        .expect("pttl");
    // PXAT is the TAT rounded up to a millisecond, PTTL counted from a whole millisecond.
    assert!(pttl > 0 && pttl <= 101, "PTTL {pttl}");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let exists: i64 = l
            .store()
            .query(redis::cmd("EXISTS").arg(&key))
            .await
            .expect("exists");
        if exists == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "bucket key never expired");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Unlimited callers and empty reservations write nothing at all.
    l.admit("ip:other", &limits(0, 100, 100), 0)
        .await
        .expect("admit");
    let keys: Vec<String> = l
        .store()
        .query(redis::cmd("KEYS").arg("test:rl:ip:other*"))
        .await
        .expect("keys");
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn redis_and_memory_stores_decide_alike() {
    let server = RedisServer::start();
    let redis = Limiter::Redis(limiter(&server, SLOW_OK));
    let memory = Limiter::Memory(MemoryStore::new());
    let l = limits(4, 1000, 1500);
    // Estimates chosen so that no decision is within a second's refill of its limit.
    let plan = [
        (300, 300),
        (300, 100),
        (300, 350),
        (50, 50),
        (300, 300),
        (200, 200),
        (10, 10),
    ];
    let mut seen = Vec::new();
    for limiter in [&redis, &memory] {
        let mut outcomes = Vec::new();
        for (estimate, actual) in plan {
            let a = limiter
                .admit("key:same", &l, estimate)
                .await
                .expect("admit");
            if a.allowed {
                limiter
                    .settle("key:same", &l, &a.reservation, actual)
                    .await
                    .expect("settle");
            }
            outcomes.push((
                a.allowed,
                a.refused,
                a.requests.remaining,
                a.daily.remaining,
            ));
        }
        seen.push(outcomes);
    }
    assert_eq!(seen[0], seen[1]);
    assert!(
        seen[0].iter().any(|o| !o.0),
        "the plan reaches a limit: {:?}",
        seen[0]
    );
}

#[tokio::test]
async fn a_killed_redis_fails_fast_and_a_restarted_one_admits_again() {
    let mut server = RedisServer::start();
    let l = limiter(&server, TIMEOUT);
    let rpm = limits(1000, 0, 0);
    assert!(l.admit("key:k", &rpm, 0).await.expect("admit").allowed);
    let errors_before = l.store().errors();

    server.kill();
    for _ in 0..4 {
        let start = Instant::now();
        let err = l.admit("key:k", &rpm, 0).await.expect_err("Redis is gone");
        assert!(
            matches!(
                err,
                StoreError::Unavailable(_) | StoreError::Timeout | StoreError::Skipped
            ),
            "{err:?}"
        );
        assert!(
            start.elapsed() <= TIMEOUT + SLACK,
            "took {:?}",
            start.elapsed()
        );
        let err = l
            .settle("key:k", &limits(0, 1000, 0), &Default::default(), 10)
            .await
            .expect_err("settlement fails the same way");
        assert!(!matches!(err, StoreError::Reply(_)), "{err:?}");
    }
    assert!(
        l.store().errors() >= errors_before + 8,
        "failures are counted"
    );

    server.restart();
    // The same limiter, not rebuilt: the shared client reconnects by itself.
    wait_until_admitting(&l, "key:k", Duration::from_secs(10)).await;
    assert!(l.admit("key:k", &rpm, 0).await.expect("admit").allowed);
}

#[tokio::test]
async fn a_frozen_redis_times_out_within_the_timeout() {
    let server = RedisServer::start();
    let l = limiter(&server, TIMEOUT);
    let rpm = limits(1000, 0, 0);
    assert!(l.admit("key:f", &rpm, 0).await.expect("admit").allowed);

    server.freeze();
    let start = Instant::now();
    let err = l.admit("key:f", &rpm, 0).await.expect_err("frozen Redis");
    let took = start.elapsed();
    assert_eq!(err, StoreError::Timeout);
    assert!(took >= TIMEOUT && took <= TIMEOUT + SLACK, "took {took:?}");

    server.thaw();
    wait_until_admitting(&l, "key:f", Duration::from_secs(5)).await;
}
