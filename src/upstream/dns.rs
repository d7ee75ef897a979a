//! The background DNS refresher: re-resolves every endpoint whose host is a name, every
//! `upstream.dns_refresh_ms`, with tokio's resolver (never on a request's path).

use std::sync::Arc;

use async_trait::async_trait;
use log::{debug, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::{Endpoint, Upstreams};

/// Background service that keeps every endpoint's addresses fresh.
pub struct DnsRefresher {
    pub upstreams: Arc<Upstreams>,
}

impl DnsRefresher {
    /// Whether any endpoint needs DNS at all.
    pub fn needed(upstreams: &Upstreams) -> bool {
        upstreams.endpoints().iter().any(|e| e.peers.needs_dns())
    }
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, shutdown: ShutdownWatch) {
        let every = self.upstreams.config().dns_refresh;
        let mut tasks = tokio::task::JoinSet::new();
        for ep in self.upstreams.endpoints() {
            if ep.peers.needs_dns() {
                tasks.spawn(refresh_loop(ep.clone(), every, shutdown.clone()));
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn refresh_loop(ep: Arc<Endpoint>, every: std::time::Duration, mut shutdown: ShutdownWatch) {
    let host = ep.peers.hostname().to_string();
    let mut failures = 0u32;
    loop {
        match ep.peers.refresh().await {
            Ok(n) => {
                failures = 0;
                debug!(
                    "endpoint {} ({host}) resolved to {n} address(es)",
                    ep.name()
                );
            }
            Err(e) => {
                failures += 1;
                warn!(
                    "cannot resolve endpoint {} ({host}): {e} (keeping {} known address(es))",
                    ep.name(),
                    ep.peers.len()
                );
            }
        }
        // While nothing has resolved yet, retry soon (1 s, 2 s, 4 s, … up to the refresh
        // period) rather than leave the endpoint out for a whole period.
        let wait = if failures > 0 && ep.peers.is_empty() {
            let backoff = std::time::Duration::from_secs(1 << (failures - 1).min(10));
            every.min(backoff)
        } else {
            every
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}
