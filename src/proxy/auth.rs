//! Who the caller is: with `clients:`, the request's bearer token looked up (by hash, in
//! constant time) among the configured keys, first of all stages and before any body is read;
//! no token or an unknown one is a 401 `invalid_api_key` and nothing goes upstream. A known
//! key's `Authorization` is replaced with the upstream key as the request leaves, so the
//! client's token never reaches the upstream. Without `clients:` this stage does nothing.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use pingora::http::RequestHeader;
use pingora::prelude::*;

use crate::clients::{bearer, ClientKeys, KeyRecord, INVALID_API_KEY};
use crate::error::{self, Failure};
use crate::shared::Shared;

/// The auth stage's slice of the request context.
#[derive(Default)]
pub struct AuthState {
    /// The caller's key, once it was found.
    pub key: Option<Arc<KeyRecord>>,
}

impl AuthState {
    /// The caller's key name for metric labels: `-` without one.
    pub fn key_name(&self) -> &str {
        self.key.as_ref().map_or("-", |k| k.name.as_str())
    }
}

/// The client keys, from [`Shared`]; None without `clients:`.
pub struct Auth {
    keys: Option<Arc<ClientKeys>>,
}

impl Auth {
    /// The stage over the shared key table.
    pub fn new(shared: &Shared) -> Auth {
        Auth {
            keys: shared.clients.clone(),
        }
    }

    /// Finds the caller's key, or refuses the request with 401.
    pub fn request_filter(&self, req: &RequestHeader, st: &mut AuthState) -> Result<()> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let token = req
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        match token.and_then(|t| keys.lookup(t)) {
            Some(record) => {
                record.count_request();
                st.key = Some(record.clone());
                Ok(())
            }
            None => Err(error::refuse(error::refusal(
                401,
                "invalid_request_error",
                INVALID_API_KEY,
                "Incorrect API key provided.",
                Failure::Unauthorized,
            ))),
        }
    }

    /// Replaces the client's `Authorization` with the upstream key's.
    pub fn upstream_request_filter(&self, req: &mut RequestHeader) -> Result<()> {
        if let Some(keys) = &self.keys {
            req.insert_header(AUTHORIZATION, keys.upstream_authorization().clone())?;
        }
        Ok(())
    }
}
