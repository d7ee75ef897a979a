//! The harness checked on its own, without the proxy: the mock upstream records what it is sent
//! and answers each `Reply` (faults included) the way the other tests rely on, over HTTP/1.1 and
//! HTTP/2, plain and TLS.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn mock_records_the_request_exactly_as_sent() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::Echo));
    let mut client = H1Client::connect(mock.addr).await;
    client
        .send(b"POST /a/b%2F?x=1&x=&y HTTP/1.1\r\nHost: up.example\r\nX-Two: 1\r\nx-two: 2\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    client
        .send_chunks(&[(ms(0), b"abc"), (ms(30), b"de"), (ms(30), b"\xff")])
        .await;
    let r = client.read_response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"abcde\xff");
    assert_eq!(r.header("content-type"), Some("text/plain"));

    let seen = mock.only_request();
    assert_eq!(seen.version, Version::H1);
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, b"/a/b%2F?x=1&x=&y");
    assert_eq!(seen.host().as_deref(), Some("up.example"));
    assert_eq!(seen.header_all("x-two"), [&b"1"[..], &b"2"[..]]);
    assert_eq!(seen.headers[1].0, "X-Two", "names keep their case");
    assert_eq!(seen.body, b"abcde\xff");
    assert_eq!(seen.chunks, [3, 2, 1]);
    assert!(seen.complete);
}

#[tokio::test]
async fn mock_serves_keep_alive_and_counts_connections() {
    let mock = MockUpstream::start(MockConfig::h1());
    let mut client = H1Client::connect(mock.addr).await;
    for _ in 0..3 {
        assert_eq!(client.request("GET", "/", &[], b"").await.status, 200);
    }
    let mut other = H1Client::connect(mock.addr).await;
    assert_eq!(other.request("HEAD", "/", &[], b"").await.body, b"");
    assert_eq!(mock.connections(), 2);
    let conns: Vec<usize> = mock.requests().iter().map(|r| r.conn).collect();
    assert_eq!(conns, [1, 1, 1, 2]);
}

#[tokio::test]
async fn mock_invites_an_expect_continue_body() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::Echo));
    let mut client = H1Client::connect(mock.addr).await;
    client
        .send(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert_eq!(client.read_response(false).await.status, 100);
    client.send(b"ok").await;
    assert_eq!(client.read_final_response(false).await.body, b"ok");
}

#[tokio::test]
async fn mock_streams_chunks_with_their_delays_and_records_send_times() {
    let mock = MockUpstream::start(
        MockConfig::h1().reply(|_| Reply::sse(&[(ms(0), "a\n\n"), (ms(150), "b\n\n")])),
    );
    let r = h1(mock.addr, "GET", "/", &[], b"").await;
    assert!(r.chunked);
    assert_eq!(r.text(), "a\n\nb\n\n");
    assert_eq!(r.pieces.len(), 2);
    assert!(r.pieces[1].0 - r.pieces[0].0 >= ms(140));
    let sent = mock.chunk_send_times();
    assert_eq!(sent.len(), 2);
    assert!(sent[1] - sent[0] >= ms(140));
}

#[tokio::test]
async fn mock_never_respond_waits_until_the_client_leaves() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::NeverRespond));
    let mut client = H1Client::connect(mock.addr).await;
    client.send(&request_bytes("POST", "/", &[], b"{}")).await;
    let waited = tokio::time::timeout(ms(200), client.read_response(false)).await;
    assert!(waited.is_err(), "no answer");
    assert!(mock.wait_for_requests(1, ms(1000)).await);
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(2);
    while mock.closed_connections() == 0 {
        assert!(
            Instant::now() < deadline,
            "the mock noticed the client left"
        );
        tokio::time::sleep(ms(5)).await;
    }
}

#[tokio::test]
async fn mock_slow_headers_answers_after_the_delay() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::SlowHeaders(ms(200))));
    let started = Instant::now();
    let r = h1(mock.addr, "GET", "/", &[], b"").await;
    assert!(started.elapsed() >= ms(200));
    assert_eq!(r.text(), r#"{"ok":true}"#);
}

