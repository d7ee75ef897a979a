//! The `listen:` section: listening sockets, each plain (optionally with h2c) or TLS.
//!
//! Only the shape is checked here; whether the certificate and key files can be used is
//! checked in [`super::files`].

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{net, ConfigError};

/// On-disk shape of one `listen:` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    addr: String,
    tls: Option<RawTls>,
    #[serde(default)]
    h2c: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// One listening socket.
#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Accept HTTP/2 with prior knowledge on a plain listener.
    pub h2c: bool,
}

/// Certificate chain and private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// Validates the whole list: at least one listener, each with an `IP:port` address.
pub(super) fn validate(raw: Vec<RawListener>) -> Result<Vec<Listener>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::invalid(
            "listen",
            "at least one listener is required",
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, l)| l.validate(i))
        .collect()
}

impl RawListener {
    fn validate(self, i: usize) -> Result<Listener, ConfigError> {
        let addr = net::socket_addr(&format!("listen[{i}].addr"), &self.addr)?;
        if self.h2c && self.tls.is_some() {
            return Err(ConfigError::invalid(
                format!("listen[{i}].h2c"),
                "h2c is for plain listeners; TLS listeners offer h2 by ALPN",
            ));
        }
        let tls = self.tls.map(|t| TlsFiles {
            cert_path: t.cert_path,
            key_path: t.key_path,
        });
        Ok(Listener {
            addr,
            tls,
            h2c: self.h2c,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::err;

    #[test]
    fn bad_listen_address_names_the_key() {
        let e = err("listen: [{addr: \"localhost\"}]\n");
        assert_eq!(e, "listen[0].addr: `localhost` is not an IP:port address");
    }

    #[test]
    fn empty_listen_is_rejected() {
        assert_eq!(
            err("listen: []\n"),
            "listen: at least one listener is required"
        );
    }

    #[test]
    fn h2c_on_tls_listener_is_rejected() {
        let e =
            err("listen: [{addr: \"127.0.0.1:1\", h2c: true, tls: {cert_path: a, key_path: b}}]\n");
        assert!(e.starts_with("listen[0].h2c:"), "{e}");
    }
}
