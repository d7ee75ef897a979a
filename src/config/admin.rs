//! The `admin:` section: the address of the admin listener (`/metrics`, `/healthz`), or `~`
//! for none.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{net, ConfigError};

/// On-disk shape of `admin:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    /// None (`addr: ~`): no admin listener.
    addr: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            addr: Some("127.0.0.1:9091".to_string()),
        }
    }
}

impl RawAdmin {
    pub(super) fn validate(self) -> Result<Option<SocketAddr>, ConfigError> {
        self.addr
            .map(|a| net::socket_addr("admin.addr", &a))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn admin_listens_on_loopback_by_default() {
        let c = Config::from_yaml(MINIMAL).expect("valid");
        assert_eq!(c.admin_addr, Some("127.0.0.1:9091".parse().expect("addr")));
    }

    #[test]
    fn null_admin_addr_disables_it() {
        let c = Config::from_yaml(&format!("{MINIMAL}admin: {{addr: ~}}\n")).expect("valid");
        assert_eq!(c.admin_addr, None);
    }

    #[test]
    fn bad_admin_addr_names_the_key() {
        let e = err(&format!("{MINIMAL}admin: {{addr: \"localhost:9\"}}\n"));
        assert_eq!(e, "admin.addr: `localhost:9` is not an IP:port address");
    }
}
