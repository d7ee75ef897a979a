//! Bench figures: the per-run [`Stats`] that the load loop records into, the [`Report`] made from
//! them (the `--json` file, with stable keys), its text rendering, and `bench compare`.
//!
//! Everything here is pure (no sockets, no clock), so unit tests feed it numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The longest time a histogram records, in microseconds (one hour); longer values saturate.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;

/// How many distinct error reasons a run keeps before lumping the rest together.
const MAX_ERROR_REASONS: usize = 20;

/// Rows in the text latency histogram.
const HISTOGRAM_ROWS: usize = 10;

/// Width of the longest bar in the text histogram.
const BAR_WIDTH: usize = 40;

/// A latency histogram in microseconds.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("constant bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What one target's requests measured, merged over workers and rounds.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Whole-exchange time of succeeded requests (request sent → body fully read), µs.
    pub latency: Histogram<u64>,
    /// Time to the response head, µs.
    pub ttfb: Histogram<u64>,
    /// Time to the first SSE event with non-empty `choices[0].delta.content`, µs.
    pub ttft: Histogram<u64>,
    /// Time between consecutive content events of a stream, µs.
    pub chunk_gap: Histogram<u64>,
    /// The gateway's own `Server-Timing: arkgate;dur=` figures, µs.
    pub server_timing: Histogram<u64>,
    /// Responses by status code (any status, including those counted as failed).
    pub status: BTreeMap<u16, u64>,
    /// Failed requests by reason.
    pub errors: BTreeMap<String, u64>,
    /// 2xx responses whose body was read in full.
    pub succeeded: u64,
    /// Everything else: other statuses, timeouts, connection and protocol errors.
    pub failed: u64,
    /// Sum of `usage.completion_tokens` over the responses that reported it.
    pub completion_tokens: u64,
    /// Connections opened during timing, after one was closed or broken.
    pub reconnects: u64,
    /// Wall time spent running this target's rounds.
    pub elapsed: Duration,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: histogram(),
            ttfb: histogram(),
            ttft: histogram(),
            chunk_gap: histogram(),
            server_timing: histogram(),
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
            succeeded: 0,
            failed: 0,
            completion_tokens: 0,
            reconnects: 0,
            elapsed: Duration::ZERO,
        }
    }
}

/// Records `d` into a microsecond histogram.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(micros(d).max(1));
}

impl Stats {
    /// Counts a failed request under `reason` (bounded: past [`MAX_ERROR_REASONS`] distinct
    /// reasons the rest go under "other").
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.failed += 1;
        let mut reason: String = reason.into();
        if reason.len() > 120 {
            let mut cut = 120;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        if !self.errors.contains_key(&reason) && self.errors.len() >= MAX_ERROR_REASONS {
            reason = "other".into();
        }
        *self.errors.entry(reason).or_default() += 1;
    }

    /// Adds another worker's or round's figures to these.
    pub fn merge(&mut self, other: &Stats) {
        for (mine, theirs) in [
            (&mut self.latency, &other.latency),
            (&mut self.ttfb, &other.ttfb),
            (&mut self.ttft, &other.ttft),
            (&mut self.chunk_gap, &other.chunk_gap),
            (&mut self.server_timing, &other.server_timing),
        ] {
            // Same bounds on both sides, so adding cannot fail.
            let _ = mine.add(theirs);
        }
        for (k, v) in &other.status {
            *self.status.entry(*k).or_default() += v;
        }
        for (k, v) in &other.errors {
            let key = if self.errors.contains_key(k) || self.errors.len() < MAX_ERROR_REASONS {
                k.clone()
            } else {
                "other".to_string()
            };
            *self.errors.entry(key).or_default() += v;
        }
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.completion_tokens += other.completion_tokens;
        self.reconnects += other.reconnects;
        self.elapsed += other.elapsed;
    }

    /// Requests that finished one way or another.
    pub fn requests(&self) -> u64 {
        self.succeeded + self.failed
    }
}

/// Percentiles of one measure, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// The JSON keys, in the order of [`Percentiles::fields`].
    pub const KEYS: [&'static str; 5] = ["p50", "p90", "p95", "p99", "max"];

    /// The values in the order of [`Percentiles::KEYS`].
    pub fn fields(&self) -> [f64; 5] {
        [self.p50, self.p90, self.p95, self.p99, self.max]
    }
}

/// A p50/p99 pair in milliseconds (signed where it is a difference).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub p50: f64,
    pub p99: f64,
}

/// One row of the latency histogram: requests that took at most `le_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub le_ms: f64,
    pub count: u64,
}

