//! The values a series holds: [`Counter`], [`Gauge`] and [`Histogram`].
//!
//! Each is a few relaxed atomics and `const`-constructible, so it can sit in a static; updating one
//! is one or two atomic adds, never a lock or an allocation. [`Metric`] is what a family needs of
//! them: a zero value for a new series and the Prometheus sample lines for a scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Histogram bucket upper bounds in nanoseconds: 50 µs … 120 s, so one list resolves both the
/// proxy's sub-millisecond overhead and a long generation. Observations above the last bound
/// count only in `+Inf`.
pub const BUCKET_BOUNDS_NS: [u64; 20] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    120_000_000_000,
];

const NS_PER_S: f64 = 1e9;

/// What a family needs of the value each of its series holds.
pub trait Metric: Send + Sync + 'static {
    /// The word after `# TYPE <name>`.
    const TYPE: &'static str;

    /// A zero value, for a series seen for the first time.
    fn zero() -> Self;

    /// Appends this value's sample lines for metric `name`. `labels` is the series' label pairs,
    /// already escaped (`model="m",type="prompt"`), or empty for a series without labels.
    fn write_samples(&self, out: &mut String, name: &str, labels: &str);
}

/// Writes `{labels}`, or nothing when there are none.
fn write_braced(out: &mut String, labels: &str) {
    if !labels.is_empty() {
        out.push('{');
        out.push_str(labels);
        out.push('}');
    }
}

/// A count that only goes up (requests, bytes, tokens).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

impl Metric for Counter {
    const TYPE: &'static str = "counter";

    fn zero() -> Self {
        Counter::new()
    }

    fn write_samples(&self, out: &mut String, name: &str, labels: &str) {
        out.push_str(name);
        write_braced(out, labels);
        let _ = writeln!(out, " {}", self.get());
    }
}

/// A count that only goes up by fractions (money): an `f64` kept as bits in one atomic.
#[derive(Debug, Default)]
pub struct FloatCounter(AtomicU64);

impl FloatCounter {
    /// A counter at zero.
    pub const fn new() -> FloatCounter {
        FloatCounter(AtomicU64::new(0))
    }

    /// Adds `v` (ignored unless finite and positive).
    pub fn add(&self, v: f64) {
        if !(v.is_finite() && v > 0.0) {
            return;
        }
        let _ = self.0.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

impl Metric for FloatCounter {
    const TYPE: &'static str = "counter";

    fn zero() -> Self {
        FloatCounter::new()
    }

    fn write_samples(&self, out: &mut String, name: &str, labels: &str) {
        out.push_str(name);
        write_braced(out, labels);
        let _ = writeln!(out, " {}", self.get());
    }
}

/// A value that goes up and down (requests in flight, open connections).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// A gauge at zero.
    pub const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// Subtracts one.
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }

    /// Adds `n` (negative to subtract).
    #[inline]
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Relaxed);
    }

    /// Replaces the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

impl Metric for Gauge {
    const TYPE: &'static str = "gauge";

    fn zero() -> Self {
        Gauge::new()
    }

    fn write_samples(&self, out: &mut String, name: &str, labels: &str) {
        out.push_str(name);
        write_braced(out, labels);
        let _ = writeln!(out, " {}", self.get());
    }
}

/// A distribution of durations over [`BUCKET_BOUNDS_NS`], rendered in seconds.
///
/// Each bucket counts only its own observations (the one past the last bound counts those above
/// 120 s); the scrape adds them up, so `+Inf` and `_count` always agree with the buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKET_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKET_BOUNDS_NS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation: two atomic adds.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKET_BOUNDS_NS.partition_point(|bound| *bound < ns);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The sum of all observations.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Relaxed))
    }
}

impl Metric for Histogram {
    const TYPE: &'static str = "histogram";

    fn zero() -> Self {
        Histogram::new()
    }

    fn write_samples(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in BUCKET_BOUNDS_NS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let le = *bound as f64 / NS_PER_S;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[BUCKET_BOUNDS_NS.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_ns.load(Relaxed) as f64 / NS_PER_S;
        let _ = write!(out, "{name}_sum");
        write_braced(out, labels);
        let _ = write!(out, " {sum}\n{name}_count");
        write_braced(out, labels);
        let _ = writeln!(out, " {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples<M: Metric>(m: &M, labels: &str) -> String {
        let mut out = String::new();
        m.write_samples(&mut out, "x", labels);
        out
    }

    #[test]
    fn bucket_bounds_rise_strictly() {
        assert!(BUCKET_BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(50)); // on a bound: that bucket (le is inclusive)
        h.observe(Duration::from_micros(51));
        h.observe(Duration::from_secs(30));
        h.observe(Duration::from_secs(121)); // only in +Inf
        let text = samples(&h, "");
        assert!(text.contains("x_bucket{le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"0.0001\"} 2\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"10\"} 2\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"30\"} 3\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"120\"} 3\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("x_count 4\n"), "{text}");
        assert!(text.contains("x_sum 151.000101\n"), "{text}");
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn buckets_are_cumulative_and_end_at_the_count() {
        let h = Histogram::new();
        for ms in [0, 1, 2, 3, 7, 40, 900, 4_000] {
            h.observe(Duration::from_millis(ms));
        }
        let text = samples(&h, "");
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("x_bucket"))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("a count")
            })
            .collect();
        assert_eq!(counts.len(), BUCKET_BOUNDS_NS.len() + 1);
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(counts.last(), Some(&8));
    }

    #[test]
    fn histogram_labels_come_before_le() {
        let h = Histogram::new();
        h.observe(Duration::from_millis(1));
        let text = samples(&h, "endpoint=\"a\"");
        assert!(
            text.contains("x_bucket{endpoint=\"a\",le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("x_sum{endpoint=\"a\"} 0.001\n"), "{text}");
        assert!(text.contains("x_count{endpoint=\"a\"} 1\n"), "{text}");
    }

    #[test]
    fn counters_and_gauges_write_one_line() {
        let c = Counter::new();
        c.add(41);
        c.inc();
        assert_eq!(samples(&c, ""), "x 42\n");
        let g = Gauge::new();
        g.inc();
        g.dec();
        g.dec();
        assert_eq!(samples(&g, "a=\"b\""), "x{a=\"b\"} -1\n");
        g.set(7);
        assert_eq!(g.get(), 7);
    }
}
