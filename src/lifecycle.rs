//! Drain state: whether this server is shutting down or handing over to a new process.
//!
//! The request path reads [`DrainSignal`] (keep-alive off, `Connection: close`); `/healthz`
//! answers 503 from it; [`DrainWatcher`] sets it when Pingora enters a shutdown or upgrade phase.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::sync::broadcast;

/// Whether this server has begun to shut down or hand over to a new process. One per server (not
/// per process), so servers embedded side by side in one process drain independently.
#[derive(Debug, Default)]
pub struct DrainSignal(AtomicBool);

impl DrainSignal {
    /// Marks the server as draining (also shown as the `arkgate_draining` gauge).
    pub fn start(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// True once shutdown or a graceful upgrade has started.
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Starts the drain when shutdown or an upgrade begins: from then on responses carry
/// `Connection: close` and `/healthz` answers 503.
pub struct DrainWatcher {
    pub phases: broadcast::Receiver<ExecutionPhase>,
    pub drain: Arc<DrainSignal>,
}

#[async_trait]
impl BackgroundService for DrainWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut phases = self.phases.resubscribe();
        loop {
            tokio::select! {
                phase = phases.recv() => match phase {
                    Ok(ExecutionPhase::GracefulUpgradeTransferringFds
                        | ExecutionPhase::GracefulUpgradeCloseTimeout
                        | ExecutionPhase::GracefulTerminate
                        | ExecutionPhase::ShutdownStarted) => self.drain.start(),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = shutdown.changed() => {
                    self.drain.start();
                    return;
                }
            }
        }
    }
}
