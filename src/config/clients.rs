//! The `clients:` section: the client keys arkgate accepts (by SHA-256, never the key itself)
//! and the file holding the upstream (ARK) key sent on their behalf.
//!
//! Without the section the client's own `Authorization` is forwarded as it is.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
use crate::clients::{KeyEntry, KeyTable};

/// On-disk shape of `clients:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClients {
    upstream_key_file: PathBuf,
    #[serde(default)]
    keys: Vec<RawKey>,
}

/// On-disk shape of one `clients.keys[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    key_sha256: String,
    #[serde(default)]
    rpm: u64,
    #[serde(default)]
    tpm: u64,
    #[serde(default)]
    daily_tokens: u64,
}

/// Validated `clients:`: the key table and where the upstream key is read from at start.
#[derive(Debug, Clone)]
pub struct Clients {
    /// The configured keys, looked up by a request's bearer token.
    pub table: KeyTable,
    /// The file holding the upstream key (read at start; checked by `arkgate -t`).
    pub upstream_key_file: PathBuf,
}

impl RawClients {
    pub(super) fn validate(self) -> Result<Clients, ConfigError> {
        if self.keys.is_empty() {
            return Err(ConfigError::invalid(
                "clients.keys",
                "must list at least one key (without keys, drop the section)",
            ));
        }
        let entries = self
            .keys
            .into_iter()
            .map(|k| KeyEntry {
                name: k.name,
                key_sha256: k.key_sha256,
                rpm: k.rpm,
                tpm: k.tpm,
                daily_tokens: k.daily_tokens,
            })
            .collect();
        let table = KeyTable::new(entries).map_err(|why| {
            // KeyTable's messages start with the key path: split it off for ConfigError.
            let (key, why) = why.split_once(": ").unwrap_or(("clients.keys", &why));
            ConfigError::invalid(key, why)
        })?;
        Ok(Clients {
            table,
            upstream_key_file: self.upstream_key_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::clients::hash_key;
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn clients_are_optional_and_keys_validated() {
        assert!(Config::from_yaml(MINIMAL).expect("valid").clients.is_none());
        let yaml = format!(
            "{MINIMAL}clients:\n  upstream_key_file: /k\n  keys:\n    - {{name: a, key_sha256: \"{}\", rpm: 5}}\n",
            hash_key("ak-1")
        );
        let c = Config::from_yaml(&yaml)
            .expect("valid")
            .clients
            .expect("set");
        assert_eq!(c.table.lookup(b"ak-1").map(|k| k.limits.rpm), Some(5));
        let e = err(&format!(
            "{MINIMAL}clients:\n  upstream_key_file: /k\n  keys: [{{name: a, key_sha256: abc}}]\n"
        ));
        assert!(e.starts_with("clients.keys[0].key_sha256"), "{e}");
        assert!(!e.contains("abc"), "{e}");
        let e = err(&format!("{MINIMAL}clients: {{upstream_key_file: /k}}\n"));
        assert!(e.starts_with("clients.keys:"), "{e}");
        let e = err(&format!("{MINIMAL}clients: {{keys: []}}\n"));
        assert!(e.contains("upstream_key_file"), "{e}");
    }

    #[test]
    fn config_test_checks_the_upstream_key_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("ark.key");
        let conf = dir.path().join("arkgate.yaml");
        let yaml = format!(
            "{MINIMAL}clients:\n  upstream_key_file: {}\n  keys: [{{name: a, key_sha256: \"{}\"}}]\n",
            key.display(),
            hash_key("ak-1")
        );
        std::fs::write(&conf, yaml).expect("write");
        let e = Config::from_file(&conf).expect_err("missing key file");
        assert!(
            e.to_string()
                .starts_with("clients.upstream_key_file: cannot read"),
            "{e}"
        );
        std::fs::write(&key, "\n").expect("write");
        let e = Config::from_file(&conf).expect_err("empty key file");
        assert!(e.to_string().ends_with("is empty"), "{e}");
        std::fs::write(&key, "sk-secret\n").expect("write");
        Config::from_file(&conf).expect("a readable key");
    }
}
