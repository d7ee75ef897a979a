//! Request size limits: header count and bytes (431), a `Content-Length` that is not a number
//! (400), and the body limit (413), checked from `Content-Length` before any byte is read and
//! again on every chunk of a body without one.

use http::header;
use pingora::http::RequestHeader;
use pingora::prelude::*;

use crate::config::Config;
use crate::error;

/// The limits, compiled from `downstream:` and `limits:`.
pub struct Limits {
    max_headers: usize,
    max_header_bytes: usize,
    /// 0 = unlimited.
    max_body_bytes: u64,
}

impl Limits {
    pub fn new(cfg: &Config) -> Limits {
        Limits {
            max_headers: cfg.downstream.max_headers,
            max_header_bytes: cfg.downstream.max_header_bytes,
            max_body_bytes: cfg.limits.max_body_bytes,
        }
    }

    /// Checks the request head; returns the declared body length, if any.
    pub fn request_filter(&self, req: &RequestHeader) -> Result<Option<u64>> {
        let headers = &req.headers;
        let header_bytes: usize = headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if headers.len() > self.max_headers || header_bytes > self.max_header_bytes {
            return Error::e_explain(error::HEADERS_TOO_LARGE, "request headers over limit");
        }
        let content_length = match headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) => Some(n),
                None => return Error::e_explain(error::BAD_CONTENT_LENGTH, "content-length"),
            },
        };
        if let Some(n) = content_length {
            self.check_body(n)?;
        }
        Ok(content_length)
    }

    /// Fails once `received` body bytes exceed `limits.max_body_bytes`.
    pub fn check_body(&self, received: u64) -> Result<()> {
        if self.max_body_bytes != 0 && received > self.max_body_bytes {
            return Error::e_explain(error::BODY_TOO_LARGE, "body over limit");
        }
        Ok(())
    }
}
