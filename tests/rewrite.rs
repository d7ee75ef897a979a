//! Body rewriting on the wire: the default `json_schema` → `json_object` rule both ways, matches
//! cut across chunks and SSE events, a 5 MB body, binary bytes, length-changing rules with honest
//! framing, an empty rule list, and compression (identity asked for; gzip passed through).

mod common;

use common::*;

const SCHEMA_REQUEST: &str = r#"{"model":"deepseek-v3","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"}}}}"#;

fn rewritten(s: &[u8]) -> Vec<u8> {
    replace_all(s, b"json_schema", b"json_object")
}

fn replace_all(s: &[u8], find: &[u8], replace: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i..].starts_with(find) {
            out.extend_from_slice(replace);
            i += find.len();
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

#[tokio::test]
async fn default_rule_rewrites_the_request_and_the_response() {
    let mock = MockUpstream::start(
        MockConfig::h1().reply(|_| Reply::json(r#"{"format":"json_schema","n":1}"#)),
    );
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let r = post_json(proxy.addr, "/chat/completions", SCHEMA_REQUEST).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), r#"{"format":"json_object","n":1}"#);
    assert_eq!(
        r.header("content-length"),
        Some("30"),
        "equal-length rule keeps Content-Length"
    );

    let seen = mock.only_request();
    let expected = rewritten(SCHEMA_REQUEST.as_bytes());
    assert_eq!(
        String::from_utf8_lossy(&seen.body),
        String::from_utf8_lossy(&expected)
    );
    assert_eq!(
        seen.header_str("content-length"),
        Some(expected.len().to_string().as_str())
    );
}

#[tokio::test]
async fn a_match_split_across_request_chunks_is_rewritten() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::Echo));
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let mut client = H1Client::connect(proxy.addr).await;
    client.send_chunked_post_head("/chat/completions").await;
    // "json_schema" cut after "json_sch", then cut byte by byte, with pauses between chunks.
    let chunks: [(std::time::Duration, &[u8]); 8] = [
        (ms(0), br#"{"response_format":{"type":"json_sch"#),
        (ms(100), br#"ema"},"x":"j"#),
        (ms(20), b"s"),
        (ms(20), b"o"),
        (ms(20), b"n_"),
        (ms(20), b"schem"),
        (ms(20), b"a"),
        (ms(20), br#"","y":"json_"}"#),
    ];
    client.send_chunks(&chunks).await;
    let r = client.read_response(false).await;
    assert_eq!(r.status, 200);
    let expected = br#"{"response_format":{"type":"json_object"},"x":"json_object","y":"json_"}"#;
    assert_eq!(
        String::from_utf8_lossy(&mock.only_request().body),
        String::from_utf8_lossy(expected)
    );
    assert_eq!(
        r.text(),
        String::from_utf8_lossy(expected),
        "echoed back unchanged"
    );
}

#[tokio::test]
async fn a_match_split_across_sse_events_is_rewritten() {
    let events = [
        (ms(0), "data: {\"t\":\"json_"),
        (ms(30), "schema\"}\n\n"),
        (ms(30), "data: {\"t\":\"js"),
        (ms(30), "on_sc"),
        (ms(30), "hema\"}\n\n"),
        (ms(30), "data: {\"t\":\"json_schem\"}\n\n"),
        (ms(30), "data: [DONE]\n\n"),
    ];
    let mock = MockUpstream::start(MockConfig::h1().reply(move |_| Reply::sse(&events)));
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let r = post_json(proxy.addr, "/chat/completions", r#"{"stream":true}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "data: {\"t\":\"json_object\"}\n\ndata: {\"t\":\"json_object\"}\n\ndata: {\"t\":\"json_schem\"}\n\ndata: [DONE]\n\n"
    );
}

/// 5 MiB of text with matches sprinkled everywhere, including across 16 KiB and 64 KiB marks.
fn big_body() -> Vec<u8> {
    let len = 5 * 1024 * 1024;
    let mut body: Vec<u8> = b"{\"data\":\""
        .iter()
        .copied()
        .chain((0..).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36]))
        .take(len - 2)
        .collect();
    body.extend_from_slice(b"\"}");
    let mut at = 100;
    while at + 11 < len - 2 {
        body[at..at + 11].copy_from_slice(b"json_schema");
        at += 9_973;
    }
    for boundary in (16 * 1024..len - 16).step_by(16 * 1024) {
        body[boundary - 5..boundary + 6].copy_from_slice(b"json_schema");
    }
    body
}

