//! The duties nginx had at the edge, end to end over real sockets: TLS listeners (HTTP/2 and
//! HTTP/1.1 by ALPN, TLS 1.2 and 1.3, chained certificates, clear start-up errors), h2c beside
//! HTTP/1.1, SSE through HTTP/2, the forwarding headers and `Via`, header limits (431), and the
//! client-side idle timeouts, including memory returning near its baseline once many idle HTTP/2
//! connections are closed.
//!
//! The memory test runs the real binary in its own process, so its RSS is the proxy's alone.
//! (TLS and plain throughput figures are a benchmark: `benches/tls_throughput.rs`.)

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::client::{alpn, tls_connect, wait_for_close};
use common::process::{assert_config_test_accepts, config_test_rejection, ProxyProcess};
use common::*;
use openssl::ssl::SslVersion;
use pingora::server::configuration::Opt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn ok_mock() -> MockUpstream {
    MockUpstream::start(MockConfig::h1())
}

fn json_error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("a JSON body, got {:?}", String::from_utf8_lossy(body)));
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------------------------
// TLS listeners
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn curl_gets_http2_and_http11_from_a_tls_listener() {
    let certs = TestCerts::generate();
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .tls_listener(&certs)
        .start();
    let url = proxy.tls_url("/models");
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = curl(&[flag, "--cacert", certs.ca(), &url]).await;
        assert_eq!(out.http_version, version, "curl {flag}");
        assert_eq!(out.status, 200, "curl {flag}");
        assert_eq!(out.body, br#"{"ok":true}"#, "curl {flag}");
    }
    let targets: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.target_str().to_string())
        .collect();
    assert_eq!(targets, ["/api/v3/models", "/api/v3/models"]);
}

#[tokio::test]
async fn tls12_and_tls13_are_accepted_and_older_versions_are_not() {
    let certs = TestCerts::generate();
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .tls_listener(&certs)
        .start();
    let url = proxy.tls_url("/models");
    for flags in [
        &["--http2", "--tlsv1.2", "--tls-max", "1.2"][..],
        &["--http2", "--tlsv1.3"][..],
        &["--http1.1", "--tlsv1.2", "--tls-max", "1.2"][..],
    ] {
        let mut args = flags.to_vec();
        args.extend(["--cacert", certs.ca(), &url]);
        let out = curl(&args).await;
        assert_eq!(out.status, 200, "curl {flags:?}");
    }

    let addr = proxy.tls_addr.expect("TLS listener");
    let tls12 = tls_connect(addr, &certs.ca_path, |b| {
        b.set_max_proto_version(Some(SslVersion::TLS1_2))
            .expect("max version");
    })
    .await
    .expect("a TLS 1.2 handshake");
    assert_eq!(tls12.ssl().version_str(), "TLSv1.2");
    let tls13 = tls_connect(addr, &certs.ca_path, |b| {
        b.set_min_proto_version(Some(SslVersion::TLS1_3))
            .expect("min version");
    })
    .await
    .expect("a TLS 1.3 handshake");
    assert_eq!(tls13.ssl().version_str(), "TLSv1.3");

    // A client willing to speak TLS 1.1 (security level 0 lets OpenSSL offer it) is refused.
    let tls11 = tls_connect(addr, &certs.ca_path, |b| {
        b.set_cipher_list("DEFAULT:@SECLEVEL=0").expect("ciphers");
        b.set_min_proto_version(Some(SslVersion::TLS1_1))
            .expect("min version");
        b.set_max_proto_version(Some(SslVersion::TLS1_1))
            .expect("max version");
    })
    .await;
    assert!(tls11.is_err(), "a TLS 1.1 handshake succeeded");
}

