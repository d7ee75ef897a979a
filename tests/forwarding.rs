//! The request line and headers as they reach the upstream: methods, the path joined onto the
//! base URL, the query byte for byte, end-to-end headers kept, hop-by-hop headers dropped, and
//! Host (`:authority` on HTTP/2) forced to the upstream's.

mod common;

use common::*;

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// A proxy in front of a fresh mock upstream answering 200: plain HTTP/1.1, or HTTP/2 over TLS
/// with the proxy trusting its CA. (Fields drop in order: the proxy stops first.)
struct Rig {
    proxy: Proxy,
    mock: MockUpstream,
    _certs: Option<TestCerts>,
}

impl Rig {
    /// In front of a plain HTTP/1.1 upstream.
    fn h1() -> Rig {
        Rig::start(Proto::H1, |p| p)
    }

    /// In front of an HTTP/2 upstream over TLS.
    fn h2() -> Rig {
        Rig::start(Proto::H2, |p| p)
    }

    /// In front of an upstream speaking `proto` (over TLS for HTTP/2), the proxy configured by
    /// `configure`.
    fn start(proto: Proto, configure: impl FnOnce(ProxyBuilder) -> ProxyBuilder) -> Rig {
        let (mock, certs) = match proto {
            Proto::H1 => (MockUpstream::start(MockConfig::h1()), None),
            _ => {
                let certs = TestCerts::generate();
                let mock = MockUpstream::start(MockConfig::new(proto).tls(&certs));
                (mock, Some(certs))
            }
        };
        let mut builder = proxy(&mock.base_url("/api/v3"));
        if let Some(certs) = &certs {
            builder = builder.trust(certs);
        }
        Rig {
            proxy: configure(builder).start(),
            mock,
            _certs: certs,
        }
    }

    /// One request on a fresh connection; asserts that it was answered 200.
    async fn request(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) {
        let r = h1(self.proxy.addr, method, target, headers, body).await;
        assert_eq!(r.status, 200, "{method} {target}: {}", r.text());
    }

    /// `host:port` of the mock upstream, as a Host header or `:authority` names it.
    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.mock.addr.port())
    }
}

/// Sends `target` through a proxy whose base URL has path `base`; returns the upstream target.
async fn upstream_targets(base: &str, targets: &[&str]) -> Vec<String> {
    let mock = MockUpstream::start(MockConfig::h1());
    let proxy = proxy(&mock.base_url(base)).start();
    let mut client = H1Client::connect(proxy.addr).await;
    for target in targets {
        let r = client.request("GET", target, &[], b"").await;
        assert_eq!(
            r.status,
            200,
            "GET {target} via base {base:?}: {}",
            r.text()
        );
    }
    mock.requests()
        .iter()
        .map(|r| r.target_str().to_string())
        .collect()
}

#[tokio::test]
async fn every_method_reaches_the_upstream_unchanged() {
    let mock = MockUpstream::start(
        MockConfig::h1()
            .reply(|r| Reply::full(200, &[("content-type", "text/plain")], r.method.clone())),
    );
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    // One keep-alive connection: a HEAD answer without a body must not desync the next one.
    let mut client = H1Client::connect(proxy.addr).await;
    for method in METHODS {
        let body: &[u8] = if matches!(method, "POST" | "PUT" | "PATCH") {
            br#"{"a":1}"#
        } else {
            b""
        };
        let r = client
            .request(
                method,
                "/items/7",
                &[("Content-Type", "application/json")],
                body,
            )
            .await;
        assert_eq!(r.status, 200, "{method}: {}", r.text());
        if method == "HEAD" {
            assert!(r.body.is_empty(), "HEAD answer has no body");
            assert_eq!(
                r.header("content-length"),
                Some("4"),
                "HEAD keeps the length of a GET"
            );
        } else {
            assert_eq!(r.text(), method);
        }
        let seen = mock.last_request();
        assert_eq!(seen.method, method);
        assert_eq!(seen.target_str(), "/api/v3/items/7");
        assert_eq!(seen.body, body, "{method} body");
    }
    assert_eq!(mock.request_count(), METHODS.len());
}

