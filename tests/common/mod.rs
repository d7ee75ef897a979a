//! The shared test kit: everything an end-to-end test needs, over real sockets on 127.0.0.1.
//!
//! - [`mock`]: the one mock upstream (HTTP/1.1 and HTTP/2, plain or TLS, named), which records
//!   each request and answers a [`mock::Reply`], faults included; it can [`MockUpstream::stop`]
//!   (drain) or [`MockUpstream::kill`], and [`DeadUpstream`] is one that is down (a bound
//!   socket that never listens) until revived on the same port.
//! - [`client`]: the one set of clients: raw HTTP/1.1 over TCP or TLS (and a blocking wrapper
//!   for load threads), HTTP/2 (h2c or TLS) that reports when its connection ends, TLS
//!   handshakes with chosen ALPN and versions, and curl; each body piece is timed.
//! - [`proxy`]: [`ProxyBuilder`], the one writer of arkgate YAML, and the real arkgate
//!   in-process on free ports, stopped when its handle drops.
//! - [`process`]: the real `arkgate` binary as a child process on a [`ProxyBuilder`] config,
//!   for signals, upgrades, memory, the log and `arkgate -t`.
//! - [`metrics`]: `/metrics` read as a map, once or until a condition holds.
//! - [`certs`]: a throwaway CA and a server certificate for `localhost` / 127.0.0.1.
//!
//! No fixed ports (everything binds port 0), readiness by polling a connect, and every wait is
//! bounded, so each test stops by itself.
//!
//! Counters: `arkgate::metrics::METRICS` is one static per process, and the tests of one binary
//! run in parallel. Assert deltas that tolerate other tests (`after > before`), or put tests
//! that need exact deltas in their own test binary, each holding [`serial`] for its whole run.

// Each test binary uses a different part of the harness.
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod client;
pub mod metrics;
pub mod mock;
pub mod process;
pub mod proxy;
pub mod redis;

pub use certs::TestCerts;
pub use client::{
    alpn, curl, h1, json_post_bytes, post_json, request_bytes, tls_connect, BlockingClient,
    CurlOutput, H1Client, H1Response, H2Client, H2Response,
};
pub use metrics::{metrics, metrics_when, parse_metrics};
pub use mock::{DeadUpstream, MockConfig, MockUpstream, Proto, RecordedRequest, Reply, Version};
pub use proxy::{proxy, start_proxy, yaml_str, Listeners, Proxy, ProxyBuilder};

use std::time::Duration;

/// Milliseconds, for readable delays.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Serializes the tests of one binary that hold it (for exact counter deltas).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