#[tokio::test]
async fn tls_alpn_offers_h2_and_http11() {
    let certs = TestCerts::generate();
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .tls_listener(&certs)
        .start();
    let addr = proxy.tls_addr.expect("TLS listener");

    let both = tls_connect(addr, &certs.ca_path, alpn(b"\x02h2\x08http/1.1"))
        .await
        .expect("TLS");
    assert_eq!(both.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));

    let h2_only = H2Client::connect_tls(addr, &certs).await;
    let r = h2_only.try_get("/models", &[]).await.expect("h2 response");
    assert_eq!(r.status, 200);

    let h1_only = tls_connect(addr, &certs.ca_path, alpn(b"\x08http/1.1"))
        .await
        .expect("TLS");
    assert_eq!(
        h1_only.ssl().selected_alpn_protocol(),
        Some(&b"http/1.1"[..])
    );
    let r = H1Client::over_tls(h1_only)
        .request("GET", "/models", &[], b"")
        .await;
    assert_eq!((r.status, &r.body[..]), (200, &br#"{"ok":true}"#[..]));

    // No ALPN at all (old clients, health checkers): HTTP/1.1.
    let none = tls_connect(addr, &certs.ca_path, |_| {})
        .await
        .expect("TLS");
    assert_eq!(none.ssl().selected_alpn_protocol(), None);
    let r = H1Client::over_tls(none)
        .request("GET", "/models", &[], b"")
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_chained_certificate_file_is_served_whole() {
    let certs = TestCerts::generate();
    let dir = tempfile::tempdir().expect("temp dir");
    let chain = dir.path().join("fullchain.pem");
    let mut pem = std::fs::read(&certs.cert_path).expect("leaf PEM");
    pem.extend(std::fs::read(&certs.ca_path).expect("CA PEM"));
    std::fs::write(&chain, pem).expect("write the chain");

    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .tls_listener_files(&chain, &certs.key_path)
        .start();
    let addr = proxy.tls_addr.expect("TLS listener");
    let tls = tls_connect(addr, &certs.ca_path, alpn(b"\x08http/1.1"))
        .await
        .expect("the chain verifies against the CA");
    let sent = tls.ssl().peer_cert_chain().map_or(0, |c| c.len());
    assert_eq!(sent, 2, "the proxy sends the leaf and the CA from the file");
    let r = H1Client::over_tls(tls)
        .request("GET", "/models", &[], b"")
        .await;
    assert_eq!(r.status, 200);
    let out = curl(&["--http2", "--cacert", certs.ca(), &proxy.tls_url("/models")]).await;
    assert_eq!((out.status, out.http_version.as_str()), (200, "2"));
}

/// A config (checked, never run) with a TLS listener serving `cert` and `key`.
fn tls_yaml(cert: &Path, key: &Path) -> String {
    proxy("http://127.0.0.1:2/api/v3")
        .tls_listener_files(cert, key)
        .render(&Listeners::unbound(), &std::env::temp_dir())
}

/// What `build_server` says about this certificate and key (it must refuse them).
fn startup_error(cert: &Path, key: &Path) -> String {
    let cfg = arkgate::Config::from_yaml(&tls_yaml(cert, key)).expect("the YAML itself is valid");
    match arkgate::server::build_server(cfg, Opt::default()) {
        Ok(_) => panic!(
            "a server was built with certificate {} and key {}",
            cert.display(),
            key.display()
        ),
        Err(e) => e.to_string(),
    }
}

/// Certificates for the start-up checks: the good pair, another pair's key, a missing file and
/// a file that is not PEM.
struct BadFiles {
    certs: TestCerts,
    other: TestCerts,
    dir: tempfile::TempDir,
}

impl BadFiles {
    fn new() -> BadFiles {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("garbage.pem"), "not a certificate\n").expect("write");
        BadFiles {
            certs: TestCerts::generate(),
            other: TestCerts::generate(),
            dir,
        }
    }

    fn missing(&self) -> PathBuf {
        self.dir.path().join("missing.pem")
    }

    fn garbage(&self) -> PathBuf {
        self.dir.path().join("garbage.pem")
    }

    /// `bad` in place of the certificate, then of the key: each is a start-up error naming it
    /// (`what` describes it in failure messages).
    fn assert_startup_errors_name(&self, bad: &Path, what: &str) {
        let name = bad.to_str().expect("UTF-8");
        let e = startup_error(bad, &self.certs.key_path);
        assert!(e.contains(name), "the {what} certificate is not named: {e}");
        let e = startup_error(&self.certs.cert_path, bad);
        assert!(e.contains(name), "the {what} key is not named: {e}");
    }
}

#[test]
fn a_missing_certificate_or_key_is_a_startup_error_naming_the_file() {
    let f = BadFiles::new();
    f.assert_startup_errors_name(&f.missing(), "missing");
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_a_startup_error() {
    let f = BadFiles::new();
    let e = startup_error(&f.certs.cert_path, &f.other.key_path);
    assert!(e.contains("does not match"), "{e}");
    assert!(
        e.contains(f.other.key_path.to_str().expect("UTF-8")),
        "the key is not named: {e}"
    );
}

#[test]
fn a_certificate_that_is_not_pem_is_a_startup_error_naming_the_file() {
    let f = BadFiles::new();
    f.assert_startup_errors_name(&f.garbage(), "bad");
}

#[test]
fn config_test_reports_a_bad_certificate_in_one_line_and_exits_64() {
    let f = BadFiles::new();
    let missing = f.missing();
    let cases = [
        (
            tls_yaml(&missing, &f.certs.key_path),
            missing.to_str().expect("UTF-8").to_string(),
        ),
        (
            tls_yaml(&f.certs.cert_path, &f.other.key_path),
            "does not match".to_string(),
        ),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let path = f.dir.path().join(format!("case{i}.yaml"));
        std::fs::write(&path, yaml).expect("write config");
        let line = config_test_rejection(&path, &format!("case {i}"));
        assert!(
            line.starts_with("invalid configuration:") && line.contains(expected),
            "case {i}: `{expected}` not in: {line}"
        );
    }
}

#[test]
fn config_test_accepts_the_shipped_edge_config_once_its_certificates_exist() {
    let certs = TestCerts::generate();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/edge.yaml");
    let text = std::fs::read_to_string(&shipped).expect("read conf/edge.yaml");
    let cert = certs.cert_path.to_str().expect("UTF-8");
    let key = certs.key_path.to_str().expect("UTF-8");
    assert!(text.contains("/etc/arkgate/tls/fullchain.pem") && text.contains("privkey.pem"));
    let text = text
        .replace("/etc/arkgate/tls/fullchain.pem", cert)
        .replace("/etc/arkgate/tls/privkey.pem", key);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("edge.yaml");
    std::fs::write(&path, text).expect("write config");
    assert_config_test_accepts(&path);
}

// ---------------------------------------------------------------------------------------------
// h2c
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_and_http11_share_a_plain_port() {
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3")).h2c().start();
    let url = proxy.url("/models");

    let out = curl(&["--http2-prior-knowledge", &url]).await;
    assert_eq!((out.status, out.http_version.as_str()), (200, "2"));
    let client = H2Client::connect(proxy.addr).await;
    let r = client.request("GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), r#"{"ok":true}"#);

    let out = curl(&["--http1.1", &url]).await;
    assert_eq!((out.status, out.http_version.as_str()), (200, "1.1"));
    let r = h1(proxy.addr, "GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200);

    assert_eq!(mock.request_count(), 4);
    assert!(mock
        .requests()
        .iter()
        .all(|r| r.target_str() == "/api/v3/models"));
}

// ---------------------------------------------------------------------------------------------
// SSE through HTTP/2 over TLS
// ---------------------------------------------------------------------------------------------

const SSE_GAP_MS: u64 = 200;
const SSE_EVENTS: usize = 5;

#[tokio::test]
async fn sse_arrives_event_by_event_over_tls_http2() {
    let events: Vec<(Duration, String)> = (0..SSE_EVENTS)
        .map(|i| {
            let gap = if i == 0 { ms(0) } else { ms(SSE_GAP_MS) };
            (gap, format!("data: {{\"i\":{i}}}\n\n"))
        })
        .collect();
    let expected: String = events.iter().map(|(_, e)| e.as_str()).collect();
    let first_len = events[0].1.len();
    let mock = MockUpstream::start(MockConfig::h1().reply(move |_| {
        let events: Vec<(Duration, &str)> = events.iter().map(|(d, e)| (*d, e.as_str())).collect();
        Reply::sse(&events)
    }));
    let certs = TestCerts::generate();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .tls_listener(&certs)
        .start();
    let client = H2Client::connect_tls(proxy.tls_addr.expect("TLS listener"), &certs).await;
    let r = client
        .post_json("/chat/completions", br#"{"stream":true}"#)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.error, None);
    assert_eq!(r.text(), expected);
    assert_eq!(r.header("x-accel-buffering"), Some("no"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));

    let sent = mock.chunk_send_times();
    assert_eq!(sent.len(), SSE_EVENTS);
    assert!(
        r.pieces.len() >= 3,
        "events arrived one by one, not in {} pieces",
        r.pieces.len()
    );
    let mut total = 0;
    let first = r
        .pieces
        .iter()
        .find_map(|(at, n)| {
            total += n;
            (total >= first_len).then_some(*at)
        })
        .expect("the first event arrived");
    let last_sent = sent[SSE_EVENTS - 1];
    assert!(
        first + ms(2 * SSE_GAP_MS) < last_sent,
        "the first event arrived only {:?} before the last was sent",
        last_sent.saturating_duration_since(first)
    );
    assert!(
        first.saturating_duration_since(sent[0]) < ms(300),
        "the first event took {:?} to arrive",
        first.saturating_duration_since(sent[0])
    );
}

// ---------------------------------------------------------------------------------------------
// Forwarding headers and Via
// ---------------------------------------------------------------------------------------------

const SPOOFED: [(&str, &str); 3] = [
    ("X-Forwarded-For", "1.2.3.4"),
    ("X-Real-IP", "1.2.3.4"),
    ("X-Forwarded-Proto", "https"),
];

/// (XFF values, X-Real-IP, X-Forwarded-Proto) as the upstream saw them last.
fn forwarded_seen(mock: &MockUpstream) -> (Vec<String>, String, String) {
    let r = mock.last_request();
    let xff = r
        .header_all("x-forwarded-for")
        .iter()
        .map(|v| String::from_utf8_lossy(v).to_string())
        .collect();
    let one = |name: &str| r.header_str(name).unwrap_or("<absent>").to_string();
    (xff, one("x-real-ip"), one("x-forwarded-proto"))
}

/// How a client reaches the proxy in the forwarding tests.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// HTTP/1.1 on the plain listener.
    PlainH1,
    /// HTTP/2 with prior knowledge on the plain listener.
    H2c,
    /// HTTP/1.1 over TLS (curl).
    TlsH1,
    /// HTTP/2 over TLS.
    TlsH2,
}

/// A proxy with an h2c-capable plain listener and a TLS listener, in front of [`ok_mock`].
/// (Fields drop in order: the proxy stops first.)
struct ForwardingSetup {
    proxy: Proxy,
    mock: MockUpstream,
    certs: TestCerts,
    /// The extra YAML, named in failure messages.
    section: String,
}

impl ForwardingSetup {
    fn start(section: &str) -> ForwardingSetup {
        let certs = TestCerts::generate();
        let mock = ok_mock();
        let proxy = proxy(&mock.base_url("/api/v3"))
            .h2c()
            .tls_listener(&certs)
            .yaml(section)
            .start();
        ForwardingSetup {
            proxy,
            mock,
            certs,
            section: section.to_string(),
        }
    }

    /// `GET /models` with `headers` by `route`; returns the status.
    async fn get_models(&self, route: Route, headers: &[(&str, &str)]) -> u16 {
        let addr = self.proxy.addr;
        match route {
            Route::PlainH1 => h1(addr, "GET", "/models", headers, b"").await.status,
            Route::H2c => {
                let client = H2Client::connect(addr).await;
                client.request("GET", "/models", headers, b"").await.status
            }
            Route::TlsH1 => {
                let header_args: Vec<String> =
                    headers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
                let mut args = vec!["--http1.1", "--cacert", self.certs.ca()];
                for h in &header_args {
                    args.extend(["-H", h.as_str()]);
                }
                let url = self.proxy.tls_url("/models");
                args.push(&url);
                curl(&args).await.status
            }
            Route::TlsH2 => {
                let tls_addr = self.proxy.tls_addr.expect("TLS");
                let client = H2Client::connect_tls(tls_addr, &self.certs).await;
                client.request("GET", "/models", headers, b"").await.status
            }
        }
    }

    /// Sends `GET /models` with `headers` by `route`, and asserts a 200 and the forwarding
    /// headers the upstream saw: one X-Forwarded-For line `xff`, X-Real-IP and
    /// X-Forwarded-Proto.
    async fn assert_forwarded(
        &self,
        route: Route,
        headers: &[(&str, &str)],
        (xff, real_ip, proto): (&str, &str, &str),
    ) {
        let what = format!("{route:?} ({})", self.section.trim());
        assert_eq!(self.get_models(route, headers).await, 200, "{what}");
        assert_eq!(
            forwarded_seen(&self.mock),
            (
                vec![xff.to_string()],
                real_ip.to_string(),
                proto.to_string()
            ),
            "{what}"
        );
    }
}

#[tokio::test]
async fn client_forwarded_headers_are_replaced_unless_the_peer_is_trusted() {
    // No trusted proxies, and a list that does not contain 127.0.0.1.
    for section in [
        "",
        "forwarded: {trusted_proxies: [\"10.0.0.0/8\", \"::1/128\"]}\n",
    ] {
        let f = ForwardingSetup::start(section);
        let plain = ("127.0.0.1", "127.0.0.1", "http");
        let tls = ("127.0.0.1", "127.0.0.1", "https");
        let mut spoofed = SPOOFED.to_vec();
        spoofed.push(("X-Forwarded-For", "5.6.7.8"));
        f.assert_forwarded(Route::PlainH1, &spoofed, plain).await;
        f.assert_forwarded(Route::H2c, &SPOOFED, plain).await;
        let spoofed_http: Vec<(&str, &str)> = SPOOFED
            .iter()
            .map(|&(n, v)| (n, if n == "X-Forwarded-Proto" { "http" } else { v }))
            .collect();
        f.assert_forwarded(Route::TlsH1, &spoofed_http, tls).await;
        let proto_http = [("x-forwarded-proto", "http")];
        f.assert_forwarded(Route::TlsH2, &proto_http, tls).await;
    }
}

#[tokio::test]
async fn a_trusted_peers_forwarded_headers_are_kept_and_appended_to() {
    let f = ForwardingSetup::start("forwarded: {trusted_proxies: [\"127.0.0.0/8\"]}\n");
    let chain = "1.2.3.4, 127.0.0.1";
    let spoofed = (chain, "1.2.3.4", "https");
    f.assert_forwarded(Route::PlainH1, &SPOOFED, spoofed).await;

    // Nothing forwarded: the proxy fills in what it knows.
    let plain = ("127.0.0.1", "127.0.0.1", "http");
    f.assert_forwarded(Route::PlainH1, &[], plain).await;

    let xff = [("x-forwarded-for", "1.2.3.4")];
    f.assert_forwarded(Route::H2c, &xff, (chain, "127.0.0.1", "http"))
        .await;
    f.assert_forwarded(Route::TlsH2, &xff, (chain, "127.0.0.1", "https"))
        .await;
}

/// RFC 9110 §5.3: several field lines are one comma-separated list, so a trusted proxy that
/// sends the chain on two lines (as some do) must not lose the second.
#[tokio::test]
async fn a_trusted_peers_forwarded_for_on_several_lines_is_kept_whole() {
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .yaml("forwarded: {trusted_proxies: [\"127.0.0.0/8\"]}\n")
        .start();
    let r = h1(
        proxy.addr,
        "GET",
        "/models",
        &[
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-For", "5.6.7.8"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let (xff, _, _) = forwarded_seen(&mock);
    assert_eq!(xff.join(", "), "1.2.3.4, 5.6.7.8, 127.0.0.1");
}

#[tokio::test]
async fn via_names_arkgate_by_default_and_can_be_switched_off() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|r| {
        if r.target_str().ends_with("/proxied") {
            Reply::full(200, &[("via", "1.1 upstream-lb")], "{}")
        } else {
            Reply::json("{}")
        }
    }));
    let on = proxy(&mock.base_url("/api/v3")).h2c().start();
    let r = h1(on.addr, "GET", "/models", &[], b"").await;
    assert_eq!(r.header("via"), Some("1.1 arkgate"));
    let r = H2Client::connect(on.addr)
        .await
        .request("GET", "/models", &[], b"")
        .await;
    assert_eq!(r.header("via"), Some("1.1 arkgate"));
    // An upstream's own Via is kept, and ours follows it.
    let r = h1(on.addr, "GET", "/proxied", &[], b"").await;
    let via: Vec<String> = r
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("via"))
        .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        .collect();
    assert_eq!(via.join(", "), "1.1 upstream-lb, 1.1 arkgate");

    let off = proxy(&mock.base_url("/api/v3"))
        .h2c()
        .yaml("forwarded: {via_header: false}\n")
        .start();
    let r = h1(off.addr, "GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("via"), None);
    let r = H2Client::connect(off.addr)
        .await
        .request("GET", "/models", &[], b"")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("via"), None);
}

// ---------------------------------------------------------------------------------------------
// Header limits
// ---------------------------------------------------------------------------------------------

const LIMITS: &str = "downstream: {max_headers: 10, max_header_bytes: 2048}\n";

fn fields(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("x-field-{i}"), "v".into()))
        .collect()
}

