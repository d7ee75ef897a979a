//! The admin listener: `/metrics` (Prometheus text), `/healthz` (200; 503 while draining or
//! until the warm-up is done), `/upstreams` (the endpoints' state as JSON) and `/keys` (each
//! client key's usage today and remaining budget; 404 without `clients:`).
//!
//! It listens on its own address (loopback by default) and never proxies anything.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics;
use crate::shared::Shared;
use crate::upstream::warmup::Readiness;

/// The admin listener: `/metrics`, `/healthz`, `/upstreams`.
pub struct AdminApp {
    pub shared: Arc<Shared>,
    /// `/healthz` answers 503 until the warm-up is done (or its time is up).
    pub readiness: Arc<Readiness>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        let (status, ctype, body) = match path {
            "/keys" => match &self.shared.clients {
                Some(keys) => (
                    200,
                    "application/json",
                    keys.status_json(self.shared.limiter.as_deref())
                        .await
                        .to_string()
                        .into_bytes(),
                ),
                None => (404, "text/plain", b"no client keys configured\n".to_vec()),
            },
            "/metrics" => (200, "text/plain; version=0.0.4", {
                let mut text = metrics::render(self.shared.drain.is_draining());
                self.shared.upstreams.render_metrics(&mut text);
                text.into_bytes()
            }),
            "/healthz" if self.shared.drain.is_draining() => {
                (503, "text/plain", b"draining\n".to_vec())
            }
            "/healthz" if !self.readiness.is_ready() => {
                (503, "text/plain", b"warming up\n".to_vec())
            }
            "/upstreams" => (
                200,
                "application/json",
                self.shared.upstreams.status_json().to_string().into_bytes(),
            ),
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, ctype)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}
