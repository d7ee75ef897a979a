//! Tests of the SSE filter: actions across events, hold-back and flush, order, pass-through, and
//! the property that a stream without a match leaves byte for byte as it came.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::policy::compile::{Action, Pattern, PolicySpec};

const KEY: &str = "sk-0123456789abcdefghijKLMN";

fn policies(specs: &[(&str, &str, Action)]) -> Arc<PolicySet> {
    let specs = specs
        .iter()
        .map(|&(name, source, action)| PolicySpec {
            name: name.into(),
            sides: vec![Side::Response],
            pattern: Pattern::Regex(source.into()),
            action,
            replacement: "[REDACTED]".into(),
            models: vec![],
        })
        .collect();
    Arc::new(PolicySet::compile(specs).expect("valid policies"))
}

fn keys(action: Action) -> Arc<PolicySet> {
    policies(&[("no-keys", "sk-[A-Za-z0-9]{20,}", action)])
}

fn filter(set: Arc<PolicySet>, settings: StreamSettings) -> StreamPolicy {
    StreamPolicy::new(set, Some("m"), settings).expect("a response policy applies")
}

/// A long flush interval, so only the window and the stream's own events release text.
fn no_timer() -> StreamSettings {
    StreamSettings {
        buffer_bytes: 4096,
        flush_interval: Duration::from_secs(3600),
    }
}

fn chunk(id: &str, content: &str) -> String {
    format!(
        "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}]}}\n\n",
        serde_json::to_string(content).expect("string")
    )
}

fn role(id: &str) -> String {
    format!("data: {{\"id\":\"{id}\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n")
}

fn stop(id: &str) -> String {
    format!("data: {{\"id\":\"{id}\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n")
}

const USAGE: &str = "data: {\"id\":\"u\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// Feeds each piece at `now`, then finishes; returns everything emitted.
fn run(filter: &mut StreamPolicy, pieces: &[&str], now: Instant) -> String {
    let mut out = Vec::new();
    for piece in pieces {
        out.extend_from_slice(&filter.push(Bytes::copy_from_slice(piece.as_bytes()), now));
    }
    out.extend_from_slice(&filter.finish(now));
    String::from_utf8(out).expect("utf-8 output")
}

/// `(id, content)` of every JSON event in `sse`, `("[DONE]", "")` for the end marker.
fn events(sse: &str) -> Vec<(String, String)> {
    sse.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|event| {
            let data = event.strip_prefix("data: ").expect("a data event");
            if data == "[DONE]" {
                return ("[DONE]".to_string(), String::new());
            }
            let v: Value = serde_json::from_str(data).expect("JSON event");
            let id = v["id"].as_str().unwrap_or_default().to_string();
            let content = v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (id, content)
        })
        .collect()
}

#[test]
fn a_clean_stream_leaves_as_it_came() {
    let input = [
        role("1"),
        chunk("1", "Hello"),
        chunk("1", ", world"),
        stop("1"),
        USAGE.to_string(),
        DONE.to_string(),
    ]
    .concat();
    let mut f = filter(keys(Action::Redact), no_timer());
    assert_eq!(run(&mut f, &[&input], Instant::now()), input);
    assert!(f.flagged().is_empty() && f.redacted_by().is_empty() && f.blocked_by().is_none());
}

#[test]
fn a_match_split_over_three_events_is_redacted() {
    let (a, rest) = KEY.split_at(8);
    let (b, c) = rest.split_at(6);
    let input = [
        chunk("1", &format!("my key is {a}")),
        chunk("2", b),
        chunk("3", &format!("{c} done")),
        stop("4"),
        DONE.to_string(),
    ];
    let pieces: Vec<&str> = input.iter().map(String::as_str).collect();
    let mut f = filter(keys(Action::Redact), no_timer());
    let out = run(&mut f, &pieces, Instant::now());
    assert_eq!(
        events(&out),
        [
            ("1".into(), "my key is [REDACTED]".into()),
            ("2".into(), String::new()),
            ("3".into(), " done".into()),
            ("4".into(), String::new()),
            ("[DONE]".into(), String::new()),
        ]
    );
    assert_eq!(f.redacted_by().len(), 1);
    // The unchanged events are byte-identical; the changed ones differ only in content.
    assert!(out.ends_with(&[stop("4"), DONE.to_string()].concat()));
    assert!(out.starts_with(&chunk("1", "my key is [REDACTED]")));
}

