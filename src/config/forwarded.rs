//! The `forwarded:` section: which peers are trusted to send `X-Forwarded-*`, and whether
//! responses carry `Via`.

use serde::Deserialize;

use super::{net::Cidr, ConfigError};

/// On-disk shape of `forwarded:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawForwarded {
    trusted_proxies: Vec<String>,
    via_header: bool,
}

impl Default for RawForwarded {
    fn default() -> Self {
        RawForwarded {
            trusted_proxies: Vec::new(),
            via_header: true,
        }
    }
}

/// How `X-Forwarded-*` headers are produced.
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub trusted_proxies: Vec<Cidr>,
    /// Add `Via: 1.1 arkgate` to responses.
    pub via_header: bool,
}

impl RawForwarded {
    pub(super) fn validate(self) -> Result<Forwarded, ConfigError> {
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Cidr::parse(c).ok_or_else(|| {
                    ConfigError::invalid(
                        format!("forwarded.trusted_proxies[{i}]"),
                        format!("`{c}` is not a CIDR such as 10.0.0.0/8"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Forwarded {
            trusted_proxies,
            via_header: self.via_header,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn trusted_proxies_are_cidrs() {
        let e = err(&format!(
            "{MINIMAL}forwarded: {{trusted_proxies: [\"10.0.0.0/33\"]}}\n"
        ));
        assert_eq!(
            e,
            "forwarded.trusted_proxies[0]: `10.0.0.0/33` is not a CIDR such as 10.0.0.0/8"
        );
    }

    #[test]
    fn defaults_trust_nobody_and_add_via() {
        let f = Config::from_yaml(MINIMAL).expect("valid").forwarded;
        assert!(f.trusted_proxies.is_empty());
        assert!(f.via_header);
    }
}
