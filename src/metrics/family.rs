//! Named metrics: [`Named`] for one series without labels, [`Family`] for series told apart by a
//! fixed list of label names ([`CounterVec`], [`GaugeVec`], [`HistogramVec`]).
//!
//! Both are `const`-constructible, so a module declares its metrics as statics next to the code
//! that moves them. A family's series are found from the label values in place, compared one by
//! one in a small family and hashed in a larger one (no `String` is built for a label set already
//! seen), under a read lock held only for that lookup.
//! A new label set takes the write lock and allocates once; its series then lives for the rest of
//! the process, which is why [`Family::with`] can hand out a `&'static` that callers keep as a
//! handle. The number of series is bounded: see [`Family::with`].

use std::hash::{BuildHasher as _, Hasher as _};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::{DefaultHashBuilder, HashTable};
use log::warn;

use super::value::{Counter, Gauge, Histogram, Metric};

/// Series a family holds unless declared otherwise ([`Family::max_series`]).
pub const DEFAULT_MAX_SERIES: usize = 500;

/// The value every label takes in the series that counts label sets past a family's limit.
pub const OVERFLOW_LABEL_VALUE: &str = "other";

/// Label values are cut to this many bytes (at a character boundary) before lookup, so a client
/// sending a huge model name cannot make a series huge.
pub const MAX_LABEL_VALUE_BYTES: usize = 128;

/// A labelled family of counters.
pub type CounterVec<const L: usize> = Family<Counter, L>;
/// A labelled family of gauges.
pub type GaugeVec<const L: usize> = Family<Gauge, L>;
/// A labelled family of duration histograms.
pub type HistogramVec<const L: usize> = Family<Histogram, L>;

/// Something `/metrics` shows: one metric name with its `# HELP`, `# TYPE` and samples.
pub trait Render: Sync {
    /// The metric's name (`arkgate_…`).
    fn name(&self) -> &'static str;

    /// Appends `# HELP`, `# TYPE` and every sample line.
    fn render(&self, out: &mut String);
}

/// Writes the `# HELP` and `# TYPE` lines of a metric.
pub(crate) fn write_header(out: &mut String, name: &str, help: &str, kind: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

/// True if `s` is a valid Prometheus metric or label name (`[a-zA-Z_][a-zA-Z0-9_]*`).
const fn is_valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b[0].is_ascii_digit() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if !(b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            return false;
        }
        i += 1;
    }
    true
}

/// One metric without labels, e.g.
/// `static RETRIES: Named<Counter> = Named::new("arkgate_retries_total", "…", Counter::new());`.
/// It dereferences to its value, so `RETRIES.inc()` is the counter's own `inc`.
pub struct Named<M> {
    name: &'static str,
    help: &'static str,
    metric: M,
}

impl<M: Metric> Named<M> {
    /// A metric called `name` (checked at compile time in a static) described by `help`.
    pub const fn new(name: &'static str, help: &'static str, metric: M) -> Self {
        assert!(is_valid_name(name), "invalid metric name");
        Named { name, help, metric }
    }
}

impl<M> Deref for Named<M> {
    type Target = M;

    fn deref(&self) -> &M {
        &self.metric
    }
}

impl<M: Metric> Render for Named<M> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn render(&self, out: &mut String) {
        write_header(out, self.name, self.help, M::TYPE);
        self.metric.write_samples(out, self.name, "");
    }
}

/// One series of a family: its label values, those pairs rendered once, and its value.
struct Series<M, const L: usize> {
    hash: u64,
    values: [Box<str>; L],
    labels: Box<str>,
    metric: M,
}

/// A metric whose series are told apart by the values of `L` labels.
pub struct Family<M: 'static, const L: usize> {
    name: &'static str,
    help: &'static str,
    label_names: [&'static str; L],
    max_series: usize,
    initial: &'static [[&'static str; L]],
    series: RwLock<Table<M, L>>,
    overflowed: AtomicBool,
}

/// Up to this many series, a lookup compares label values in order instead of hashing them:
/// faster for the small families most are (see `benches/metrics.rs`).
const LINEAR_SCAN_MAX: usize = 8;

/// A family's series, in creation order and indexed by the hash of their label values.
struct Table<M: 'static, const L: usize> {
    list: Vec<&'static Series<M, L>>,
    index: HashTable<&'static Series<M, L>>,
}

