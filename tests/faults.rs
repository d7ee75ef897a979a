//! Fault injection over real sockets: the upstream is down, silent, slow, stalls, resets, talks
//! garbage or closes pooled connections; the client goes away mid-upload and mid-stream, sends
//! oversized bodies, smuggling attempts and malformed headers; and 1,000 concurrent connections
//! mix all of it. Each test asserts what the client sees (status and the OpenAI-shaped JSON error,
//! leaking nothing internal), the exact moves of the reliability counters, how many times the
//! request reached the upstream (a POST is never sent twice), and that the proxy then serves the
//! next request normally.
//!
//! Counters are process-wide, so every test here holds [`serial`] for its whole run, and this file
//! is its own test binary: the deltas are exact. Timeouts are short (connect 300 ms, read 500 ms)
//! so the whole file runs in seconds.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arkgate::metrics::METRICS;
use bytes::Bytes;
use common::client::{read_h1_response, response_status};
use common::mock::{owned, read_h1_head};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

const CONNECT_TIMEOUT_MS: u64 = 300;
const READ_TIMEOUT_MS: u64 = 500;
/// The longest any raw exchange in this file may take before the test fails.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(5);
/// A chat completion request, as an agent would send it.
const BODY: &str = r#"{"model":"deepseek-v3","messages":[{"role":"user","content":"hi"}]}"#;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A proxy in front of `base_url` with this file's short timeouts.
fn fast_proxy(base_url: &str) -> ProxyBuilder {
    proxy(base_url)
        .upstream("connect_timeout_ms", &CONNECT_TIMEOUT_MS.to_string())
        .upstream("read_timeout_ms", &READ_TIMEOUT_MS.to_string())
}

/// A mock that echoes every request's body.
fn echo_config() -> MockConfig {
    MockConfig::h1().reply(|_| Reply::Echo)
}

fn echo_mock() -> MockUpstream {
    MockUpstream::start(echo_config())
}

/// A mock answering `fault` to requests whose path contains `/fault`, and echoing the body of
/// every other request (so "the next request" is checked end to end).
fn fault_mock(cfg: MockConfig, fault: Reply) -> MockUpstream {
    MockUpstream::start(cfg.reply(move |r| {
        if r.target_str().contains("/fault") {
            fault.clone()
        } else {
            Reply::Echo
        }
    }))
}

/// How many requests for a path containing `needle` reached the mock.
fn arrivals(mock: &MockUpstream, needle: &str) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.target_str().contains(needle))
        .count()
}

/// The reliability counters this file asserts, as a snapshot or as a delta between two.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    connection_timeout: u64,
    read_timeout: u64,
    retry_exhausted: u64,
    unexpected_error: u64,
    connect_failures: u64,
    upstream_5xx: u64,
    retries: u64,
    body_too_large: u64,
}

impl Counters {
    fn now() -> Counters {
        Counters {
            connection_timeout: METRICS.connection_timeout.get(),
            read_timeout: METRICS.read_timeout.get(),
            retry_exhausted: METRICS.retry_exhausted.get(),
            unexpected_error: METRICS.unexpected_error.get(),
            connect_failures: METRICS.upstream_connect_failures.get(),
            upstream_5xx: METRICS.upstream_5xx.get(),
            retries: METRICS.retries.get(),
            body_too_large: METRICS.body_too_large.get(),
        }
    }

    /// What moved since this snapshot.
    fn since(self) -> Counters {
        let n = Counters::now();
        Counters {
            connection_timeout: n.connection_timeout - self.connection_timeout,
            read_timeout: n.read_timeout - self.read_timeout,
            retry_exhausted: n.retry_exhausted - self.retry_exhausted,
            unexpected_error: n.unexpected_error - self.unexpected_error,
            connect_failures: n.connect_failures - self.connect_failures,
            upstream_5xx: n.upstream_5xx - self.upstream_5xx,
            retries: n.retries - self.retries,
            body_too_large: n.body_too_large - self.body_too_large,
        }
    }

    /// Asserts the delta since this snapshot, waiting up to 1 s for counters that move after the
    /// client already has its answer (or has gone away).
    async fn assert_moved(self, expected: Counters) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.since() != expected && Instant::now() < deadline {
            tokio::time::sleep(ms(5)).await;
        }
        assert_eq!(self.since(), expected, "counter deltas");
    }
}

/// No counter moves.
const NONE: Counters = Counters {
    connection_timeout: 0,
    read_timeout: 0,
    retry_exhausted: 0,
    unexpected_error: 0,
    connect_failures: 0,
    upstream_5xx: 0,
    retries: 0,
    body_too_large: 0,
};

/// Exactly one read timeout.
const ONE_READ_TIMEOUT: Counters = Counters {
    read_timeout: 1,
    ..NONE
};

/// An error arkgate answered itself: the status, `application/json`, the OpenAI error shape with
/// `code`, and nothing internal (addresses, ports, OS errors, Pingora's wording).
fn assert_error(r: &H1Response, status: u16, code: &str, upstream: Option<SocketAddr>) {
    assert_eq!(r.status, status, "status of {r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert!(r.complete, "the error body is complete: {r:?}");
    let v = r.json();
    let e = &v["error"];
    assert_eq!(e["code"], code, "error code in {}", r.text());
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a message in {}",
        r.text()
    );
    assert!(e["type"].is_string(), "a type in {}", r.text());
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(1),
        "only `error` at the top level: {}",
        r.text()
    );
    let text = r.text().to_ascii_lowercase();
    let mut leaks = vec![
        "127.0.0.1".to_string(),
        "os error".into(),
        "refused".into(),
        "peer".into(),
        "pingora".into(),
    ];
    if let Some(a) = upstream {
        leaks.push(a.port().to_string());
    }
    for leak in leaks {
        assert!(!text.contains(&leak), "error body leaks {leak:?}: {text}");
    }
}

/// A normal request right after the fault: 200 with the echoed body.
async fn assert_serves_next(proxy: &Proxy) {
    let r = post_json(proxy.addr, "/chat/completions", BODY).await;
    assert_eq!(r.status, 200, "the next request is served: {r:?}");
    assert_eq!(r.text(), BODY);
}

