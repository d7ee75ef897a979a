//! The admin listener: `/metrics` (Prometheus text), `/healthz` (200; 503 while draining or
//! until the warm-up is done), `/upstreams` (the endpoints' state as JSON), `/cache` (`GET`: the
//! cache's counters; `DELETE`: clear it, or one model's entries with `?model=`) and `/keys` (each
//! client key's usage today and remaining budget; 404 without `clients:`).
//!
//! It listens on its own address (loopback by default) and never proxies anything. With
//! `admin.token_file`, the mutating endpoints (`DELETE /cache`) require
//! `Authorization: Bearer <token>` (401 otherwise), compared in constant time.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{read_token_file, ConfigError};
use crate::metrics;
use crate::shared::Shared;
use crate::upstream::warmup::Readiness;

/// The admin listener: `/metrics`, `/healthz`, `/upstreams`.
pub struct AdminApp {
    pub shared: Arc<Shared>,
    /// `/healthz` answers 503 until the warm-up is done (or its time is up).
    pub readiness: Arc<Readiness>,
}

/// The admin token, kept only as its SHA-256 (so comparing never depends on its length).
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// Reads `admin.token_file`.
    pub fn read(path: &std::path::Path) -> Result<AdminToken, ConfigError> {
        Ok(AdminToken::new(&read_token_file(path)?))
    }

    /// A token from its text.
    pub fn new(token: &str) -> AdminToken {
        AdminToken(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether an `Authorization` header value is `Bearer <this token>`, in constant time.
    pub fn admits(&self, authorization: Option<&http::HeaderValue>) -> bool {
        let given = authorization
            .map(|v| v.as_bytes())
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(given).into();
        bool::from(digest.ct_eq(&self.0)) && !given.is_empty()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

type Answer = (u16, &'static str, Vec<u8>);

impl AdminApp {
    /// `/cache`: GET the counters, DELETE everything or `?model=NAME`.
    async fn cache(&self, session: &ServerSession) -> Answer {
        let Some(cache) = self.shared.cache.as_ref() else {
            return (404, "text/plain", b"no cache configured\n".to_vec());
        };
        let req = session.req_header();
        if req.method == http::Method::GET {
            return (
                200,
                "application/json",
                cache.stats_json().to_string().into_bytes(),
            );
        }
        if req.method != http::Method::DELETE {
            return (405, "text/plain", b"GET or DELETE\n".to_vec());
        }
        if let Some(token) = &self.shared.admin_token {
            if !token.admits(req.headers.get(http::header::AUTHORIZATION)) {
                return (401, "text/plain", b"admin token required\n".to_vec());
            }
        }
        let model = req.uri.query().and_then(model_param);
        let done = match &model {
            Some(m) => cache.clear_model(m).await,
            None => cache.clear().await,
        };
        match done {
            Ok(()) => {
                let body = serde_json::json!({"cleared": true, "model": model});
                (200, "application/json", body.to_string().into_bytes())
            }
            Err(e) => (
                503,
                "text/plain",
                format!("cache not cleared: {e}\n").into_bytes(),
            ),
        }
    }
}

/// The `model` parameter of a query string, percent-decoded.
fn model_param(query: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("model="))?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().filter(|m| !m.is_empty())
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
                if let Some(cache) = &self.shared.cache {
                    cache.render_metrics(&mut text);
                }
                text.into_bytes()
            }),
            "/cache" => self.cache(session).await,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_a_bearer_token_compared_whole() {
        let t = AdminToken::new("s3cret");
        let h = |v: &'static str| http::HeaderValue::from_static(v);
        assert!(t.admits(Some(&h("Bearer s3cret"))));
        assert!(!t.admits(Some(&h("Bearer s3cre"))));
        assert!(!t.admits(Some(&h("s3cret"))));
        assert!(!t.admits(None));
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn the_model_parameter_is_decoded() {
        assert_eq!(model_param("model=a%2Fb+c"), Some("a/b c".to_string()));
        assert_eq!(model_param("x=1&model=m"), Some("m".to_string()));
        assert_eq!(model_param("model="), None);
        assert_eq!(model_param("other=1"), None);
    }
}
