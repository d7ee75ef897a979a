//! Throughput of the streaming body replacer (`arkgate::transform::rewrite::Replacer`) against baselines.
//!
//! Each group is one body size and match density, e.g. `no_match/64KiB`; inside it,
//! `replacer/chunk=…` streams the body through `Replacer::push` in chunks of that size, beside
//! three whole-buffer baselines over the same bytes: `memmem_search` (counting matches with
//! `memchr::memmem`, the floor any replacer pays), `replace_all` (the one-shot reference) and
//! `naive_replace` (a byte-by-byte `starts_with` loop). The rule is the production one,
//! `json_schema` → `json_object`. Bodies are SSE-like chat-completion lines; every input is
//! built before timing starts.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arkgate::transform::rewrite::{Replacer, RuleSet};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use memchr::memmem;

const FIND: &[u8] = b"json_schema";
const REPLACE: &[u8] = b"json_object";

const KIB: usize = 1024;
const BODY_SIZES_BYTES: [usize; 3] = [KIB / 2, 64 * KIB, 4 * KIB * KIB];
const CHUNK_SIZES_BYTES: [usize; 3] = [KIB, 16 * KIB, 64 * KIB];

/// How often the rule matches in a body.
#[derive(Clone, Copy)]
enum Density {
    /// Never (but `json` appears often, so `memmem` still has candidates to check).
    NoMatch,
    /// Once, straddling the middle of the body (so also across a chunk boundary).
    One,
    /// In every SSE line, about every 100 bytes.
    Dense,
}

impl Density {
    fn name(self) -> &'static str {
        match self {
            Density::NoMatch => "no_match",
            Density::One => "one_match",
            Density::Dense => "dense",
        }
    }
}

/// An SSE stream of chat-completion deltas, cut to exactly `size` bytes.
fn body(size: usize, density: Density) -> Vec<u8> {
    let mut body = Vec::with_capacity(size + 200);
    let mut line = 0;
    while body.len() < size {
        let event = match density {
            Density::Dense => format!(
                "data: {{\"id\":\"c-{line:05}\",\"format\":{{\"type\":\"json_schema\"}},\"delta\":\"word {line}\"}}\n\n"
            ),
            _ => format!(
                "data: {{\"id\":\"c-{line:05}\",\"format\":\"application/json\",\"delta\":\"word {line} of it\"}}\n\n"
            ),
        };
        body.extend_from_slice(event.as_bytes());
        line += 1;
    }
    body.truncate(size);
    if let Density::One = density {
        let at = size / 2 - FIND.len() / 2;
        body[at..at + FIND.len()].copy_from_slice(FIND);
    }
    body
}

/// Human-readable size for benchmark names.
fn label(bytes: usize) -> String {
    match bytes {
        b if b >= KIB * KIB && b % (KIB * KIB) == 0 => format!("{}MiB", b / (KIB * KIB)),
        b if b >= KIB && b % KIB == 0 => format!("{}KiB", b / KIB),
        b => format!("{b}B"),
    }
}

/// The obvious whole-buffer replace, as someone would write it without `memmem`.
fn naive_replace(body: &[u8], find: &[u8], replace: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut pos = 0;
    while pos < body.len() {
        if body[pos..].starts_with(find) {
            out.extend_from_slice(replace);
            pos += find.len();
        } else {
            out.push(body[pos]);
            pos += 1;
        }
    }
    out
}

fn replacer(c: &mut Criterion) {
    let rules = Arc::new(
        RuleSet::new(vec![(FIND.to_vec(), REPLACE.to_vec())])
            .expect("the production rule is valid"),
    );
    let finder = memmem::Finder::new(FIND);

    for density in [Density::NoMatch, Density::One, Density::Dense] {
        for size in BODY_SIZES_BYTES {
            let raw = body(size, density);
            let expected = naive_replace(&raw, FIND, REPLACE);
            let matches = finder.find_iter(&raw).count();
            match density {
                Density::NoMatch => assert_eq!(matches, 0),
                Density::One => assert_eq!(matches, 1),
                Density::Dense => assert!(matches >= size / 120),
            }
            let whole = Bytes::from(raw);

            let mut group = c.benchmark_group(format!("{}/{}", density.name(), label(size)));
            group.throughput(Throughput::Bytes(size as u64));
            if size > 64 * KIB {
                group.sampling_mode(SamplingMode::Flat);
            }

            let mut chunk_sizes: Vec<usize> = CHUNK_SIZES_BYTES
                .iter()
                .map(|&chunk| chunk.min(size))
                .collect();
            chunk_sizes.dedup();
            for chunk_size in chunk_sizes {
                let chunks: Vec<Bytes> = (0..size)
                    .step_by(chunk_size)
                    .map(|from| whole.slice(from..size.min(from + chunk_size)))
                    .collect();
                // What the proxy does per body: a fresh replacer, every chunk moved in, each
                // output handed on (here: measured and dropped). The chunks are cloned for each
                // run outside the timing, since the proxy owns the chunks it receives.
                let stream = |chunks: Vec<Bytes>, sink: &mut dyn FnMut(Bytes)| {
                    let mut replacer = Replacer::new(rules.clone());
                    let last = chunks.len() - 1;
                    for (i, chunk) in chunks.into_iter().enumerate() {
                        sink(replacer.push(chunk, i == last));
                    }
                };
                let mut out = Vec::new();
                stream(chunks.clone(), &mut |bytes| out.extend_from_slice(&bytes));
                assert_eq!(out, expected, "replacer output");
                group.bench_function(format!("replacer/chunk={}", label(chunk_size)), |b| {
                    b.iter_batched(
                        || chunks.clone(),
                        |chunks| {
                            let mut forwarded = 0;
                            stream(chunks, &mut |bytes| forwarded += bytes.len());
                            forwarded
                        },
                        BatchSize::SmallInput,
                    )
                });
            }
            group.bench_function("memmem_search", |b| {
                b.iter(|| finder.find_iter(black_box(&whole)).count())
            });
            group.bench_function("replace_all", |b| {
                b.iter(|| rules.replace_all(black_box(&whole)).len())
            });
            group.bench_function("naive_replace", |b| {
                b.iter(|| naive_replace(black_box(&whole), FIND, REPLACE))
            });
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    // Modest run time: the machine has 2 cores and runs this beside other work.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    targets = replacer
}
criterion_main!(benches);
