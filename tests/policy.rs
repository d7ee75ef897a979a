//! Content policies end to end: what the upstream receives for a redacted or blocked request,
//! what the client receives for a redacted or blocked answer (JSON and SSE), model globs, the
//! metrics, the hold-back against a slow stream, big and hostile inputs, and `arkgate -t`.
//!
//! Counters are process-wide and the tests run in parallel: each test that reads one uses a
//! policy name of its own.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const KEY: &str = "sk-0123456789abcdefghijKLMN";

/// One policy named `name` on `sides` matching API keys, with `action`.
fn key_policy(name: &str, sides: &str, action: &str, models: &str) -> String {
    format!(
        "policies:\n  - name: {name}\n    on: [{sides}]\n    regex: \"sk-[A-Za-z0-9]{{20,}}\"\n    action: {action}\n    replacement: \"[REDACTED]\"\n    models: [{models}]\n"
    )
}

fn chat(model: &str, content: Value) -> String {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "be brief", "name": "sk-not-text-0123456789abcdefghij"},
            {"role": "user", "content": content}
        ],
        "temperature": 0.5
    })
    .to_string()
}

fn answer(content: &str) -> String {
    json!({
        "id": "chatcmpl-sk-0123456789abcdefghijXYZ",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]
    })
    .to_string()
}

fn delta(id: &str, text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"id": id, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
    )
}

/// A streamed chat request for model `m`.
fn stream_request() -> String {
    json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

const DONE: &str = "data: [DONE]\n\n";

/// The `content` of each `data:` event of an SSE body, in order (`[DONE]` as itself).
fn contents(sse: &str) -> Vec<String> {
    sse.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| match serde_json::from_str::<Value>(d) {
            Ok(v) => v["choices"][0]["delta"]["content"]
                .as_str()
                .map_or_else(|| v.to_string(), str::to_string),
            Err(_) => d.to_string(),
        })
        .collect()
}

fn actions(m: &HashMap<String, f64>, policy: &str, action: &str, side: &str) -> f64 {
    let key = format!(
        "arkgate_policy_actions_total{{policy=\"{policy}\",action=\"{action}\",side=\"{side}\"}}"
    );
    m.get(&key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn a_key_in_a_request_reaches_the_upstream_redacted_and_nothing_else_changes() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(answer("ok"))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy("req-redact", "request", "redact", "\"*\""))
        .start();
    let sent = chat("m", json!(format!("my key is {KEY}, keep it")));
    let r = post_json(proxy.addr, "/chat/completions", &sent).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let seen = mock.only_request();
    let mut want: Value = serde_json::from_str(&sent).expect("JSON");
    want["messages"][1]["content"] = json!("my key is [REDACTED], keep it");
    assert_eq!(seen.body_json(), want, "only the message text changed");
    assert_eq!(
        seen.header_str("content-length"),
        Some(seen.body.len().to_string().as_str()),
        "an exact Content-Length"
    );
}

#[tokio::test]
async fn a_blocked_request_gets_400_and_never_reaches_the_upstream() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(answer("ok"))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy("req-block", "request", "block", "\"*\""))
        .start();
    let r = post_json(proxy.addr, "/chat/completions", &chat("m", json!(KEY))).await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error"]["code"], "content_policy_violation");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let message = v["error"]["message"].as_str().expect("a message");
    assert!(message.contains("req-block"), "{message}");
    assert!(
        !r.text().contains("sk-0123"),
        "the matched text never comes back"
    );
    assert_eq!(mock.request_count(), 0);
    assert_eq!(mock.connections(), 0, "not even a connection upstream");
}

#[tokio::test]
async fn a_key_inside_a_text_part_of_a_multi_part_message_is_redacted() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(answer("ok"))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy("req-parts", "request", "redact", "\"*\""))
        .start();
    let parts = json!([
        {"type": "text", "text": "look at this"},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/sk-0123456789abcdefghijKLMN.png"}},
        {"type": "text", "text": format!("and {KEY}")}
    ]);
    let r = post_json(proxy.addr, "/chat/completions", &chat("m", parts.clone())).await;
    assert_eq!(r.status, 200);
    let seen = mock.only_request().body_json();
    let got = &seen["messages"][1]["content"];
    assert_eq!(got[0], parts[0]);
    assert_eq!(got[1], parts[1], "non-text parts are never touched");
    assert_eq!(got[2]["text"], "and [REDACTED]");
}