fn as_refs(h: &[(String, String)]) -> Vec<(&str, &str)> {
    h.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

#[tokio::test]
async fn too_many_header_fields_get_431_over_http11() {
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3")).yaml(LIMITS).start();
    // Host plus 9: at the limit.
    let at_limit = fields(9);
    let r = h1(proxy.addr, "GET", "/models", &as_refs(&at_limit), b"").await;
    assert_eq!(r.status, 200);

    let over = fields(12);
    let r = h1(proxy.addr, "GET", "/models", &as_refs(&over), b"").await;
    assert_eq!(r.status, 431);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(json_error_code(&r.body), "headers_too_large");
    assert_eq!(
        mock.request_count(),
        1,
        "the refused request never went upstream"
    );

    let r = h1(proxy.addr, "GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200, "the next request is served");
}

#[tokio::test]
async fn an_oversized_header_section_gets_431_over_http11() {
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3")).yaml(LIMITS).start();
    let fits = "a".repeat(1500);
    let r = h1(proxy.addr, "GET", "/models", &[("x-big", &fits)], b"").await;
    assert_eq!(r.status, 200);

    let big = "a".repeat(3000);
    let r = h1(proxy.addr, "GET", "/models", &[("x-big", &big)], b"").await;
    assert_eq!(r.status, 431);
    assert_eq!(json_error_code(&r.body), "headers_too_large");
    // Many small fields adding up past the byte limit, under the count limit.
    let spread: Vec<(String, String)> = (0..8)
        .map(|i| (format!("x-part-{i}"), "b".repeat(300)))
        .collect();
    let r = h1(proxy.addr, "GET", "/models", &as_refs(&spread), b"").await;
    assert_eq!(r.status, 431);
    assert_eq!(mock.request_count(), 1);

    let r = h1(proxy.addr, "GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200, "the next request is served");
}

#[tokio::test]
async fn oversized_header_lists_over_http2_are_refused_and_the_connection_stays_usable() {
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3")).h2c().yaml(LIMITS).start();
    let conn = H2Client::connect(proxy.addr).await;
    let uri = "/models";

    // Too many fields, small in bytes: the proxy's own check answers with the JSON error.
    let over = fields(12);
    let r = conn
        .try_get(uri, &as_refs(&over))
        .await
        .expect("a response");
    assert_eq!(r.status, 431);
    assert_eq!(json_error_code(&r.body), "headers_too_large");

    // Over max_header_bytes but inside HTTP/2's header-list cap (bytes + 32 per field): the
    // proxy's check again.
    let medium = "m".repeat(2060);
    let r = conn
        .try_get(uri, &[("x-big", &medium)])
        .await
        .expect("a response");
    assert_eq!(r.status, 431);
    assert_eq!(json_error_code(&r.body), "headers_too_large");

    // Over HTTP/2's cap (max_header_bytes + 32 × max_headers = 2368 here) but within the h2
    // crate's abuse margin (4× the cap): the HTTP/2 layer refuses the stream itself, before the
    // proxy sees it (a bare 431, then a reset); the connection stays.
    let over = "o".repeat(4000);
    let refused = conn.try_get(uri, &[("x-over", &over)]).await;
    match &refused {
        Ok(r) => assert_eq!(r.status, 431, "{r:?}"),
        Err(e) => assert!(!e.is_empty(), "the stream was reset: {e}"),
    }
    assert_eq!(mock.request_count(), 0, "no refused request went upstream");
    let r = conn.try_get(uri, &[]).await.expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!conn.is_closed(), "the connection was closed");

    // Far over (more than 4× the cap): h2 takes it for abuse and ends the whole connection with
    // GOAWAY(ENHANCE_YOUR_CALM). New connections, and the process, are unaffected.
    let huge = "h".repeat(20_000);
    let abuse = conn.try_get(uri, &[("x-huge", &huge)]).await;
    let err = abuse.as_ref().expect_err("the connection is refused");
    assert!(
        err.contains("excessive load") || err.contains("ENHANCE_YOUR_CALM"),
        "{err}"
    );
    let (_, ended) = conn
        .closed_within(Duration::from_secs(2))
        .await
        .expect("the connection ended");
    let fresh = H2Client::connect(proxy.addr).await;
    let r = fresh.try_get(uri, &[]).await.expect("a response");
    assert_eq!(r.status, 200);
    let r = h1(proxy.addr, "GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.request_count(), 3);
    eprintln!(
        "h2 header list over the cap: {}; far over: {err} (connection: {ended:?})",
        match refused {
            Ok(r) => format!("status {} then {:?}", r.status, r.error),
            Err(e) => format!("stream error {e}"),
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Client connection timeouts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout() {
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .yaml("downstream: {keepalive_timeout_s: 1}\n")
        .start();
    let mut client = H1Client::connect(proxy.addr).await;

    // Two requests 500 ms apart: the connection is kept between them.
    let r = client.request("GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(!r.closes());
    tokio::time::sleep(ms(500)).await;
    let r = client.request("GET", "/models", &[], b"").await;
    assert_eq!(r.status, 200);

    let closed = client
        .wait_for_close(Duration::from_secs(4))
        .await
        .expect("the proxy closed the idle connection");
    assert!(
        closed >= ms(900) && closed <= Duration::from_secs(3),
        "closed {closed:?} after the last response"
    );
}

/// Opens a plain connection and a TLS connection offering `protos` by ALPN, sends nothing on
/// either, and returns how long the proxy took to close each (None: still open after `limit`).
async fn silent_connections_closed_after(
    proxy: &Proxy,
    certs: &TestCerts,
    protos: &'static [u8],
    limit: Duration,
) -> (Option<Duration>, Option<Duration>) {
    tokio::join!(
        async {
            let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
            wait_for_close(&mut tcp, limit).await
        },
        async {
            let addr = proxy.tls_addr.expect("TLS listener");
            let mut tls = tls_connect(addr, &certs.ca_path, alpn(protos))
                .await
                .expect("TLS");
            wait_for_close(&mut tls, limit).await
        }
    )
}

/// nginx's `client_header_timeout`: a connection that never sends a request is closed after
/// `downstream.client_timeout_ms` (here 1 s), plain or TLS, not held for Pingora's built-in 60 s.
#[tokio::test]
async fn a_silent_http11_connection_is_closed_after_the_client_timeout() {
    let certs = TestCerts::generate();
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .tls_listener(&certs)
        .yaml("downstream: {keepalive_timeout_s: 1, client_timeout_ms: 1000}\n")
        .start();
    let limit = Duration::from_secs(3);
    let (plain, tls) =
        silent_connections_closed_after(&proxy, &certs, b"\x08http/1.1", limit).await;
    let in_time = |t: Option<Duration>| t.is_some_and(|t| t <= ms(2500));
    assert!(
        in_time(plain) && in_time(tls),
        "silent HTTP/1.1 connections with client_timeout_ms: 1000 were closed after: plain \
         {plain:?}, TLS {tls:?} (None: still open after {limit:?})"
    );
}

/// Before an HTTP/2 connection exists there is no idle timer: the h2c listener waits for the
/// 24-byte preface, and a TLS client that chose h2 owes the same preface. Neither wait may be
/// endless, or idle clients hold sockets and memory without bound.
#[tokio::test]
async fn a_client_that_never_starts_http2_is_closed() {
    let certs = TestCerts::generate();
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .h2c()
        .tls_listener(&certs)
        .yaml(
            "downstream: {keepalive_timeout_s: 1, client_timeout_ms: 1000, h2_idle_timeout_s: 1}\n",
        )
        .start();
    let limit = Duration::from_secs(3);
    let (h2c, tls_h2) = silent_connections_closed_after(&proxy, &certs, b"\x02h2", limit).await;
    let in_time = |t: Option<Duration>| t.is_some_and(|t| t <= ms(2500));
    assert!(
        in_time(h2c) && in_time(tls_h2),
        "clients that sent nothing were closed after: h2c listener {h2c:?}, TLS with ALPN h2 \
         {tls_h2:?} (None: still open after {limit:?})"
    );
}

/// The h2c listener tells HTTP/2 from HTTP/1.1 by the preface; an HTTP/1.0 request shorter
/// than the 24-byte preface (`GET / HTTP/1.0` and an empty line: 18 bytes, as simple health
/// checkers send) must still be answered, as it is on a plain listener.
#[tokio::test]
async fn a_short_http10_request_is_answered_on_an_h2c_listener() {
    let mock = ok_mock();
    let plain = proxy(&mock.base_url("/api/v3")).start();
    let h2c = proxy(&mock.base_url("/api/v3")).h2c().start();
    let request = b"GET / HTTP/1.0\r\n\r\n";
    let mut answers = Vec::new();
    for addr in [plain.addr, h2c.addr] {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(request).await.expect("write");
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut raw)).await;
        answers.push(match read {
            Ok(Ok(_)) => String::from_utf8_lossy(&raw)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => format!("no answer within 2 s ({} bytes)", raw.len()),
        });
    }
    assert!(
        answers[0].contains(" 200"),
        "plain listener: {}",
        answers[0]
    );
    assert!(answers[1].contains(" 200"), "h2c listener: {}", answers[1]);
}

#[tokio::test]
async fn an_idle_tls_http2_connection_is_closed_after_the_idle_timeout() {
    let certs = TestCerts::generate();
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .tls_listener(&certs)
        .yaml("downstream: {h2_idle_timeout_s: 1}\n")
        .start();
    let addr = proxy.tls_addr.expect("TLS listener");
    let conn = H2Client::connect_tls(addr, &certs).await;
    let r = conn.try_get("/models", &[]).await.expect("a response");
    assert_eq!(r.status, 200);
    let done = Instant::now();
    let (closed_at, _) = conn
        .closed_within(Duration::from_secs(4))
        .await
        .expect("the proxy closed the idle connection within 4 s");
    let idle = closed_at - done;
    assert!(
        idle >= ms(900) && idle <= Duration::from_secs(3),
        "closed after {idle:?} idle"
    );
}

/// `h2_idle_timeout_s: 0` would close every HTTP/2 connection the moment it has no stream, so
/// it is refused before anything starts: by `Config::from_yaml`, and by `arkgate -t` in one
/// line naming the key, with exit status 64. One second is the least it accepts.
#[test]
fn a_zero_h2_idle_timeout_is_refused_at_startup_naming_the_key() {
    let config = |seconds: u64| {
        proxy("http://127.0.0.1:2/api/v3")
            .h2c()
            .yaml(&format!("downstream: {{h2_idle_timeout_s: {seconds}}}\n"))
            .render(&Listeners::unbound(), &std::env::temp_dir())
    };
    let e = arkgate::Config::from_yaml(&config(0)).expect_err("h2_idle_timeout_s: 0 is refused");
    let message = e.to_string();
    assert!(
        message.contains("downstream.h2_idle_timeout_s") && message.contains("at least 1"),
        "{message}"
    );
    assert!(
        arkgate::Config::from_yaml(&config(1)).is_ok(),
        "1 s is accepted"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("zero.yaml");
    std::fs::write(&path, config(0)).expect("write config");
    let line = config_test_rejection(&path, "h2_idle_timeout_s: 0");
    assert!(
        line.starts_with("invalid configuration:") && line.contains("downstream.h2_idle_timeout_s"),
        "{line}"
    );
}

#[tokio::test]
async fn h2_max_concurrent_streams_is_what_the_server_advertises() {
    let certs = TestCerts::generate();
    let mock = ok_mock();
    let proxy = proxy(&mock.base_url("/api/v3"))
        .h2c()
        .tls_listener(&certs)
        .yaml("downstream: {h2_max_concurrent_streams: 7}\n")
        .start();
    let addr = proxy.tls_addr.expect("TLS listener");
    for (conn, listener) in [
        (H2Client::connect(proxy.addr).await, "h2c"),
        (H2Client::connect_tls(addr, &certs).await, "TLS"),
    ] {
        let r = conn.try_get("/models", &[]).await.expect("a response");
        assert_eq!(r.status, 200);
        assert_eq!(conn.max_send_streams(), 7, "{listener}");
    }
}

/// One round of the idle test: `n` HTTP/2 connections each complete one request and go quiet.
/// Returns how long each stayed open after its response, once all have been closed by the
/// proxy, and calls `at_peak` while all are open.
async fn idle_h2_round(addr: SocketAddr, n: usize, at_peak: impl FnOnce()) -> Vec<Duration> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let c = H2Client::connect(addr).await;
        let r = c.try_get("/models", &[]).await;
        assert!(
            matches!(&r, Ok(r) if r.status == 200),
            "connection {i}: {r:?}"
        );
        conns.push((Instant::now(), c));
    }
    at_peak();
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(n);
    // Keep every client: it never closes on its own; only the proxy can.
    for (i, (done, c)) in conns.iter().enumerate() {
        let left = (opened + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        let (closed_at, _) = c
            .closed_within(left)
            .await
            .unwrap_or_else(|| panic!("connection {i} still open 5 s after the last was opened"));
        idle.push(closed_at - *done);
    }
    idle
}

/// Many HTTP/2 clients that finish a request and go quiet are all closed by the proxy after
/// `h2_idle_timeout_s`, and the proxy lets go of them: its sockets go back to the baseline count
/// and its RSS (the real binary, measured alone) stays within 20 MiB of where it was before they
/// opened. glibc keeps freed pages (RSS after the close equals the peak; see the printed line),
/// so a second round checks the memory is reused rather than accumulated: it may add at most
/// 60% of what the first added (a leak would add about as much again).
#[tokio::test]
async fn many_idle_http2_connections_are_closed_and_memory_returns_near_baseline() {
    const CONNECTIONS: usize = 200;
    const TOLERANCE_KIB: u64 = 20 * 1024;
    // Allocator noise between two identical rounds (arenas, thread caches) on a busy machine.
    const NOISE_KIB: u64 = 2 * 1024;
    // The proxy is its own process: other tests may run beside this one.
    let mock = ok_mock();
    // The real binary in its own process, so its memory is its own.
    let config = proxy(&mock.base_url("/api/v3"))
        .h2c()
        .yaml("logging: {sample_rate: 0}\n")
        .yaml("downstream: {h2_idle_timeout_s: 1}\n");
    let proxy = ProxyProcess::start_quiet(&config, "idle");

    // Warm up (runtimes, pools, the upstream connection) before the baseline.
    let _ = idle_h2_round(proxy.addr(), 20, || {}).await;
    tokio::time::sleep(ms(200)).await;
    let (baseline, baseline_fds) = (proxy.rss_kib(), proxy.open_fds());
    let mut report = format!("arkgate RSS before {baseline} KiB ({baseline_fds} fds)");
    let mut afters = Vec::new();
    for round in 1..=2 {
        let mut peak = (0, 0);
        let idle = idle_h2_round(proxy.addr(), CONNECTIONS, || {
            peak = (proxy.rss_kib(), proxy.open_fds())
        })
        .await;
        let shortest = idle.iter().min().copied().unwrap_or_default();
        let longest = idle.iter().max().copied().unwrap_or_default();
        assert!(
            shortest >= ms(900),
            "round {round}: a connection was closed after only {shortest:?} idle"
        );
        assert!(
            longest <= Duration::from_secs(4),
            "round {round}: a connection stayed open {longest:?} idle"
        );
        tokio::time::sleep(ms(300)).await;
        let (after, fds) = (proxy.rss_kib(), proxy.open_fds());
        report += &format!(
            "; round {round}: {CONNECTIONS} idle open {} KiB ({} fds), all closed by the proxy \
             after {shortest:.2?}..{longest:.2?} idle, then {after} KiB ({fds} fds)",
            peak.0, peak.1
        );
        assert!(
            fds <= baseline_fds + 2,
            "the proxy still holds sockets: {report}"
        );
        afters.push(after);
    }
    println!("idle h2 connections: {report}");
    let first = afters[0].saturating_sub(baseline);
    let second = afters[1].saturating_sub(afters[0]);
    assert!(
        first <= TOLERANCE_KIB,
        "RSS did not come back near its baseline: {report}"
    );
    assert!(
        second * 10 <= first * 6 || second <= NOISE_KIB,
        "the second round added {second} KiB after the first added {first} KiB: {report}"
    );
}
