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
    /// Bytes read from a client socket at once (Pingora's buffer under the HTTP layer); None:
    /// the default for the listener's kind.
    read_buffer_bytes: Option<usize>,
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
    /// Per-connection read buffer under the HTTP layer, in bytes (0: none; each read goes to
    /// the socket). See [`Listener::DEFAULT_PLAIN_READ_BUFFER`].
    pub read_buffer_bytes: usize,
}

impl Listener {
    /// Plain listeners read straight into the HTTP layer's own buffer: a buffer below it would
    /// only add a copy, and it stays allocated while a keep-alive client is idle.
    pub const DEFAULT_PLAIN_READ_BUFFER: usize = 0;
    /// TLS listeners keep a buffer of one full TLS record (16 KiB): OpenSSL reads a record's
    /// header and then its body, and the buffer turns those into one system call. Pingora's
    /// 64 KiB default is zeroed at accept and, with mimalloc, stays resident for as long as the
    /// connection is open, idle or not.
    pub const DEFAULT_TLS_READ_BUFFER: usize = 16 * 1024 + 256;
    /// Largest `read_buffer_bytes` accepted.
    const MAX_READ_BUFFER: usize = 1 << 20;
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
        let read_buffer_bytes = match (self.read_buffer_bytes, &self.tls) {
            (Some(n), _) if n > Listener::MAX_READ_BUFFER => {
                return Err(ConfigError::invalid(
                    format!("listen[{i}].read_buffer_bytes"),
                    format!("{n} is more than {}", Listener::MAX_READ_BUFFER),
                ))
            }
            (Some(n), _) => n,
            (None, None) => Listener::DEFAULT_PLAIN_READ_BUFFER,
            (None, Some(_)) => Listener::DEFAULT_TLS_READ_BUFFER,
        };
        let tls = self.tls.map(|t| TlsFiles {
            cert_path: t.cert_path,
            key_path: t.key_path,
        });
        Ok(Listener {
            addr,
            tls,
            h2c: self.h2c,
            read_buffer_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::err;
    use crate::config::Config;

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
    fn read_buffer_defaults_by_kind_and_is_bounded() {
        let c = Config::from_yaml(
            "listen: [{addr: \"127.0.0.1:1\"}, {addr: \"127.0.0.1:2\", tls: {cert_path: a, key_path: b}}, {addr: \"127.0.0.1:3\", read_buffer_bytes: 16384}]\nupstream: {base_url: \"http://127.0.0.1:9/v1\"}\n",
        )
        .expect("valid");
        let sizes: Vec<usize> = c.listeners.iter().map(|l| l.read_buffer_bytes).collect();
        assert_eq!(sizes, [0, 16 * 1024 + 256, 16384]);
        let e = err("listen: [{addr: \"127.0.0.1:1\", read_buffer_bytes: 2000000}]\n");
        assert_eq!(
            e,
            "listen[0].read_buffer_bytes: 2000000 is more than 1048576"
        );
    }

    #[test]
    fn h2c_on_tls_listener_is_rejected() {
        let e =
            err("listen: [{addr: \"127.0.0.1:1\", h2c: true, tls: {cert_path: a, key_path: b}}]\n");
        assert!(e.starts_with("listen[0].h2c:"), "{e}");
    }
}
