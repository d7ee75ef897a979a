//! The `structured_output:` section: how requests asking for `json_schema` output are handled,
//! by default and per model name pattern, compiled into a [`Policy`].

use serde::Deserialize;

use super::ConfigError;
use crate::transform::structured::{Mode, Policy};

/// On-disk shape of `structured_output:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStructured {
    default: String,
    models: Vec<RawModelRule>,
}

impl Default for RawStructured {
    fn default() -> Self {
        RawStructured {
            default: "bytes".to_string(),
            models: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelRule {
    #[serde(rename = "match")]
    pattern: String,
    mode: String,
}

impl RawStructured {
    pub(super) fn validate(self) -> Result<Policy, ConfigError> {
        let default: Mode = self
            .default
            .parse()
            .map_err(|e| ConfigError::invalid("structured_output.default", e))?;
        let mut models = Vec::with_capacity(self.models.len());
        for (i, m) in self.models.into_iter().enumerate() {
            let mode: Mode = m.mode.parse().map_err(|e| {
                ConfigError::invalid(format!("structured_output.models[{i}].mode"), e)
            })?;
            if m.pattern.is_empty() {
                return Err(ConfigError::invalid(
                    format!("structured_output.models[{i}].match"),
                    "must not be empty",
                ));
            }
            models.push((m.pattern, mode));
        }
        Ok(Policy::new(default, models))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, MINIMAL};

    #[test]
    fn bad_structured_mode_names_the_key() {
        let e = err(&format!(
            "{MINIMAL}structured_output: {{default: downgrade, models: [{{match: \"x*\", mode: fancy}}]}}\n"
        ));
        assert!(e.starts_with("structured_output.models[0].mode: "), "{e}");
    }

    #[test]
    fn bad_default_mode_names_the_key() {
        let e = err(&format!("{MINIMAL}structured_output: {{default: fancy}}\n"));
        assert!(e.starts_with("structured_output.default: "), "{e}");
    }

    #[test]
    fn empty_model_pattern_is_rejected() {
        let e = err(&format!(
            "{MINIMAL}structured_output: {{models: [{{match: \"\", mode: bytes}}]}}\n"
        ));
        assert_eq!(e, "structured_output.models[0].match: must not be empty");
    }
}
