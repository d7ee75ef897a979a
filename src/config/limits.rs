//! The `limits:` section: request size limits.

use serde::Deserialize;

/// On-disk shape of `limits:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    max_body_bytes: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_body_bytes: 10 * 1024 * 1024,
        }
    }
}

/// Request size limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted; 0 means unlimited.
    pub max_body_bytes: u64,
}

impl RawLimits {
    /// Every value is usable (0 means unlimited), so this cannot fail.
    pub(super) fn validate(self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::MINIMAL;
    use crate::config::Config;

    #[test]
    fn body_limit_defaults_to_10_mib_and_0_is_unlimited() {
        let c = Config::from_yaml(MINIMAL).expect("valid");
        assert_eq!(c.limits.max_body_bytes, 10 * 1024 * 1024);
        let c =
            Config::from_yaml(&format!("{MINIMAL}limits: {{max_body_bytes: 0}}\n")).expect("valid");
        assert_eq!(c.limits.max_body_bytes, 0);
    }
}