#[test]
fn block_mid_stream_ends_with_one_error_event() {
    let start = Instant::now();
    let settings = StreamSettings {
        buffer_bytes: 4096,
        flush_interval: Duration::from_millis(100),
    };
    let mut f = filter(keys(Action::Block), settings);
    // Each text ends where a key could begin, so it is held.
    let first = chunk("1", "fine so far sk-0");
    assert!(f.push(first.clone().into(), start).is_empty());
    let released = f.flush_due(start + Duration::from_millis(100));
    assert_eq!(released, first.as_bytes());

    let mut out = Vec::new();
    out.extend_from_slice(&f.push(chunk("2", "and then sk").into(), start));
    out.extend_from_slice(&f.push(chunk("3", KEY).into(), start));
    let out = String::from_utf8(out).expect("utf-8");
    assert!(!out.contains("sk-"), "{out}");
    let data = out
        .strip_prefix("data: ")
        .and_then(|rest| rest.strip_suffix("\n\n"))
        .expect("exactly one event");
    let v: Value = serde_json::from_str(data).expect("JSON");
    assert_eq!(v["error"]["code"], "content_policy_violation");
    assert_eq!(
        v["error"]["message"],
        "response blocked by content policy no-keys"
    );
    assert_eq!(f.blocked_by().map(|n| &**n), Some("no-keys"));
    // Nothing more comes out.
    assert!(f.push(chunk("4", "more").into(), start).is_empty());
    assert!(f.push(DONE.into(), start).is_empty());
    assert!(f.finish(start).is_empty());
}

#[test]
fn flag_forwards_the_stream_untouched_and_records_the_policy() {
    let input = [
        chunk("1", &format!("a {KEY} b")),
        stop("1"),
        DONE.to_string(),
    ]
    .concat();
    let mut f = filter(keys(Action::Flag), no_timer());
    assert_eq!(run(&mut f, &[&input], Instant::now()), input);
    assert_eq!(f.flagged().len(), 1);
    assert_eq!(&*f.flagged()[0], "no-keys");
}

#[test]
fn the_flush_interval_releases_held_text() {
    let start = Instant::now();
    let settings = StreamSettings {
        buffer_bytes: 4096,
        flush_interval: Duration::from_millis(100),
    };
    let mut f = filter(keys(Action::Redact), settings);
    assert_eq!(f.deadline(), None);
    let first = chunk("1", "Hello sk");
    assert!(f.push(first.clone().into(), start).is_empty());
    assert_eq!(f.deadline(), Some(start + Duration::from_millis(100)));
    let later = start + Duration::from_millis(60);
    let second = chunk("2", "-0123");
    assert!(f.push(second.clone().into(), later).is_empty());
    assert!(f.flush_due(start + Duration::from_millis(99)).is_empty());
    // Only the text that is due leaves; the younger event stays until its own deadline.
    assert_eq!(
        f.flush_due(start + Duration::from_millis(100)),
        first.as_bytes()
    );
    assert_eq!(f.deadline(), Some(later + Duration::from_millis(100)));
    assert_eq!(
        f.flush_due(later + Duration::from_millis(100)),
        second.as_bytes()
    );
    assert_eq!(f.deadline(), None);
}

#[test]
fn text_that_cannot_begin_a_match_is_not_held() {
    let mut f = filter(keys(Action::Redact), no_timer());
    let now = Instant::now();
    let plain = chunk("1", "Hello there, no key here.");
    assert_eq!(f.push(plain.clone().into(), now), plain.as_bytes());
    assert_eq!(f.deadline(), None);
    // Only the tail that could still be a key is held: here the whole event, as its text
    // ends in `sk-01`.
    let partial = chunk("2", "see sk-01");
    assert!(f.push(partial.clone().into(), now).is_empty());
    let rest = chunk("3", " never mind");
    assert_eq!(
        f.push(rest.clone().into(), now),
        [partial.as_str(), rest.as_str()].concat().as_bytes()
    );
}

#[test]
fn non_ascii_text_that_cannot_begin_a_match_is_not_held_either() {
    let set = policies(&[
        ("keys", "sk-[A-Za-z0-9]{20,}", Action::Redact),
        ("words", "(?i:内部项目|internal\\.example)", Action::Block),
    ]);
    let mut f = filter(set, no_timer());
    let now = Instant::now();
    let plain = chunk("1", "你好，这是普通的回答。");
    assert_eq!(f.push(plain.clone().into(), now), plain.as_bytes());
    let partial = chunk("2", "关于内部");
    assert!(
        f.push(partial.into(), now).is_empty(),
        "`内部` may begin `内部项目`"
    );
    let out = f.push(chunk("3", "项目的细节").into(), now);
    assert!(String::from_utf8_lossy(&out).contains("content_policy_violation"));
}

