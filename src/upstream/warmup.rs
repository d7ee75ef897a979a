//! Warm-up: at start, each endpoint gets `upstream.warmup.connections` pooled connections (one
//! per address over HTTP/2, whose streams multiplex), so the first client requests reuse them.
//!
//! Pingora's connection pool is private to each `HttpProxy` and cannot be filled from outside.
//! So the warm-up goes through the proxy app itself: it hands the app in-memory client
//! connections (a `tokio::io::duplex` half is a Pingora `Stream`) carrying
//! `GET <warmup.path>` with a [`WARMUP_HEADER`] that pins the request to one endpoint and
//! address. The proxy forwards it like any request, and the upstream connection it used goes
//! back into the real pool. The header holds a per-process random token compared in constant
//! time, so a client cannot use it to pick an endpoint; the proxy always strips it.
//!
//! `/healthz` answers 503 until the warm-up is done or `upstream.connect_timeout_ms` has passed
//! ([`Readiness`]). Failures are logged and never stop the start.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{info, warn};
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Upstreams;
use crate::config::HttpVersion;

/// The request header that pins a warm-up request: `<token>.<endpoint>.<address>`.
pub const WARMUP_HEADER: &str = "x-arkgate-warmup";

/// The per-process secret that marks warm-up requests.
pub struct WarmupToken {
    token: String,
}

impl WarmupToken {
    /// A fresh random token (128 bits from the OS).
    pub fn new() -> WarmupToken {
        let mut bytes = [0u8; 16];
        let from_os = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .is_ok();
        if !from_os {
            // std's hasher keys are random per process: a fallback where /dev/urandom is absent.
            use std::hash::{BuildHasher, Hasher};
            for chunk in bytes.chunks_mut(8) {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(Instant::now().elapsed().as_nanos());
                chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
            }
        }
        let token = bytes.iter().map(|b| format!("{b:02x}")).collect();
        WarmupToken { token }
    }

    /// The header value that pins a request to `endpoint` and its address `address`.
    pub fn header_value(&self, endpoint: usize, address: usize) -> String {
        format!("{}.{endpoint}.{address}", self.token)
    }

    /// The endpoint and address a header value pins to, if it carries this token.
    pub fn check(&self, value: &[u8]) -> Option<(usize, usize)> {
        let n = self.token.len();
        if value.len() <= n || !constant_time_eq(&value[..n], self.token.as_bytes()) {
            return None;
        }
        let rest = std::str::from_utf8(&value[n..]).ok()?.strip_prefix('.')?;
        let (e, a) = rest.split_once('.')?;
        Some((e.parse().ok()?, a.parse().ok()?))
    }
}

impl Default for WarmupToken {
    fn default() -> Self {
        WarmupToken::new()
    }
}

/// Equality whose time depends only on the length, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the proxy is ready for `/healthz`: warm-up done, or its deadline passed.
pub struct Readiness {
    done: AtomicBool,
    deadline: Instant,
}

impl Readiness {
    /// Ready at once (no warm-up configured).
    pub fn ready() -> Arc<Readiness> {
        Arc::new(Readiness {
            done: AtomicBool::new(true),
            deadline: Instant::now(),
        })
    }

    /// Not ready until [`Self::mark_done`] or `wait` from now.
    pub fn waiting(wait: Duration) -> Arc<Readiness> {
        Arc::new(Readiness {
            done: AtomicBool::new(false),
            deadline: Instant::now() + wait,
        })
    }

    /// True once the warm-up is done or its time is up.
    pub fn is_ready(&self) -> bool {
        self.done.load(Ordering::Acquire) || Instant::now() >= self.deadline
    }