#[tokio::test]
async fn a_five_megabyte_body_is_rewritten_exactly_with_its_content_length() {
    let original = big_body();
    let expected = rewritten(&original);
    assert_ne!(original, expected);
    let reply_body = bytes::Bytes::from(original.clone());
    let mock = MockUpstream::start(MockConfig::h1().reply(move |_| {
        Reply::full(
            200,
            &[("content-type", "application/json")],
            reply_body.clone(),
        )
    }));
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let r = post_json(
        proxy.addr,
        "/files",
        std::str::from_utf8(&original).expect("ascii"),
    )
    .await;
    assert_eq!(r.status, 200);

    let seen = mock.only_request();
    assert_eq!(seen.body.len(), expected.len());
    assert!(
        seen.body == expected,
        "upstream body differs from a one-shot replace"
    );
    assert_eq!(
        seen.header_str("content-length"),
        Some(expected.len().to_string().as_str())
    );
    assert!(seen.header("transfer-encoding").is_none());

    assert_eq!(r.body.len(), expected.len());
    assert!(
        r.body == expected,
        "response body differs from a one-shot replace"
    );
    assert_eq!(
        r.header("content-length"),
        Some(expected.len().to_string().as_str())
    );
}

#[tokio::test]
async fn non_utf8_bytes_around_a_match_are_kept() {
    let original: &[u8] =
        b"\xff\xfejson_schema\x80\x00\xc3(json_schema\xf0\x28\x8c\xbc json_schem\xff";
    let expected: &[u8] =
        b"\xff\xfejson_object\x80\x00\xc3(json_object\xf0\x28\x8c\xbc json_schem\xff";
    let mock = MockUpstream::start(MockConfig::h1().reply(move |_| {
        Reply::full(
            200,
            &[("content-type", "application/octet-stream")],
            original,
        )
    }));
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let r = h1(
        proxy.addr,
        "PUT",
        "/blob",
        &[("Content-Type", "application/octet-stream")],
        original,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.only_request().body, expected);
    assert_eq!(r.body, expected);
}

const LENGTH_CHANGING_RULES: &str = "rewrite:\n  - {find: json_schema, replace: json_object}\n  - {find: gpt-4, replace: deepseek-v3-250324, on: [response]}\n  - {find: alpha, replace: alphabet, on: [request]}\n";

#[tokio::test]
async fn a_length_changing_response_rule_reframes_the_response_as_chunked() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| {
        Reply::full(
            200,
            &[
                ("content-type", "application/json"),
                ("accept-ranges", "bytes"),
            ],
            r#"{"model":"gpt-4","fallback":"gpt-4","f":"json_schema"}"#,
        )
    }));
    let proxy = start_proxy(LENGTH_CHANGING_RULES, &mock.base_url("/api/v3"));
    let r = post_json(proxy.addr, "/chat/completions", "{}").await;
    assert_eq!(r.status, 200);
    assert!(r.chunked, "re-framed as chunked: {r:?}");
    assert!(r.header("content-length").is_none());
    assert!(
        r.header("accept-ranges").is_none(),
        "ranges of the old bytes are meaningless"
    );
    assert!(r.complete);
    assert_eq!(
        r.text(),
        r#"{"model":"deepseek-v3-250324","fallback":"deepseek-v3-250324","f":"json_object"}"#
    );
}

#[tokio::test]
async fn a_length_changing_response_rule_gives_an_h2_client_an_exact_body() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(r#"{"model":"gpt-4"}"#)));
    let proxy = proxy(&mock.base_url("/api/v3"))
        .h2c()
        .yaml(LENGTH_CHANGING_RULES)
        .start();
    let client = H2Client::connect(proxy.addr).await;
    let r = client.post_json("/chat/completions", b"{}").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), r#"{"model":"deepseek-v3-250324"}"#);
    if let Some(len) = r.header("content-length") {
        assert_eq!(
            len,
            r.body.len().to_string(),
            "a Content-Length must match the body"
        );
    }
}

