//! Cost of the response cache on the request path (`arkgate::cache`).
//!
//! `key/<size>`: for a chat-completion body of about 2 KiB and 32 KiB, `parse+key` parses the
//! JSON and computes the cache key (canonical JSON + SHA-256), `key` computes it from the
//! parsed body (what the proxy pays when it parses the body anyway), beside `sha256_raw`, a bare
//! SHA-256 of the same raw bytes: the floor any content key pays. `memory_hit` is one lookup
//! that hits in a memory cache of 10 000 entries. `path/2KiB` is what the proxy's cache stage
//! pays per request besides the upstream: `hit` parses the body, makes the key and finds the
//! entry; `miss` does the same for a key not stored, then stores the 2 KiB answer (what a miss
//! adds after the upstream answered). Every input is built before timing starts.

use std::hint::black_box;
use std::time::Duration;

use arkgate::cache::{cacheable, Body, Cache, CacheConfig, CacheKey, Lookup, Scope};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::{Digest, Sha256};

const PATH: &str = "/api/v3/chat/completions";

/// A chat-completion request of about `target` bytes: a system prompt and alternating turns.
fn chat_body(target: usize) -> Vec<u8> {
    let mut messages = vec![serde_json::json!({
        "role": "system",
        "content": "You are a careful assistant. Answer in JSON with the fields \"answer\" and \"sources\"."
    })];
    let mut i = 0;
    while serde_json::to_vec(&messages).map_or(0, |v| v.len()) < target {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(serde_json::json!({
            "role": role,
            "content": format!("Turn {i}: please summarise the quarterly figures for region {i} and list the three largest changes, with numbers like {}.", i as f64 * 1.5)
        }));
        i += 1;
    }
    serde_json::to_vec(&serde_json::json!({
        "model": "doubao-1-5-pro-32k-250115",
        "temperature": 0,
        "max_tokens": 512,
        "top_p": 1.0,
        "messages": messages,
    }))
    .expect("serialise")
}

fn key_bench(c: &mut Criterion) {
    let scope = Scope::for_credential(b"sk-bench-credential");
    for (name, size) in [("2KiB", 2 * 1024), ("32KiB", 32 * 1024)] {
        let raw = chat_body(size);
        let parsed: serde_json::Value = serde_json::from_slice(&raw).expect("parse");
        let mut group = c.benchmark_group(format!("key/{name}"));
        group.throughput(Throughput::Bytes(raw.len() as u64));
        group.bench_function("parse+key", |b| {
            b.iter(|| {
                let v: serde_json::Value = serde_json::from_slice(black_box(&raw)).expect("parse");
                let c = cacheable(PATH, &v).expect("cacheable");
                CacheKey::compute(PATH, &scope, b"downgrade", c.stream, &v)
            })
        });
        group.bench_function("key", |b| {
            b.iter(|| CacheKey::compute(PATH, &scope, b"downgrade", false, black_box(&parsed)))
        });
        group.bench_function("sha256_raw", |b| {
            b.iter(|| {
                let digest: [u8; 32] = Sha256::digest(black_box(&raw)).into();
                digest
            })
        });
        group.finish();
    }
}

fn memory_hit_bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let cache = Cache::memory(CacheConfig::default());
    let keys: Vec<CacheKey> = (0..10_000u32)
        .map(|n| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&n.to_le_bytes());
            CacheKey(k)
        })
        .collect();
    let answer = Bytes::from(vec![b'x'; 2048]);
    rt.block_on(async {
        for key in &keys {
            if let Lookup::Miss(fill) = cache.lookup(*key, "m").await {
                cache
                    .complete(
                        fill,
                        200,
                        &http::HeaderMap::new(),
                        Body::Whole(answer.clone()),
                    )
                    .await;
            }
        }
    });
    let hot = keys[4242];
    let mut group = c.benchmark_group("memory");
    group.bench_function("memory_hit", |b| {
        b.iter(|| {
            rt.block_on(async {
                match cache.lookup(black_box(hot), "m").await {
                    Lookup::Hit(e) => e,
                    Lookup::Miss(_) => panic!("the hot key is stored"),
                }
            })
        })
    });
    group.finish();
}

fn path_bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let cache = Cache::memory(CacheConfig::default());
    let scope = Scope::for_credential(b"sk-bench-credential");
    let raw = chat_body(2 * 1024);
    let answer = Body::Whole(Bytes::from(vec![b'x'; 2048]));
    let headers = http::HeaderMap::new();
    let key_of = |raw: &[u8], transform: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(raw).expect("parse");
        let c = cacheable(PATH, &v).expect("cacheable");
        (
            CacheKey::compute(PATH, &scope, transform, c.stream, &v),
            c.model,
        )
    };
    rt.block_on(async {
        let (key, model) = key_of(&raw, b"hot");
        if let Lookup::Miss(fill) = cache.lookup(key, &model).await {
            cache.complete(fill, 200, &headers, answer.clone()).await;
        }
    });
    let mut group = c.benchmark_group("path/2KiB");
    group.bench_function("hit", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (key, model) = key_of(black_box(&raw), b"hot");
                match cache.lookup(key, &model).await {
                    Lookup::Hit(e) => e,
                    Lookup::Miss(_) => panic!("the hot key is stored"),
                }
            })
        })
    });
    let mut n = 0u64;
    group.bench_function("miss", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(async {
                // A transform tag of its own per iteration: a key never stored before.
                let (key, model) = key_of(black_box(&raw), &n.to_le_bytes());
                match cache.lookup(key, &model).await {
                    Lookup::Miss(fill) => cache.complete(fill, 200, &headers, answer.clone()).await,
                    Lookup::Hit(_) => panic!("a fresh key is not stored"),
                }
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = key_bench, memory_hit_bench, path_bench
}
criterion_main!(benches);
