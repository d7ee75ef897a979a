//! The shared Redis client against a real `redis-server` on 127.0.0.1: commands, expiry,
//! scripts, prefix clearing, and what a hung, killed or restarted Redis does to callers (a
//! bounded error, never a hang or a panic, and service again once Redis is back).

mod common;

use std::time::{Duration, Instant};

use arkgate::store::{RedisConfig, RedisStore, StoreError};
use common::redis::RedisServer;

const TIMEOUT: Duration = Duration::from_millis(100);

fn store(server: &RedisServer, prefix: &str) -> RedisStore {
    let config = RedisConfig::new(&server.url(), prefix, TIMEOUT).expect("valid config");
    RedisStore::new(&config).expect("store")
}

/// Retries `get` until Redis answers again, or panics after `limit`.
async fn wait_until_answering(store: &RedisStore, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if store.get("probe").await.is_ok() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "Redis did not answer again within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn get_set_and_del_use_the_prefix() {
    let server = RedisServer::start();
    let a = store(&server, "a:");
    let b = store(&server, "b:");
    assert_eq!(a.get("k").await, Ok(None));
    a.set_ex("k", b"value", Duration::from_secs(60))
        .await
        .expect("set");
    assert_eq!(a.get("k").await, Ok(Some(b"value".to_vec())));
    assert_eq!(b.get("k").await, Ok(None), "another prefix sees nothing");
    let raw: Option<Vec<u8>> = a
        .query(redis::cmd("GET").arg("a:k"))
        .await
        .expect("raw get");
    assert_eq!(raw, Some(b"value".to_vec()));
    assert_eq!(a.del(&["k", "missing"]).await, Ok(1));
    assert_eq!(a.get("k").await, Ok(None));
}

#[tokio::test]
async fn entries_expire_by_redis_ttl() {
    let server = RedisServer::start();
    let s = store(&server, "t:");
    s.set_ex("short", b"x", Duration::from_millis(150))
        .await
        .expect("set");
    let pttl: i64 = s
        .query(redis::cmd("PTTL").arg(s.key("short")))
        .await
        .expect("pttl");
    assert!(pttl > 0 && pttl <= 150, "PTTL {pttl}");
    assert_eq!(s.get("short").await, Ok(Some(b"x".to_vec())));
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.get("short").await != Ok(None) {
        assert!(Instant::now() < deadline, "key never expired");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn scripts_run_with_prefixed_keys() {
    let server = RedisServer::start();
    let s = store(&server, "lua:");
    let script = redis::Script::new(
        "local n = redis.call('INCRBY', KEYS[1], ARGV[1]); redis.call('PEXPIRE', KEYS[1], ARGV[2]); return n",
    );
    let key = s.key("counter");
    for expected in [5i64, 10, 15] {
        let n: i64 = s
            .eval(script.key(&key).arg(5).arg(10_000))
            .await
            .expect("eval");
        assert_eq!(n, expected);
    }
    assert_eq!(s.get("counter").await, Ok(Some(b"15".to_vec())));
}

#[tokio::test]
async fn scan_delete_removes_only_its_prefix() {
    let server = RedisServer::start();
    let s = store(&server, "app:");
    let other = store(&server, "other:");
    for i in 0..1200 {
        s.set_ex(&format!("cache:{i}"), b"v", Duration::from_secs(60))
            .await
            .expect("set");
    }
    s.set_ex("limits:x", b"v", Duration::from_secs(60))
        .await
        .expect("set");
    other
        .set_ex("cache:1", b"v", Duration::from_secs(60))
        .await
        .expect("set");
    // A prefix with glob characters matches itself only.
    s.set_ex("ca*:1", b"v", Duration::from_secs(60))
        .await
        .expect("set");

    assert_eq!(s.scan_delete("cache:").await, Ok(1200));
    assert_eq!(s.get("cache:7").await, Ok(None));
    assert_eq!(s.get("limits:x").await, Ok(Some(b"v".to_vec())));
    assert_eq!(other.get("cache:1").await, Ok(Some(b"v".to_vec())));
    assert_eq!(s.get("ca*:1").await, Ok(Some(b"v".to_vec())));
    assert_eq!(s.scan_delete("ca*").await, Ok(1));
}

#[tokio::test]
async fn a_hung_redis_times_out_then_serves_again() {
    let server = RedisServer::start();
    let s = store(&server, "h:");
    s.set_ex("k", b"v", Duration::from_secs(60))
        .await
        .expect("set");

    server.freeze();
    let start = Instant::now();
    let err = s.get("k").await.expect_err("frozen Redis");
    let took = start.elapsed();
    assert_eq!(err, StoreError::Timeout);
    assert!(
        took >= TIMEOUT && took < TIMEOUT * 5,
        "took {took:?}, timeout {TIMEOUT:?}"
    );
    // After a few timeouts the store stops waiting at all.
    let mut last = err;
    for _ in 0..3 {
        last = s.get("k").await.expect_err("still frozen");
    }
    assert_eq!(last, StoreError::Skipped);
    let start = Instant::now();
    assert_eq!(s.get("k").await, Err(StoreError::Skipped));
    assert!(start.elapsed() < TIMEOUT, "a skip does not wait");
    assert!(s.errors() >= 5);

    server.thaw();
    wait_until_answering(&s, Duration::from_secs(5)).await;
    assert_eq!(s.get("k").await, Ok(Some(b"v".to_vec())));
}

#[tokio::test]
async fn the_store_reconnects_after_redis_is_killed_and_restarted() {
    let mut server = RedisServer::start();
    let s = store(&server, "r:");
    s.set_ex("k", b"before", Duration::from_secs(60))
        .await
        .expect("set");

    server.kill();
    for _ in 0..5 {
        let err = s.get("k").await.expect_err("Redis is gone");
        assert!(
            matches!(
                err,
                StoreError::Unavailable(_) | StoreError::Timeout | StoreError::Skipped
            ),
            "{err:?}"
        );
    }

    server.restart();
    assert!(server.answers_ping());
    wait_until_answering(&s, Duration::from_secs(10)).await;
    // A fresh, empty Redis: the old value is gone, new writes work.
    assert_eq!(s.get("k").await, Ok(None));
    s.set_ex("k", b"after", Duration::from_secs(60))
        .await
        .expect("set after restart");
    assert_eq!(s.get("k").await, Ok(Some(b"after".to_vec())));
}

#[tokio::test]
async fn a_store_made_while_redis_is_down_connects_once_it_is_up() {
    let mut server = RedisServer::start();
    server.kill();
    let s = store(&server, "late:");
    assert!(s.get("k").await.is_err());
    server.restart();
    wait_until_answering(&s, Duration::from_secs(10)).await;
    s.set_ex("k", b"v", Duration::from_secs(5))
        .await
        .expect("set");
    assert_eq!(s.get("k").await, Ok(Some(b"v".to_vec())));
}
