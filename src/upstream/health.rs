//! Active health checks: a background service that sends `GET <base path><health_check.path>`
//! to each endpoint every `interval_ms`, over a fresh connection made by Pingora's own connector
//! (same TLS settings, ALPN and CA as requests), with `timeout_ms` on the whole exchange.
//!
//! Any HTTP answer below 500 counts as up (a 401 proves the endpoint is alive); a 5xx, a
//! connect failure or a timeout counts as down. `unhealthy_after` consecutive failures take the
//! endpoint out of rotation, `healthy_after` consecutive successes bring it back. Each check
//! goes to the endpoint's next address in turn. Never on a request's path.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::header;
use log::{info, warn};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::{Endpoint, Upstreams};
use crate::config::HealthCheck;

/// Consecutive check results and the verdict they give (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCounter {
    healthy: bool,
    streak: u32,
}

impl Default for HealthCounter {
    fn default() -> Self {
        HealthCounter {
            healthy: true,
            streak: 0,
        }
    }
}

impl HealthCounter {
    /// Records one check; returns the verdict after it.
    pub fn record(&mut self, up: bool, cfg: &HealthCheck) -> bool {
        if up == self.healthy {
            self.streak = 0;
            return self.healthy;
        }
        self.streak += 1;
        let needed = if up {
            cfg.healthy_after
        } else {
            cfg.unhealthy_after
        };
        if self.streak >= needed {
            self.healthy = up;
            self.streak = 0;
        }
        self.healthy
    }
}

/// Background service running the checks of every endpoint.
pub struct HealthChecker {
    upstreams: Arc<Upstreams>,
    cfg: HealthCheck,
    connector: Arc<Connector>,
}

impl HealthChecker {
    /// The checker, when `upstream.health_check` is set. `options` carry the CA and bind
    /// settings of the server (as for requests).
    pub fn new(upstreams: Arc<Upstreams>, options: ConnectorOptions) -> Option<HealthChecker> {
        let cfg = upstreams.config().health_check.clone()?;
        Some(HealthChecker {
            upstreams,
            cfg,
            connector: Arc::new(Connector::new(Some(options))),
        })
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut tasks = tokio::task::JoinSet::new();
        for ep in self.upstreams.endpoints() {
            tasks.spawn(check_loop(
                ep.clone(),
                self.cfg.clone(),
                self.connector.clone(),
                shutdown.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn check_loop(
    ep: Arc<Endpoint>,
    cfg: HealthCheck,
    connector: Arc<Connector>,
    mut shutdown: ShutdownWatch,
) {
    let mut counter = HealthCounter::default();
    let mut turn = 0usize;
    loop {
        let result = check_once(&ep, &cfg, &connector, turn).await;
        turn = turn.wrapping_add(1);
        let up = matches!(result, Ok(status) if status < 500);
        let healthy = counter.record(up, &cfg);
        if ep.set_healthy(healthy) {
            match (&result, healthy) {
                (_, true) => info!("endpoint {} is up again (health checks)", ep.name()),
                (Ok(status), false) => warn!(
                    "endpoint {} is down: health check answered {status}",
                    ep.name()
                ),
                (Err(why), false) => warn!("endpoint {} is down: health check {why}", ep.name()),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One check: the status, or why there is none.
async fn check_once(
    ep: &Endpoint,
    cfg: &HealthCheck,
    connector: &Connector,
    turn: usize,
) -> Result<u16, String> {
    let Some(mut peer) = ep.peers.peer(turn) else {
        return Err("has no address".into());
    };
    // Never share the pool key of request connections.
    peer.group_key = u64::MAX;
    let path = format!("{}{}", ep.cfg.base_path, cfg.path);
    let exchange = async {
        let (mut session, _) = connector
            .get_http_session(&*peer)
            .await
            .map_err(|e| format!("failed to connect: {}", e.etype().as_str()))?;
        let mut req = RequestHeader::build("GET", path.as_bytes(), None)
            .map_err(|_| "cannot build the request".to_string())?;
        req.insert_header(header::HOST, ep.cfg.host_header.clone())
            .map_err(|_| "cannot set Host".to_string())?;
        req.insert_header(header::USER_AGENT, "arkgate-health-check")
            .map_err(|_| "cannot set User-Agent".to_string())?;
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| format!("failed to send: {}", e.etype().as_str()))?;
        session
            .finish_request_body()
            .await
            .map_err(|e| format!("failed to send: {}", e.etype().as_str()))?;
        session
            .read_response_header()
            .await
            .map_err(|e| format!("failed to read: {}", e.etype().as_str()))?;
        let status = session
            .response_header()
            .map(|r| r.status.as_u16())
            .ok_or_else(|| "got no response".to_string())?;
        session.shutdown().await;
        Ok(status)
    };
    match tokio::time::timeout(cfg.timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {} ms", ms(cfg.timeout))),
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthCheck {
        HealthCheck {
            path: "/models".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_after: 3,
            healthy_after: 2,
        }
    }

    #[test]
    fn down_after_consecutive_failures_and_up_after_consecutive_successes() {
        let c = cfg();
        let mut h = HealthCounter::default();
        assert!(h.record(false, &c));
        assert!(h.record(false, &c));
        assert!(h.record(true, &c), "a success resets the failure streak");
        assert!(h.record(false, &c) && h.record(false, &c));
        assert!(!h.record(false, &c), "third consecutive failure");
        assert!(!h.record(true, &c));
        assert!(!h.record(false, &c), "a failure resets the success streak");
        assert!(!h.record(true, &c));
        assert!(h.record(true, &c), "second consecutive success");
    }
}
