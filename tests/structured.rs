//! The structured-output downgrade on the wire (`structured_output: {default: downgrade}`): a
//! `json_schema` request reaches the upstream in JSON mode with the schema in a system message,
//! everything else byte for byte; bodies that need nothing, or that cannot be read, pass
//! untouched; per-model passthrough; streaming; chunked and large uploads.

mod common;

use arkgate::metrics::METRICS;
use serde_json::{json, Value};

use common::*;

const DOWNGRADE: &str = "structured_output: {default: downgrade}\n";

const SCHEMA: &str = r##"{"type":"object","properties":{"answer":{"$ref":"#/$defs/Answer"}},"required":["answer"],"additionalProperties":false,"$defs":{"Answer":{"type":"object","properties":{"text":{"type":"string"},"score":{"type":"number"}},"required":["text","score"],"additionalProperties":false}}}"##;

/// As openai-agents-python sends it for an agent with a Pydantic `output_type`.
fn agents_body(model: &str, stream: bool, user: &str) -> String {
    format!(
        r#"{{"messages":[{{"content":"You are a careful grader.","role":"system"}},{{"role":"user","content":{user}}}],"model":"{model}","response_format":{{"type":"json_schema","json_schema":{{"name":"final_output","strict":true,"schema":{SCHEMA}}}}},"stream":{stream},"temperature":0.70,"top_p":1e0}}"#,
        user = serde_json::to_string(user).expect("string")
    )
}

fn downgrade_proxy(mock: &MockUpstream) -> Proxy {
    start_proxy(DOWNGRADE, &mock.base_url("/api/v3"))
}

/// A mock upstream answering 200, and a downgrading proxy in front of it.
fn downgrading_proxy_and_mock() -> (MockUpstream, Proxy) {
    let mock = MockUpstream::start(MockConfig::h1());
    let proxy = downgrade_proxy(&mock);
    (mock, proxy)
}

