//! The `downstream:` section: client-facing connection settings (keep-alive, first-request
//! deadline, HTTP/2 limits, request header limits).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// On-disk shape of `downstream:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDownstream {
    /// 0 turns client keep-alive off.
    keepalive_timeout_s: u64,
    client_timeout_ms: u64,
    h2_idle_timeout_s: u64,
    h2_max_concurrent_streams: u32,
    max_header_bytes: usize,
    max_headers: usize,
}

impl Default for RawDownstream {
    fn default() -> Self {
        RawDownstream {
            keepalive_timeout_s: 75,
            client_timeout_ms: 60_000,
            h2_idle_timeout_s: 300,
            h2_max_concurrent_streams: 128,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
        }
    }
}

/// Client-facing connection settings.
#[derive(Debug, Clone, Copy)]
pub struct Downstream {
    pub keepalive_timeout: Duration,
    pub client_timeout: Duration,
    pub h2_idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    /// Largest request header section (names + values) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Most request header fields accepted; more gets 431.
    pub max_headers: usize,
}

impl RawDownstream {
    pub(super) fn validate(self) -> Result<Downstream, ConfigError> {
        if self.max_header_bytes == 0 {
            return Err(ConfigError::invalid(
                "downstream.max_header_bytes",
                "header limits must be at least 1",
            ));
        }
        if self.max_headers == 0 {
            return Err(ConfigError::invalid(
                "downstream.max_headers",
                "header limits must be at least 1",
            ));
        }
        for (key, v) in [
            ("downstream.h2_idle_timeout_s", self.h2_idle_timeout_s),
            (
                "downstream.h2_max_concurrent_streams",
                u64::from(self.h2_max_concurrent_streams),
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        Ok(Downstream {
            keepalive_timeout: Duration::from_secs(self.keepalive_timeout_s),
            client_timeout: Duration::from_millis(self.client_timeout_ms),
            h2_idle_timeout: Duration::from_secs(self.h2_idle_timeout_s),
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn defaults() {
        let d = Config::from_yaml(MINIMAL).expect("valid").downstream;
        assert_eq!(d.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(d.client_timeout, Duration::from_millis(60_000));
        assert_eq!(d.h2_idle_timeout, Duration::from_secs(300));
        assert_eq!(d.h2_max_concurrent_streams, 128);
        assert_eq!(d.max_header_bytes, 32 * 1024);
        assert_eq!(d.max_headers, 100);
    }

    #[test]
    fn zero_max_header_bytes_names_its_key() {
        let e = err(&format!("{MINIMAL}downstream: {{max_header_bytes: 0}}\n"));
        assert_eq!(
            e,
            "downstream.max_header_bytes: header limits must be at least 1"
        );
    }

    #[test]
    fn zero_max_headers_names_its_key() {
        let e = err(&format!("{MINIMAL}downstream: {{max_headers: 0}}\n"));
        assert_eq!(
            e,
            "downstream.max_headers: header limits must be at least 1"
        );
    }

    #[test]
    fn zero_h2_limits_are_rejected() {
        let e = err(&format!("{MINIMAL}downstream: {{h2_idle_timeout_s: 0}}\n"));
        assert_eq!(e, "downstream.h2_idle_timeout_s: must be at least 1");
        let e = err(&format!(
            "{MINIMAL}downstream: {{h2_max_concurrent_streams: 0}}\n"
        ));
        assert_eq!(
            e,
            "downstream.h2_max_concurrent_streams: must be at least 1"
        );
    }
}
