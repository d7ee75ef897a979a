//! Network values shared by several sections: CIDR networks, `IP:port` socket addresses and
//! `host[:port]` authorities.

use std::net::{IpAddr, SocketAddr};

use super::ConfigError;

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a host route).
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr.trim().parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { net, prefix })
    }

    /// True when `ip` lies inside this network (IPv4-mapped IPv6 addresses match IPv4 networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Parses the `IP:port` value of `key` (a listener or the admin address).
pub(super) fn socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| ConfigError::invalid(key, format!("`{text}` is not an IP:port address")))
}

/// Puts an IPv6 literal in brackets, as it must be written before a `:port` or in `Host`.
pub(super) fn bracket_v6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Splits `host[:port]` / `[v6][:port]`, applying `default_port`.
pub(super) fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((authority.to_string(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("10.0.0.0/8").expect("cidr");
        assert!(c.contains("10.1.2.3".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        assert!(c.contains("::ffff:10.0.0.1".parse().expect("ip")));
        let all = Cidr::parse("0.0.0.0/0").expect("cidr");
        assert!(all.contains("1.2.3.4".parse().expect("ip")));
        let v6 = Cidr::parse("::1").expect("cidr");
        assert!(v6.contains("::1".parse().expect("ip")));
        assert!(!v6.contains("::2".parse().expect("ip")));
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("a.example", 443),
            Some(("a.example".into(), 443))
        );
        assert_eq!(
            split_host_port("a.example:8443", 443),
            Some(("a.example".into(), 8443))
        );
        assert_eq!(split_host_port("[::1]", 80), Some(("::1".into(), 80)));
        assert_eq!(
            split_host_port("[::1]:9000", 80),
            Some(("::1".into(), 9000))
        );
        assert_eq!(split_host_port("::1", 80), None);
        assert_eq!(split_host_port("[::1]x", 80), None);
        assert_eq!(split_host_port("a:b", 80), None);
        assert_eq!(bracket_v6("::1"), "[::1]");
        assert_eq!(bracket_v6("a.example"), "a.example");
    }
}