#[test]
fn text_beyond_the_buffer_is_released_without_waiting() {
    let settings = StreamSettings {
        buffer_bytes: 8,
        flush_interval: Duration::from_secs(3600),
    };
    let mut f = filter(keys(Action::Redact), settings);
    let now = Instant::now();
    let a = chunk("1", "xsk-0123");
    let b = chunk("2", "abcdefsk-0");
    // A key may have begun at 1: the event cannot leave until all its text is released.
    assert!(f.push(a.clone().into(), now).is_empty());
    // Now 18 bytes: the first event's 8 are all older than the last 8 (and a key may begin
    // at 14, so the second event waits).
    assert_eq!(f.push(b.clone().into(), now), a.as_bytes());
    assert_eq!(f.finish(now), b.as_bytes());
}

#[test]
fn a_match_straddling_the_window_edge_is_released_redacted() {
    let settings = StreamSettings {
        buffer_bytes: 8,
        flush_interval: Duration::from_secs(3600),
    };
    let mut f = filter(keys(Action::Redact), settings);
    let out = run(
        &mut f,
        &[
            &chunk("1", &format!("x{KEY}")),
            &chunk("2", "!"),
            &chunk("3", "tail text"),
        ],
        Instant::now(),
    );
    assert_eq!(
        events(&out),
        [
            ("1".into(), "x[REDACTED]".into()),
            ("2".into(), "!".into()),
            ("3".into(), "tail text".into()),
        ]
    );
}

#[test]
fn done_and_the_usage_chunk_release_everything_before_them() {
    let mut f = filter(keys(Action::Redact), no_timer());
    let now = Instant::now();
    let text = chunk("1", "partial sk-");
    assert!(f.push(text.clone().into(), now).is_empty());
    assert_eq!(
        f.push(USAGE.into(), now),
        [text.as_str(), USAGE].concat().as_bytes()
    );
    assert_eq!(f.push(DONE.into(), now), DONE.as_bytes());
    assert_eq!(f.deadline(), None);
}

#[test]
fn finish_reason_releases_that_choice_and_order_and_ids_are_kept() {
    let mut f = filter(keys(Action::Redact), no_timer());
    let now = Instant::now();
    let events_in = [
        role("a"),
        chunk("b", "one sk"),
        chunk("c", "-two"),
        stop("d"),
    ];
    let mut out = Vec::new();
    for e in &events_in[..3] {
        out.extend_from_slice(&f.push(e.clone().into(), now));
    }
    // Held: the role event waits for nothing, so it left; the text events wait.
    assert_eq!(out, events_in[0].as_bytes());
    out.extend_from_slice(&f.push(events_in[3].clone().into(), now));
    assert_eq!(out, events_in.concat().as_bytes());
}

#[test]
fn choices_and_reasoning_are_separate_texts() {
    // `ab` must not match across choice 0 and choice 1, nor across reasoning and content.
    let set = policies(&[("ab", "ab", Action::Block)]);
    let two = "data: {\"id\":\"1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}},{\"index\":1,\"delta\":{\"content\":\"b\"}}]}\n\n";
    let mixed = "data: {\"id\":\"2\",\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"b\"}}]}\n\n";
    let mut f = filter(set.clone(), no_timer());
    assert_eq!(
        run(&mut f, &[two, mixed, DONE], Instant::now()),
        [two, mixed, DONE].concat()
    );

    let across =
        "data: {\"id\":\"3\",\"choices\":[{\"index\":1,\"delta\":{\"content\":\"a\"}}]}\n\n";
    let mut f = filter(set, no_timer());
    let out = run(&mut f, &[two, across, &chunk("4", "b")], Instant::now());
    // Choice 0 has "a" then "b" (event 4): blocked, whatever sits between.
    assert!(out.contains("content_policy_violation"), "{out}");
}

#[test]
fn reasoning_content_is_redacted_too() {
    let event = format!("data: {{\"id\":\"r\",\"choices\":[{{\"index\":0,\"delta\":{{\"reasoning_content\":\"think {KEY}\"}}}}]}}\n\n");
    let mut f = filter(keys(Action::Redact), no_timer());
    let out = run(&mut f, &[&event], Instant::now());
    assert_eq!(
        out,
        "data: {\"id\":\"r\",\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"think [REDACTED]\"}}]}\n\n"
    );
}

