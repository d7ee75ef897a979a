//! TLS and plain throughput of the in-process proxy, printed for the README's edge notes:
//! sequential requests on one keep-alive connection (plain HTTP/1.1, TLS HTTP/1.1, TLS h2),
//! fresh TLS handshakes, and fresh plain connections with one request each.
//!
//! ```text
//! cargo bench --bench tls_throughput            # release build, the figures that count
//! cargo bench --bench tls_throughput -- 500     # requests per connection (default 2000)
//! ```
//! A benchmark, not a test: it asserts only that every answer is a 200, and runs alone (nothing
//! else should share the cores while it times). It drives the proxy with the test kit in
//! `tests/common/`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::client::{alpn, tls_client, tls_handshake};
use common::*;

/// Fresh connections timed in the handshake and connect-per-request runs.
const HANDSHAKES: usize = 300;
/// Requests sent before each timed run.
const WARM_UP: usize = 50;

fn per_second(n: usize, t: Duration) -> f64 {
    n as f64 / t.as_secs_f64()
}

/// One keep-alive connection to time.
enum Conn<'a> {
    H1(&'a mut H1Client),
    H2(&'a H2Client),
}

impl Conn<'_> {
    /// `GET /models`; its status.
    async fn get(&mut self) -> u16 {
        match self {
            Conn::H1(c) => c.request("GET", "/models", &[], b"").await.status,
            Conn::H2(c) => c.request("GET", "/models", &[], b"").await.status,
        }
    }

    /// `n` sequential GETs after a warm-up (one stream at a time on HTTP/2); how long the `n`
    /// took.
    async fn time(mut self, n: usize) -> Duration {
        for _ in 0..WARM_UP {
            assert_eq!(self.get().await, 200);
        }
        let start = Instant::now();
        for _ in 0..n {
            assert_eq!(self.get().await, 200);
        }
        start.elapsed()
    }
}

async fn run(requests: usize) {
    let certs = TestCerts::generate();
    let mock = MockUpstream::start(MockConfig::h1());
    let proxy = proxy(&mock.base_url("/api/v3"))
        .tls_listener(&certs)
        .start();
    let tls_addr = proxy.tls_addr.expect("TLS listener");
    let mut lines = Vec::new();

    let t = Conn::H1(&mut H1Client::connect(proxy.addr).await)
        .time(requests)
        .await;
    lines.push(format!(
        "plain HTTP/1.1 keep-alive: {:.0} req/s",
        per_second(requests, t)
    ));

    let tls = tls_connect(tls_addr, &certs.ca_path, alpn(b"\x08http/1.1"))
        .await
        .expect("TLS");
    let version = tls.ssl().version_str();
    let t = Conn::H1(&mut H1Client::over_tls(tls)).time(requests).await;
    lines.push(format!(
        "{version} HTTP/1.1 keep-alive: {:.0} req/s",
        per_second(requests, t)
    ));

    let h2 = H2Client::connect_tls(tls_addr, &certs).await;
    let t = Conn::H2(&h2).time(requests).await;
    lines.push(format!(
        "{version} h2, one stream at a time: {:.0} req/s",
        per_second(requests, t)
    ));

    let client = tls_client(&certs.ca_path, alpn(b"\x08http/1.1"));
    let start = Instant::now();
    for _ in 0..HANDSHAKES {
        drop(tls_handshake(tls_addr, &client).await.expect("TLS"));
    }
    lines.push(format!(
        "fresh {version} handshakes (P-256 certificate, no resumption): {:.0} handshakes/s",
        per_second(HANDSHAKES, start.elapsed())
    ));

    let start = Instant::now();
    for _ in 0..HANDSHAKES {
        let r = h1(proxy.addr, "GET", "/models", &[], b"").await;
        assert_eq!(r.status, 200);
    }
    lines.push(format!(
        "fresh plain connection + one request each: {:.0} conn/s",
        per_second(HANDSHAKES, start.elapsed())
    ));

    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "edge throughput ({profile} build, proxy with 2 threads, in-process mock upstream over \
         plain HTTP/1.1, {requests} sequential requests per connection):"
    );
    for l in lines {
        println!("  {l}");
    }
    assert!(mock.request_count() >= 3 * requests);
}

fn main() {
    // `cargo bench` passes `--bench`; a number sets the requests per connection.
    let requests = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(requests));
}
