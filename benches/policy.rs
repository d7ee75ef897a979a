//! Cost of the content policies (`arkgate::policy`) against a bare JSON parse.
//!
//! Five policies of the shapes people configure (an API-key regex, a word list, an e-mail regex,
//! a phone-number regex, a host-name list), all on both sides. Groups:
//!
//! - `request/4KiB`, `request/64KiB`: [`PolicySet::check_request`] on a chat body with no match
//!   and with one redaction, beside `serde_json_value` (`serde_json::from_slice::<Value>` of the
//!   same body), the parse any JSON-aware feature pays;
//! - `stream/200_events`: a 200-event SSE response fed event by event through a
//!   [`StreamPolicy`], beside parsing each event's JSON into a `Value`; throughput is per event.
//!
//! Every input is built before timing starts.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arkgate::policy::{Action, Pattern, PolicySet, PolicySpec, Side, StreamPolicy, StreamSettings};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const KIB: usize = 1024;
const BODY_SIZES_BYTES: [usize; 2] = [4 * KIB, 64 * KIB];
const STREAM_EVENTS: usize = 200;
const KEY: &str = "sk-0123456789abcdefghijKLMNOP";

fn policies() -> Arc<PolicySet> {
    let spec = |name: &str, pattern: Pattern, action: Action| PolicySpec {
        name: name.into(),
        sides: vec![Side::Request, Side::Response],
        pattern,
        action,
        replacement: "[REDACTED]".into(),
        models: vec!["*".into()],
    };
    let regex = |s: &str| Pattern::Regex(s.into());
    let words = |w: &[&str]| Pattern::Words(w.iter().map(|s| s.to_string()).collect());
    Arc::new(
        PolicySet::compile(vec![
            spec("no-keys-out", regex("sk-[A-Za-z0-9]{20,}"), Action::Redact),
            spec(
                "no-codenames",
                words(&["project bluebird", "operation nightjar", "falcon-9x"]),
                Action::Block,
            ),
            spec(
                "emails",
                regex(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
                Action::Flag,
            ),
            spec(
                "phones",
                regex(r"\+?[0-9]{2,3}[ -]?[0-9]{3,4}[ -]?[0-9]{4}"),
                Action::Redact,
            ),
            spec(
                "internal-hosts",
                words(&["internal.example", "corp.local"]),
                Action::Flag,
            ),
        ])
        .expect("valid policies"),
    )
}

/// A chat request of about `size` bytes: a system prompt and alternating user/assistant turns.
fn request(size: usize, secret: bool) -> Vec<u8> {
    let mut messages = vec![r#"{"role":"system","content":"You are a helpful assistant. Answer briefly and cite sources."}"#.to_string()];
    let mut turn = 0;
    while messages.iter().map(String::len).sum::<usize>() + 200 < size {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        let text = format!(
            "Turn {turn}: here is some ordinary prose about the weather, the schedule for \
             tomorrow and a list of things to buy at the market, nothing sensitive in it at all."
        );
        messages.push(format!(r#"{{"role":"{role}","content":"{text}"}}"#));
        turn += 1;
    }
    if secret {
        let middle = messages.len() / 2;
        messages[middle] = format!(r#"{{"role":"user","content":"my key is {KEY}, keep it"}}"#);
    }
    format!(
        r#"{{"model":"doubao-pro-32k","temperature":0.7,"stream":true,"messages":[{}]}}"#,
        messages.join(",")
    )
    .into_bytes()
}

/// A 200-event SSE answer, each delta a few words.
fn stream_events() -> Vec<Bytes> {
    (0..STREAM_EVENTS)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"doubao-pro-32k\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word {i} of the answer \"}},\"finish_reason\":null}}]}}\n\n"
            ))
        })
        .collect()
}

fn bench_request(c: &mut Criterion) {
    let set = policies();
    for size in BODY_SIZES_BYTES {
        let mut group = c.benchmark_group(format!("request/{}KiB", size / KIB));
        let clean = request(size, false);
        let secret = request(size, true);
        group.throughput(Throughput::Bytes(clean.len() as u64));
        group.bench_function("serde_json_value", |b| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(&clean)))
        });
        group.bench_function("check_request/no_match", |b| {
            b.iter(|| set.check_request(black_box(&clean)))
        });
        group.bench_function("check_request/one_redaction", |b| {
            b.iter(|| set.check_request(black_box(&secret)))
        });
        group.finish();
    }
}

fn bench_stream(c: &mut Criterion) {
    let set = policies();
    let events = stream_events();
    let mut group = c.benchmark_group(format!("stream/{STREAM_EVENTS}_events"));
    group.throughput(Throughput::Elements(STREAM_EVENTS as u64));
    group.bench_function("serde_json_value_per_event", |b| {
        b.iter(|| {
            for event in &events {
                let json = &event[6..event.len() - 2];
                black_box(serde_json::from_slice::<serde_json::Value>(json).ok());
            }
        })
    });
    group.bench_function("stream_policy", |b| {
        let now = Instant::now();
        b.iter(|| {
            let mut filter = StreamPolicy::new(
                Arc::clone(&set),
                Some("doubao-pro-32k"),
                StreamSettings::default(),
            )
            .expect("response policies apply");
            let mut sent = 0;
            for event in &events {
                sent += filter.push(event.clone(), now).len();
            }
            sent += filter.finish(now).len();
            black_box(sent)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = bench_request, bench_stream
}
criterion_main!(benches);