#[tokio::test]
async fn a_held_chunked_upload_that_is_blocked_never_completes_upstream() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(answer("ok"))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy("req-block-held", "request", "block", "\"*\""))
        .start();
    let body = chat("m", json!(format!("here: {KEY}")));
    let (a, b) = body.split_at(body.len() / 2);
    let mut client = H1Client::connect(proxy.addr).await;
    client.send_chunked_post_head("/chat/completions").await;
    client
        .send_chunks(&[(ms(0), a.as_bytes()), (ms(30), b.as_bytes())])
        .await;
    let r = client.read_response(false).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["error"]["code"],
        "content_policy_violation",
        "{}",
        r.text()
    );
    // The upstream may have the head (the body was being held), never a complete request.
    tokio::time::sleep(ms(100)).await;
    assert!(
        mock.requests().iter().all(|q| !q.complete),
        "{:?}",
        mock.requests()
    );
}

#[tokio::test]
async fn a_key_in_a_json_answer_is_redacted_and_the_answer_re_framed() {
    let mock = MockUpstream::start(
        MockConfig::h1().reply(|_| Reply::json(answer(&format!("the key: {KEY}.")))),
    );
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy("resp-redact", "response", "redact", "\"*\""))
        .start();
    let r = post_json(proxy.addr, "/chat/completions", &chat("m", json!("hi"))).await;
    assert_eq!(r.status, 200);
    assert!(r.complete, "framed correctly");
    let v = r.json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "the key: [REDACTED]."
    );
    assert_eq!(
        v["id"], "chatcmpl-sk-0123456789abcdefghijXYZ",
        "ids are never matched"
    );
}

#[tokio::test]
async fn a_key_split_over_three_events_is_redacted_in_the_stream() {
    let events = [
        delta("1", "your key sk-0123"),
        delta("2", "456789abcde"),
        delta("3", "fghijKLMN, done"),
    ];
    let reply_events: Vec<(Duration, String)> = events
        .iter()
        .map(|e| (ms(10), e.clone()))
        .chain([(ms(10), DONE.to_string())])
        .collect();
    let mock = MockUpstream::start(MockConfig::h1().reply(move |_| {
        let refs: Vec<(Duration, &str)> =
            reply_events.iter().map(|(d, e)| (*d, e.as_str())).collect();
        Reply::sse(&refs)
    }));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy("resp-stream", "response", "redact", "\"*\""))
        .start();
    let body = stream_request();
    let r = post_json(proxy.addr, "/chat/completions", &body).await;
    assert_eq!(r.status, 200);
    assert!(r.complete);
    let text = r.text();
    assert!(
        !text.contains("sk-0123") && !text.contains("456789"),
        "{text}"
    );
    let got = contents(&text);
    assert_eq!(got.len(), 4, "every event kept, in order: {text}");
    assert_eq!(got.concat(), "your key [REDACTED], done[DONE]");
    assert!(text.contains("\"id\":\"1\"") && text.contains("\"id\":\"3\""));
}

#[tokio::test]
async fn a_blocked_stream_ends_with_one_error_event_and_no_blocked_text() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| {
        Reply::sse(&[
            (ms(0), &delta("1", "fine so far. ")),
            (ms(10), &delta("2", "sk-0123456789")),
            (ms(10), &delta("3", "abcdefghijKLMN")),
            (ms(10), &delta("4", "after")),
            (ms(10), DONE),
        ])
    }));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy("resp-block", "response", "block", "\"*\""))
        .start();
    let body = stream_request();
    let mut client = H1Client::connect(proxy.addr).await;
    let r = client
        .request(
            "POST",
            "/chat/completions",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.complete, "the stream ends cleanly");
    let text = r.text();
    assert!(!text.contains("sk-") && !text.contains("after"), "{text}");
    let last = text
        .trim_end()
        .rsplit("\n\n")
        .next()
        .and_then(|e| e.strip_prefix("data: "))
        .expect("a last event");
    let v: Value = serde_json::from_str(last).expect("JSON error event");
    assert_eq!(v["error"]["code"], "content_policy_violation");
    assert!(text.starts_with(&delta("1", "fine so far. ")), "{text}");
    assert!(
        client
            .wait_for_close(Duration::from_secs(2))
            .await
            .is_some(),
        "the connection is not kept alive after a block"
    );
}