/// The upstream's framing must match the rewritten request body.
fn assert_honest_request_framing(seen: &RecordedRequest) {
    assert!(seen.complete);
    if let Some(len) = seen.header_str("content-length") {
        assert_eq!(
            len,
            seen.body.len().to_string(),
            "Content-Length matches the rewritten body"
        );
    }
}

#[tokio::test]
async fn a_length_changing_request_rule_sends_an_exact_body_upstream() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::Echo));
    let proxy = start_proxy(LENGTH_CHANGING_RULES, &mock.base_url("/api/v3"));
    let r = post_json(
        proxy.addr,
        "/chat/completions",
        r#"{"a":"alpha","b":"alpha json_schema"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = mock.only_request();
    assert_eq!(seen.body, br#"{"a":"alphabet","b":"alphabet json_object"}"#);
    assert_honest_request_framing(&seen);
    assert_eq!(r.text(), r#"{"a":"alphabet","b":"alphabet json_object"}"#);
}

#[tokio::test]
async fn a_length_changing_request_rule_sends_an_exact_body_to_an_h2_upstream() {
    let certs = TestCerts::generate();
    let mock = MockUpstream::start(
        MockConfig::new(Proto::H2)
            .tls(&certs)
            .reply(|_| Reply::Echo),
    );
    let proxy = proxy(&mock.base_url("/api/v3"))
        .trust(&certs)
        .yaml(LENGTH_CHANGING_RULES)
        .start();
    let r = post_json(proxy.addr, "/chat/completions", r#"{"a":"alpha"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mock.only_request();
    assert_eq!(seen.body, br#"{"a":"alphabet"}"#);
    assert_honest_request_framing(&seen);
}

#[tokio::test]
async fn an_empty_rule_list_forwards_bodies_untouched() {
    let mock =
        MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(r#"{"f":"json_schema"}"#)));
    let proxy = start_proxy("rewrite: []\n", &mock.base_url("/api/v3"));
    let r = h1(
        proxy.addr,
        "POST",
        "/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Accept-Encoding", "gzip, br"),
        ],
        SCHEMA_REQUEST.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), r#"{"f":"json_schema"}"#);
    let seen = mock.only_request();
    assert_eq!(seen.body, SCHEMA_REQUEST.as_bytes());
    assert_eq!(
        seen.header_str("accept-encoding"),
        Some("gzip, br"),
        "no rewrite, no reason to refuse compression"
    );
}

/// Sends `GET /models` with `Accept-Encoding: accept_encoding` through a proxy configured with
/// `yaml` (empty: the default rules) and returns the request as the upstream got it.
async fn upstream_request_accepting(yaml: &str, accept_encoding: &str) -> RecordedRequest {
    let mock = MockUpstream::start(MockConfig::h1());
    let proxy = start_proxy(yaml, &mock.base_url("/api/v3"));
    let headers = [("Accept-Encoding", accept_encoding)];
    let r = h1(proxy.addr, "GET", "/models", &headers, b"").await;
    assert_eq!(r.status, 200);
    mock.only_request()
}

#[tokio::test]
async fn a_gzip_capable_client_makes_the_upstream_see_identity_when_response_rules_are_on() {
    let seen = upstream_request_accepting("", "gzip, deflate, br").await;
    assert_eq!(seen.header_all("accept-encoding"), [&b"identity"[..]]);
}

#[tokio::test]
async fn accept_encoding_passes_through_when_only_request_rules_are_on() {
    let seen = upstream_request_accepting(
        "rewrite: [{find: json_schema, replace: json_object, on: [request]}]\n",
        "gzip",
    )
    .await;
    assert_eq!(seen.header_str("accept-encoding"), Some("gzip"));
}

/// A valid gzip member holding `data` in one stored (uncompressed) deflate block, so the bytes
/// `json_schema` appear literally inside the compressed body.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    assert!(data.len() <= 0xffff);
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    out.push(1); // BFINAL, stored
    let len = data.len() as u16;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn a_compressed_response_passes_through_byte_exact_and_unrewritten() {
    let plain = br#"{"choices":[{"message":{"content":"use json_schema"}}]}"#;
    let gzipped = gzip_stored(plain);
    let body = bytes::Bytes::from(gzipped.clone());
    let mock = MockUpstream::start(MockConfig::h1().reply(move |_| {
        Reply::full(
            200,
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            body.clone(),
        )
    }));
    let proxy = proxy(&mock.base_url("/api/v3")).start();

    let r = h1(
        proxy.addr,
        "GET",
        "/models",
        &[("Accept-Encoding", "gzip")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert!(
        r.body == gzipped,
        "compressed bytes are passed through untouched"
    );
    if let Some(len) = r.header("content-length") {
        assert_eq!(len, gzipped.len().to_string());
    }

    // A real client decodes it to the upstream's text: nothing contradicts the headers.
    let out = curl(&["--compressed", &proxy.url("/models")]).await;
    assert_eq!(out.status, 200);
    assert_eq!(out.body, plain);
}

#[tokio::test]
async fn an_h2_client_and_an_h2_upstream_get_both_directions_rewritten() {
    let certs = TestCerts::generate();
    let mock = MockUpstream::start(
        MockConfig::new(Proto::H2)
            .tls(&certs)
            .reply(|_| Reply::json(r#"{"f":"json_schema"}"#)),
    );
    let proxy = proxy(&mock.base_url("/api/v3")).trust(&certs).h2c().start();
    let client = H2Client::connect(proxy.addr).await;
    let r = client
        .post_json("/chat/completions", SCHEMA_REQUEST.as_bytes())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), r#"{"f":"json_object"}"#);
    assert_eq!(
        mock.only_request().body,
        rewritten(SCHEMA_REQUEST.as_bytes())
    );
}

#[tokio::test]
async fn a_rewritten_response_weakens_a_strong_etag() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| {
        Reply::full(
            200,
            &[("content-type", "application/json"), ("etag", "\"v1\"")],
            r#"{"f":"json_schema"}"#,
        )
    }));
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let r = h1(proxy.addr, "GET", "/models", &[], b"").await;
    assert_eq!(r.text(), r#"{"f":"json_object"}"#);
    assert_eq!(r.header("etag"), Some("W/\"v1\""));
}

#[tokio::test]
async fn a_compressed_request_body_is_not_byte_rewritten() {
    // A gzip body whose stored block holds `json_schema` literally: rewriting it would break
    // the CRC, so the upstream would get a body that contradicts its Content-Encoding.
    let gzipped = gzip_stored(SCHEMA_REQUEST.as_bytes());
    let mock = MockUpstream::start(MockConfig::h1());
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let r = h1(
        proxy.addr,
        "POST",
        "/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
        ],
        &gzipped,
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = mock.only_request();
    assert_eq!(seen.header_str("content-encoding"), Some("gzip"));
    assert!(
        seen.body == gzipped,
        "compressed request bytes must pass untouched"
    );
}

#[tokio::test]
async fn a_no_content_response_gets_no_transfer_encoding() {
    // RFC 9112 §6.1: a server MUST NOT send Transfer-Encoding in a 204 response.
    let mock = MockUpstream::start(MockConfig::h1().reply(|r| {
        if r.method == "DELETE" {
            Reply::full(204, &[], "")
        } else {
            Reply::json(r#"{"model":"gpt-4"}"#)
        }
    }));
    let proxy = start_proxy(LENGTH_CHANGING_RULES, &mock.base_url("/api/v3"));
    let mut client = H1Client::connect(proxy.addr).await;
    let r = client.request("DELETE", "/files/1", &[], b"").await;
    assert_eq!(r.status, 204);
    assert!(
        r.header("transfer-encoding").is_none(),
        "204 with Transfer-Encoding: {:?}",
        r
    );
    assert!(r.header("content-length").is_none_or(|l| l == "0"));
    // The connection is still in step for the next request.
    let r = client.request("GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), r#"{"model":"deepseek-v3-250324"}"#);
}

#[tokio::test]
async fn a_head_response_to_a_length_changing_rule_has_no_body() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(r#"{"model":"gpt-4"}"#)));
    let proxy = start_proxy(LENGTH_CHANGING_RULES, &mock.base_url("/api/v3"));
    let mut client = H1Client::connect(proxy.addr).await;
    let r = client.request("HEAD", "/models", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_ne!(
        r.header("content-length"),
        Some("17"),
        "the old length would describe the wrong bytes"
    );
    let r = client.request("GET", "/models", &[], b"").await;
    assert_eq!(
        r.text(),
        r#"{"model":"deepseek-v3-250324"}"#,
        "the connection is still in step"
    );
}
