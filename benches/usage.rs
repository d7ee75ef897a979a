//! Throughput of the usage extractor and the usage-only chunk filter
//! (`arkgate::transform::usage`) against a bare `memchr::memmem` scan of the same bytes.
//!
//! Groups: `json/64KiB` (a chat completion whose content fills 64 KiB, `usage` last, fed in
//! 16 KiB chunks) and, for SSE, `sse_openai/200_events` (content chunks without `usage`, then the
//! usage-only chunk and `[DONE]`) and `sse_ark/200_events` (DeepSeek/ARK style: `"usage":null`
//! on every chunk, so every event is parsed). SSE streams are fed one event per chunk, as
//! upstreams send them, and in 16 KiB chunks. `memmem_usage` counts `"usage"` in the whole body:
//! the floor of any scan. Every input is built before timing starts.

use std::hint::black_box;
use std::time::Duration;

use arkgate::transform::usage::{BodyKind, UsageChunkFilter, UsageExtractor};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use memchr::memmem;

const KIB: usize = 1024;
const CHUNK_BYTES: usize = 16 * KIB;
const EVENTS: usize = 200;

/// A non-streamed answer of about `size` bytes: prose with escapes in `content`, `usage` last.
fn json_body(size: usize) -> Vec<u8> {
    let sentence = r#"The gateway reads \"usage\" only at the top level.\nIt costs one pass. "#;
    let usage = r#"],"created":1742631811,"id":"0217","model":"deepseek-v3-250324","object":"chat.completion","usage":{"completion_tokens":10,"prompt_tokens":19,"total_tokens":29}}"#;
    let head = r#"{"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant","content":""#;
    let mut body = String::from(head);
    while body.len() + usage.len() + 4 < size {
        body.push_str(sentence);
    }
    body.push_str("\"}}");
    body.push_str(usage);
    body.into_bytes()
}

/// `EVENTS` content chunks, the usage where the provider puts it, then `[DONE]`.
fn sse_events(ark: bool) -> Vec<Vec<u8>> {
    let null = if ark { r#","usage":null"# } else { "" };
    let mut events: Vec<Vec<u8>> = (0..EVENTS)
        .map(|i| {
            format!(
                "data: {{\"id\":\"chatcmpl-0217\",\"object\":\"chat.completion.chunk\",\"created\":1742631811,\"model\":\"deepseek-v3-250324\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}},\"finish_reason\":null}}]{null}}}\n\n"
            )
            .into_bytes()
        })
        .collect();
    events.push(
        br#"data: {"id":"chatcmpl-0217","object":"chat.completion.chunk","created":1742631811,"model":"deepseek-v3-250324","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":200,"total_tokens":219}}"#
            .iter()
            .chain(b"\n\n")
            .copied()
            .collect(),
    );
    events.push(b"data: [DONE]\n\n".to_vec());
    events
}

fn chunked(whole: &Bytes, size: usize) -> Vec<Bytes> {
    (0..whole.len())
        .step_by(size)
        .map(|from| whole.slice(from..whole.len().min(from + size)))
        .collect()
}

fn extract(kind: BodyKind, chunks: &[Bytes]) -> Option<u64> {
    let mut extractor = UsageExtractor::new(kind);
    for chunk in chunks {
        extractor.push(chunk);
    }
    extractor.finish().usage.map(|u| u.total_tokens)
}

fn filter(chunks: Vec<Bytes>) -> usize {
    let mut filter = UsageChunkFilter::new();
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| filter.push(chunk, i == last).len())
        .sum()
}

fn usage(c: &mut Criterion) {
    let finder = memmem::Finder::new(b"\"usage\"");

    let whole = Bytes::from(json_body(64 * KIB));
    let chunks = chunked(&whole, CHUNK_BYTES);
    assert_eq!(extract(BodyKind::Json, &chunks), Some(29));
    let mut group = c.benchmark_group("json/64KiB");
    group.throughput(Throughput::Bytes(whole.len() as u64));
    group.bench_function("extractor/chunk=16KiB", |b| {
        b.iter(|| extract(BodyKind::Json, black_box(&chunks)))
    });
    group.bench_function("memmem_usage", |b| {
        b.iter(|| finder.find_iter(black_box(&whole)).count())
    });
    group.finish();

    for (name, ark) in [("sse_openai", false), ("sse_ark", true)] {
        let events = sse_events(ark);
        let whole = Bytes::from(events.concat());
        let per_event: Vec<Bytes> = {
            let mut at = 0;
            events
                .iter()
                .map(|e| {
                    at += e.len();
                    whole.slice(at - e.len()..at)
                })
                .collect()
        };
        let in_16k = chunked(&whole, CHUNK_BYTES);
        assert_eq!(extract(BodyKind::EventStream, &per_event), Some(219));
        assert_eq!(filter(per_event.clone()), filter(in_16k.clone()));
        assert!(filter(per_event.clone()) < whole.len());

        let mut group = c.benchmark_group(format!("{name}/{EVENTS}_events"));
        group.throughput(Throughput::Bytes(whole.len() as u64));
        for (cut, chunks) in [("event", &per_event), ("16KiB", &in_16k)] {
            group.bench_function(format!("extractor/chunk={cut}"), |b| {
                b.iter(|| extract(BodyKind::EventStream, black_box(chunks)))
            });
            // The proxy owns the chunks it filters: clone them outside the timing.
            group.bench_function(format!("filter/chunk={cut}"), |b| {
                b.iter_batched(|| chunks.clone(), filter, BatchSize::SmallInput)
            });
        }
        group.bench_function("memmem_usage", |b| {
            b.iter(|| finder.find_iter(black_box(&whole)).count())
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    // Modest run time: the machine has 2 cores and runs this beside other work.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    targets = usage
}
criterion_main!(benches);
