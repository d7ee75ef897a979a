//! Token usage, time to first token, `Server-Timing` and JSON access events, end to end.
//!
//! Counters are process-wide and the tests of this binary run in parallel: each test uses a
//! model name of its own, so its `arkgate_tokens_total{model=…}` series are its alone.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::process::ProxyProcess;
use common::*;

const USAGE: &str = r#""usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}"#;

fn chat_json(model: &str) -> String {
    format!(
        r#"{{"id":"c1","object":"chat.completion","model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":"the usage is \"usage\": 999"}}}}],{USAGE}}}"#
    )
}

fn delta(text: &str) -> String {
    format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}\n\n"
    )
}

fn usage_chunk() -> String {
    format!("data: {{\"choices\":[],{USAGE}}}\n\n")
}

/// An SSE answer that ends with the usage-only chunk, as upstreams send it when asked.
fn stream_reply(first_delay: Duration) -> Reply {
    Reply::sse(&[
        (first_delay, &delta("Hel")),
        (ms(5), &delta("lo")),
        (ms(5), &usage_chunk()),
        (ms(5), "data: [DONE]\n\n"),
    ])
}

fn tokens(m: &HashMap<String, f64>, model: &str, kind: &str) -> f64 {
    let key = format!("arkgate_tokens_total{{key=\"-\",model=\"{model}\",type=\"{kind}\"}}");
    m.get(&key).copied().unwrap_or(0.0)
}

fn body(model: &str, stream: bool, extra: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}{extra}}}"#
    )
}

#[tokio::test]
async fn tokens_of_json_answers_are_counted_from_the_top_level_usage() {
    let model = "m-json";
    let mock = MockUpstream::start(MockConfig::h1().reply(move |_| Reply::json(chat_json(model))));
    let proxy = proxy(&mock.base_url("/v1")).admin().start();
    for _ in 0..3 {
        let r = post_json(proxy.addr, "/chat/completions", &body(model, false, "")).await;
        assert_eq!(r.status, 200);
        assert!(
            r.text().contains("\"usage\""),
            "the client's answer is unchanged"
        );
    }
    let m = metrics_when(proxy.admin_addr.expect("admin"), |m| {
        tokens(m, model, "completion") >= 21.0
    })
    .await;
    assert_eq!(tokens(&m, model, "prompt"), 33.0);
    assert_eq!(tokens(&m, model, "completion"), 21.0);
}

#[tokio::test]
async fn a_stream_whose_client_did_not_ask_for_usage_is_counted_and_left_as_asked() {
    let model = "m-stream-silent";
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| stream_reply(ms(0))));
    let proxy = proxy(&mock.base_url("/v1")).admin().start();
    let r = post_json(proxy.addr, "/chat/completions", &body(model, true, "")).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(
        !text.contains("prompt_tokens"),
        "usage chunk reached the client: {text}"
    );
    assert!(text.contains("Hel") && text.contains("lo") && text.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        text,
        format!("{}{}data: [DONE]\n\n", delta("Hel"), delta("lo")),
        "every other event byte for byte"
    );
    let sent = mock.only_request().body_json();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["model"], model);
    let m = metrics_when(proxy.admin_addr.expect("admin"), |m| {
        tokens(m, model, "completion") >= 7.0
    })
    .await;
    assert_eq!(tokens(&m, model, "prompt"), 11.0);
    assert_eq!(tokens(&m, model, "completion"), 7.0);
}

#[tokio::test]
async fn a_stream_whose_client_asked_for_usage_keeps_its_usage_chunk() {
    let model = "m-stream-asked";
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| stream_reply(ms(0))));
    let proxy = proxy(&mock.base_url("/v1")).admin().start();
    let asked = body(model, true, r#","stream_options":{"include_usage":true}"#);
    let r = post_json(proxy.addr, "/chat/completions", &asked).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains(&usage_chunk()), "{}", r.text());
    assert_eq!(
        mock.only_request().body,
        asked.as_bytes(),
        "body sent as it came"
    );
    let m = metrics_when(proxy.admin_addr.expect("admin"), |m| {
        tokens(m, model, "completion") >= 7.0
    })
    .await;
    assert_eq!(tokens(&m, model, "completion"), 7.0);
}

#[tokio::test]
async fn include_usage_can_be_switched_off() {
    let model = "m-no-include";
    let mock = MockUpstream::start(
        MockConfig::h1()
            .reply(|_| Reply::sse(&[(ms(0), &delta("x")), (ms(5), "data: [DONE]\n\n")])),
    );
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml("usage: {stream_include_usage: false}")
        .admin()
        .start();
    let sent = body(model, true, "");
    let r = post_json(proxy.addr, "/chat/completions", &sent).await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.only_request().body, sent.as_bytes());
}

