//! Server-sent events leave the proxy as they arrive: the first event reaches the client long
//! before the upstream sends the last, over HTTP/1.1 and HTTP/2 on either side, with the rewrite
//! still applied and the no-buffering headers set.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The upstream's pace: five events 200 ms apart, each carrying a match.
const GAP_MS: u64 = 200;
const EVENTS: usize = 5;
/// How late an event may reach the client after the mock sent it.
const MAX_LAG: Duration = Duration::from_millis(150);

fn events() -> Vec<(Duration, String)> {
    (0..EVENTS)
        .map(|i| {
            let delay = if i == 0 { ms(0) } else { ms(GAP_MS) };
            (
                delay,
                format!("data: {{\"i\":{i},\"format\":\"json_schema\"}}\n\n"),
            )
        })
        .collect()
}

fn expected_body() -> String {
    (0..EVENTS)
        .map(|i| format!("data: {{\"i\":{i},\"format\":\"json_object\"}}\n\n"))
        .collect()
}

fn sse_mock(cfg: MockConfig) -> MockUpstream {
    let events = events();
    MockUpstream::start(cfg.reply(move |_| {
        let events: Vec<(Duration, &str)> = events.iter().map(|(d, e)| (*d, e.as_str())).collect();
        Reply::sse(&events)
    }))
}

/// When the client had received the first `n` bytes of the body.
fn arrival_of(pieces: &[(Instant, usize)], n: usize) -> Instant {
    let mut total = 0;
    for (at, size) in pieces {
        total += size;
        if total >= n {
            return *at;
        }
    }
    panic!("the client received only {total} of {n} bytes");
}

/// The first whole event reached the client within `MAX_LAG` of being sent, long before the
/// last was sent; the stream came in several pieces and the last event was prompt too.
fn assert_streamed(pieces: &[(Instant, usize)], sent: &[Instant]) {
    assert_eq!(sent.len(), EVENTS, "the mock sent every event");
    assert!(
        pieces.len() >= 3,
        "events arrived one by one, not in one piece: {} pieces",
        pieces.len()
    );
    let first_event_len = events()[0].1.len();
    let first = arrival_of(pieces, first_event_len);
    let lag = first.saturating_duration_since(sent[0]);
    assert!(
        lag < MAX_LAG,
        "first event reached the client {lag:?} after it was sent"
    );
    let last_sent = sent[EVENTS - 1];
    assert!(
        first + Duration::from_millis(GAP_MS * 2) < last_sent,
        "first event arrived only {:?} before the last was sent",
        last_sent.saturating_duration_since(first)
    );
    let total: usize = pieces.iter().map(|(_, n)| n).sum();
    let tail_lag = arrival_of(pieces, total).saturating_duration_since(last_sent);
    assert!(
        tail_lag < MAX_LAG,
        "last event reached the client {tail_lag:?} after it was sent"
    );
}

