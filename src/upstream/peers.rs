//! One endpoint's addresses as ready-made `HttpPeer`s, refreshed off the request path.
//!
//! Pingora's `HttpPeer::new` resolves names with blocking std DNS (and panics on failure), so
//! peers are built here from `SocketAddr`s only. The DNS refresher ([`super::dns`]) re-resolves
//! the host name with tokio's resolver every `upstream.dns_refresh_ms` and swaps in a new peer
//! list; a request only clones a peer from the current list. All A/AAAA records are used,
//! round-robin, and a connect retry on the same endpoint moves on to the next address.
//!
//! `upstream.max_lifetime_ms`: Pingora's pool knows only an idle timeout, and a reused
//! connection cannot be refused after the fact. So the peer's `group_key`, part of the pool
//! key, is the connection's lifetime epoch: `(elapsed + offset) / max_lifetime`, with a
//! per-address offset so addresses do not all roll over at once. A connection opened in one
//! epoch is reused only within it, hence never past `max_lifetime`; the next epoch opens fresh
//! connections and the old ones close by idle timeout.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{Endpoint as EndpointConfig, HttpVersion, Upstream};

/// One address's peer and its lifetime-epoch offset.
struct AddrPeer {
    peer: HttpPeer,
    offset: Duration,
}

/// The current addresses of one endpoint, as peers ready to clone.
pub struct PeerSet {
    endpoint: EndpointConfig,
    upstream: Arc<Upstream>,
    peers: RwLock<Arc<Vec<AddrPeer>>>,
    /// The origin of lifetime epochs.
    born: Instant,
}

impl PeerSet {
    /// The peers of `endpoint`. An IP-literal host is usable at once; a name has no address
    /// until the first background resolution (requests meanwhile go elsewhere, or get 502).
    pub fn new(endpoint: EndpointConfig, upstream: Arc<Upstream>) -> PeerSet {
        let set = PeerSet {
            endpoint,
            upstream,
            peers: RwLock::new(Arc::new(Vec::new())),
            born: Instant::now(),
        };
        if let Ok(ip) = set.endpoint.hostname.parse::<IpAddr>() {
            set.set_addresses(vec![SocketAddr::new(ip, set.endpoint.port)]);
        }
        set
    }

    /// True when the host is a name that needs DNS.
    pub fn needs_dns(&self) -> bool {
        self.endpoint.hostname.parse::<IpAddr>().is_err()
    }

    /// The host name (or IP literal) the addresses come from.
    pub fn hostname(&self) -> &str {
        &self.endpoint.hostname
    }

    /// How many addresses are known.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    /// True while no address is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The peer at position `i` of the rotation (mod the address count), with its pool key
    /// set to the current lifetime epoch. None while no address is known.
    pub fn peer(&self, i: usize) -> Option<Box<HttpPeer>> {
        let peers = self.current();
        if peers.is_empty() {
            return None;
        }
        let p = &peers[i % peers.len()];
        let mut peer = Box::new(p.peer.clone());
        peer.group_key = self.epoch(p.offset);
        Some(peer)
    }

    fn epoch(&self, offset: Duration) -> u64 {
        let life = self.upstream.max_lifetime.as_millis().max(1);
        let elapsed = (self.born.elapsed() + offset).as_millis();
        u64::try_from(elapsed / life).unwrap_or(u64::MAX)
    }