/// Waits until `cond` holds, for at most `limit`; false if it never did.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(ms(2)).await;
    }
    true
}

/// How a raw HTTP/1.1 exchange ended.
#[derive(Debug)]
enum Outcome {
    /// A response head arrived (its body may still have been cut short: see `complete`).
    Response(H1Response),
    /// The connection ended before any response head.
    Closed,
}

impl Outcome {
    fn response(self) -> H1Response {
        match self {
            Outcome::Response(r) => r,
            Outcome::Closed => panic!("the proxy closed the connection without a response"),
        }
    }
}

/// Sends raw bytes on a fresh connection and reads whatever comes back (bounded).
async fn exchange(addr: SocketAddr, request: &[u8]) -> Outcome {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    tcp.set_nodelay(true).expect("nodelay");
    let mut io = BufReader::new(tcp);
    if io.get_mut().write_all(request).await.is_err() {
        return Outcome::Closed;
    }
    read_outcome(&mut io).await
}

/// A fresh connection to `addr` with `request` already sent on it.
async fn connect_and_send(addr: SocketAddr, request: &[u8]) -> BufReader<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut io = BufReader::new(tcp);
    io.get_mut().write_all(request).await.expect("send");
    io
}

/// Reads one final response, or notices that the connection ended first.
async fn read_outcome(io: &mut BufReader<TcpStream>) -> Outcome {
    let read = async {
        loop {
            let head = match read_h1_head(io).await {
                Ok(Some(head)) => head,
                _ => return Outcome::Closed,
            };
            if response_status(&head) < 200 {
                continue;
            }
            let framing = head.framing();
            return Outcome::Response(read_h1_response(io, head, framing).await);
        }
    };
    tokio::time::timeout(EXCHANGE_LIMIT, read)
        .await
        .expect("the proxy answered or closed the connection in time")
}

/// A POST of `BODY` to `path`, as raw bytes.
fn post(path: &str) -> Vec<u8> {
    request_bytes(
        "POST",
        path,
        &[("Content-Type", "application/json")],
        BODY.as_bytes(),
    )
}

/// `n` bytes of a repeating pattern.
fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| b"0123456789abcdef"[i % 16]).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Upstream down
// ---------------------------------------------------------------------------------------------

/// A proxy allowed `max_retries` in front of an upstream that is down (for now).
fn proxy_to_nothing(max_retries: &str) -> (Proxy, DeadUpstream) {
    let dead = DeadUpstream::new();
    let proxy = fast_proxy(&dead.base_url("/api/v3"))
        .upstream("max_retries", max_retries)
        .start();
    (proxy, dead)
}

/// A request while the upstream is down: a 502 `upstream_connect_failed`.
async fn assert_connect_failed(proxy: &Proxy, dead: &DeadUpstream) {
    let r = post_json(proxy.addr, "/chat/completions", BODY).await;
    assert_error(&r, 502, "upstream_connect_failed", Some(dead.addr()));
}

/// The upstream comes back on its port: the same proxy serves at once, and the request reaches
/// the upstream once.
async fn assert_serves_once_the_upstream_is_back(proxy: &Proxy, dead: DeadUpstream) {
    let mock = dead.revive(echo_config());
    assert_serves_next(proxy).await;
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn upstream_down_is_502_after_one_attempt_plus_max_retries() {
    let _serial = serial().await;
    let (proxy, dead) = proxy_to_nothing("3");

    let before = Counters::now();
    let started = Instant::now();
    assert_connect_failed(&proxy, &dead).await;
    before
        .assert_moved(Counters {
            connect_failures: 4,
            retries: 3,
            retry_exhausted: 1,
            ..NONE
        })
        .await;
    // Backing off 20 + 40 + 80 ms between the four attempts.
    assert!(started.elapsed() >= ms(140), "{:?}", started.elapsed());

    assert_serves_once_the_upstream_is_back(&proxy, dead).await;
}

#[tokio::test]
async fn upstream_down_with_no_retries_is_one_attempt_and_not_exhaustion() {
    let _serial = serial().await;
    let (proxy, dead) = proxy_to_nothing("0");

    let before = Counters::now();
    assert_connect_failed(&proxy, &dead).await;
    before
        .assert_moved(Counters {
            connect_failures: 1,
            ..NONE
        })
        .await;

    assert_serves_once_the_upstream_is_back(&proxy, dead).await;
}

/// `upstream.max_retries` accepts up to 16: that many retries must happen, then RETRY_EXHAUSTED.
/// (Pingora also caps its retry loop with `ServerConf.max_retries`, which counts every try,
/// the first included, and defaults to 16: arkgate has to raise it to `max_retries + 1`.)
#[tokio::test]
async fn the_largest_max_retries_is_honoured_in_full() {
    let _serial = serial().await;
    let (proxy, dead) = proxy_to_nothing("16");

    let before = Counters::now();
    assert_connect_failed(&proxy, &dead).await;
    before
        .assert_moved(Counters {
            connect_failures: 17,
            retries: 16,
            retry_exhausted: 1,
            ..NONE
        })
        .await;
}

#[tokio::test]
async fn a_refused_connect_is_retried_and_the_post_arrives_exactly_once() {
    let _serial = serial().await;
    let (proxy, dead) = proxy_to_nothing("5");

    let before = Counters::now();
    let addr = proxy.addr;
    let request = tokio::spawn(async move { post_json(addr, "/chat/completions", BODY).await });
    // Bring the upstream up right after the second refused connect. The third attempt follows
    // a 40 ms backoff, so on an idle machine it finds the listener; the later backoffs (80, 160,
    // 200 ms) leave a loaded machine room too, before the retries run out.
    assert!(
        eventually(Duration::from_secs(2), || before.since().connect_failures
            >= 2)
        .await,
        "two connects were refused"
    );
    let mock = dead.revive(echo_config());

    let r = request.await.expect("client task");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), BODY);
    let seen = mock.only_request();
    assert_eq!(seen.body, BODY.as_bytes());
    assert_eq!(mock.connections(), 1);
    let refused = before.since().connect_failures;
    assert!((2..=5).contains(&refused), "{refused} refused connects");
    before
        .assert_moved(Counters {
            connect_failures: refused,
            retries: refused,
            ..NONE
        })
        .await;
    assert_serves_next(&proxy).await;
}