/// Checks a downgraded agents body as the upstream received it.
fn assert_downgraded(seen: &RecordedRequest, original: &str) {
    let raw = String::from_utf8(seen.body.clone()).expect("UTF-8 body");
    let body: Value = serde_json::from_str(&raw).expect("upstream body is JSON");
    let before: Value = serde_json::from_str(original).expect("original is JSON");

    assert_eq!(body["response_format"], json!({"type": "json_object"}));
    let user_text = serde_json::to_string(&before["messages"][1]["content"]).expect("user text");
    assert!(
        !raw.replace(&user_text, "").contains("json_schema"),
        "json_schema left outside the user's text: {raw}"
    );
    let messages = body["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 3, "one message inserted: {raw}");
    assert_eq!(
        messages[0], before["messages"][0],
        "the caller's system message comes first, unchanged"
    );
    assert_eq!(messages[1]["role"], "system");
    let instruction = messages[1]["content"].as_str().expect("instruction text");
    assert!(
        instruction.contains("JSON"),
        "JSON mode needs the word JSON: {instruction}"
    );
    let (_, schema) = instruction
        .rsplit_once('\n')
        .expect("schema on the last line");
    assert_eq!(
        serde_json::from_str::<Value>(schema).expect("schema is JSON"),
        serde_json::from_str::<Value>(SCHEMA).expect("schema"),
        "the whole schema, $defs included, is handed to the model"
    );
    assert_eq!(
        messages[2], before["messages"][1],
        "the user message is unchanged"
    );

    // Every other field is exactly as sent, number spellings included.
    for key in ["model", "stream", "temperature", "top_p"] {
        assert_eq!(body[key], before[key], "{key}");
    }
    // A streamed request also asks for usage (`usage.stream_include_usage`, on by default):
    // that one field is added, nothing else.
    let added_usage = usize::from(
        before["stream"] == true
            && before.get("stream_options").is_none()
            && body["stream_options"]["include_usage"] == true,
    );
    assert_eq!(
        body.as_object().map(|o| o.len()),
        before.as_object().map(|o| o.len() + added_usage),
        "no field added or lost"
    );
    assert!(
        raw.contains(r#""temperature":0.70"#) && raw.contains(r#""top_p":1e0"#),
        "numbers copied byte for byte: {raw}"
    );
}

/// The upstream's framing matches the body it got.
fn assert_honest_framing(seen: &RecordedRequest) {
    assert!(seen.complete);
    match seen.header_str("content-length") {
        Some(len) => assert_eq!(
            len,
            seen.body.len().to_string(),
            "Content-Length equals the body length"
        ),
        None => assert!(
            seen.version == Version::H2 || seen.header_str("transfer-encoding") == Some("chunked")
        ),
    }
}

/// [`assert_downgraded`] and [`assert_honest_framing`].
fn assert_downgraded_with_honest_framing(seen: &RecordedRequest, original: &str) {
    assert_downgraded(seen, original);
    assert_honest_framing(seen);
}

#[tokio::test]
async fn an_agents_json_schema_request_is_downgraded_to_json_mode() {
    let (mock, proxy) = downgrading_proxy_and_mock();
    let original = agents_body("deepseek-v3-250324", false, "Grade this essay.");
    let downgraded_before = METRICS.structured_downgraded.get();
    let r = post_json(proxy.addr, "/chat/completions", &original).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        METRICS.structured_downgraded.get() > downgraded_before,
        "counted"
    );
    let seen = mock.only_request();
    assert_downgraded(&seen, &original);
    assert_eq!(
        seen.header_str("content-length"),
        Some(seen.body.len().to_string().as_str()),
        "a small body goes out with its exact new length"
    );
    assert_eq!(seen.target_str(), "/api/v3/chat/completions");
}

#[tokio::test]
async fn a_user_message_mentioning_json_schema_survives_the_downgrade() {
    let (mock, proxy) = downgrading_proxy_and_mock();
    let user = "Explain json_schema versus json_object, quoting \"json_schema\" verbatim.";
    let original = agents_body("deepseek-v3-250324", false, user);
    let r = post_json(proxy.addr, "/chat/completions", &original).await;
    assert_eq!(r.status, 200);
    let seen = mock.only_request();
    assert_downgraded(&seen, &original);
    assert_eq!(seen.body_json()["messages"][2]["content"], user);
}

#[tokio::test]
async fn a_request_without_response_format_mentioning_json_schema_is_untouched() {
    let (mock, proxy) = downgrading_proxy_and_mock();
    let body =
        r#"{"model":"deepseek-v3","messages":[{"role":"user","content":"what is json_schema?"}]}"#;
    let r = post_json(proxy.addr, "/chat/completions", body).await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.only_request().body, body.as_bytes());
}

#[tokio::test]
async fn json_object_and_text_requests_pass_untouched() {
    let (mock, proxy) = downgrading_proxy_and_mock();
    let bodies = [
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"},"temperature":0.70}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"text"}}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
    ];
    for body in bodies {
        let r = post_json(proxy.addr, "/chat/completions", body).await;
        assert_eq!(r.status, 200);
        let seen = mock.last_request();
        assert_eq!(seen.body, body.as_bytes());
        assert_eq!(
            seen.header_str("content-length"),
            Some(body.len().to_string().as_str())
        );
    }
}

#[tokio::test]
async fn invalid_json_is_forwarded_untouched_not_rejected() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| {
        Reply::full(
            400,
            &[("content-type", "application/json")],
            r#"{"error":{"message":"bad json","type":"invalid_request_error","code":null}}"#,
        )
    }));
    let proxy = downgrade_proxy(&mock);
    let bodies = [
        r#"{"model":"m","response_format":{"type":"json_schema","json_schema":{"schema":{}}}"#,
        r#"["json_schema"]"#,
        r#"{"model":"m","model":"n","response_format":{"type":"json_schema","json_schema":{"schema":{}}},"messages":[]}"#,
        r#"{"model":"m","response_format":{"type":"json_schema"},"messages":[]}"#,
    ];
    for body in bodies {
        let r = post_json(proxy.addr, "/chat/completions", body).await;
        assert_eq!(r.status, 400, "the upstream's own answer comes back");
        assert_eq!(r.json()["error"]["message"], "bad json");
        assert_eq!(
            mock.last_request().body,
            body.as_bytes(),
            "forwarded as sent"
        );
    }
    assert_eq!(mock.request_count(), bodies.len());
}