    /// The resolved addresses, in use order.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.current()
            .iter()
            .filter_map(|p| p.peer._address.as_inet().copied())
            .collect()
    }

    fn current(&self) -> Arc<Vec<AddrPeer>> {
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
        let life = u64::try_from(self.upstream.max_lifetime.as_millis().max(1)).unwrap_or(u64::MAX);
        let peers: Vec<AddrPeer> = addrs
            .iter()
            .map(|a| AddrPeer {
                peer: self.build_peer(*a),
                offset: Duration::from_millis(spread(a) % life),
            })
            .collect();
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
        let cfg = &self.upstream;
        let ep = &self.endpoint;
        // SNI only matters for TLS; an empty one costs no copy per request for plain upstreams.
        let sni = if ep.tls {
            ep.hostname.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, ep.tls, sni);
        let o = &mut peer.options;
        o.connection_timeout = Some(cfg.connect_timeout);
        o.total_connection_timeout = Some(cfg.connect_timeout);
        o.read_timeout = Some(cfg.read_timeout);
        o.write_timeout = Some(cfg.write_timeout);
        o.idle_timeout = Some(cfg.idle_timeout);
        o.verify_cert = cfg.tls_verify;
        o.verify_hostname = cfg.tls_verify;
        o.max_h2_streams = cfg.max_h2_streams;
        o.alpn = match (cfg.http_version, ep.tls) {
            (HttpVersion::H1, _) | (HttpVersion::Auto, false) => ALPN::H1,
            (HttpVersion::H2, _) => ALPN::H2,
            (HttpVersion::Auto, true) => ALPN::H2H1,
        };
        o.tcp_keepalive = Some(pingora::protocols::TcpKeepalive {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 5,
            #[cfg(target_os = "linux")]
            user_timeout: Duration::from_secs(0),
        });
        peer
    }

    /// Resolves the host name now (async, never blocking a worker thread).
    pub async fn refresh(&self) -> std::io::Result<usize> {
        let host = format!("{}:{}", self.endpoint.hostname, self.endpoint.port);
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

/// A stable number per address, to spread the lifetime epochs of different addresses.
fn spread(addr: &SocketAddr) -> u64 {
    let port = u64::from(addr.port());
    let ip = match addr.ip() {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let n = u128::from(v6);
            (n as u64) ^ ((n >> 64) as u64)
        }
    };
    // A multiplicative hash (Knuth): neighbouring addresses land far apart.
    (ip << 16 | port).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(addrs: &[&str]) -> PeerSet {
        pool_with(addrs, "")
    }

    fn pool_with(addrs: &[&str], extra: &str) -> PeerSet {
        let cfg = crate::Config::from_yaml(&format!(
            "listen: [{{addr: \"127.0.0.1:1\"}}]\nupstream: {{base_url: \"http://127.0.0.1:9/v1\"{extra}}}"
        ))
        .expect("config")
        .upstream;
        let p = PeerSet::new(cfg.endpoints[0].clone(), Arc::new(cfg));
        p.set_addresses(addrs.iter().map(|a| a.parse().expect("addr")).collect());
        p
    }

    fn addr_of(peer: &HttpPeer) -> SocketAddr {
        *peer._address.as_inet().expect("inet")
    }

    #[test]
    fn the_next_position_is_the_next_address() {
        let p = pool(&["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]);
        let first = addr_of(&p.peer(7).expect("peer"));
        let retry = addr_of(&p.peer(8).expect("peer"));
        assert_ne!(
            first, retry,
            "a retry must not go back to the address that just failed"
        );
        let addrs = p.addresses();
        let i = addrs.iter().position(|a| *a == first).expect("known");
        assert_eq!(retry, addrs[(i + 1) % addrs.len()]);
    }

    #[test]
    fn an_ip_literal_is_known_at_once_and_no_address_means_no_peer() {
        let cfg = crate::Config::from_yaml(
            "listen: [{addr: \"127.0.0.1:1\"}]\nupstream: {base_url: \"http://127.0.0.1:9/v1\"}",
        )
        .expect("config")
        .upstream;
        let p = PeerSet::new(cfg.endpoints[0].clone(), Arc::new(cfg));
        assert_eq!(p.addresses(), vec!["127.0.0.1:9".parse().expect("addr")]);
        p.set_addresses(Vec::new());
        assert!(p.is_empty() && p.peer(0).is_none());
    }

    #[test]
    fn the_pool_key_changes_once_per_lifetime() {
        let p = pool_with(&["127.0.0.1:1001"], ", max_lifetime_ms: 40");
        let key = |p: &PeerSet| p.peer(0).expect("peer").group_key;
        let k0 = key(&p);
        let mut seen = vec![k0];
        let deadline = Instant::now() + Duration::from_secs(2);
        while seen.len() < 3 && Instant::now() < deadline {
            let k = key(&p);
            if Some(&k) != seen.last() {
                seen.push(k);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            seen,
            vec![k0, k0 + 1, k0 + 2],
            "one new key per 40 ms epoch"
        );
    }
}