/// A listener whose accept queue is full drops further SYNs, so connecting to it times out.
#[tokio::test]
async fn a_connect_timeout_is_504_and_counted_once_per_request() {
    let _serial = serial().await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("address");
    let mut queued = Vec::new();
    loop {
        match tokio::time::timeout(ms(100), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => queued.push(s),
            _ => break,
        }
        assert!(queued.len() < 16, "the accept queue never filled");
    }

    let proxy = fast_proxy(&format!("http://{addr}/api/v3"))
        .upstream("max_retries", "1")
        .start();
    let before = Counters::now();
    let started = Instant::now();
    let r = post_json(proxy.addr, "/chat/completions", BODY).await;
    let took = started.elapsed();
    assert_error(&r, 504, "upstream_connect_timeout", Some(addr));
    before
        .assert_moved(Counters {
            connection_timeout: 1,
            connect_failures: 2,
            retries: 1,
            retry_exhausted: 1,
            ..NONE
        })
        .await;
    assert!(
        took >= ms(2 * CONNECT_TIMEOUT_MS) && took < ms(2 * CONNECT_TIMEOUT_MS + 700),
        "two connect timeouts and a backoff took {took:?}"
    );

    // Start serving on that listener: the queued connections are accepted and the proxy works.
    let mock = MockUpstream::start_on(echo_config(), listener.into_std().expect("std listener"));
    assert_serves_next(&proxy).await;
    assert_eq!(mock.request_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// 2-3. Silence and slow headers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_upstream_that_never_answers_is_504_after_the_read_timeout_and_never_resent() {
    let _serial = serial().await;
    let mock = fault_mock(MockConfig::h1(), Reply::NeverRespond);
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();

    // Warm the pool first: the POST then goes out on a reused connection, the case where a
    // retry would be most tempting.
    let mut client = H1Client::connect(proxy.addr).await;
    let r = client
        .request(
            "POST",
            "/warm",
            &[("Content-Type", "application/json")],
            b"{}",
        )
        .await;
    assert_eq!(r.status, 200);

    let before = Counters::now();
    let started = Instant::now();
    let r = exchange(proxy.addr, &post("/chat/fault")).await.response();
    let took = started.elapsed();
    assert_error(&r, 504, "upstream_timeout", Some(mock.addr));
    assert!(
        took >= ms(READ_TIMEOUT_MS - 20) && took < ms(READ_TIMEOUT_MS + 700),
        "answered after {took:?}"
    );
    before.assert_moved(ONE_READ_TIMEOUT).await;
    assert_eq!(
        mock.connections(),
        1,
        "the POST went out on the pooled connection"
    );
    tokio::time::sleep(ms(300)).await;
    assert_eq!(
        arrivals(&mock, "/fault"),
        1,
        "the POST was sent exactly once"
    );
    assert!(
        eventually(ms(500), || mock.closed_connections() == 1).await,
        "the timed-out upstream connection was closed, not pooled"
    );
    assert_serves_next(&proxy).await;
}

#[tokio::test]
async fn headers_later_than_the_read_timeout_are_504_and_earlier_ones_200() {
    let _serial = serial().await;
    let mock = MockUpstream::start(MockConfig::h1().reply(|r| {
        if r.target_str().contains("/late") {
            Reply::SlowHeaders(ms(READ_TIMEOUT_MS + 400))
        } else if r.target_str().contains("/slow") {
            Reply::SlowHeaders(ms(READ_TIMEOUT_MS - 250))
        } else {
            Reply::Echo
        }
    }));
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();

    let before = Counters::now();
    let r = exchange(proxy.addr, &post("/late")).await.response();
    assert_error(&r, 504, "upstream_timeout", Some(mock.addr));
    before.assert_moved(ONE_READ_TIMEOUT).await;
    assert_eq!(arrivals(&mock, "/late"), 1);

    let before = Counters::now();
    let r = exchange(proxy.addr, &post("/slow")).await.response();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), r#"{"ok":true}"#);
    before.assert_moved(NONE).await;
    assert_eq!(arrivals(&mock, "/slow"), 1);
    assert_serves_next(&proxy).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Streams: stalls cut, slow-but-steady completes; the total deadline
// ---------------------------------------------------------------------------------------------

/// `data: 0` at once, then `more` events `data: more`, each `gap` after the last.
fn steady_events(gap: Duration, more: usize) -> Vec<(Duration, &'static str)> {
    let mut events = vec![(ms(0), "data: 0\n\n")];
    events.extend(std::iter::repeat_n((gap, "data: more\n\n"), more));
    events
}

fn stall_reply() -> Reply {
    Reply::StallAfter {
        status: 200,
        headers: owned(&[("content-type", "text/event-stream")]),
        first: Bytes::from_static(b"data: 1\n\n"),
        stall: ms(READ_TIMEOUT_MS * 3),
    }
}

#[tokio::test]
async fn a_stream_that_stalls_past_the_read_timeout_ends_the_client_connection() {
    let _serial = serial().await;
    let mock = fault_mock(MockConfig::h1(), stall_reply());
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();

    let before = Counters::now();
    let r = exchange(proxy.addr, &post("/chat/fault")).await.response();
    assert_eq!(r.status, 200, "the status was already sent: {r:?}");
    assert!(r.chunked, "{r:?}");
    assert_eq!(r.text(), "data: 1\n\n", "the first event arrived");
    assert!(
        !r.complete,
        "no terminating chunk: the client must not see a clean, complete body"
    );
    let first = r.pieces[0].0;
    let cut_after = first.elapsed();
    assert!(
        cut_after >= ms(READ_TIMEOUT_MS - 50),
        "cut {cut_after:?} after the first event, before the read timeout"
    );
    before.assert_moved(ONE_READ_TIMEOUT).await;
    assert_eq!(arrivals(&mock, "/fault"), 1);
    assert_serves_next(&proxy).await;
}

#[tokio::test]
async fn a_stalled_stream_to_an_http2_client_ends_with_an_error_not_a_clean_end() {
    let _serial = serial().await;
    let mock = fault_mock(MockConfig::h1(), stall_reply());
    let proxy = fast_proxy(&mock.base_url("/api/v3")).h2c().start();

    let before = Counters::now();
    let client = H2Client::connect(proxy.addr).await;
    let r = client
        .request("POST", "/chat/fault", &[], BODY.as_bytes())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "data: 1\n\n");
    assert!(
        r.error.is_some(),
        "the stream must be reset, not ended cleanly: {r:?}"
    );
    before.assert_moved(ONE_READ_TIMEOUT).await;
    assert_eq!(arrivals(&mock, "/fault"), 1);
    assert_serves_next(&proxy).await;
}