#[tokio::test]
async fn every_method_reaches_an_h2_upstream_unchanged() {
    let rig = Rig::h2();
    for method in METHODS {
        let body: &[u8] = if matches!(method, "POST" | "PUT" | "PATCH") {
            br#"{"a":1}"#
        } else {
            b""
        };
        rig.request(method, "/items/7", &[], body).await;
        let seen = rig.mock.last_request();
        assert_eq!(seen.version, Version::H2);
        assert_eq!(seen.method, method);
        assert_eq!(seen.target_str(), "/api/v3/items/7");
        assert_eq!(seen.body, body, "{method} body");
    }
}

#[tokio::test]
async fn path_joins_a_base_path_without_trailing_slash() {
    let seen = upstream_targets("/api/v3", &["/chat/completions", "/", "/models"]).await;
    assert_eq!(
        seen,
        ["/api/v3/chat/completions", "/api/v3/", "/api/v3/models"]
    );
}

#[tokio::test]
async fn path_joins_a_base_path_with_trailing_slash() {
    let seen = upstream_targets("/api/v3/", &["/chat/completions", "/"]).await;
    assert_eq!(seen, ["/api/v3/chat/completions", "/api/v3/"]);
}

#[tokio::test]
async fn path_is_kept_as_is_when_the_base_url_has_no_path() {
    assert_eq!(upstream_targets("", &["/x", "/"]).await, ["/x", "/"]);
    assert_eq!(upstream_targets("/", &["/x", "/"]).await, ["/x", "/"]);
}

#[tokio::test]
async fn client_path_bytes_are_not_normalized() {
    let seen = upstream_targets("/api/v3", &["/files/a%2Fb", "/a//b/./c/../d", "/%E4%BD%A0"]).await;
    assert_eq!(
        seen,
        [
            "/api/v3/files/a%2Fb",
            "/api/v3/a//b/./c/../d",
            "/api/v3/%E4%BD%A0"
        ]
    );
}

