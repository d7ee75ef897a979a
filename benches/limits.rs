//! Cost of the per-request limit checks: the pure GCRA check (`gcra/check`), a full admission
//! in the memory store (`memory/admit`, one caller and 10 000 callers), a client key lookup over
//! 100 keys (`keys/lookup_100`: SHA-256 plus a constant-time compare against every entry) beside
//! a bare SHA-256 of the same token (`keys/sha256_only`, the floor of any hashed lookup), and
//! one limit check as the proxy makes it, with the memory store and with a real Redis started
//! for the run (`limit_check/memory`, `limit_check/redis`). Every input is built before timing
//! starts.

use std::hint::black_box;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arkgate::clients::{hash_key, KeyEntry, KeyTable};
use arkgate::ratelimit::gcra::{self, Bucket};
use arkgate::ratelimit::{Limiter, Limits, MemoryStore, RedisLimiter};
use arkgate::store::{RedisConfig, RedisStore};
use criterion::{criterion_group, criterion_main, Criterion};
use sha2::{Digest, Sha256};

const T0: u64 = 1_750_000_000 * 1_000_000;
/// A limit no benchmark loop reaches, so every check admits.
const HIGH: Limits = Limits {
    rpm: 1_000_000_000,
    tpm: 1_000_000_000_000,
    daily_tokens: 0,
};

fn bench_gcra(c: &mut Criterion) {
    let mut group = c.benchmark_group("gcra");
    let state = Bucket { tat_us: T0 + 1234 };
    group.bench_function("check", |b| {
        b.iter(|| {
            gcra::check(
                black_box(state),
                black_box(T0),
                black_box(1),
                black_box(600),
            )
        })
    });
    let full = gcra::State::default();
    group.bench_function("admit_all_three", |b| {
        let limits = Limits {
            rpm: 600,
            tpm: 100_000,
            daily_tokens: 1_000_000,
        };
        b.iter(|| gcra::admit(black_box(&full), black_box(T0), &limits, black_box(500)))
    });
    group.finish();
}

fn bench_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory");
    let store = MemoryStore::new();
    group.bench_function("admit/one_caller", |b| {
        b.iter(|| store.admit(black_box("key:bench"), &HIGH, black_box(500)))
    });
    let many = MemoryStore::new();
    let callers: Vec<String> = (0..10_000)
        .map(|i| format!("ip:10.0.{}.{}", i / 256, i % 256))
        .collect();
    for who in &callers {
        many.admit(who, &HIGH, 1);
    }
    let mut i = 0;
    group.bench_function("admit/10k_callers", |b| {
        b.iter(|| {
            i = (i + 1) % callers.len();
            many.admit(black_box(&callers[i]), &HIGH, black_box(500))
        })
    });
    group.finish();
}

fn bench_keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("keys");
    let entries: Vec<KeyEntry> = (0..100)
        .map(|i| KeyEntry {
            name: format!("client-{i}"),
            key_sha256: hash_key(&format!("ak-bench-key-{i:040}")),
            rpm: 60,
            tpm: 0,
            daily_tokens: 0,
        })
        .collect();
    let table = KeyTable::new(entries).expect("valid bench keys");
    let hit = format!("ak-bench-key-{:040}", 57);
    let miss = format!("ak-bench-key-{:040}", 1000);
    group.bench_function("lookup_100/hit", |b| {
        b.iter(|| table.lookup(black_box(hit.as_bytes())).is_some())
    });
    group.bench_function("lookup_100/miss", |b| {
        b.iter(|| table.lookup(black_box(miss.as_bytes())).is_some())
    });
    group.bench_function("sha256_only", |b| {
        b.iter(|| Sha256::digest(black_box(hit.as_bytes())))
    });
    group.finish();
}

/// A throwaway redis-server on a free loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One limit check as the proxy's stage makes it (`Limiter::admit`, through the enum), with the
/// memory store and with a real Redis side by side in one group: `limit_check/memory`,
/// `limit_check/redis`. The redis-server is started here on a free port and stopped at the end.
fn bench_limit_check(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("limit_check");
    let memory = Limiter::Memory(MemoryStore::new());
    group.bench_function("memory", |b| {
        b.iter(|| runtime.block_on(memory.admit(black_box("key:bench"), &HIGH, black_box(500))))
    });
    let Some(server) = Server::start() else {
        eprintln!("redis-server could not be started: limit_check/redis skipped");
        group.finish();
        return;
    };
    let url = format!("redis://127.0.0.1:{}/0", server.port);
    let config = RedisConfig::new(&url, "bench:", Duration::from_millis(500)).expect("config");
    let redis = Limiter::Redis(RedisLimiter::new(RedisStore::new(&config).expect("store")));
    if runtime
        .block_on(redis.admit("key:bench", &HIGH, 500))
        .is_err()
    {
        eprintln!("Redis did not answer: limit_check/redis skipped");
        group.finish();
        return;
    }
    group.bench_function("redis", |b| {
        b.iter(|| runtime.block_on(redis.admit(black_box("key:bench"), &HIGH, black_box(500))))
    });
    group.finish();
    drop(server);
}

criterion_group!(
    benches,
    bench_gcra,
    bench_memory,
    bench_keys,
    bench_limit_check
);
criterion_main!(benches);