#[tokio::test]
async fn a_model_matched_to_passthrough_is_untouched() {
    let mock = MockUpstream::start(MockConfig::h1());
    let proxy = start_proxy(
        "structured_output:\n  default: downgrade\n  models:\n    - {match: \"gpt-4*\", mode: passthrough}\n",
        &mock.base_url("/api/v3"),
    );
    let native = agents_body("gpt-4o-2024-08-06", false, "hi");
    let r = post_json(proxy.addr, "/chat/completions", &native).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        mock.last_request().body,
        native.as_bytes(),
        "passthrough: byte for byte"
    );

    let other = agents_body("deepseek-v3-250324", false, "hi");
    let r = post_json(proxy.addr, "/chat/completions", &other).await;
    assert_eq!(r.status, 200);
    assert_downgraded(&mock.last_request(), &other);
}

#[tokio::test]
async fn a_streaming_structured_request_is_downgraded_and_streams_back() {
    let events = [
        (
            ms(0),
            "data: {\"choices\":[{\"delta\":{\"content\":\"{\\\"answer\\\"\"}}]}\n\n",
        ),
        (
            ms(50),
            "data: {\"choices\":[{\"delta\":{\"content\":\":{}}\"}}]}\n\n",
        ),
        (ms(50), "data: [DONE]\n\n"),
    ];
    let mock = MockUpstream::start(MockConfig::h1().reply(move |_| Reply::sse(&events)));
    let proxy = downgrade_proxy(&mock);
    let original = agents_body("deepseek-v3-250324", true, "Grade this essay.");
    let r = post_json(proxy.addr, "/chat/completions", &original).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.text(), events.iter().map(|(_, e)| *e).collect::<String>());
    assert!(r.pieces.len() >= 2, "streamed in pieces");
    let seen = mock.only_request();
    assert_downgraded(&seen, &original);
    assert_eq!(seen.body_json()["stream"], true);
}

#[tokio::test]
async fn a_chunked_upload_is_downgraded_too() {
    let (mock, proxy) = downgrading_proxy_and_mock();
    let original = agents_body("deepseek-v3-250324", false, "Grade this essay.");

    // The same body with a Content-Length, for comparison.
    post_json(proxy.addr, "/chat/completions", &original).await;
    let with_length = mock.last_request();

    let mut client = H1Client::connect(proxy.addr).await;
    client.send_chunked_post_head("/chat/completions").await;
    let bytes = original.as_bytes();
    let cut = original.find("json_sch").expect("a json_schema") + 8;
    client
        .send_chunks(&[
            (ms(0), &bytes[..cut]),
            (ms(50), &bytes[cut..cut + 40]),
            (ms(50), &bytes[cut + 40..]),
        ])
        .await;
    let r = client.read_response(false).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let seen = mock.last_request();
    assert_downgraded_with_honest_framing(&seen, &original);
    assert_eq!(
        seen.body, with_length.body,
        "same result however the body was framed"
    );
}

#[tokio::test]
async fn a_large_structured_request_is_downgraded_with_honest_framing() {
    // Over the 64 KiB read-ahead: held until complete, then sent re-framed.
    let (mock, proxy) = downgrading_proxy_and_mock();
    let essay = "lorem ipsum json_schema dolor ".repeat(10_000);
    let original = agents_body("deepseek-v3-250324", false, &essay);
    assert!(original.len() > 256 * 1024);
    let r = post_json(proxy.addr, "/chat/completions", &original).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mock.only_request();
    assert_downgraded_with_honest_framing(&seen, &original);
}

