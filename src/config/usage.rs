//! The `usage:` section: how arkgate learns the tokens each call used.

use serde::Deserialize;

/// On-disk shape of `usage:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUsage {
    stream_include_usage: bool,
}

impl Default for RawUsage {
    fn default() -> Self {
        RawUsage {
            stream_include_usage: true,
        }
    }
}

/// Token usage settings.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Streamed chat requests get `stream_options.include_usage: true` when they lack it, so the
    /// stream ends with a usage chunk (removed again for a client that had not asked for it).
    pub stream_include_usage: bool,
}

impl RawUsage {
    pub(super) fn validate(self) -> Usage {
        Usage {
            stream_include_usage: self.stream_include_usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn include_usage_is_on_by_default_and_can_be_turned_off() {
        assert!(
            Config::from_yaml(MINIMAL)
                .expect("valid")
                .usage
                .stream_include_usage
        );
        let off = format!("{MINIMAL}usage: {{stream_include_usage: false}}\n");
        assert!(
            !Config::from_yaml(&off)
                .expect("valid")
                .usage
                .stream_include_usage
        );
    }

    #[test]
    fn unknown_usage_key_is_rejected() {
        let e = err(&format!("{MINIMAL}usage: {{include: true}}\n"));
        assert!(e.contains("usage") && e.contains("include"), "{e}");
    }
}
