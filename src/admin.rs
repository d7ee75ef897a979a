//! The admin listener: `/metrics` (Prometheus text) and `/healthz` (200, or 503 while draining).
//!
//! It listens on its own address (loopback by default) and never proxies anything.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::lifecycle::DrainSignal;
use crate::metrics;

/// The admin listener: `/metrics` (Prometheus text) and `/healthz` (200, or 503 while draining).
pub struct AdminApp {
    pub drain: Arc<DrainSignal>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        let (status, ctype, body) = match path {
            "/metrics" => (
                200,
                "text/plain; version=0.0.4",
                metrics::render(self.drain.is_draining()).into_bytes(),
            ),
            "/healthz" if self.drain.is_draining() => (503, "text/plain", b"draining\n".to_vec()),
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