#[tokio::test]
async fn a_model_glob_exempts_other_models() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(answer("ok"))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy(
            "ds-only",
            "request",
            "redact",
            "\"deepseek-*\"",
        ))
        .start();
    let exempt = chat("doubao-pro", json!(KEY));
    post_json(proxy.addr, "/chat/completions", &exempt).await;
    assert_eq!(mock.last_request().body, exempt.as_bytes(), "untouched");
    post_json(
        proxy.addr,
        "/chat/completions",
        &chat("deepseek-v3", json!(KEY)),
    )
    .await;
    assert_eq!(
        mock.last_request().body_json()["messages"][1]["content"],
        "[REDACTED]"
    );
}

#[tokio::test]
async fn a_flag_forwards_untouched_and_is_counted() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(answer("ok"))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy("req-flag", "request", "flag", "\"*\""))
        .admin()
        .start();
    let sent = chat("m", json!(KEY));
    let r = post_json(proxy.addr, "/chat/completions", &sent).await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.only_request().body, sent.as_bytes());
    let admin = proxy.admin_addr.expect("admin");
    let m = metrics_when(admin, |m| actions(m, "req-flag", "flag", "request") >= 1.0).await;
    assert_eq!(actions(&m, "req-flag", "flag", "request"), 1.0);
    assert!(
        m.keys()
            .any(|k| k.starts_with("arkgate_policy_seconds_count{side=\"request\"}")),
        "evaluation time is measured"
    );
}

#[tokio::test]
async fn text_of_a_slow_stream_reaches_the_client_without_waiting_for_the_next_event() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| {
        Reply::sse(&[
            (ms(0), &delta("1", "Hello, this is plain text.")),
            (ms(800), &delta("2", " More text.")),
            (ms(10), DONE),
        ])
    }));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&key_policy("resp-slow", "response", "redact", "\"*\""))
        .start();
    let body = stream_request();
    let r = post_json(proxy.addr, "/chat/completions", &body).await;
    assert_eq!(r.status, 200);
    let sent = mock.chunk_send_times();
    let first_piece = r.pieces.first().expect("a first piece").0;
    let lag = first_piece.saturating_duration_since(sent[0]);
    assert!(
        lag < ms(100),
        "the first event reached the client {lag:?} after the upstream sent it"
    );
    assert_eq!(
        contents(&r.text()).concat(),
        "Hello, this is plain text. More text.[DONE]"
    );
}

#[tokio::test]
async fn a_pathological_pattern_and_a_five_megabyte_prompt_do_not_stall_the_proxy() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(answer("ok"))));
    let policies = "policies:\n  - {name: evil, on: [request, response], regex: \"(a+)+$\", action: redact, replacement: X}\nlimits: {max_body_bytes: 8388608}\n";
    let proxy = proxy(&mock.base_url("/v1")).yaml(policies).start();
    let mut prompt = "a".repeat(5 << 20);
    prompt.push('!');
    let started = Instant::now();
    let r = post_json(proxy.addr, "/chat/completions", &chat("m", json!(prompt))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        mock.only_request().body_json()["messages"][1]["content"],
        json!(prompt)
    );
    // Meanwhile (and after), small requests are answered.
    let r = post_json(proxy.addr, "/chat/completions", &chat("m", json!("aaa"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        mock.last_request().body_json()["messages"][1]["content"],
        "X"
    );
}

#[tokio::test]
async fn without_policies_a_streamed_upload_still_streams() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(answer("ok"))));
    let proxy = proxy(&mock.base_url("/v1")).start();
    let body = chat("m", json!(format!("here: {KEY}")));
    let (a, b) = body.split_at(body.len() / 2);
    let mut client = H1Client::connect(proxy.addr).await;
    client.send_chunked_post_head("/chat/completions").await;
    client
        .send_chunks(&[(ms(0), a.as_bytes()), (ms(50), b.as_bytes())])
        .await;
    let r = client.read_response(false).await;
    assert_eq!(r.status, 200);
    let seen = mock.only_request();
    assert_eq!(seen.body, body.as_bytes());
    assert!(
        seen.chunks.len() >= 2,
        "forwarded as it came, not held: {:?}",
        seen.chunks
    );
}

