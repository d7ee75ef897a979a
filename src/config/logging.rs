//! The `logging:` section: access-log sampling and body capture.

use serde::Deserialize;

use super::ConfigError;

/// On-disk shape of `logging:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLogging {
    sample_rate: f64,
    bodies: bool,
    body_max_bytes: usize,
    format: LogFormat,
}

/// How access events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One `key=value` line per request.
    Text,
    /// One JSON object per request and line.
    Json,
}

impl Default for RawLogging {
    fn default() -> Self {
        RawLogging {
            sample_rate: 0.01,
            bodies: false,
            body_max_bytes: 1024,
            format: LogFormat::Text,
        }
    }
}

/// Access log settings.
#[derive(Debug, Clone, Copy)]
pub struct Logging {
    /// Fraction of successful requests that get an access line (errors always do).
    pub sample_rate: f64,
    pub bodies: bool,
    pub body_max_bytes: usize,
    pub format: LogFormat,
}

impl RawLogging {
    pub(super) fn validate(self) -> Result<Logging, ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(ConfigError::invalid(
                "logging.sample_rate",
                format!("{} is not between 0 and 1", self.sample_rate),
            ));
        }
        Ok(Logging {
            sample_rate: self.sample_rate,
            bodies: self.bodies,
            body_max_bytes: self.body_max_bytes,
            format: self.format,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn defaults() {
        let l = Config::from_yaml(MINIMAL).expect("valid").logging;
        assert_eq!(l.sample_rate, 0.01);
        assert!(!l.bodies);
        assert_eq!(l.body_max_bytes, 1024);
    }

    #[test]
    fn format_is_text_or_json() {
        let l = Config::from_yaml(MINIMAL).expect("valid").logging;
        assert_eq!(l.format, super::LogFormat::Text);
        let json = format!("{MINIMAL}logging: {{format: json}}\n");
        let l = Config::from_yaml(&json).expect("valid").logging;
        assert_eq!(l.format, super::LogFormat::Json);
        let e = err(&format!("{MINIMAL}logging: {{format: xml}}\n"));
        assert!(e.contains("logging.format") || e.contains("xml"), "{e}");
    }

    #[test]
    fn sample_rate_out_of_range() {
        let e = err(&format!("{MINIMAL}logging: {{sample_rate: 2}}\n"));
        assert_eq!(e, "logging.sample_rate: 2 is not between 0 and 1");
    }
}