#[tokio::test]
async fn an_h2_client_request_reaches_an_h2_upstream_downgraded() {
    let certs = TestCerts::generate();
    let mock = MockUpstream::start(MockConfig::new(Proto::H2).tls(&certs));
    let proxy = proxy(&mock.base_url("/api/v3"))
        .trust(&certs)
        .h2c()
        .yaml(DOWNGRADE)
        .start();
    let client = H2Client::connect(proxy.addr).await;
    let original = agents_body("deepseek-v3-250324", false, "Grade this essay.");
    let r = client
        .post_json("/chat/completions", original.as_bytes())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mock.only_request();
    assert_downgraded_with_honest_framing(&seen, &original);
}

#[tokio::test]
async fn an_expect_continue_structured_request_is_invited_before_its_body_is_read() {
    // RFC 9110 §10.1.1: a proxy must answer or forward the header section of a 100-continue
    // request at once; reading the body first leaves the client waiting for an invitation.
    let (mock, proxy) = downgrading_proxy_and_mock();
    let original = agents_body("deepseek-v3-250324", false, "Grade this essay.");
    let r = H1Client::connect(proxy.addr)
        .await
        .post_json_expecting_continue("/chat/completions", original.as_bytes())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_downgraded(&mock.only_request(), &original);
}

#[tokio::test]
async fn model_rules_pick_the_downgrade_or_the_byte_rules_per_model() {
    let mock =
        MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(r#"{"f":"json_schema"}"#)));
    let proxy = start_proxy(
        "structured_output:\n  default: bytes\n  models:\n    - {match: \"deepseek-*\", mode: downgrade}\n",
        &mock.base_url("/api/v3"),
    );
    let deepseek = agents_body("deepseek-v3-250324", false, "hi");
    let r = post_json(proxy.addr, "/chat/completions", &deepseek).await;
    assert_eq!(r.status, 200);
    assert_downgraded(&mock.last_request(), &deepseek);

    let legacy = agents_body("doubao-pro", false, "say json_schema");
    let r = post_json(proxy.addr, "/chat/completions", &legacy).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&mock.last_request().body),
        legacy.replace("json_schema", "json_object"),
        "bytes mode: the legacy byte rule everywhere"
    );
    assert_eq!(r.text(), r#"{"f":"json_object"}"#, "and on the response");
}

/// An agents body of exactly `len` bytes (padding the user message).
fn agents_body_of_len(len: usize) -> String {
    let base = agents_body("deepseek-v3-250324", false, "");
    assert!(len > base.len());
    agents_body("deepseek-v3-250324", false, &"x".repeat(len - base.len()))
}

#[tokio::test]
async fn bodies_on_both_sides_of_the_read_ahead_limit_are_downgraded() {
    let (mock, proxy) = downgrading_proxy_and_mock();
    for len in [64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1] {
        let original = agents_body_of_len(len);
        assert_eq!(original.len(), len);
        let r = post_json(proxy.addr, "/chat/completions", &original).await;
        assert_eq!(r.status, 200, "{len}: {}", r.text());
        let seen = mock.last_request();
        assert_downgraded_with_honest_framing(&seen, &original);
    }
}

#[tokio::test]
async fn an_h2_client_request_with_content_length_is_downgraded() {
    let mock = MockUpstream::start(MockConfig::h1());
    let proxy = proxy(&mock.base_url("/api/v3"))
        .h2c()
        .yaml(DOWNGRADE)
        .start();
    let original = agents_body("deepseek-v3-250324", false, "Grade this essay.");
    let len = original.len().to_string();
    let r = H2Client::connect(proxy.addr)
        .await
        .request(
            "POST",
            "/chat/completions",
            &[
                ("content-type", "application/json"),
                ("content-length", &len),
            ],
            original.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mock.only_request();
    assert_downgraded(&seen, &original);
    assert_eq!(
        seen.header_str("content-length"),
        Some(seen.body.len().to_string().as_str())
    );
}