#[test]
fn config_test_rejects_a_bad_pattern_naming_the_policy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.yaml");
    let yaml = "listen: [{addr: \"127.0.0.1:8000\"}]\npolicies:\n  - {name: broken-keys, on: [request], regex: \"sk-[A-Z\", action: block}\n";
    std::fs::write(&path, yaml).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arkgate"))
        .args(["-t", "-c", path.to_str().expect("UTF-8")])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run arkgate");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(
            "invalid configuration: policies[0].pattern: policy broken-keys: invalid regex"
        ),
        "{stderr}"
    );
}

#[test]
fn the_access_event_names_the_policies_that_acted_and_never_the_text() {
    let mock = MockUpstream::start(
        MockConfig::h1().reply(|_| Reply::json(answer(&format!("yours: {KEY}")))),
    );
    for format in ["json", "text"] {
        let yaml = format!(
            "{}logging: {{format: {format}, sample_rate: 1}}\n",
            key_policy("log-keys", "request, response", "redact", "\"*\"")
        );
        let config = proxy(&mock.base_url("/v1")).yaml(&yaml);
        let arkgate = common::process::ProxyProcess::start(&config, "policy-log");
        let mut client = BlockingClient::new(arkgate.addr());
        let body = chat("m", json!(format!("mine: {KEY}")));
        let r = client
            .send(&json_post_bytes("/chat/completions", &body))
            .expect("answer");
        assert_eq!(r.status, 200);
        let lines = arkgate.wait_for_log_lines("arkgate::access", 1);
        let line = &lines[0];
        if format == "json" {
            let start = line.find('{').expect("a JSON object on the line");
            let event: Value = serde_json::from_str(&line[start..]).expect("one JSON object");
            assert_eq!(
                event["policies"],
                json!([
                    {"policy": "log-keys", "action": "redact", "side": "request"},
                    {"policy": "log-keys", "action": "redact", "side": "response"}
                ])
            );
        } else {
            assert!(
                line.contains(" policies=log-keys:redact:request,log-keys:redact:response"),
                "{line}"
            );
        }
        assert!(
            !arkgate.log().contains("sk-0123"),
            "matched text reached the log"
        );
    }
}

#[tokio::test]
async fn held_text_reaches_an_h2_client_when_an_h2_upstream_ends_with_trailers() {
    let certs = TestCerts::generate();
    let mock = MockUpstream::start(MockConfig::new(Proto::H2).tls(&certs).reply(|_| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-done", "1".parse().expect("header value"));
        Reply::Chunks {
            status: 200,
            headers: mock::owned(&[("content-type", "text/event-stream")]),
            chunks: vec![
                (ms(0), delta("1", "plain words ").into()),
                (ms(20), delta("2", "and then sk-01").into()),
            ],
            trailers: Some(trailers),
        }
    }));
    let proxy = proxy(&mock.base_url("/v1"))
        .trust(&certs)
        .h2c()
        .yaml(&key_policy("resp-trailers", "response", "redact", "\"*\""))
        .start();
    let client = H2Client::connect(proxy.addr).await;
    let body = stream_request();
    let r = client.post_json("/chat/completions", body.as_bytes()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        [delta("1", "plain words "), delta("2", "and then sk-01")].concat(),
        "the held tail (a possible key's beginning) leaves at the end"
    );
}