impl<M, const L: usize> Table<M, L> {
    const fn new() -> Self {
        Table {
            list: Vec::new(),
            index: HashTable::new(),
        }
    }

    /// The series with these values; `hash` is computed only when the table is large.
    fn find(&self, values: &[&str; L]) -> Option<&'static Series<M, L>> {
        if self.list.len() <= LINEAR_SCAN_MAX {
            return self.list.iter().find(|s| matches(s, values)).copied();
        }
        self.index
            .find(hash_of(values), |s| matches(s, values))
            .copied()
    }

    fn insert(&mut self, series: &'static Series<M, L>) {
        self.list.push(series);
        self.index.insert_unique(series.hash, series, |s| s.hash);
    }
}

/// The hash of a label set, with a hasher seeded once per process. Each value is followed by a
/// byte no UTF-8 text holds, so `["ab", "c"]` and `["a", "bc"]` hash apart.
fn hash_of<const L: usize>(values: &[&str; L]) -> u64 {
    static HASHER: OnceLock<DefaultHashBuilder> = OnceLock::new();
    let mut h = HASHER
        .get_or_init(DefaultHashBuilder::default)
        .build_hasher();
    for v in values {
        h.write(v.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

/// `value` cut to at most [`MAX_LABEL_VALUE_BYTES`], at a character boundary.
fn clip(value: &str) -> &str {
    let mut end = value.len().min(MAX_LABEL_VALUE_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// Appends `v` escaped for a label value in the text format: `\`, `"` and newline.
fn push_escaped(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl<M: Metric, const L: usize> Family<M, L> {
    /// A family called `name`, described by `help`, with these label names; names are checked at
    /// compile time when the family is a static. It holds at most [`DEFAULT_MAX_SERIES`] series.
    pub const fn new(
        name: &'static str,
        help: &'static str,
        label_names: [&'static str; L],
    ) -> Self {
        assert!(is_valid_name(name), "invalid metric name");
        let mut i = 0;
        while i < L {
            assert!(is_valid_name(label_names[i]), "invalid label name");
            i += 1;
        }
        Family {
            name,
            help,
            label_names,
            max_series: DEFAULT_MAX_SERIES,
            initial: &[],
            series: RwLock::new(Table::new()),
            overflowed: AtomicBool::new(false),
        }
    }

    /// The same family holding at most `n` series, plus the overflow one.
    pub const fn max_series(mut self, n: usize) -> Self {
        self.max_series = n;
        self
    }

    /// The same family with these label sets shown (at zero) from the first scrape on, before
    /// anything moves them; for labels whose values are known in advance (a status class).
    pub const fn initial(mut self, sets: &'static [[&'static str; L]]) -> Self {
        self.initial = sets;
        self
    }

    /// The series for these label values, created at zero the first time they are seen.
    ///
    /// For a label set already seen this is one hash of the values and one lookup under a read
    /// lock: no allocation. The result lives as long as the process, so a caller that knows its
    /// labels ahead (an endpoint, a configured key) resolves it once and keeps it as a handle.
    ///
    /// Values longer than [`MAX_LABEL_VALUE_BYTES`] are cut to it. Once the family holds its
    /// [`max_series`](Self::max_series), a label set it does not know yet is counted in the one
    /// series whose every label is [`OVERFLOW_LABEL_VALUE`] (`"other"`), and a warning is logged
    /// once per family.
    pub fn with(&self, values: [&str; L]) -> &'static M {
        let values = values.map(clip);
        let found = self.read().find(&values);
        match found {
            Some(series) => &series.metric,
            None => self.insert(values, true),
        }
    }

    /// The write-locked slow path of [`with`](Self::with): finds or creates the series, or falls
    /// back to the overflow series when `limited` and the family is full.
    #[cold]
    fn insert(&self, values: [&str; L], limited: bool) -> &'static M {
        let mut table = self.write();
        if let Some(series) = table.find(&values) {
            return &series.metric;
        }
        if limited && table.list.len() >= self.max_series {
            drop(table);
            if !self.overflowed.swap(true, Relaxed) {
                warn!(
                    "metric {}: more than {} label sets; new ones are counted under \"{OVERFLOW_LABEL_VALUE}\"",
                    self.name, self.max_series
                );
            }
            return self.insert([OVERFLOW_LABEL_VALUE; L], false);
        }
        let series: &'static Series<M, L> = Box::leak(Box::new(Series {
            hash: hash_of(&values),
            values: values.map(Box::from),
            labels: self.label_pairs(&values).into_boxed_str(),
            metric: M::zero(),
        }));
        table.insert(series);
        &series.metric
    }

    /// `a="x",b="y"` for these values, escaped.
    fn label_pairs(&self, values: &[&str; L]) -> String {
        let mut out = String::new();
        for (i, (name, value)) in self.label_names.iter().zip(values).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(name);
            out.push_str("=\"");
            push_escaped(&mut out, value);
            out.push('"');
        }
        out
    }

    /// Series held now, the overflow one included.
    pub fn len(&self) -> usize {
        self.read().list.len()
    }

    /// True before any series exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> RwLockReadGuard<'_, Table<M, L>> {
        // A panic elsewhere cannot leave the table half-updated: keep counting.
        self.series.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table<M, L>> {
        self.series.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn matches<M, const L: usize>(series: &Series<M, L>, values: &[&str; L]) -> bool {
    series.values.iter().zip(values).all(|(a, b)| **a == **b)
}

impl<M: Metric, const L: usize> Render for Family<M, L> {
    fn name(&self) -> &'static str {
        self.name
    }

    /// Series are written sorted by their label values, so scrapes are stable.
    fn render(&self, out: &mut String) {
        for set in self.initial {
            self.with(*set);
        }
        let mut series = self.read().list.clone();
        series.sort_unstable_by(|a, b| a.values.cmp(&b.values));
        write_header(out, self.name, self.help, M::TYPE);
        for s in series {
            s.metric.write_samples(out, self.name, &s.labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rendered(r: &dyn Render) -> String {
        let mut out = String::new();
        r.render(&mut out);
        out
    }

    #[test]
    fn a_family_writes_help_and_type_once_and_each_series_once() {
        static TOKENS: CounterVec<2> =
            CounterVec::new("t_tokens_total", "Tokens.\nPer model.", ["model", "type"]);
        TOKENS.with(["m1", "prompt"]).add(12);
        TOKENS.with(["m1", "completion"]).add(3);
        TOKENS.with(["m1", "prompt"]).add(1);
        assert_eq!(
            rendered(&TOKENS),
            "# HELP t_tokens_total Tokens.\\nPer model.\n\
             # TYPE t_tokens_total counter\n\
             t_tokens_total{model=\"m1\",type=\"completion\"} 3\n\
             t_tokens_total{model=\"m1\",type=\"prompt\"} 13\n"
        );
        assert_eq!(TOKENS.len(), 2);
    }

    #[test]
    fn label_values_from_clients_are_escaped() {
        static BY_MODEL: CounterVec<1> = CounterVec::new("t_escaped_total", "h", ["model"]);
        BY_MODEL.with(["a\"b\\c\nd}"]).inc();
        let text = rendered(&BY_MODEL);
        assert!(
            text.contains("t_escaped_total{model=\"a\\\"b\\\\c\\nd}\"} 1\n"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn long_label_values_are_cut_at_a_character_boundary() {
        static LONG: CounterVec<1> = CounterVec::new("t_long_total", "h", ["model"]);
        let long = "é".repeat(MAX_LABEL_VALUE_BYTES);
        LONG.with([&long]).inc();
        LONG.with([&long[..MAX_LABEL_VALUE_BYTES]]).inc();
        assert_eq!(LONG.len(), 1);
        let kept = "é".repeat(MAX_LABEL_VALUE_BYTES / 2);
        assert!(rendered(&LONG).contains(&format!("{{model=\"{kept}\"}} 2\n")));
    }

    #[test]
    fn label_sets_past_the_limit_count_under_other() {
        static LIMITED: CounterVec<2> =
            CounterVec::new("t_limited_total", "h", ["model", "key"]).max_series(2);
        LIMITED.with(["a", "k"]).inc();
        LIMITED.with(["b", "k"]).inc();
        LIMITED.with(["c", "k"]).add(5);
        LIMITED.with(["d", "j"]).add(2);
        LIMITED.with(["a", "k"]).inc(); // known sets keep their own series
        assert_eq!(LIMITED.len(), 3);
        let text = rendered(&LIMITED);
        assert!(
            text.contains("t_limited_total{model=\"a\",key=\"k\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("t_limited_total{model=\"b\",key=\"k\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("t_limited_total{model=\"other\",key=\"other\"} 7\n"),
            "{text}"
        );
        assert!(!text.contains("\"c\""), "{text}");
    }

    #[test]
    fn an_overflow_set_already_present_is_not_written_twice() {
        static OTHERS: CounterVec<1> =
            CounterVec::new("t_others_total", "h", ["model"]).max_series(1);
        OTHERS.with(["other"]).inc();
        OTHERS.with(["x"]).inc();
        assert_eq!(OTHERS.len(), 1);
        assert!(rendered(&OTHERS).contains("t_others_total{model=\"other\"} 2\n"));
    }

    #[test]
    fn a_large_family_finds_each_set_by_its_hash() {
        static LARGE: CounterVec<2> = CounterVec::new("t_large_total", "h", ["a", "b"]);
        for round in 1..=3 {
            for i in 0..(4 * LINEAR_SCAN_MAX) {
                LARGE.with([&format!("m{i}"), "x"]).inc();
                assert_eq!(LARGE.with([&format!("m{i}"), "x"]).get(), round);
            }
        }
        LARGE.with(["ab", "c"]).inc();
        LARGE.with(["a", "bc"]).add(2);
        assert_eq!(LARGE.with(["ab", "c"]).get(), 1);
        assert_eq!(LARGE.with(["a", "bc"]).get(), 2);
        assert_eq!(LARGE.len(), 4 * LINEAR_SCAN_MAX + 2);
    }

    #[test]
    fn initial_sets_show_at_zero_before_any_increment() {
        static CLASSES: CounterVec<1> =
            CounterVec::new("t_class_total", "h", ["class"]).initial(&[["2xx"], ["5xx"]]);
        let text = rendered(&CLASSES);
        assert!(text.contains("t_class_total{class=\"2xx\"} 0\n"), "{text}");
        assert!(text.contains("t_class_total{class=\"5xx\"} 0\n"), "{text}");
    }

    #[test]
    fn a_handle_is_the_series_itself() {
        static HANDLED: GaugeVec<1> = GaugeVec::new("t_handled", "h", ["endpoint"]);
        let handle = HANDLED.with(["e1"]);
        handle.add(3);
        assert!(std::ptr::eq(handle, HANDLED.with(["e1"])));
        assert_eq!(HANDLED.with(["e1"]).get(), 3);
    }

    #[test]
    fn histogram_families_label_every_line() {
        static LATENCY: HistogramVec<1> = HistogramVec::new("t_latency_seconds", "h", ["endpoint"]);
        LATENCY.with(["e"]).observe(Duration::from_millis(2));
        let text = rendered(&LATENCY);
        assert_eq!(text.matches("# TYPE").count(), 1, "{text}");
        assert!(text.contains("t_latency_seconds_bucket{endpoint=\"e\",le=\"0.0025\"} 1\n"));
        assert!(text.contains("t_latency_seconds_count{endpoint=\"e\"} 1\n"));
    }

    #[test]
    fn concurrent_increments_sum_exactly() {
        static CONCURRENT: CounterVec<2> = CounterVec::new("t_concurrent_total", "h", ["a", "b"]);
        const THREADS: u64 = 8;
        const PER_THREAD: u64 = 20_000;
        std::thread::scope(|s| {
            for t in 0..THREADS {
                s.spawn(move || {
                    let mine = format!("t{t}");
                    for i in 0..PER_THREAD {
                        CONCURRENT
                            .with(["shared", if i % 2 == 0 { "x" } else { "y" }])
                            .inc();
                        CONCURRENT.with([&mine, "x"]).inc();
                    }
                });
            }
        });
        let shared =
            CONCURRENT.with(["shared", "x"]).get() + CONCURRENT.with(["shared", "y"]).get();
        assert_eq!(shared, THREADS * PER_THREAD);
        for t in 0..THREADS {
            assert_eq!(CONCURRENT.with([&format!("t{t}"), "x"]).get(), PER_THREAD);
        }
        assert_eq!(CONCURRENT.len() as u64, 2 + THREADS);
    }

    #[test]
    fn named_metrics_have_no_braces() {
        static RETRIES: Named<Counter> = Named::new("t_retries_total", "Retried.", Counter::new());
        RETRIES.add(2);
        assert_eq!(
            rendered(&RETRIES),
            "# HELP t_retries_total Retried.\n# TYPE t_retries_total counter\nt_retries_total 2\n"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(is_valid_name("arkgate_tokens_total"));
        assert!(is_valid_name("_x1"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("1x"));
        assert!(!is_valid_name("a-b"));
        assert!(!is_valid_name("a b"));
    }
}
