//! The `admin:` section: the address of the admin listener (`/metrics`, `/healthz`), or `~`
//! for none, and the file holding the token its mutating endpoints require (`token_file`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{net, ConfigError};

/// On-disk shape of `admin:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    /// None (`addr: ~`): no admin listener.
    addr: Option<String>,
    /// A file holding the bearer token `DELETE /cache` requires; None: no token.
    token_file: Option<PathBuf>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            addr: Some("127.0.0.1:9091".to_string()),
            token_file: None,
        }
    }
}

impl RawAdmin {
    /// The listener's address (None: no listener) and the token file (read at start).
    pub(super) fn validate(self) -> Result<(Option<SocketAddr>, Option<PathBuf>), ConfigError> {
        let addr = self
            .addr
            .map(|a| net::socket_addr("admin.addr", &a))
            .transpose()?;
        Ok((addr, self.token_file))
    }
}

/// Reads `admin.token_file`: its content without surrounding whitespace, never empty.
pub fn read_token_file(path: &std::path::Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|_| ConfigError::file("admin.token_file", path, "is not a readable file"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ConfigError::file("admin.token_file", path, "is empty"));
    }
    Ok(token.to_string())
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
    fn a_token_file_is_read_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").expect("write");
        assert_eq!(super::read_token_file(&path).expect("token"), "s3cret");
        std::fs::write(&path, "\n").expect("write");
        let e = super::read_token_file(&path)
            .expect_err("empty")
            .to_string();
        assert!(e.starts_with("admin.token_file"), "{e}");
        let yaml = format!("{MINIMAL}admin: {{token_file: \"{}\"}}\n", path.display());
        let c = Config::from_yaml(&yaml).expect("valid");
        assert_eq!(c.admin_token_file.as_deref(), Some(path.as_path()));
    }

    #[test]
    fn bad_admin_addr_names_the_key() {
        let e = err(&format!("{MINIMAL}admin: {{addr: \"localhost:9\"}}\n"));
        assert_eq!(e, "admin.addr: `localhost:9` is not an IP:port address");
    }
}