#[test]
fn a_last_event_without_its_blank_line_is_still_examined() {
    let event = chunk("1", KEY);
    let cut = event.trim_end_matches('\n');
    let mut f = filter(keys(Action::Redact), no_timer());
    let out = run(&mut f, &[cut], Instant::now());
    assert_eq!(out, chunk("1", "[REDACTED]").trim_end_matches('\n'));
}

#[test]
fn crlf_and_multi_line_data_events_are_understood() {
    let crlf = format!("data: {{\"id\":\"1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{KEY}\"}}}}]}}\r\n\r\n");
    let mut f = filter(keys(Action::Redact), no_timer());
    assert_eq!(
        run(&mut f, &[&crlf], Instant::now()),
        "data: {\"id\":\"1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"[REDACTED]\"}}]}\r\n\r\n"
    );

    let multi = format!("id: 7\ndata: {{\"id\":\"1\",\ndata: \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{KEY}\"}}}}]}}\n\n");
    let mut f = filter(keys(Action::Redact), no_timer());
    assert_eq!(
        run(&mut f, &[&multi], Instant::now()),
        "id: 7\ndata: {\"id\":\"1\",\n\"choices\":[{\"index\":0,\"delta\":{\"content\":\"[REDACTED]\"}}]}\n\n"
    );
}

#[test]
fn comments_and_non_json_events_pass_through_in_order() {
    let input = [
        chunk("1", "held"),
        ": keep-alive\n\n".to_string(),
        "event: ping\ndata: not json\n\n".to_string(),
        chunk("2", "more"),
    ]
    .concat();
    let mut f = filter(keys(Action::Redact), no_timer());
    assert_eq!(run(&mut f, &[&input], Instant::now()), input);
}

#[test]
fn an_oversized_event_passes_through_unexamined() {
    let mut f = filter(keys(Action::Block), no_timer());
    let now = Instant::now();
    let held = chunk("1", "text sk-");
    assert!(f.push(held.clone().into(), now).is_empty());
    let big = "x".repeat(MAX_EVENT_BYTES + 1);
    let out = f.push(big.clone().into(), now);
    assert_eq!(out, [held.as_str(), big.as_str()].concat().as_bytes());
}

#[test]
fn no_filter_when_no_response_policy_applies() {
    let request_only = Arc::new(
        PolicySet::compile(vec![PolicySpec {
            name: "req".into(),
            sides: vec![Side::Request],
            pattern: Pattern::Regex("x".into()),
            action: Action::Block,
            replacement: String::new(),
            models: vec![],
        }])
        .expect("valid"),
    );
    assert!(StreamPolicy::new(request_only, Some("m"), no_timer()).is_none());
    let other_model = Arc::new(
        PolicySet::compile(vec![PolicySpec {
            name: "ds".into(),
            sides: vec![Side::Response],
            pattern: Pattern::Regex("x".into()),
            action: Action::Block,
            replacement: String::new(),
            models: vec!["deepseek-*".into()],
        }])
        .expect("valid"),
    );
    assert!(StreamPolicy::new(other_model.clone(), Some("doubao"), no_timer()).is_none());
    assert!(StreamPolicy::new(other_model, Some("deepseek-v3"), no_timer()).is_some());
}

/// Cuts `text` into pieces at the given relative points (char boundaries kept).
fn split_text(text: &str, points: &[usize]) -> Vec<String> {
    let mut cuts: Vec<usize> = points
        .iter()
        .map(|p| p % (text.len() + 1))
        .filter(|&p| text.is_char_boundary(p))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut at = 0;
    for cut in cuts.into_iter().chain([text.len()]) {
        pieces.push(text[at..cut].to_string());
        at = cut;
    }
    pieces
}

/// Cuts bytes into chunks at the given points.
fn split_bytes(bytes: &[u8], points: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = points.iter().map(|p| p % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut chunks = Vec::new();
    let mut at = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        chunks.push(Bytes::copy_from_slice(&bytes[at..cut]));
        at = cut;
    }
    chunks
}

const WORDS: &[&str] = &[
    "hello", "sk-", "abcab", "sk-abc", "wörld", "中文", "sk-ab", "x", "\"q\"",
];

