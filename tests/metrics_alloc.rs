//! The metrics hot path does not allocate: counted by a global allocator that records every
//! allocation in this test binary. One test only, so nothing else allocates while it counts.

use std::alloc::System;
use std::time::Duration;

use arkgate::metrics::{CounterVec, HistogramVec, METRICS};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

static TOKENS: CounterVec<2> = CounterVec::new("t_tokens_total", "h", ["model", "type"]);
static LATENCY: HistogramVec<1> = HistogramVec::new("t_latency_seconds", "h", ["endpoint"]);

#[test]
fn updating_a_known_label_set_allocates_nothing_and_a_new_one_allocates_once() {
    // First sight of each set (and the hasher's seed) may allocate.
    TOKENS.with(["deepseek-v3", "prompt"]).inc();
    LATENCY.with(["primary"]).observe(Duration::from_millis(1));
    METRICS.count_status(200);
    METRICS.observe_request(200, Duration::from_millis(1));
    let model = String::from("deepseek-v3");

    let region = Region::new(GLOBAL);
    for i in 0..1_000u64 {
        TOKENS.with([&model, "prompt"]).add(i);
        LATENCY.with(["primary"]).observe(Duration::from_micros(i));
        METRICS.count_status(200);
        METRICS.retries.inc();
        METRICS.observe_request(200, Duration::from_micros(i));
    }
    let steady = region.change();
    assert_eq!(steady.allocations, 0, "{steady:?}");
    assert_eq!(steady.reallocations, 0, "{steady:?}");

    let region = Region::new(GLOBAL);
    for _ in 0..100 {
        TOKENS.with(["another-model", "completion"]).inc();
    }
    let new_set = region.change();
    assert!(new_set.allocations > 0, "{new_set:?}");
    assert!(
        new_set.allocations <= 8,
        "allocated per update: {new_set:?}"
    );
    assert_eq!(TOKENS.with(["another-model", "completion"]).get(), 100);
}