#[tokio::test]
async fn query_string_is_forwarded_byte_for_byte() {
    let queries = [
        "?a=1&b=%2F&c=&d&a=2",
        "?q=%E4%BD%A0%20x+y&empty=&=novalue&flag",
        "?x=%2f%2F&semi=1;2&slash=/a/b&q=?&amp=%26",
        "?",
    ];
    let targets: Vec<String> = queries.iter().map(|q| format!("/models{q}")).collect();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let seen = upstream_targets("/api/v3", &targets).await;
    let expected: Vec<String> = queries
        .iter()
        .map(|q| format!("/api/v3/models{q}"))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn query_string_reaches_an_h2_upstream_byte_for_byte() {
    let rig = Rig::h2();
    rig.request("GET", "/models?a=1&b=%2F&c=&d&a=2", &[], b"")
        .await;
    assert_eq!(
        rig.mock.only_request().target_str(),
        "/api/v3/models?a=1&b=%2F&c=&d&a=2"
    );
}

const END_TO_END: [(&str, &str); 7] = [
    ("Authorization", "Bearer sk-test-123"),
    ("Content-Type", "application/json; charset=utf-8"),
    ("Accept", "text/event-stream"),
    ("X-Foo", "bar baz"),
    ("User-Agent", "OpenAI/Python 1.50.0"),
    ("X-Request-Id", "req-42"),
    ("OpenAI-Organization", "org-1"),
];

fn assert_end_to_end_headers(seen: &RecordedRequest) {
    for (name, value) in END_TO_END {
        assert_eq!(
            seen.header_str(name),
            Some(value),
            "{name} passes through: {seen:#?}"
        );
    }
    assert_eq!(
        seen.header_all("x-multi"),
        [&b"one"[..], &b"two"[..]],
        "repeated header keeps both values in order"
    );
}

#[tokio::test]
async fn end_to_end_headers_pass_through() {
    let rig = Rig::h1();
    let mut headers = END_TO_END.to_vec();
    headers.extend([("X-Multi", "one"), ("X-Multi", "two")]);
    rig.request("POST", "/chat/completions", &headers, b"{}")
        .await;
    assert_end_to_end_headers(&rig.mock.only_request());
}

#[tokio::test]
async fn end_to_end_headers_pass_through_to_an_h2_upstream() {
    let rig = Rig::h2();
    let mut headers = END_TO_END.to_vec();
    headers.extend([("X-Multi", "one"), ("X-Multi", "two")]);
    rig.request("POST", "/chat/completions", &headers, b"{}")
        .await;
    assert_end_to_end_headers(&rig.mock.only_request());
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), including one the client nominated in `Connection`.
const HOP_BY_HOP: [(&str, &str); 7] = [
    ("Connection", "keep-alive, X-Hop"),
    ("X-Hop", "secret"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("X-Foo", "end-to-end"),
];

fn assert_no_hop_by_hop(seen: &RecordedRequest) {
    for name in [
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "http2-settings",
    ] {
        assert!(
            seen.header(name).is_none(),
            "{name} must not be forwarded: {seen:#?}"
        );
    }
    if let Some(c) = seen.header_str("connection") {
        assert!(
            !c.to_ascii_lowercase().contains("x-hop"),
            "Connection names our hop header: {c}"
        );
    }
    assert_eq!(
        seen.header_str("x-foo"),
        Some("end-to-end"),
        "end-to-end header kept"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let rig = Rig::h1();
    rig.request("POST", "/chat/completions", &HOP_BY_HOP, b"{}")
        .await;
    assert_no_hop_by_hop(&rig.mock.only_request());
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_reach_an_h2_upstream() {
    let rig = Rig::h2();
    rig.request("POST", "/chat/completions", &HOP_BY_HOP, b"{}")
        .await;
    assert_no_hop_by_hop(&rig.mock.only_request());
}

#[tokio::test]
async fn connection_close_from_the_client_is_not_forwarded_and_closes_only_the_client_side() {
    let mock = MockUpstream::start(MockConfig::h1());
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    for _ in 0..3 {
        let mut client = H1Client::connect(proxy.addr).await;
        let r = client
            .request("GET", "/models", &[("Connection", "close")], b"")
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("close"));
        // The proxy closes the client side (after pooling the upstream connection).
        assert_eq!(client.read_to_end().await, b"");
    }
    for seen in mock.requests() {
        assert_ne!(
            seen.header_str("connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("close")
        );
    }
    assert_eq!(
        mock.connections(),
        1,
        "the upstream connection stays pooled"
    );
}

#[tokio::test]
async fn an_h2c_upgrade_offer_is_not_forwarded() {
    // What `curl --http2 http://…` sends: the proxy answers in HTTP/1.1 and drops the offer.
    let rig = Rig::h1();
    let headers = [
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ("X-Foo", "end-to-end"),
    ];
    rig.request("GET", "/models", &headers, b"").await;
    assert_no_hop_by_hop(&rig.mock.only_request());
}

#[tokio::test]
async fn host_is_forced_to_the_upstream_authority() {
    let rig = Rig::h1();
    rig.request("GET", "/models", &[("Host", "client.example:8000")], b"")
        .await;
    let seen = rig.mock.only_request();
    assert_eq!(seen.header_all("host"), [rig.authority().as_bytes()]);
}

#[tokio::test]
async fn authority_is_forced_on_an_h2_upstream() {
    let rig = Rig::h2();
    rig.request("GET", "/models", &[("Host", "client.example")], b"")
        .await;
    let seen = rig.mock.only_request();
    let expected = rig.authority();
    assert_eq!(seen.authority.as_deref(), Some(expected.as_str()));
    if let Some(host) = seen.header_str("host") {
        assert_eq!(
            host, expected,
            "a Host header beside :authority must agree with it"
        );
    }
}

#[tokio::test]
async fn upstream_host_setting_overrides_host() {
    let rig = Rig::start(Proto::H1, |p| p.upstream("host", "\"api.example.com\""));
    rig.request("GET", "/models", &[("Host", "client.example")], b"")
        .await;
    assert_eq!(
        rig.mock.only_request().header_all("host"),
        [&b"api.example.com"[..]]
    );
}

#[tokio::test]
async fn upstream_host_setting_overrides_the_h2_authority() {
    let rig = Rig::start(Proto::H2, |p| p.upstream("host", "\"api.example.com\""));
    rig.request("GET", "/models", &[], b"").await;
    let seen = rig.mock.only_request();
    assert_eq!(seen.authority.as_deref(), Some("api.example.com"));
}

#[tokio::test]
async fn an_h2_client_is_forwarded_with_the_upstream_host() {
    let rig = Rig::start(Proto::H1, |p| p.h2c());
    let client = H2Client::connect(rig.proxy.addr).await;
    let r = client
        .request(
            "POST",
            "/chat/completions?x=%2F",
            &[("authorization", "Bearer k"), ("x-foo", "bar")],
            b"{}",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = rig.mock.only_request();
    assert_eq!(seen.version, Version::H1);
    assert_eq!(seen.target_str(), "/api/v3/chat/completions?x=%2F");
    assert_eq!(seen.header_all("host"), [rig.authority().as_bytes()]);
    assert_eq!(seen.header_str("authorization"), Some("Bearer k"));
    assert_eq!(seen.header_str("x-foo"), Some("bar"));
    assert_eq!(seen.body, b"{}");
}

#[tokio::test]
async fn upstream_response_status_headers_and_body_reach_the_client() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| {
        Reply::full(
            429,
            &[
                ("content-type", "application/json"),
                ("x-ratelimit-remaining", "0"),
                ("retry-after", "3"),
            ],
            r#"{"error":{"message":"slow down","type":"rate_limit","code":"429"}}"#,
        )
    }));
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let r = post_json(proxy.addr, "/chat/completions", "{}").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("retry-after"), Some("3"));
    assert_eq!(
        r.text(),
        r#"{"error":{"message":"slow down","type":"rate_limit","code":"429"}}"#
    );
}

/// Hop-by-hop fields in an upstream response, one of them nominated by `Connection`.
const HOP_BY_HOP_RESPONSE: [(&str, &str); 4] = [
    ("connection", "X-Resp-Hop"),
    ("x-resp-hop", "upstream-private"),
    ("keep-alive", "timeout=5, max=100"),
    ("x-e2e", "kept"),
];

fn hop_mock() -> MockUpstream {
    MockUpstream::start(MockConfig::h1().reply(|_| Reply::full(200, &HOP_BY_HOP_RESPONSE, "{}")))
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_forwarded_to_an_h1_client() {
    // RFC 9110 §7.6.1: an intermediary removes the fields the Connection header nominates, and
    // Keep-Alive, before forwarding a message, responses included.
    let mock = hop_mock();
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let r = h1(proxy.addr, "GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-e2e"), Some("kept"));
    assert!(
        r.header("x-resp-hop").is_none(),
        "nominated field leaked: {:?}",
        r
    );
    assert!(
        r.header("keep-alive").is_none(),
        "upstream Keep-Alive leaked: {:?}",
        r
    );
    if let Some(c) = r.header("connection") {
        assert!(
            !c.to_ascii_lowercase().contains("x-resp-hop"),
            "Connection: {c}"
        );
    }
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_forwarded_to_an_h2_client() {
    let mock = hop_mock();
    let proxy = proxy(&mock.base_url("/api/v3")).h2c().start();
    let r = H2Client::connect(proxy.addr)
        .await
        .request("GET", "/models", &[], b"")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-e2e"), Some("kept"));
    assert!(
        r.header("x-resp-hop").is_none(),
        "nominated field leaked: {:?}",
        r.headers
    );
    assert!(r.header("keep-alive").is_none());
}

#[tokio::test]
async fn an_expect_continue_request_is_invited_and_forwarded() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::Echo));
    let proxy = proxy(&mock.base_url("/api/v3")).start();
    let body = br#"{"model":"m","messages":[]}"#;
    let r = H1Client::connect(proxy.addr)
        .await
        .post_json_expecting_continue("/chat/completions", body)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
}

#[tokio::test]
async fn an_absolute_form_target_is_forwarded_in_origin_form() {
    let rig = Rig::h1();
    let target = "http://client.example/models?a=%2F";
    rig.request("GET", target, &[("Host", "client.example")], b"")
        .await;
    let seen = rig.mock.only_request();
    assert_eq!(seen.target_str(), "/api/v3/models?a=%2F");
    assert_eq!(seen.header_all("host"), [rig.authority().as_bytes()]);
}

#[tokio::test]
async fn an_http10_client_without_host_is_served() {
    let rig = Rig::h1();
    let mut client = H1Client::connect(rig.proxy.addr).await;
    client.send(b"GET /models HTTP/1.0\r\n\r\n").await;
    let r = client.read_final_response(false).await;
    assert_eq!(r.status, 200);
    let seen = rig.mock.only_request();
    assert_eq!(seen.target_str(), "/api/v3/models");
    assert_eq!(seen.header_all("host"), [rig.authority().as_bytes()]);
}