#[tokio::test]
async fn an_answer_without_usage_is_counted_as_missing_not_as_zero_tokens() {
    let model = "m-missing";
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| {
        Reply::json(r#"{"choices":[{"message":{"role":"assistant","content":"hi"}}]}"#)
    }));
    let proxy = proxy(&mock.base_url("/v1")).admin().start();
    let admin = proxy.admin_addr.expect("admin");
    let before = metrics(admin).await["arkgate_usage_missing_total"];
    let r = post_json(proxy.addr, "/chat/completions", &body(model, false, "")).await;
    assert_eq!(r.status, 200);
    let m = metrics_when(admin, |m| m["arkgate_usage_missing_total"] >= before + 1.0).await;
    assert!(m["arkgate_usage_missing_total"] >= before + 1.0);
    let key = format!("arkgate_tokens_total{{key=\"-\",model=\"{model}\",type=\"prompt\"}}");
    assert!(
        !m.contains_key(&key),
        "missing usage must not become zero tokens"
    );
}

#[tokio::test]
async fn time_to_first_token_covers_a_delayed_first_event() {
    let model = "m-ttft";
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| stream_reply(ms(300))));
    let proxy = proxy(&mock.base_url("/v1")).admin().start();
    let r = post_json(proxy.addr, "/chat/completions", &body(model, true, "")).await;
    assert_eq!(r.status, 200);
    let key = format!("arkgate_ttft_seconds_count{{model=\"{model}\"}}");
    let m = metrics_when(proxy.admin_addr.expect("admin"), |m| m.contains_key(&key)).await;
    let count = m[&format!("arkgate_ttft_seconds_count{{model=\"{model}\"}}")];
    let sum = m[&format!("arkgate_ttft_seconds_sum{{model=\"{model}\"}}")];
    assert_eq!(count, 1.0);
    assert!(sum >= 0.3, "ttft {sum} s below the upstream's 300 ms delay");
    assert!(sum < 5.0, "ttft {sum} s");
}

/// `arkgate;dur=1.234, upstream;dur=200.5` → (1.234, 200.5).
fn server_timing(v: &str) -> (f64, f64) {
    let mut ours = None;
    let mut upstream = None;
    for part in v.split(',') {
        let (name, dur) = part.trim().split_once(";dur=").expect("name;dur=value");
        let dur: f64 = dur.parse().expect("a number");
        match name {
            "arkgate" => ours = Some(dur),
            "upstream" => upstream = Some(dur),
            other => panic!("unexpected metric {other}"),
        }
    }
    (ours.expect("arkgate"), upstream.expect("upstream"))
}

#[tokio::test]
async fn server_timing_splits_arkgate_from_a_delayed_upstream() {
    let mock = MockUpstream::start(
        MockConfig::h1()
            .reply(|_| Reply::After(ms(200), Box::new(Reply::json(chat_json("m-timing"))))),
    );
    let proxy = proxy(&mock.base_url("/v1")).start();
    let r = post_json(
        proxy.addr,
        "/chat/completions",
        &body("m-timing", false, ""),
    )
    .await;
    assert_eq!(r.status, 200);
    let (ours, upstream) = server_timing(r.header("server-timing").expect("Server-Timing"));
    assert!(upstream >= 200.0, "upstream {upstream} ms");
    assert!(upstream < 2000.0, "upstream {upstream} ms");
    assert!(ours >= 0.0 && ours < upstream, "arkgate {ours} ms");
}

#[test]
fn json_access_events_carry_the_fields_and_never_a_credential() {
    const SECRET: &str = "sk-usage-test-secret-0123456789";
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(chat_json("m-log"))));
    let config = proxy(&mock.base_url("/v1"))
        .yaml("logging: {format: json, sample_rate: 1}")
        .admin();
    let arkgate = ProxyProcess::start(&config, "usage-json");
    let mut client = BlockingClient::new(arkgate.addr());
    let request = request_bytes(
        "POST",
        "/chat/completions?key=hidden",
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {SECRET}")),
        ],
        body("m-log", false, "").as_bytes(),
    );
    let r = client.send(&request).expect("answer");
    assert_eq!(r.status, 200);
    let lines = arkgate.wait_for_log_lines("arkgate::access", 1);
    let line = &lines[0];
    let start = line.find('{').expect("a JSON object on the line");
    let event: serde_json::Value = serde_json::from_str(&line[start..]).expect("one JSON object");
    for key in [
        "ts",
        "method",
        "path",
        "status",
        "model",
        "stream",
        "endpoint",
        "cache",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "duration_ms",
        "upstream_ms",
        "overhead_ms",
        "bytes_in",
        "bytes_out",
        "error",
    ] {
        assert!(event.get(key).is_some(), "{key} missing in {event}");
    }
    assert_eq!(event["method"], "POST");
    assert_eq!(event["path"], "/chat/completions");
    assert_eq!(event["status"], 200);
    assert_eq!(event["model"], "m-log");
    assert_eq!(event["stream"], false);
    assert_eq!(event["endpoint"], "default");
    assert_eq!(event["prompt_tokens"], 11);
    assert_eq!(event["completion_tokens"], 7);
    assert!(event["error"].is_null());
    assert!(event["duration_ms"].as_f64().expect("number") >= 0.0);
    let log = arkgate.log();
    assert!(!log.contains(SECRET), "a credential reached the log");
    assert!(!log.contains("hidden"), "the query reached the log");
}
