//! Cost of one metric update on the request path (`arkgate::metrics`), beside baselines.
//!
//! `atomic_fetch_add` is the floor (a bare relaxed `AtomicU64::fetch_add`); `counter_inc` is
//! [`Counter::inc`]; `countervec_with_inc/series=N` looks up an existing 2-label set in a family
//! holding N series, then increments it; `handle_inc` increments a series resolved once ahead;
//! `histogram_observe` is one [`Histogram::observe`]. Two naive families show what the design
//! avoids: `naive_linear_scan/series=N` (an `RwLock<Vec>` of owned labels scanned in order) and
//! `naive_string_key_map` (a `HashMap` keyed by owned `String`s, built per update). All single
//! threaded: contention is not measured here.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;
use std::time::Duration;

use arkgate::metrics::{Counter, CounterVec, Histogram};
use criterion::{criterion_group, criterion_main, Criterion};

const SERIES_COUNTS: [usize; 3] = [2, 16, 400];

static SMALL: CounterVec<2> = CounterVec::new("b_small_total", "h", ["model", "type"]);
static MEDIUM: CounterVec<2> = CounterVec::new("b_medium_total", "h", ["model", "type"]);
static LARGE: CounterVec<2> = CounterVec::new("b_large_total", "h", ["model", "type"]);

/// Fills `family` with `n` series, the measured one (`deepseek-v3`, `prompt`) among them.
fn fill(family: &CounterVec<2>, n: usize) {
    family.with(["deepseek-v3", "prompt"]);
    for i in 1..n {
        family.with([&format!("model-{i}"), "completion"]);
    }
    assert_eq!(family.len(), n);
}

type NaiveVec = RwLock<Vec<([String; 2], AtomicU64)>>;

fn naive_vec(n: usize) -> NaiveVec {
    let mut v = Vec::with_capacity(n);
    for i in 1..n {
        v.push((
            [format!("model-{i}"), "completion".into()],
            AtomicU64::new(0),
        ));
    }
    // Last, so the scan is the worst case for this size.
    v.push((["deepseek-v3".into(), "prompt".into()], AtomicU64::new(0)));
    RwLock::new(v)
}

fn naive_vec_inc(v: &NaiveVec, labels: [&str; 2]) {
    let guard = v.read().expect("not poisoned");
    if let Some((_, c)) = guard
        .iter()
        .find(|(l, _)| l[0] == labels[0] && l[1] == labels[1])
    {
        c.fetch_add(1, Relaxed);
    }
}

fn bench_values(c: &mut Criterion) {
    let mut g = c.benchmark_group("update");
    let atomic = AtomicU64::new(0);
    g.bench_function("atomic_fetch_add", |b| {
        b.iter(|| black_box(&atomic).fetch_add(1, Relaxed))
    });
    let counter = Counter::new();
    g.bench_function("counter_inc", |b| b.iter(|| black_box(&counter).inc()));
    let histogram = Histogram::new();
    let d = Duration::from_micros(1_700);
    g.bench_function("histogram_observe", |b| {
        b.iter(|| black_box(&histogram).observe(black_box(d)))
    });
    fill(&SMALL, SERIES_COUNTS[0]);
    let handle = SMALL.with(["deepseek-v3", "prompt"]);
    g.bench_function("handle_inc", |b| b.iter(|| black_box(handle).inc()));
    g.finish();
}

fn bench_lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_and_inc");
    fill(&MEDIUM, SERIES_COUNTS[1]);
    fill(&LARGE, SERIES_COUNTS[2]);
    let families = [&SMALL, &MEDIUM, &LARGE];
    for (family, n) in families.into_iter().zip(SERIES_COUNTS) {
        let model = String::from("deepseek-v3");
        g.bench_function(format!("countervec_with_inc/series={n}"), |b| {
            b.iter(|| family.with([black_box(&model), black_box("prompt")]).inc())
        });
        let naive = naive_vec(n);
        g.bench_function(format!("naive_linear_scan/series={n}"), |b| {
            b.iter(|| naive_vec_inc(&naive, [black_box(&model), black_box("prompt")]))
        });
    }
    let map: RwLock<HashMap<(String, String), AtomicU64>> = RwLock::new(HashMap::from([(
        ("deepseek-v3".to_string(), "prompt".to_string()),
        AtomicU64::new(0),
    )]));
    g.bench_function("naive_string_key_map", |b| {
        b.iter(|| {
            let key = (
                black_box("deepseek-v3").to_string(),
                black_box("prompt").to_string(),
            );
            if let Some(c) = map.read().expect("not poisoned").get(&key) {
                c.fetch_add(1, Relaxed);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench_values, bench_lookups);
criterion_main!(benches);
