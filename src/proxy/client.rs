//! The client connection's per-request settings: read and write timeouts, and keep-alive, which
//! stays off once Pingora turned it off and goes off while the server drains.

use std::sync::Arc;
use std::time::Duration;

use pingora::proxy::Session;

use crate::config::Config;
use crate::lifecycle::DrainSignal;

/// Client-side timeouts and keep-alive, compiled from `downstream:`.
pub struct ClientPolicy {
    timeout: Duration,
    keepalive_secs: u64,
    drain: Arc<DrainSignal>,
}

impl ClientPolicy {
    pub fn new(cfg: &Config, drain: Arc<DrainSignal>) -> ClientPolicy {
        ClientPolicy {
            timeout: cfg.downstream.client_timeout,
            keepalive_secs: cfg.downstream.keepalive_timeout.as_secs(),
            drain,
        }
    }

    /// Applies the timeouts and keep-alive to this request's connection.
    ///
    /// Only the idle timeout is ours to choose. Keep-alive that Pingora already turned off (the
    /// client asked to close, HTTP/1.0, or the request arrived after shutdown began) stays off:
    /// re-enabling it during a drain would keep clients on a connection that is dropped when the
    /// drain ends. Once draining, answer with `Connection: close` so clients move to the new
    /// process while both still accept.
    pub fn request_filter(&self, session: &mut Session) {
        session.set_read_timeout(Some(self.timeout));
        session.set_write_timeout(Some(self.timeout));
        if session.get_keepalive().is_some() {
            let keep = self.keepalive_secs;
            let keep = (keep > 0 && !self.drain.is_draining()).then_some(keep);
            session.set_keepalive(keep);
        }
    }
}