#[tokio::test]
async fn a_slow_stream_that_keeps_sending_is_never_cut() {
    let _serial = serial().await;
    // Five events, each 250 ms after the last: 1.25 s in all, over twice the read timeout, but
    // never silent for as long as the read timeout.
    let mut events = vec![(ms(0), "data: 0\n\n")];
    events.extend([
        (ms(250), "data: 1\n\n"),
        (ms(250), "data: 2\n\n"),
        (ms(250), "data: 3\n\n"),
        (ms(250), "data: 4\n\n"),
        (ms(250), "data: [DONE]\n\n"),
    ]);
    let mock = fault_mock(MockConfig::h1(), Reply::sse(&events));
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();

    let before = Counters::now();
    let started = Instant::now();
    let r = exchange(proxy.addr, &post("/chat/fault")).await.response();
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert!(r.complete, "the stream ended cleanly: {r:?}");
    let expected: String = events.iter().map(|(_, e)| *e).collect();
    assert_eq!(r.text(), expected);
    assert!(took >= ms(1250), "the stream took {took:?}");
    before.assert_moved(NONE).await;
    assert_eq!(arrivals(&mock, "/fault"), 1);
    assert_serves_next(&proxy).await;
}

#[tokio::test]
async fn a_steady_stream_past_the_total_deadline_is_cut() {
    let _serial = serial().await;
    let events = steady_events(ms(200), 10);
    let mock = fault_mock(MockConfig::h1(), Reply::sse(&events));
    let proxy = fast_proxy(&mock.base_url("/api/v3"))
        .upstream("total_timeout_ms", "800")
        .start();

    let before = Counters::now();
    let started = Instant::now();
    let r = exchange(proxy.addr, &post("/chat/fault")).await.response();
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("data: 0\n\n"), "{r:?}");
    assert!(!r.complete, "the stream was cut, not ended cleanly: {r:?}");
    // Checked as chunks pass: the first chunk after 800 ms (at about 1000 ms) ends it.
    assert!(
        took >= ms(800) && took < ms(800 + READ_TIMEOUT_MS + 300),
        "cut after {took:?}"
    );
    before.assert_moved(ONE_READ_TIMEOUT).await;
    assert_eq!(arrivals(&mock, "/fault"), 1);
    assert_serves_next(&proxy).await;
}

