//! The `server:` section: process-level settings handed to Pingora's `ServerConf` (threads,
//! pid file, upgrade socket, daemon mode, grace periods, upstream connection pool).

use serde::Deserialize;

use super::ConfigError;

/// On-disk shape of `server:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    /// None: one per CPU.
    threads: Option<usize>,
    pid_file: String,
    upgrade_sock: String,
    daemon: bool,
    /// None: standard error.
    error_log: Option<String>,
    grace_period_seconds: u64,
    graceful_shutdown_timeout_seconds: u64,
    upstream_keepalive_pool_size: usize,
    /// Pingora's runtime: one work-stealing pool (true) or one single-threaded runtime per
    /// thread (false, the default: cheaper per request and a shorter tail; README, Performance).
    work_stealing: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            threads: None,
            pid_file: "/tmp/arkgate.pid".to_string(),
            upgrade_sock: "/tmp/arkgate_upgrade.sock".to_string(),
            daemon: false,
            error_log: None,
            grace_period_seconds: 60,
            graceful_shutdown_timeout_seconds: 10,
            upstream_keepalive_pool_size: 128,
            work_stealing: false,
        }
    }
}

/// Pingora server settings, from the `server:` section.
#[derive(Debug, Clone)]
pub struct Server {
    pub threads: usize,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub daemon: bool,
    pub error_log: Option<String>,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub upstream_keepalive_pool_size: usize,
    pub work_stealing: bool,
}

impl RawServer {
    pub(super) fn validate(self) -> Result<Server, ConfigError> {
        let threads = match self.threads {
            Some(0) => return Err(ConfigError::invalid("server.threads", "must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        Ok(Server {
            threads,
            pid_file: self.pid_file,
            upgrade_sock: self.upgrade_sock,
            daemon: self.daemon,
            error_log: self.error_log,
            grace_period_seconds: self.grace_period_seconds,
            graceful_shutdown_timeout_seconds: self.graceful_shutdown_timeout_seconds,
            upstream_keepalive_pool_size: self.upstream_keepalive_pool_size,
            work_stealing: self.work_stealing,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn server_section_maps_to_settings() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}server: {{threads: 3, pid_file: /run/a.pid, upgrade_sock: /run/a.sock, grace_period_seconds: 5, graceful_shutdown_timeout_seconds: 2}}\n"
        ))
        .expect("valid");
        assert_eq!(c.server.threads, 3);
        assert_eq!(c.server.pid_file, "/run/a.pid");
        assert_eq!(c.server.upgrade_sock, "/run/a.sock");
        assert_eq!(c.server.grace_period_seconds, 5);
        assert_eq!(c.server.graceful_shutdown_timeout_seconds, 2);
    }

    #[test]
    fn defaults() {
        let s = Config::from_yaml(MINIMAL).expect("valid").server;
        assert!(s.threads >= 1);
        assert_eq!(s.pid_file, "/tmp/arkgate.pid");
        assert_eq!(s.upgrade_sock, "/tmp/arkgate_upgrade.sock");
        assert!(!s.daemon);
        assert_eq!(s.error_log, None);
        assert_eq!(s.grace_period_seconds, 60);
        assert_eq!(s.graceful_shutdown_timeout_seconds, 10);
        assert_eq!(s.upstream_keepalive_pool_size, 128);
        assert!(!s.work_stealing);
    }

    #[test]
    fn zero_threads_is_rejected() {
        let e = err(&format!("{MINIMAL}server: {{threads: 0}}\n"));
        assert_eq!(e, "server.threads: must be at least 1");
    }
}