#[tokio::test]
async fn mock_stall_after_sends_the_first_chunk_then_goes_quiet() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::StallAfter {
        status: 200,
        headers: mock::owned(&[("content-type", "text/event-stream")]),
        first: "data: 1\n\n".into(),
        stall: ms(300),
    }));
    let r = h1(mock.addr, "GET", "/", &[], b"").await;
    assert_eq!(r.text(), "data: 1\n\n");
    assert!(r.complete, "the body ends after the stall");
    let sent = mock.chunk_send_times();
    assert!(r.pieces[0].0 - sent[0] < ms(100));
    assert!(Instant::now() - sent[0] >= ms(300));
}

#[tokio::test]
async fn mock_reset_mid_body_breaks_an_h1_response() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::ResetMidBody {
        first: "data: partial".into(),
    }));
    let r = h1(mock.addr, "GET", "/", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "data: partial");
    assert!(!r.complete, "the chunked body never ended");
}

#[tokio::test]
async fn mock_reset_mid_body_resets_an_h2_stream() {
    let mock = MockUpstream::start(MockConfig::h2().reply(|_| Reply::ResetMidBody {
        first: "data: partial".into(),
    }));
    let r = H2Client::connect(mock.addr)
        .await
        .request("GET", "/", &[], b"")
        .await;
    assert_eq!(r.text(), "data: partial");
    assert!(r.error.is_some(), "the stream was reset");
}

#[tokio::test]
async fn mock_garbage_is_written_raw_then_the_connection_closes() {
    let mock = MockUpstream::start(
        MockConfig::h1().reply(|_| Reply::Garbage("\x00\x01not http\r\n\r\n".into())),
    );
    let mut client = H1Client::connect(mock.addr).await;
    client.send(&request_bytes("GET", "/", &[], b"")).await;
    assert_eq!(client.read_to_end().await, b"\x00\x01not http\r\n\r\n");
}

#[tokio::test]
async fn mock_close_after_response_drops_the_keep_alive_connection() {
    let mock = MockUpstream::start(
        MockConfig::h1().reply(|_| Reply::CloseAfterResponse(Box::new(Reply::json("{}")))),
    );
    let mut client = H1Client::connect(mock.addr).await;
    let r = client.request("GET", "/", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(r.header("connection").is_none(), "no warning given");
    let deadline = Instant::now() + Duration::from_secs(2);
    while mock.closed_connections() == 0 {
        assert!(Instant::now() < deadline, "the mock closed the connection");
        tokio::time::sleep(ms(5)).await;
    }
}

#[tokio::test]
async fn mock_h2_records_authority_path_and_sends_trailers() {
    let mock = MockUpstream::start(MockConfig::h2().reply(|_| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-done", "yes".parse().expect("value"));
        Reply::Chunks {
            status: 200,
            headers: vec![],
            chunks: vec![(ms(0), "a".into()), (ms(20), "b".into())],
            trailers: Some(trailers),
        }
    }));
    let r = H2Client::connect(mock.addr)
        .await
        .request("POST", "/p?q=%2F", &[("x-foo", "bar")], b"body")
        .await;
    assert_eq!(r.text(), "ab");
    assert_eq!(
        r.trailers
            .as_ref()
            .and_then(|t| t.get("x-done"))
            .map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    let seen = mock.only_request();
    assert_eq!(seen.version, Version::H2);
    assert_eq!(seen.target_str(), "/p?q=%2F");
    assert_eq!(seen.authority, Some(mock.addr.to_string()));
    assert_eq!(seen.header_str("x-foo"), Some("bar"));
    assert_eq!(seen.body, b"body");
}

#[tokio::test]
async fn tls_mock_negotiates_the_protocol_by_alpn_with_a_certificate_the_test_ca_signed() {
    let certs = TestCerts::generate();
    let mock = MockUpstream::start(MockConfig::new(Proto::Both).tls(&certs));
    let url = mock.base_url("/x");
    let h2 = curl(&["--http2", "--cacert", certs.ca(), &url]).await;
    assert_eq!((h2.status, h2.http_version.as_str()), (200, "2"));
    let h1 = curl(&["--http1.1", "--cacert", certs.ca(), &url]).await;
    assert_eq!((h1.status, h1.http_version.as_str()), (200, "1.1"));
    let versions: Vec<Version> = mock.requests().iter().map(|r| r.version).collect();
    assert_eq!(versions, [Version::H2, Version::H1]);
}

#[tokio::test]
async fn a_dead_address_refuses_connections() {
    let dead = DeadUpstream::new();
    assert!(tokio::net::TcpStream::connect(dead.addr()).await.is_err());
}