/// The deadline passes while the upstream is still silent: the client gets a 504, not a 200
/// that is then cut. Two shapes: a complete response whose head and body arrive together after
/// the deadline, and a stream whose head arrives after the deadline on its own (the first event
/// 100 ms later), which is what a slow streamed completion looks like.
#[tokio::test]
async fn a_total_deadline_that_passes_before_the_headers_is_504() {
    let _serial = serial().await;
    let late_stream = Reply::After(
        ms(700),
        Box::new(Reply::sse(&[
            (ms(100), "data: 0\n\n"),
            (ms(100), "data: 1\n\n"),
        ])),
    );
    for (name, late) in [
        ("complete response", Reply::SlowHeaders(ms(700))),
        ("stream", late_stream),
    ] {
        let mock = fault_mock(MockConfig::h1(), late);
        let proxy = fast_proxy(&mock.base_url("/api/v3"))
            .upstream("read_timeout_ms", "1000")
            .upstream("total_timeout_ms", "300")
            .start();

        let before = Counters::now();
        let started = Instant::now();
        let r = exchange(proxy.addr, &post("/chat/fault")).await.response();
        let took = started.elapsed();
        assert_eq!(r.status, 504, "{name}: {r:?}");
        assert_error(&r, 504, "upstream_timeout", Some(mock.addr));
        assert!(took < ms(1000), "{name}: answered after {took:?}");
        before.assert_moved(ONE_READ_TIMEOUT).await;
        assert_eq!(arrivals(&mock, "/fault"), 1, "{name}");
        assert_serves_next(&proxy).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 5-7. Resets, garbage, pooled connections closed by the upstream
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_reset_mid_body_is_an_error_for_the_client_and_sent_once() {
    let _serial = serial().await;
    for (name, cfg, version) in [
        ("h1", MockConfig::h1(), "h1"),
        ("h2", MockConfig::h2(), "h2"),
    ] {
        let mock = fault_mock(
            cfg,
            Reply::ResetMidBody {
                first: Bytes::from_static(b"data: partial\n\n"),
            },
        );
        let proxy = fast_proxy(&mock.base_url("/api/v3"))
            .upstream("http_version", version)
            .start();

        let before = Counters::now();
        match exchange(proxy.addr, &post("/chat/fault")).await {
            Outcome::Response(r) => {
                assert_eq!(r.status, 200, "{name}: {r:?}");
                assert!(!r.complete, "{name}: not a clean truncated body: {r:?}");
                assert!(
                    "data: partial\n\n".as_bytes().starts_with(&r.body),
                    "{name}: {r:?}"
                );
            }
            // Ended before the head reached the client: also an error.
            Outcome::Closed => eprintln!("{name}: closed before a response head"),
        }
        before.assert_moved(NONE).await;
        assert_eq!(arrivals(&mock, "/fault"), 1, "{name}: sent exactly once");
        assert_serves_next(&proxy).await;
    }
}

#[tokio::test]
async fn garbage_instead_of_http_is_502_and_sent_once() {
    let _serial = serial().await;
    for garbage in [
        &b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02\xff\r\n\r\n"[..],
        &b"HTTP/1.1 twohundred OK\r\nContent-Length: 2\r\n\r\nok"[..],
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
    ] {
        let mock = fault_mock(
            MockConfig::h1(),
            Reply::Garbage(Bytes::from_static(garbage)),
        );
        let proxy = fast_proxy(&mock.base_url("/api/v3")).start();

        let before = Counters::now();
        let r = exchange(proxy.addr, &post("/chat/fault")).await.response();
        assert_error(&r, 502, "upstream_error", Some(mock.addr));
        before.assert_moved(NONE).await;
        assert_eq!(arrivals(&mock, "/fault"), 1, "{garbage:?}");
        assert_serves_next(&proxy).await;
    }
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used_for_the_next_post() {
    let _serial = serial().await;
    // (`Echo` is only resolved at the top level, so the inner reply is spelled out.)
    let mock = MockUpstream::start(
        MockConfig::h1()
            .reply(|_| Reply::CloseAfterResponse(Box::new(Reply::json(r#"{"ok":true}"#)))),
    );
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();

    let before = Counters::now();
    let r = post_json(proxy.addr, "/chat/completions", BODY).await;
    assert_eq!(r.status, 200);
    assert!(
        eventually(ms(500), || mock.closed_connections() == 1).await,
        "the upstream closed its side"
    );
    tokio::time::sleep(ms(50)).await;
    let r = post_json(proxy.addr, "/chat/completions", BODY).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), r#"{"ok":true}"#);
    assert_eq!(mock.request_count(), 2, "each POST arrived exactly once");
    assert_eq!(
        mock.connections(),
        2,
        "the closed connection was not reused"
    );
    before.assert_moved(NONE).await;
}

// ---------------------------------------------------------------------------------------------
// 8. The client goes away
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_client_leaving_mid_upload_cancels_the_upstream_request() {
    let _serial = serial().await;
    let mock = echo_mock();
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();

    let before = Counters::now();
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let head = b"POST /upload HTTP/1.1\r\nHost: arkgate.test\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n";
    tcp.write_all(head).await.expect("head");
    tcp.write_all(&payload(50_000))
        .await
        .expect("half the body");
    assert!(
        eventually(Duration::from_secs(2), || mock.connections() == 1).await,
        "the upload was on its way upstream"
    );
    drop(tcp);

    assert!(
        eventually(Duration::from_secs(1), || mock.closed_connections() == 1).await,
        "the proxy closed the upstream connection"
    );
    let seen = mock.only_request();
    assert!(
        !seen.complete,
        "the upstream saw an aborted request: {seen:?}"
    );
    assert!(seen.body.len() <= 50_000, "{} bytes", seen.body.len());
    before.assert_moved(NONE).await;
    assert_serves_next(&proxy).await;
}

#[tokio::test]
async fn a_client_leaving_mid_stream_closes_the_upstream_connection() {
    let _serial = serial().await;
    // 40 events 100 ms apart: 4 s if nobody stops it.
    let events = steady_events(ms(100), 39);
    let mock = fault_mock(MockConfig::h1(), Reply::sse(&events));
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();

    let before = Counters::now();
    let mut io = connect_and_send(proxy.addr, &post("/chat/fault")).await;
    let head = read_h1_head(&mut io)
        .await
        .expect("head")
        .expect("a response");
    assert_eq!(head.start[1], b"200");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(7).any(|w| w == b"data: 0") {
        let n = tokio::time::timeout(EXCHANGE_LIMIT, io.read(&mut buf))
            .await
            .expect("the first event in time")
            .expect("read");
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    drop(io);
    let left = Instant::now();

    assert!(
        eventually(Duration::from_secs(1), || mock.closed_connections() == 1).await,
        "the upstream connection is still open 1 s after the client left"
    );
    let closed_after = left.elapsed();
    let sent = mock.chunk_send_times().len();
    assert!(sent < events.len(), "the stream was stopped ({sent} sent)");
    assert_eq!(arrivals(&mock, "/fault"), 1);
    before.assert_moved(NONE).await;
    assert_serves_next(&proxy).await;
    eprintln!("upstream closed {closed_after:?} after the client left");
}

/// The HTTP/2 form: the client cancels the stream (RST_STREAM) but keeps its connection open, so
/// only the stream reset tells the proxy to stop.
#[tokio::test]
async fn an_http2_client_cancelling_a_stream_closes_the_upstream_connection() {
    let _serial = serial().await;
    let events = steady_events(ms(100), 39);
    let mock = fault_mock(MockConfig::h1(), Reply::sse(&events));
    let proxy = fast_proxy(&mock.base_url("/api/v3")).h2c().start();

    let before = Counters::now();
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let (send, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await.expect("h2 ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/chat/fault", proxy.addr))
        .body(())
        .expect("request");
    let (response, mut upload) = send.send_request(request, false).expect("send");
    upload
        .send_data(Bytes::from_static(BODY.as_bytes()), true)
        .expect("body");
    let response = tokio::time::timeout(EXCHANGE_LIMIT, response)
        .await
        .expect("head in time")
        .expect("head");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = tokio::time::timeout(EXCHANGE_LIMIT, body.data())
        .await
        .expect("first event in time")
        .expect("a first event")
        .expect("first event");
    assert!(first.starts_with(b"data: 0"), "{first:?}");
    drop(body); // RST_STREAM(CANCEL); the connection stays up
    drop(upload);
    let left = Instant::now();

    assert!(
        eventually(Duration::from_secs(1), || mock.closed_connections() == 1).await,
        "the upstream connection is still open 1 s after the client cancelled"
    );
    let closed_after = left.elapsed();
    let sent = mock.chunk_send_times().len();
    assert!(sent < events.len(), "the stream was stopped ({sent} sent)");
    assert_eq!(arrivals(&mock, "/fault"), 1);
    before.assert_moved(NONE).await;
    // The same HTTP/2 connection still serves.
    let mut send = send.ready().await.expect("the h2 connection survived");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/chat/completions", proxy.addr))
        .body(())
        .expect("request");
    let (response, mut upload) = send.send_request(request, false).expect("send");
    upload
        .send_data(Bytes::from_static(BODY.as_bytes()), true)
        .expect("body");
    let response = response.await.expect("second response");
    assert_eq!(response.status(), 200);
    eprintln!("h2: upstream closed {closed_after:?} after the cancel");
    connection.abort();
    assert_serves_next(&proxy).await;
}

// ---------------------------------------------------------------------------------------------
// 9. Body limits
// ---------------------------------------------------------------------------------------------

/// An `application/octet-stream` POST of `body` to `target`, with its Content-Length.
fn upload(target: &str, body: &[u8]) -> Vec<u8> {
    let ct = ("Content-Type", "application/octet-stream");
    request_bytes("POST", target, &[ct], body)
}

/// The same, chunked: one chunk per piece of `chunks`, then the last chunk.
fn chunked_upload(target: &str, chunks: &[&[u8]]) -> Vec<u8> {
    let ct = ("Content-Type", "application/octet-stream");
    let mut request = request_bytes("POST", target, &[ct, ("Transfer-Encoding", "chunked")], b"");
    for chunk in chunks {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

fn limited_proxy(mock: &MockUpstream, max: u64) -> Proxy {
    fast_proxy(&mock.base_url("/api/v3"))
        .yaml(&format!("limits: {{max_body_bytes: {max}}}"))
        .start()
}

#[tokio::test]
async fn a_content_length_over_the_limit_is_413_before_anything_goes_upstream() {
    let _serial = serial().await;
    let mock = echo_mock();
    let proxy = limited_proxy(&mock, 1000);

    let before = Counters::now();
    let r = exchange(proxy.addr, &upload("/upload", &payload(2000)))
        .await
        .response();
    assert_error(&r, 413, "body_too_large", Some(mock.addr));
    before
        .assert_moved(Counters {
            body_too_large: 1,
            ..NONE
        })
        .await;
    assert_eq!(mock.connections(), 0, "nothing reached the upstream");
    assert_eq!(mock.request_count(), 0);
    assert_serves_next(&proxy).await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413_and_never_completes_upstream() {
    let _serial = serial().await;
    let mock = echo_mock();
    let proxy = limited_proxy(&mock, 1000);

    let before = Counters::now();
    let chunk = payload(1000);
    let request = chunked_upload("/upload", &[&chunk, &chunk]);
    match exchange(proxy.addr, &request).await {
        Outcome::Response(r) => assert_error(&r, 413, "body_too_large", Some(mock.addr)),
        Outcome::Closed => panic!("no 413: the connection was closed"),
    }
    before
        .assert_moved(Counters {
            body_too_large: 1,
            ..NONE
        })
        .await;
    assert!(
        eventually(ms(500), || mock.connections() == mock.closed_connections()).await,
        "the upstream request was aborted"
    );
    assert!(
        mock.requests().iter().all(|r| !r.complete),
        "no complete oversized request reached the upstream: {:?}",
        mock.requests()
    );
    assert_serves_next(&proxy).await;
}

#[tokio::test]
async fn a_body_exactly_at_the_limit_passes_with_either_framing() {
    let _serial = serial().await;
    let mock = echo_mock();
    let proxy = limited_proxy(&mock, 1000);
    let before = Counters::now();

    let body = payload(1000);
    let r = exchange(proxy.addr, &upload("/cl", &body)).await.response();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, body);

    let chunked = chunked_upload("/chunked", &[&body[..500], &body[500..]]);
    let r = exchange(proxy.addr, &chunked).await.response();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, body);

    assert_eq!(mock.request_count(), 2);
    assert!(mock.requests().iter().all(|r| r.complete && r.body == body));
    before.assert_moved(NONE).await;
}

#[tokio::test]
async fn a_zero_body_limit_means_unlimited() {
    let _serial = serial().await;
    let mock = echo_mock();
    let proxy = limited_proxy(&mock, 0);
    let before = Counters::now();

    let body = payload(200_000);
    let r = exchange(proxy.addr, &upload("/cl", &body)).await.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());

    let r = exchange(proxy.addr, &chunked_upload("/chunked", &[&body]))
        .await
        .response();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());

    assert_eq!(mock.request_count(), 2);
    before.assert_moved(NONE).await;
}

// ---------------------------------------------------------------------------------------------
// 10. Smuggling and malformed requests
// ---------------------------------------------------------------------------------------------

const SMUGGLED: &str = "GET /admin HTTP/1.1\r\nHost: arkgate.test\r\n\r\n";

/// Reads what follows the first response until the proxy closes: must not be a second response.
async fn assert_closed_without_another_response(io: &mut BufReader<TcpStream>) {
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(EXCHANGE_LIMIT, io.read_to_end(&mut rest))
        .await
        .expect("the proxy closed the connection");
    assert!(
        !rest.windows(5).any(|w| w == b"HTTP/"),
        "a second response came back: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// What the upstream got from a smuggling attempt, once the proxy has closed the client
/// connection without a second response: exactly one request, framed one way only, and nothing
/// for `/admin`.
async fn only_request_after_smuggling(
    io: &mut BufReader<TcpStream>,
    mock: &MockUpstream,
) -> RecordedRequest {
    assert_closed_without_another_response(io).await;
    tokio::time::sleep(ms(100)).await;
    let seen = mock.only_request();
    assert!(
        seen.header("content-length").is_none() || seen.header("transfer-encoding").is_none(),
        "both framings were forwarded: {seen:?}"
    );
    assert!(mock
        .requests()
        .iter()
        .all(|r| !r.target_str().contains("admin")));
    seen
}

/// Content-Length says the smuggled GET is body; Transfer-Encoding says the body ended before it.
#[tokio::test]
async fn content_length_with_transfer_encoding_never_lets_a_smuggled_request_through() {
    let _serial = serial().await;
    let mock = echo_mock();
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();
    let before = Counters::now();

    let body = format!("0\r\n\r\n{SMUGGLED}");
    let request = format!(
        "POST /chat/completions HTTP/1.1\r\nHost: arkgate.test\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let mut io = connect_and_send(proxy.addr, request.as_bytes()).await;
    let r = read_outcome(&mut io).await.response();
    // Pingora follows Transfer-Encoding (RFC 9112 §6.3): an empty chunked body.
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"");
    let seen = only_request_after_smuggling(&mut io, &mock).await;
    assert_eq!(seen.method, "POST");
    assert!(seen.complete);
    assert_eq!(seen.body, b"", "{seen:?}");
    before.assert_moved(NONE).await;
    assert_serves_next(&proxy).await;
}

/// The smuggled GET travels as chunked body data, with a small Content-Length beside it: the
/// upstream must get it as the body of one request, framed one way only.
#[tokio::test]
async fn a_request_hidden_in_a_chunked_body_stays_body() {
    let _serial = serial().await;
    let mock = echo_mock();
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();
    let before = Counters::now();

    let request = format!(
        "POST /chat/completions HTTP/1.1\r\nHost: arkgate.test\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
        SMUGGLED.len()
    );
    let mut io = connect_and_send(proxy.addr, request.as_bytes()).await;
    let r = read_outcome(&mut io).await.response();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), SMUGGLED, "echoed as the body");
    let seen = only_request_after_smuggling(&mut io, &mock).await;
    assert_eq!(seen.body, SMUGGLED.as_bytes());
    before.assert_moved(NONE).await;
    assert_serves_next(&proxy).await;
}

/// A 400 for a request Pingora's HTTP/1.1 parser rejects before any arkgate hook runs: Pingora
/// answers it itself (`respond_error(400)`: no body), so arkgate's JSON cannot be asserted here.
/// If a body is ever added, it must be arkgate's JSON error. This includes a non-numeric
/// Content-Length: Pingora's `validate_request` rejects it, so the JSON 400 that arkgate's
/// `request_filter` has for it is never reached (over HTTP/2 the h2 codec resets the stream).
fn assert_rejected_by_the_parser(outcome: Outcome, what: &str) {
    let r = outcome.response();
    assert_eq!(r.status, 400, "{what}: {r:?}");
    if !r.body.is_empty() {
        assert_error(&r, 400, "bad_request", None);
    }
}

#[tokio::test]
async fn malformed_framing_and_header_bytes_are_400_and_never_reach_the_upstream() {
    let _serial = serial().await;
    let mock = echo_mock();
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();
    let before = Counters::now();

    let cases: [(&str, &[u8]); 7] = [
        (
            "duplicate differing Content-Length",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "Content-Length list with differing values",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\nhello!",
        ),
        (
            "non-numeric Content-Length",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\nhello",
        ),
        (
            "a space inside a header name",
            b"POST /x HTTP/1.1\r\nHost: a\r\nBad Header: x\r\nContent-Length: 2\r\n\r\nhi",
        ),
        (
            "a space before the colon of Transfer-Encoding",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        ),
        (
            "a NUL in a header value",
            b"POST /x HTTP/1.1\r\nHost: a\r\nX-Note: a\x00b\r\nContent-Length: 2\r\n\r\nhi",
        ),
        (
            "Transfer-Encoding whose final coding is not chunked",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        ),
    ];
    for (what, request) in cases {
        assert_rejected_by_the_parser(exchange(proxy.addr, request).await, what);
    }
    tokio::time::sleep(ms(100)).await;
    assert_eq!(mock.request_count(), 0, "{:?}", mock.requests());
    before.assert_moved(NONE).await;
    assert_serves_next(&proxy).await;
}

/// A chunked body whose framing breaks after the upstream request started: this one reaches
/// arkgate's `fail_to_proxy`, so the 400 carries the JSON error.
#[tokio::test]
async fn a_malformed_chunk_is_400_json_and_the_upstream_request_is_aborted() {
    let _serial = serial().await;
    let mock = echo_mock();
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();
    let before = Counters::now();

    let request = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nnot a chunk\r\n0\r\n\r\n";
    let r = exchange(proxy.addr, request).await.response();
    assert_error(&r, 400, "bad_request", Some(mock.addr));
    assert!(
        eventually(ms(500), || mock.connections() == mock.closed_connections()).await,
        "the upstream request was aborted"
    );
    assert!(
        mock.requests().iter().all(|r| !r.complete),
        "{:?}",
        mock.requests()
    );
    before.assert_moved(NONE).await;
    assert_serves_next(&proxy).await;
}

// ---------------------------------------------------------------------------------------------
// 11. 1,000 concurrent connections with faults mixed in
// ---------------------------------------------------------------------------------------------

/// What request `i` of the crowd asks the mock for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ok,
    Slow,
    Never,
    Reset,
    Garbage,
}

impl Kind {
    fn of(i: usize) -> Kind {
        match i % 10 {
            0 => Kind::Never,
            1 => Kind::Reset,
            2 => Kind::Garbage,
            3 => Kind::Slow,
            _ => Kind::Ok,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Kind::Ok => "ok",
            Kind::Slow => "slow",
            Kind::Never => "never",
            Kind::Reset => "reset",
            Kind::Garbage => "garbage",
        }
    }
}

/// 1,000 client connections at once, each carried on its own upstream connection, so about
/// 4,000 sockets live in this process (`ulimit -n` is 20,000 here; with a limit of 1,024, use
/// 200 clients instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_with_faults_mixed_in() {
    const CLIENTS: usize = 1000;
    let _serial = serial().await;
    // The mock listens with a deep accept queue, so 1,000 connects at once are not dropped.
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let mock = MockUpstream::start_on_socket(
        MockConfig::h1().reply(|r| {
            let target = r.target_str();
            if target.contains("/never/") {
                Reply::NeverRespond
            } else if target.contains("/reset/") {
                Reply::ResetMidBody {
                    first: Bytes::from_static(b"data: partial\n\n"),
                }
            } else if target.contains("/garbage/") {
                Reply::Garbage(Bytes::from_static(b"\x00\x01 not http\r\n\r\n"))
            } else if target.contains("/slow/") {
                Reply::Chunks {
                    status: 200,
                    headers: owned(&[("content-type", "application/json")]),
                    chunks: vec![
                        (ms(100), Bytes::copy_from_slice(&r.body)),
                        (ms(100), Bytes::new()),
                    ],
                    trailers: None,
                }
            } else {
                Reply::Echo
            }
        }),
        socket,
        4096,
    );
    let proxy = proxy(&mock.base_url("/api/v3"))
        .upstream("connect_timeout_ms", "3000")
        .upstream("read_timeout_ms", &READ_TIMEOUT_MS.to_string())
        .start();
    let in_flight = METRICS.in_flight.get();
    let before = Counters::now();
    let started = Instant::now();

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let kind = Kind::of(i);
                let body = format!(r#"{{"i":{i}}}"#);
                let request = request_bytes(
                    "POST",
                    &format!("/c/{}/{i}", kind.path()),
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                );
                (i, kind, body, exchange(addr, &request).await)
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(CLIENTS);
    for t in tasks {
        outcomes.push(t.await.expect("no client task panicked"));
    }
    let took = started.elapsed();

    let (mut good, mut timeouts, mut garbage, mut resets) = (0, 0, 0, 0);
    for (i, kind, body, outcome) in outcomes {
        match kind {
            Kind::Ok | Kind::Slow => {
                let r = outcome.response();
                assert_eq!(r.status, 200, "request {i} ({kind:?}): {r:?}");
                assert!(r.complete, "request {i}: {r:?}");
                assert_eq!(r.text(), body, "request {i} got its own body back");
                good += 1;
            }
            Kind::Never => {
                assert_error(
                    &outcome.response(),
                    504,
                    "upstream_timeout",
                    Some(mock.addr),
                );
                timeouts += 1;
            }
            Kind::Garbage => {
                assert_error(&outcome.response(), 502, "upstream_error", Some(mock.addr));
                garbage += 1;
            }
            Kind::Reset => {
                if let Outcome::Response(r) = &outcome {
                    assert!(
                        (r.status == 200 && !r.complete) || r.status == 502,
                        "request {i}: a reset is an error for the client: {r:?}"
                    );
                }
                resets += 1;
            }
        }
    }
    assert_eq!((good, timeouts, garbage, resets), (700, 100, 100, 100));
    assert!(took < Duration::from_secs(10), "the crowd took {took:?}");

    // Every request reached the upstream exactly once.
    let mut seen: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.target_str().to_string())
        .collect();
    seen.sort();
    let mut expected: Vec<String> = (0..CLIENTS)
        .map(|i| format!("/api/v3/c/{}/{i}", Kind::of(i).path()))
        .collect();
    expected.sort();
    assert_eq!(seen, expected);

    before
        .assert_moved(Counters {
            read_timeout: 100,
            ..NONE
        })
        .await;
    assert!(
        eventually(Duration::from_secs(1), || METRICS.in_flight.get()
            == in_flight)
        .await,
        "every request finished: {} in flight, {in_flight} before",
        METRICS.in_flight.get()
    );
    let r = post_json(proxy.addr, "/c/ok/after", BODY).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), BODY);
    eprintln!("1000 concurrent requests with faults took {took:?}");
}

// ---------------------------------------------------------------------------------------------
// 12. The upstream's own errors pass through
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_error_responses_pass_through_untouched() {
    let _serial = serial().await;
    const ARK_400: &str = r#"{"error":{"code":"InvalidParameter","message":"The parameter `temperature` specified in the request are not valid: must be <= 2. Request id: 0217","param":"temperature","type":"BadRequest"}}"#;
    const ARK_429: &str = r#"{"error":{"code":"RateLimitExceeded.EndpointRPMExceeded","message":"Too many requests","param":"","type":"TooManyRequests"}}"#;
    const ARK_500: &str = r#"{"error":{"code":"InternalServiceError","message":"The service encountered an unexpected internal error.","param":"","type":"InternalServerError"}}"#;
    const OVERLOADED: &str = "upstream overloaded, try again\n";
    let mock = MockUpstream::start(MockConfig::h1().reply(|r| {
        let json = ("content-type", "application/json; charset=utf-8");
        match r.target_str().rsplit('/').next() {
            Some("e400") => Reply::full(400, &[json], ARK_400),
            Some("e429") => Reply::full(429, &[json, ("retry-after", "3")], ARK_429),
            Some("e500") => Reply::full(500, &[json], ARK_500),
            Some("e503") => Reply::full(
                503,
                &[("content-type", "text/plain"), ("retry-after", "1")],
                OVERLOADED,
            ),
            _ => Reply::Echo,
        }
    }));
    let proxy = fast_proxy(&mock.base_url("/api/v3")).start();
    let before = Counters::now();

    for (path, status, content_type, body, retry_after) in [
        (
            "/e400",
            400,
            "application/json; charset=utf-8",
            ARK_400,
            None,
        ),
        (
            "/e429",
            429,
            "application/json; charset=utf-8",
            ARK_429,
            Some("3"),
        ),
        (
            "/e500",
            500,
            "application/json; charset=utf-8",
            ARK_500,
            None,
        ),
        ("/e503", 503, "text/plain", OVERLOADED, Some("1")),
    ] {
        let r = exchange(proxy.addr, &post(path)).await.response();
        assert_eq!(r.status, status, "{path}: {r:?}");
        assert_eq!(r.header("content-type"), Some(content_type), "{path}");
        assert_eq!(r.text(), body, "{path}: the body byte for byte");
        assert!(r.complete);
        assert_eq!(r.header("retry-after"), retry_after, "{path}");
        assert_eq!(
            arrivals(&mock, path),
            1,
            "{path}: an upstream error is not retried"
        );
    }
    before
        .assert_moved(Counters {
            upstream_5xx: 2,
            ..NONE
        })
        .await;
    assert_serves_next(&proxy).await;
}
