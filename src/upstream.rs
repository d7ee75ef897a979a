//! The upstream: resolved addresses and ready-made `HttpPeer`s, refreshed off the request path.
//!
//! Pingora's `HttpPeer::new` resolves names with blocking std DNS (and panics on failure), so
//! peers are built here from `SocketAddr`s only. A background service re-resolves the host name
//! with tokio's resolver every `upstream.dns_refresh_ms` and swaps in a new peer list; a request
//! only clones a peer from the current list. All A/AAAA records are used, round-robin, and a
//! connect retry moves on to the next address.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use log::{debug, warn};
use pingora::protocols::ALPN;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{HttpVersion, Upstream};

/// The current upstream addresses, as peers ready to clone.
pub struct UpstreamPool {
    cfg: Upstream,
    peers: RwLock<Arc<Vec<HttpPeer>>>,
    next: AtomicUsize,
}

impl UpstreamPool {
    /// A pool for `cfg`. An IP-literal host is usable at once; a name has no address until the
    /// first background resolution (requests meanwhile get 502).
    pub fn new(cfg: Upstream) -> Arc<UpstreamPool> {
        let pool = Arc::new(UpstreamPool {
            cfg,
            peers: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
        });
        if let Ok(ip) = pool.cfg.hostname.parse::<IpAddr>() {
            pool.set_addresses(vec![SocketAddr::new(ip, pool.cfg.port)]);
        }
        pool
    }

    /// True when the host is a name that needs DNS.
    pub fn needs_dns(&self) -> bool {
        self.cfg.hostname.parse::<IpAddr>().is_err()
    }

    /// Where a new request starts in the address rotation (round-robin across requests).
    pub fn start(&self) -> usize {
        self.next.fetch_add(1, Relaxed)
    }

    /// The peer for attempt `attempt` of a request that started at `start` (see [`Self::start`]):
    /// each retry moves on to the next address from the request's own start, whatever other
    /// requests did to the rotation meanwhile. None while no address is known.
    pub fn peer(&self, start: usize, attempt: usize) -> Option<Box<HttpPeer>> {
        let peers = self.current();
        if peers.is_empty() {
            return None;
        }
        let i = start.wrapping_add(attempt) % peers.len();
        Some(Box::new(peers[i].clone()))
    }

    /// The resolved addresses, in use order.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.current()
            .iter()
            .filter_map(|p| p._address.as_inet().copied())
            .collect()
    }

    fn current(&self) -> Arc<Vec<HttpPeer>> {
        match self.peers.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the address list (kept as is when unchanged, so pooled connections stay hot).
    pub fn set_addresses(&self, mut addrs: Vec<SocketAddr>) {
        addrs.sort();
        addrs.dedup();
        if addrs == self.addresses_sorted() {
            return;
        }
        let peers: Vec<HttpPeer> = addrs.iter().map(|a| self.build_peer(*a)).collect();
        let mut guard = match self.peers.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(peers);
    }

    fn addresses_sorted(&self) -> Vec<SocketAddr> {
        let mut a = self.addresses();
        a.sort();
        a
    }

    /// One peer with every option from config; built once per address, cloned per request.
    fn build_peer(&self, addr: SocketAddr) -> HttpPeer {
        let cfg = &self.cfg;
        // SNI only matters for TLS; an empty one costs no copy per request for plain upstreams.
        let sni = if cfg.tls {
            cfg.hostname.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, cfg.tls, sni);
        let o = &mut peer.options;
        o.connection_timeout = Some(cfg.connect_timeout);
        o.total_connection_timeout = Some(cfg.connect_timeout);
        o.read_timeout = Some(cfg.read_timeout);
        o.write_timeout = Some(cfg.write_timeout);
        o.idle_timeout = Some(cfg.idle_timeout);
        o.verify_cert = cfg.tls_verify;
        o.verify_hostname = cfg.tls_verify;
        o.max_h2_streams = cfg.max_h2_streams;
        o.alpn = match (cfg.http_version, cfg.tls) {
            (HttpVersion::H1, _) | (HttpVersion::Auto, false) => ALPN::H1,
            (HttpVersion::H2, _) => ALPN::H2,
            (HttpVersion::Auto, true) => ALPN::H2H1,
        };
        o.tcp_keepalive = Some(pingora::protocols::TcpKeepalive {
            idle: std::time::Duration::from_secs(60),
            interval: std::time::Duration::from_secs(10),
            count: 5,
            #[cfg(target_os = "linux")]
            user_timeout: std::time::Duration::from_secs(0),
        });
        peer
    }

    /// Resolves the host name now (async, never blocking a worker thread).
    pub async fn refresh(&self) -> std::io::Result<usize> {
        let host = format!("{}:{}", self.cfg.hostname, self.cfg.port);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host).await?.collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no A/AAAA records",
            ));
        }
        let n = addrs.len();
        self.set_addresses(addrs);
        Ok(n)
    }
}

/// Background service that keeps the upstream addresses fresh.
pub struct DnsRefresher {
    pub pool: Arc<UpstreamPool>,
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let every = self.pool.cfg.dns_refresh;
        let mut failures = 0u32;
        loop {
            match self.pool.refresh().await {
                Ok(n) => {
                    failures = 0;
                    debug!(
                        "upstream {} resolved to {n} address(es)",
                        self.pool.cfg.hostname
                    );
                }
                Err(e) => {
                    failures += 1;
                    warn!(
                        "cannot resolve upstream {}: {e} (keeping {} known address(es))",
                        self.pool.cfg.hostname,
                        self.pool.addresses().len()
                    );
                }
            }
            // While nothing has resolved yet, retry soon (1 s, 2 s, 4 s, … up to the refresh
            // period) rather than leave requests failing for a whole period.
            let wait = if failures > 0 && self.pool.addresses().is_empty() {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(addrs: &[&str]) -> Arc<UpstreamPool> {
        let cfg = crate::Config::from_yaml(
            "listen: [{addr: \"127.0.0.1:1\"}]\nupstream: {base_url: \"http://127.0.0.1:9/v1\"}",
        )
        .expect("config")
        .upstream;
        let p = UpstreamPool::new(cfg);
        p.set_addresses(addrs.iter().map(|a| a.parse().expect("addr")).collect());
        p
    }

    fn addr_of(peer: &HttpPeer) -> SocketAddr {
        *peer._address.as_inet().expect("inet")
    }

    #[test]
    fn a_retry_moves_on_from_the_requests_own_start() {
        let p = pool(&["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]);
        let start = p.start();
        let first = addr_of(&p.peer(start, 0).expect("peer"));
        // Other requests move the shared rotation meanwhile.
        for _ in 0..4 {
            p.start();
        }
        let retry = addr_of(&p.peer(start, 1).expect("peer"));
        assert_ne!(
            first, retry,
            "a retry must not go back to the address that just failed"
        );
        let addrs = p.addresses();
        let i = addrs.iter().position(|a| *a == first).expect("known");
        assert_eq!(retry, addrs[(i + 1) % addrs.len()]);
    }

    #[test]
    fn requests_rotate_across_addresses() {
        let p = pool(&["127.0.0.1:1001", "127.0.0.1:1002"]);
        let a = addr_of(&p.peer(p.start(), 0).expect("peer"));
        let b = addr_of(&p.peer(p.start(), 0).expect("peer"));
        assert_ne!(a, b);
    }
}
