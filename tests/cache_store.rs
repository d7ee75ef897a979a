//! The response cache on a real Redis shared by two `Cache` instances (a fleet of two arkgates):
//! what one stores the other serves, entries expire by Redis TTL, a clear from either side
//! reaches both, and a dead, hung or restarted Redis costs a bounded wait and a counted error,
//! never a failed request, with caching back once Redis is.

mod common;

use std::time::{Duration, Instant};

use arkgate::cache::{Body, Cache, CacheConfig, CacheKey, Lookup};
use arkgate::store::{RedisConfig, RedisStore};
use bytes::Bytes;
use common::redis::RedisServer;
use http::HeaderMap;

const TIMEOUT: Duration = Duration::from_millis(100);

fn instance(server: &RedisServer, ttl: Duration) -> Cache {
    let config = RedisConfig::new(&server.url(), "fleet:", TIMEOUT).expect("config");
    let store = RedisStore::new(&config).expect("store");
    Cache::redis(
        CacheConfig {
            ttl,
            ..CacheConfig::default()
        },
        store,
    )
}

fn key(n: u8) -> CacheKey {
    CacheKey([n; 32])
}

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    h
}

/// Looks `key` up and, on a miss, stores `body` for it; returns whether it was a hit.
async fn fetch(cache: &Cache, key: CacheKey, model: &str, body: &'static [u8]) -> bool {
    match cache.lookup(key, model).await {
        Lookup::Hit(entry) => {
            assert_eq!(entry.key, key);
            true
        }
        Lookup::Miss(fill) => {
            cache
                .complete(fill, 200, &headers(), Body::Whole(Bytes::from_static(body)))
                .await;
            false
        }
    }
}

async fn is_hit(cache: &Cache, key: CacheKey, model: &str) -> bool {
    matches!(cache.lookup(key, model).await, Lookup::Hit(_))
}

#[tokio::test]
async fn one_instance_serves_what_the_other_stored() {
    let server = RedisServer::start();
    let a = instance(&server, Duration::from_secs(60));
    let b = instance(&server, Duration::from_secs(60));
    assert!(!fetch(&a, key(1), "m", b"{\"answer\":1}").await);
    assert_eq!(a.stats().stores, 1);
    let Lookup::Hit(entry) = b.lookup(key(1), "m").await else {
        panic!("b must see a's entry")
    };
    assert_eq!(
        entry.body,
        Body::Whole(Bytes::from_static(b"{\"answer\":1}"))
    );
    assert_eq!(entry.model, "m");
    assert_eq!(
        entry.headers[0].1,
        http::HeaderValue::from_static("application/json")
    );
    assert!(!is_hit(&b, key(1), "other-model").await, "model is checked");
    let s = b.stats();
    assert_eq!((s.entries, s.hits, s.errors), (None, 1, 0));

    let streamed = Body::Events(vec![
        Bytes::from_static(b"data: {\"x\":1}\n\n"),
        Bytes::from_static(b"data: [DONE]\n\n"),
    ]);
    let Lookup::Miss(fill) = b.lookup(key(2), "m").await else {
        panic!("empty")
    };
    assert!(b.complete(fill, 200, &headers(), streamed.clone()).await);
    let Lookup::Hit(entry) = a.lookup(key(2), "m").await else {
        panic!("a must see b's stream")
    };
    assert_eq!(entry.body, streamed);
}

#[tokio::test]
async fn entries_expire_by_redis_ttl() {
    let server = RedisServer::start();
    let a = instance(&server, Duration::from_millis(200));
    let b = instance(&server, Duration::from_millis(200));
    fetch(&a, key(1), "m", b"x").await;
    assert!(is_hit(&b, key(1), "m").await);
    let deadline = Instant::now() + Duration::from_secs(3);
    while is_hit(&b, key(1), "m").await {
        assert!(Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn clears_from_one_instance_reach_the_fleet() {
    let server = RedisServer::start();
    let a = instance(&server, Duration::from_secs(60));
    let b = instance(&server, Duration::from_secs(60));
    fetch(&a, key(1), "alpha", b"1").await;
    fetch(&a, key(2), "alpha", b"2").await;
    fetch(&a, key(3), "beta", b"3").await;

    b.clear_model("alpha").await.expect("clear_model");
    assert!(!is_hit(&a, key(1), "alpha").await);
    assert!(!is_hit(&a, key(2), "alpha").await);
    assert!(is_hit(&a, key(3), "beta").await);
    // The cleared model caches again.
    fetch(&a, key(1), "alpha", b"1 again").await;
    assert!(is_hit(&b, key(1), "alpha").await);

    // Another deployment's keys on the same Redis survive a clear.
    let other =
        RedisStore::new(&RedisConfig::new(&server.url(), "elsewhere:", TIMEOUT).expect("config"))
            .expect("store");
    other
        .set_ex("cache:e:x", b"keep", Duration::from_secs(60))
        .await
        .expect("set");

    a.clear().await.expect("clear");
    assert!(!is_hit(&b, key(1), "alpha").await);
    assert!(!is_hit(&b, key(3), "beta").await);
    assert_eq!(other.get("cache:e:x").await, Ok(Some(b"keep".to_vec())));
}

#[tokio::test]
async fn a_dead_redis_is_skipped_and_counted_and_caching_resumes() {
    let mut server = RedisServer::start();
    let cache = instance(&server, Duration::from_secs(60));
    fetch(&cache, key(1), "m", b"before").await;
    assert!(is_hit(&cache, key(1), "m").await);

    server.kill();
    for _ in 0..10 {
        let start = Instant::now();
        // Every request still gets an answer: a miss it fills from the upstream.
        let Lookup::Miss(fill) = cache.lookup(key(1), "m").await else {
            panic!("Redis is gone")
        };
        assert!(
            start.elapsed() < TIMEOUT * 3,
            "lookup took {:?}",
            start.elapsed()
        );
        assert!(
            !cache
                .complete(fill, 200, &headers(), Body::Whole(Bytes::from_static(b"x")))
                .await
        );
    }
    let errors = cache.stats().errors;
    assert!(errors >= 20, "{errors} errors counted");
    assert!(cache.clear().await.is_err());

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        fetch(&cache, key(5), "m", b"after").await;
        if is_hit(&cache, key(5), "m").await {
            break;
        }
        assert!(Instant::now() < deadline, "caching did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cache.stats().stores >= 2);
}

#[tokio::test]
async fn a_hung_redis_costs_at_most_the_timeout() {
    let server = RedisServer::start();
    let cache = instance(&server, Duration::from_secs(60));
    fetch(&cache, key(1), "m", b"x").await;
    server.freeze();
    let start = Instant::now();
    assert!(matches!(cache.lookup(key(1), "m").await, Lookup::Miss(_)));
    let took = start.elapsed();
    assert!(took >= TIMEOUT && took < TIMEOUT * 5, "took {took:?}");
    assert_eq!(cache.stats().errors, 1);
    server.thaw();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_hit(&cache, key(1), "m").await {
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