proptest! {
    #[test]
    fn without_a_match_output_equals_input_whatever_the_chunking(
        words in prop::collection::vec(0..WORDS.len(), 0..60),
        text_cuts in prop::collection::vec(any::<usize>(), 0..20),
        byte_cuts in prop::collection::vec(any::<usize>(), 0..40),
        steps in prop::collection::vec(0u64..80, 0..40),
        buffer_bytes in 0usize..32,
    ) {
        let text: Vec<&str> = words.iter().map(|&i| WORDS[i]).collect();
        let text = text.join(" ");
        let mut input = role("0");
        for (i, piece) in split_text(&text, &text_cuts).iter().enumerate() {
            input.push_str(&chunk(&i.to_string(), piece));
            input.push_str(": ping\n\n");
        }
        input.push_str(&stop("s"));
        input.push_str(USAGE);
        input.push_str(DONE);
        // Never matches these words.
        let set = policies(&[("never", "zz[0-9]+", Action::Redact), ("nor", "QQQ", Action::Block)]);
        let settings = StreamSettings { buffer_bytes, flush_interval: Duration::from_millis(50) };
        let mut f = filter(set, settings);
        let start = Instant::now();
        let mut now = start;
        let mut out = Vec::new();
        for (i, chunk) in split_bytes(input.as_bytes(), &byte_cuts).into_iter().enumerate() {
            now += Duration::from_millis(steps.get(i).copied().unwrap_or(0));
            out.extend_from_slice(&f.flush_due(now));
            out.extend_from_slice(&f.push(chunk, now));
        }
        out.extend_from_slice(&f.finish(now));
        prop_assert_eq!(String::from_utf8(out).expect("utf-8"), input);
    }

    #[test]
    fn redaction_equals_redacting_the_whole_text_whatever_the_split(
        words in prop::collection::vec(0..WORDS.len(), 0..60),
        text_cuts in prop::collection::vec(any::<usize>(), 0..30),
        byte_cuts in prop::collection::vec(any::<usize>(), 0..30),
        buffer_bytes in 8usize..40,
    ) {
        let text: Vec<&str> = words.iter().map(|&i| WORDS[i]).collect();
        let text = text.join(" ");
        let pieces = split_text(&text, &text_cuts);
        let mut input = String::new();
        for (i, piece) in pieces.iter().enumerate() {
            input.push_str(&chunk(&i.to_string(), piece));
        }
        input.push_str(&stop("s"));
        input.push_str(DONE);
        // Matches are at most 8 bytes (`sk-abcab`), shorter than any buffer here.
        let source = "sk-[abc]{2,}";
        let set = policies(&[("keys", source, Action::Redact)]);
        let settings = StreamSettings { buffer_bytes, flush_interval: Duration::from_secs(3600) };
        let mut f = filter(set, settings);
        let now = Instant::now();
        let mut out = Vec::new();
        for chunk in split_bytes(input.as_bytes(), &byte_cuts) {
            out.extend_from_slice(&f.push(chunk, now));
        }
        out.extend_from_slice(&f.finish(now));
        let out = String::from_utf8(out).expect("utf-8");
        let got = events(&out);
        // Same events, same ids, in order; the text, joined, is the whole text redacted.
        let ids: Vec<String> = got.iter().map(|(id, _)| id.clone()).collect();
        let mut want_ids: Vec<String> = (0..pieces.len()).map(|i| i.to_string()).collect();
        want_ids.extend(["s".to_string(), "[DONE]".to_string()]);
        prop_assert_eq!(ids, want_ids);
        let joined: String = got.iter().map(|(_, content)| content.as_str()).collect();
        let whole = regex::Regex::new(source).expect("valid").replace_all(&text, "[REDACTED]");
        prop_assert_eq!(joined, whole.into_owned());
    }
}

#[test]
fn only_delta_text_is_matched_not_ids_models_or_tool_arguments() {
    let event = format!(
        "data: {{\"id\":\"{KEY}\",\"model\":\"{KEY}\",\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"id\":\"{KEY}\",\"function\":{{\"name\":\"f\",\"arguments\":\"{{\\\"k\\\":\\\"{KEY}\\\"}}\"}}}}]}},\"logprobs\":{{\"content\":[{{\"token\":\"{KEY}\"}}]}}}}]}}\n\n"
    );
    let input = [event.as_str(), DONE].concat();
    let mut f = filter(keys(Action::Block), no_timer());
    assert_eq!(run(&mut f, &[&input], Instant::now()), input);
    assert!(f.blocked_by().is_none());
}
