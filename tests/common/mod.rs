//! The shared test harness: everything an end-to-end test needs, over real sockets on 127.0.0.1.
//!
//! - [`certs`]: a throwaway CA and a server certificate for `localhost` / 127.0.0.1.
//! - [`mock`]: the mock upstream (HTTP/1.1 and HTTP/2, plain or TLS) that records each request
//!   and answers with a [`mock::Reply`], faults included.
//! - [`proxy`]: the real arkgate in-process on free ports, stopped when its handle drops.
//! - [`client`]: a raw HTTP/1.1 client, an HTTP/2 client and curl, all timing each body piece.
//! - [`process`]: the real `arkgate` binary as a child process, with a scripted upstream and a
//!   blocking client, for signals, upgrades, the log and `arkgate -t`.
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
pub mod mock;
pub mod process;
pub mod proxy;
pub mod redis;

pub use certs::TestCerts;
pub use client::{
    curl, h1, post_json, request_bytes, CurlOutput, H1Client, H1Response, H2Client, H2Response,
};
pub use mock::{
    dead_addr, dead_base_url, MockConfig, MockUpstream, Proto, RecordedRequest, Reply, Version,
};
pub use proxy::{proxy, start_proxy, yaml_str, Proxy, ProxyBuilder};

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