    /// The warm-up has finished (whatever its outcome).
    pub fn mark_done(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// Background service that warms the pool of one proxy app.
pub struct Warmer<A> {
    pub app: Arc<A>,
    pub upstreams: Arc<Upstreams>,
    pub readiness: Arc<Readiness>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> BackgroundService for Warmer<A> {
    async fn start(&self, shutdown: ShutdownWatch) {
        let Some(cfg) = self.upstreams.config().warmup.clone() else {
            self.readiness.mark_done();
            return;
        };
        let started = Instant::now();
        let wait = self.upstreams.config().connect_timeout;
        let per_request =
            self.upstreams.config().connect_timeout + self.upstreams.config().read_timeout;
        let mut tasks = tokio::task::JoinSet::new();
        for ep in self.upstreams.endpoints() {
            // A host name may not have resolved yet: give it the connect timeout.
            let until = Instant::now() + wait;
            while ep.peers.is_empty() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let addresses = ep.peers.len();
            if addresses == 0 {
                warn!("warm-up: endpoint {} has no address yet", ep.name());
                continue;
            }
            let count = match self.upstreams.config().http_version {
                HttpVersion::H2 => addresses,
                _ => cfg.connections,
            };
            for k in 0..count {
                let value = self
                    .upstreams
                    .warmup_token()
                    .header_value(ep.index, k % addresses);
                let request = format!(
                    "GET {} HTTP/1.1\r\nHost: arkgate-warmup\r\n{WARMUP_HEADER}: {value}\r\nConnection: close\r\n\r\n",
                    cfg.path
                );
                let app = self.app.clone();
                let shutdown = shutdown.clone();
                let name = ep.name().to_string();
                tasks.spawn(async move {
                    let r = tokio::time::timeout(per_request, one_request(app, request, shutdown))
                        .await;
                    (name, r.unwrap_or_else(|_| Err("timed out".into())))
                });
            }
        }
        let (mut ok, mut failed) = (0usize, 0usize);
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(status))) if status < 500 => ok += 1,
                Ok((name, Ok(status))) => {
                    failed += 1;
                    warn!("warm-up request to endpoint {name} got {status}");
                }
                Ok((name, Err(why))) => {
                    failed += 1;
                    warn!("warm-up request to endpoint {name} failed: {why}");
                }
                Err(e) => {
                    failed += 1;
                    warn!("warm-up task failed: {e}");
                }
            }
        }
        self.readiness.mark_done();
        info!(
            "warm-up done in {} ms: {ok} connection(s) ready, {failed} failed",
            started.elapsed().as_millis()
        );
    }
}

/// Sends one request through the app over an in-memory connection; returns the status.
async fn one_request<A: ServerApp + Send + Sync + 'static>(
    app: Arc<A>,
    request: String,
    shutdown: ShutdownWatch,
) -> Result<u16, String> {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let serve = tokio::spawn(async move {
        let stream: Stream = Box::new(server);
        // The connection ends after this one request (Connection: close).
        let _ = app.process_new(stream, &shutdown).await;
    });
    client
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot write: {e}"))?;
    let mut response = Vec::new();
    client
        .read_to_end(&mut response)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let _ = serve.await;
    status_of(&response).ok_or_else(|| "no HTTP response".to_string())
}

/// The status code of an HTTP/1.1 response's first line.
fn status_of(response: &[u8]) -> Option<u16> {
    let line = response.split(|b| *b == b'\n').next()?;
    let code = line.split(|b| *b == b' ').nth(1)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_pins_and_nothing_else_does() {
        let t = WarmupToken::new();
        let v = t.header_value(1, 3);
        assert_eq!(t.check(v.as_bytes()), Some((1, 3)));
        let other = WarmupToken::new();
        assert_eq!(other.check(v.as_bytes()), None, "another process's token");
        assert_eq!(t.check(b"x.1.3"), None);
        assert_eq!(t.check(b""), None);
        let mut forged = v.clone().into_bytes();
        forged[0] ^= 1;
        assert_eq!(t.check(&forged), None);
        assert_eq!(t.check(format!("{v}x").as_bytes()), None);
    }

    #[test]
    fn readiness_waits_for_done_or_the_deadline() {
        let r = Readiness::waiting(Duration::from_secs(60));
        assert!(!r.is_ready());
        r.mark_done();
        assert!(r.is_ready());
        assert!(Readiness::waiting(Duration::ZERO).is_ready());
        assert!(Readiness::ready().is_ready());
    }

    #[test]
    fn status_line_is_read() {
        assert_eq!(status_of(b"HTTP/1.1 401 Unauthorized\r\n\r\n"), Some(401));
        assert_eq!(status_of(b"garbage"), None);
    }
}