#[tokio::test]
async fn sse_events_leave_before_the_stream_ends_over_an_h1_upstream() {
    let mock = sse_mock(MockConfig::h1());
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let r = post_json(proxy.addr, "/chat/completions", r#"{"stream":true}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), expected_body());
    assert_streamed(&r.pieces, &mock.chunk_send_times());
}

#[tokio::test]
async fn sse_events_leave_before_the_stream_ends_over_a_tls_h2_upstream() {
    let certs = TestCerts::generate();
    let mock = sse_mock(MockConfig::new(Proto::H2).tls(&certs));
    let proxy = proxy(&mock.base_url("/api/v3")).trust(&certs).start();
    let r = post_json(proxy.addr, "/chat/completions", r#"{"stream":true}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.only_request().version, Version::H2);
    assert_eq!(r.text(), expected_body());
    assert_streamed(&r.pieces, &mock.chunk_send_times());
}

#[tokio::test]
async fn sse_events_leave_before_the_stream_ends_for_an_h2_client() {
    let mock = sse_mock(MockConfig::h1());
    let proxy = proxy(&mock.base_url("/api/v3")).h2c().start();
    let client = H2Client::connect(proxy.addr).await;
    let r = client
        .post_json("/chat/completions", br#"{"stream":true}"#)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), expected_body());
    assert_streamed(&r.pieces, &mock.chunk_send_times());
}

#[tokio::test]
async fn sse_events_leave_before_the_stream_ends_from_a_plain_h2_upstream_to_an_h2_client() {
    let mock = sse_mock(MockConfig::h2());
    let proxy = proxy(&mock.base_url("/api/v3"))
        .upstream("http_version", "h2")
        .h2c()
        .start();
    let client = H2Client::connect(proxy.addr).await;
    let r = client.request("GET", "/stream", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.only_request().version, Version::H2);
    assert_eq!(r.text(), expected_body());
    assert_streamed(&r.pieces, &mock.chunk_send_times());
}

#[tokio::test]
async fn sse_events_stream_with_rewriting_off() {
    // The baseline: without rules, events flow at the upstream's pace.
    let mock = sse_mock(MockConfig::h1());
    let proxy = start_proxy("rewrite: []\n", &mock.base_url("/api/v3"));
    let r = post_json(proxy.addr, "/chat/completions", r#"{"stream":true}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        expected_body().replace("json_object", "json_schema")
    );
    assert_streamed(&r.pieces, &mock.chunk_send_times());
}

#[tokio::test]
async fn sse_responses_carry_no_buffering_headers() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|r| {
        if r.target_str().ends_with("/stream") {
            Reply::Chunks {
                status: 200,
                headers: mock::owned(&[
                    ("content-type", "text/event-stream; charset=utf-8"),
                    ("cache-control", "private, max-age=60"),
                ]),
                chunks: vec![(ms(0), "data: [DONE]\n\n".into())],
                trailers: None,
            }
        } else {
            Reply::json("{}")
        }
    }));
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let sse = h1(proxy.addr, "GET", "/stream", &[], b"").await;
    assert_eq!(sse.header("x-accel-buffering"), Some("no"));
    assert_eq!(sse.header("cache-control"), Some("no-cache"));
    assert_eq!(sse.text(), "data: [DONE]\n\n");
    let json = h1(proxy.addr, "GET", "/models", &[], b"").await;
    assert!(
        json.header("x-accel-buffering").is_none(),
        "only event streams get it"
    );
}

fn trailers() -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("x-usage", "42".parse().expect("header value"));
    t
}

/// An HTTP/2 upstream whose body ends with a prefix of the pattern, then trailers (no empty
/// END_STREAM DATA frame): the held-back bytes must still reach the client.
fn trailer_mock(certs: &TestCerts) -> MockUpstream {
    MockUpstream::start(
        MockConfig::new(Proto::H2)
            .tls(certs)
            .reply(|_| Reply::Chunks {
                status: 200,
                headers: mock::owned(&[("content-type", "text/event-stream")]),
                chunks: vec![
                    (ms(0), "data: {\"f\":\"json_schema\"}\n\n".into()),
                    (ms(20), "data: {\"f\":\"json_sch".into()),
                ],
                trailers: Some(trailers()),
            }),
    )
}

#[tokio::test]
async fn held_back_bytes_reach_an_h1_client_when_an_h2_upstream_ends_with_trailers() {
    let certs = TestCerts::generate();
    let mock = trailer_mock(&certs);
    let proxy = proxy(&mock.base_url("/api/v3")).trust(&certs).start();
    let r = h1(proxy.addr, "GET", "/stream", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(
        r.text(),
        "data: {\"f\":\"json_object\"}\n\ndata: {\"f\":\"json_sch"
    );
}

#[tokio::test]
async fn held_back_bytes_reach_an_h2_client_when_an_h2_upstream_ends_with_trailers() {
    let certs = TestCerts::generate();
    let mock = trailer_mock(&certs);
    let proxy = proxy(&mock.base_url("/api/v3")).trust(&certs).h2c().start();
    let client = H2Client::connect(proxy.addr).await;
    let r = client.request("GET", "/stream", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "data: {\"f\":\"json_object\"}\n\ndata: {\"f\":\"json_sch"
    );
}

#[tokio::test]
async fn curl_over_http2_and_tls_receives_the_rewritten_stream() {
    let certs = TestCerts::generate();
    let mock = sse_mock(MockConfig::h1());
    let proxy = proxy(&mock.base_url("/api/v3"))
        .tls_listener(&certs)
        .start();
    let url = proxy.tls_url("/chat/completions");
    let out = curl(&[
        "--http2",
        "--cacert",
        certs.ca(),
        "-N",
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"stream":true}"#,
        &url,
    ])
    .await;
    assert_eq!(out.http_version, "2");
    assert_eq!(out.status, 200);
    assert_eq!(out.header("x-accel-buffering"), Some("no"));
    assert_eq!(String::from_utf8_lossy(&out.body), expected_body());
}