/// One target's figures, as printed and as written by `--json`. Optional keys are left out
/// when they do not apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The endpoint, as given on the command line.
    pub url: String,
    pub requests: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub elapsed_s: f64,
    /// Finished requests per second of wall time.
    pub rps: f64,
    /// Latency of succeeded requests.
    pub latency_ms: Option<Percentiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttfb_ms: Option<Percentiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<Percentiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_gap_ms: Option<Percentiles>,
    /// Completion tokens (from `usage`) per second of wall time; absent when no response
    /// reported usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default)]
    pub completion_tokens: u64,
    /// Responses by status code.
    #[serde(default)]
    pub status: BTreeMap<String, u64>,
    /// Failed requests by reason.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    #[serde(default)]
    pub reconnects: u64,
    #[serde(default)]
    pub latency_histogram: Vec<Bucket>,
    /// Latency added by the gateway: this target's percentile minus the baseline's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overhead_ms: Option<Pair>,
    /// The gateway's own figure, from `Server-Timing: arkgate;dur=<ms>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_timing_ms: Option<Pair>,
    /// The baseline's own figures, when `--baseline` was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<Report>>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn percentiles(h: &Histogram<u64>) -> Option<Percentiles> {
    (!h.is_empty()).then(|| Percentiles {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p95: ms(h.value_at_quantile(0.95)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Equal-width rows from the fastest to the slowest request.
fn buckets(h: &Histogram<u64>) -> Vec<Bucket> {
    if h.is_empty() {
        return Vec::new();
    }
    let (lo, hi) = (h.min(), h.max());
    let width = ((hi - lo) / HISTOGRAM_ROWS as u64).max(1);
    let mut rows: Vec<Bucket> = (1..=HISTOGRAM_ROWS as u64)
        .map(|i| Bucket {
            le_ms: ms(if i == HISTOGRAM_ROWS as u64 {
                hi
            } else {
                lo + i * width
            }),
            count: 0,
        })
        .collect();
    for v in h.iter_recorded() {
        let value = h.highest_equivalent(v.value_iterated_to()).min(hi);
        let row = (((value.saturating_sub(lo)) / width) as usize).min(HISTOGRAM_ROWS - 1);
        rows[row].count += v.count_at_value();
    }
    rows.retain(|b| b.count > 0 || b.le_ms > 0.0);
    rows
}

impl Report {
    /// The report of one target. `stream` adds the streaming measures.
    pub fn from_stats(url: &str, s: &Stats, stream: bool) -> Report {
        let secs = s.elapsed.as_secs_f64();
        let per_s = |x: u64| {
            if secs > 0.0 {
                round3(x as f64 / secs)
            } else {
                0.0
            }
        };
        Report {
            url: url.to_string(),
            requests: s.requests(),
            succeeded: s.succeeded,
            failed: s.failed,
            elapsed_s: round3(secs),
            rps: per_s(s.requests()),
            latency_ms: percentiles(&s.latency),
            ttfb_ms: stream.then(|| percentiles(&s.ttfb)).flatten(),
            ttft_ms: stream.then(|| percentiles(&s.ttft)).flatten(),
            chunk_gap_ms: stream.then(|| percentiles(&s.chunk_gap)).flatten(),
            tokens_per_s: (s.completion_tokens > 0).then(|| per_s(s.completion_tokens)),
            completion_tokens: s.completion_tokens,
            status: s.status.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            errors: s.errors.clone(),
            reconnects: s.reconnects,
            latency_histogram: buckets(&s.latency),
            overhead_ms: None,
            server_timing_ms: (!s.server_timing.is_empty()).then(|| Pair {
                p50: ms(s.server_timing.value_at_quantile(0.5)),
                p99: ms(s.server_timing.value_at_quantile(0.99)),
            }),
            baseline: None,
        }
    }

    /// Attaches the baseline's report and the difference at p50 and p99.
    pub fn with_baseline(mut self, baseline: Report) -> Report {
        if let (Some(g), Some(b)) = (self.latency_ms, baseline.latency_ms) {
            self.overhead_ms = Some(Pair {
                p50: round3(g.p50 - b.p50),
                p99: round3(g.p99 - b.p99),
            });
        }
        self.baseline = Some(Box::new(baseline));
        self
    }

    /// The text a person reads after a run.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_one(&mut out, "Summary");
        if let Some(b) = &self.baseline {
            out.push('\n');
            b.render_one(&mut out, "Baseline");
            out.push('\n');
            self.render_overhead(&mut out, b);
        }
        out
    }

    fn render_one(&self, out: &mut String, title: &str) {
        let _ = writeln!(out, "{title}: {}", self.url);
        let _ = writeln!(
            out,
            "  Requests:     {} ({} succeeded, {} failed)",
            self.requests, self.succeeded, self.failed
        );
        let _ = writeln!(out, "  Total time:   {:.3} s", self.elapsed_s);
        let _ = writeln!(out, "  Requests/s:   {:.1}", self.rps);
        if let Some(t) = self.tokens_per_s {
            let _ = writeln!(
                out,
                "  Tokens/s:     {t:.1} ({} completion tokens)",
                self.completion_tokens
            );
        }
        if self.reconnects > 0 {
            let _ = writeln!(out, "  Reconnects:   {}", self.reconnects);
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "  {:<14}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "(ms)", "p50", "p90", "p95", "p99", "max"
        );
        let rows = [
            ("latency", self.latency_ms),
            ("first byte", self.ttfb_ms),
            ("first token", self.ttft_ms),
            ("chunk gap", self.chunk_gap_ms),
        ];
        for (name, p) in rows {
            if let Some(p) = p {
                let _ = writeln!(
                    out,
                    "  {name:<14}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
                    p.p50, p.p90, p.p95, p.p99, p.max
                );
            }
        }
        if self.latency_ms.is_none() {
            let _ = writeln!(out, "  no request succeeded");
        }
        if !self.latency_histogram.is_empty() {
            let _ = writeln!(out, "\n  Latency histogram (ms):");
            let top = self
                .latency_histogram
                .iter()
                .map(|b| b.count)
                .max()
                .unwrap_or(1)
                .max(1);
            for b in &self.latency_histogram {
                let bar = (b.count * BAR_WIDTH as u64).div_ceil(top) as usize;
                let _ = writeln!(
                    out,
                    "  {:>10.2} [{:>6}] {}",
                    b.le_ms,
                    b.count,
                    "■".repeat(bar)
                );
            }
        }
        if !self.status.is_empty() {
            let _ = writeln!(out, "\n  Status codes:");
            for (code, n) in &self.status {
                let _ = writeln!(out, "    [{code}] {n} responses");
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\n  Errors:");
            for (reason, n) in &self.errors {
                let _ = writeln!(out, "    [{n}] {reason}");
            }
        }
    }

    fn render_overhead(&self, out: &mut String, baseline: &Report) {
        let _ = writeln!(out, "Added latency (gateway minus baseline):");
        let _ = writeln!(out, "  {:<26}{:>10}{:>10}", "(ms)", "p50", "p99");
        let pair = |p: Option<Percentiles>| p.map(|p| (p.p50, p.p99));
        for (name, p) in [
            ("gateway", pair(self.latency_ms)),
            ("baseline", pair(baseline.latency_ms)),
        ] {
            if let Some((a, b)) = p {
                let _ = writeln!(out, "  {name:<26}{a:>10.2}{b:>10.2}");
            }
        }
        match self.overhead_ms {
            Some(o) => {
                let _ = writeln!(out, "  {:<26}{:>+10.2}{:>+10.2}", "added", o.p50, o.p99);
            }
            None => {
                let _ = writeln!(out, "  added: not measured (a side had no success)");
            }
        }
        if let Some(s) = self.server_timing_ms {
            let _ = writeln!(
                out,
                "  {:<26}{:>10.2}{:>10.2}",
                "gateway's own (arkgate;dur)", s.p50, s.p99
            );
        }
    }
}

/// `bench compare`: two reports side by side, with B/A ratios.
pub fn compare(a_name: &str, a: &Report, b_name: &str, b: &Report) -> String {
    let mut rows: Vec<(String, Option<f64>, Option<f64>)> = vec![
        (
            "requests".into(),
            Some(a.requests as f64),
            Some(b.requests as f64),
        ),
        (
            "failed".into(),
            Some(a.failed as f64),
            Some(b.failed as f64),
        ),
        ("rps".into(), Some(a.rps), Some(b.rps)),
    ];
    let measures = [
        ("latency_ms", a.latency_ms, b.latency_ms),
        ("ttfb_ms", a.ttfb_ms, b.ttfb_ms),
        ("ttft_ms", a.ttft_ms, b.ttft_ms),
        ("chunk_gap_ms", a.chunk_gap_ms, b.chunk_gap_ms),
    ];
    for (name, pa, pb) in measures {
        if pa.is_none() && pb.is_none() {
            continue;
        }
        let (fa, fb) = (pa.map(|p| p.fields()), pb.map(|p| p.fields()));
        for i in 0..5 {
            let key = Percentiles::KEYS[i];
            rows.push((format!("{name}.{key}"), fa.map(|f| f[i]), fb.map(|f| f[i])));
        }
    }
    if a.tokens_per_s.is_some() || b.tokens_per_s.is_some() {
        rows.push(("tokens_per_s".into(), a.tokens_per_s, b.tokens_per_s));
    }
    if a.overhead_ms.is_some() || b.overhead_ms.is_some() {
        let o = |r: &Report, f: fn(&Pair) -> f64| r.overhead_ms.as_ref().map(f);
        rows.push(("overhead_ms.p50".into(), o(a, |p| p.p50), o(b, |p| p.p50)));
        rows.push(("overhead_ms.p99".into(), o(a, |p| p.p99), o(b, |p| p.p99)));
    }

    let mut out = String::new();
    let _ = writeln!(out, "A: {a_name} ({})", a.url);
    let _ = writeln!(out, "B: {b_name} ({})", b.url);
    let _ = writeln!(out, "{:<20}{:>14}{:>14}{:>10}", "", "A", "B", "B/A");
    let cell = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
    for (name, x, y) in rows {
        let ratio = match (x, y) {
            (Some(x), Some(y)) if x != 0.0 => format!("{:.2}x", y / x),
            _ => "-".into(),
        };
        let _ = writeln!(out, "{name:<20}{:>14}{:>14}{ratio:>10}", cell(x), cell(y));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_with(latencies_ms: &[u64]) -> Stats {
        let mut s = Stats::default();
        for &l in latencies_ms {
            record(&mut s.latency, Duration::from_millis(l));
            s.succeeded += 1;
            *s.status.entry(200).or_default() += 1;
        }
        s.elapsed = Duration::from_secs(2);
        s
    }

    #[test]
    fn percentiles_and_rates_come_from_the_recorded_values() {
        let s = stats_with(&(1..=100).collect::<Vec<_>>());
        let r = Report::from_stats("http://x/chat/completions", &s, false);
        assert_eq!(r.requests, 100);
        assert_eq!(r.rps, 50.0);
        let p = r.latency_ms.expect("latency");
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        assert!(r.ttft_ms.is_none() && r.tokens_per_s.is_none());
        let total: u64 = r.latency_histogram.iter().map(|b| b.count).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn merging_adds_counts_and_keeps_the_reason_bound() {
        let mut a = stats_with(&[10, 20]);
        let mut b = stats_with(&[30]);
        for i in 0..(MAX_ERROR_REASONS + 5) {
            b.fail(format!("reason {i}"));
        }
        a.merge(&b);
        assert_eq!(a.succeeded, 3);
        assert_eq!(a.failed, MAX_ERROR_REASONS as u64 + 5);
        assert_eq!(a.errors.values().sum::<u64>(), a.failed);
        assert!(a.errors.len() <= MAX_ERROR_REASONS + 1);
        assert_eq!(a.status.get(&200), Some(&3));
    }

    #[test]
    fn the_baseline_gives_the_added_latency() {
        let gw = Report::from_stats("gw", &stats_with(&[25; 10]), false);
        let base = Report::from_stats("base", &stats_with(&[20; 10]), false);
        let r = gw.with_baseline(base);
        let o = r.overhead_ms.expect("overhead");
        assert!((o.p50 - 5.0).abs() < 0.1, "{o:?}");
        let text = r.render();
        assert!(text.contains("Added latency"), "{text}");
        assert!(text.contains(&format!("{:+.2}", o.p50)), "{text}");
    }

    #[test]
    fn json_round_trips_and_leaves_out_what_does_not_apply() {
        let r = Report::from_stats("u", &stats_with(&[5, 6]), false);
        let text = serde_json::to_string(&r).expect("serializes");
        assert!(
            !text.contains("ttft_ms") && !text.contains("overhead_ms"),
            "{text}"
        );
        let back: Report = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, r);
    }

    #[test]
    fn compare_prints_ratios() {
        let a = Report::from_stats("a", &stats_with(&[10; 4]), false);
        let b = Report::from_stats("b", &stats_with(&[20; 4]), false);
        let text = compare("a.json", &a, "b.json", &b);
        let line = text
            .lines()
            .find(|l| l.starts_with("latency_ms.p50"))
            .unwrap_or_else(|| panic!("no p50 row: {text}"));
        assert!(line.ends_with("2.00x"), "{line}");
    }
}
