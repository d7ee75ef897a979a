//! Rate limits and accounting: admission before the request goes upstream (requests, tokens per
//! minute and the day's tokens, reserving an estimate), the `x-ratelimit-*` fields on the
//! answer, and, when the request is over, the reservation settled against the real usage, the
//! caller's tokens counted for `/keys`, and the cost by `prices:`.
//!
//! A refused request is a 429 (`rate_limit_exceeded`, or `insufficient_quota` for the daily
//! budget) with `Retry-After`; a store that cannot be asked follows `on_store_error` (deny: 503).
//! Without a limiter and prices this stage does nothing and allocates nothing.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::auth::AuthState;
use super::body::{BodyPlan, BodyState};
use super::retry::AttemptState;
use super::usage::UsageState;
use crate::clients::bearer;
use crate::config::{Config, LimitBy, Prices, RateLimit};
use crate::error::{self, Failure};
use crate::metrics::METRICS;
use crate::ratelimit::{self, estimate_tokens, Admission, Limiter, Limits, OnStoreError};
use crate::shared::Shared;

/// The stage's slice of the request context.
#[derive(Default)]
pub struct LimitState {
    /// The limiter's subject and the limits it was admitted under.
    subject: Option<(String, Limits)>,
    /// The admission, for the response fields and the settlement.
    admission: Option<Admission>,
}

/// The limiter (shared with the admin listener) and its settings; the prices.
pub struct RateLimits {
    limiter: Option<(Arc<Limiter>, RateLimit)>,
    prices: Prices,
}

impl RateLimits {
    /// The stage over the shared limiter, with the prices.
    pub fn new(cfg: &Config, shared: &Shared) -> RateLimits {
        RateLimits {
            limiter: shared.limiter.clone().zip(cfg.limiter()),
            prices: cfg.prices.clone(),
        }
    }

    /// After the body plan: admits the request or refuses it (429, or 503 when the store is
    /// down and `on_store_error: deny`).
    pub async fn request_filter(
        &self,
        session: &Session,
        auth: &AuthState,
        body: &BodyState,
        content_length: Option<u64>,
        st: &mut LimitState,
        attempt: &mut AttemptState,
    ) -> Result<()> {
        let Some((limiter, settings)) = &self.limiter else {
            return Ok(());
        };
        let limits = auth.key.as_ref().map_or(settings.defaults, |k| k.limits);
        if limits.is_unlimited() {
            return Ok(());
        }
        let who = subject(session, auth, settings.by);
        let estimate = if limits.tpm > 0 || limits.daily_tokens > 0 {
            let whole = match &body.plan {
                BodyPlan::Replace(b) => Some(b.as_ref()),
                _ => None,
            };
            let prompt_bytes = content_length.unwrap_or(body.bytes_in);
            estimate_tokens(
                prompt_bytes,
                whole.and_then(max_tokens),
                settings.default_completion_tokens,
            )
        } else {
            0
        };
        match limiter.admit(&who, &limits, estimate).await {
            Ok(a) if a.allowed => {
                st.admission = Some(a);
                st.subject = Some((who, limits));
                Ok(())
            }
            Ok(a) => Err(refused(&a, auth, attempt)),
            Err(_) => store_down(settings.on_store_error),
        }
    }

    /// The `x-ratelimit-*` fields of an admitted request.
    pub fn response_filter(&self, resp: &mut ResponseHeader, st: &LimitState) -> Result<()> {
        for (name, value) in self.headers(st) {
            resp.insert_header(name, value)?;
        }
        Ok(())
    }

    /// The `x-ratelimit-*` fields of the request's admission (none without one): on every
    /// answer, from the upstream or the cache.
    pub fn headers(&self, st: &LimitState) -> Vec<(&'static str, String)> {
        st.admission
            .as_ref()
            .map(ratelimit::headers)
            .unwrap_or_default()
    }

    /// The request is over: settles the reservation against the usage, counts the caller's
    /// tokens and their cost.
    pub async fn logging(
        &self,
        auth: &AuthState,
        usage: &UsageState,
        status: u16,
        went_upstream: bool,
        st: &mut LimitState,
    ) {
        let used = usage.usage.map(|u| (u.prompt_tokens, u.completion_tokens));
        if let (Some((limiter, _)), Some(a), Some((who, limits))) =
            (&self.limiter, st.admission.take(), st.subject.take())
        {
            // No usage on a failed answer, or on one that never went upstream (a cache hit):
            // nothing was generated. No usage on an upstream success: keep the estimate rather
            // than guess.
            let actual = match used {
                Some((p, c)) => Some(p.saturating_add(c)),
                None if !went_upstream || !(200..300).contains(&status) => Some(0),
                None => None,
            };
            if let Some(actual) = actual.filter(|n| *n != a.reservation.tokens) {
                let _ = limiter.settle(&who, &limits, &a.reservation, actual).await;
            }
        }
        let Some((p, c)) = used else {
            return;
        };
        if let Some(key) = &auth.key {
            key.count_tokens(p.saturating_add(c));
        }
        if !self.prices.is_empty() {
            let model = usage.model.as_deref().unwrap_or("-");
            if let Some(cost) = self.prices.cost(model, p, c) {
                METRICS.cost.with([auth.key_name(), model]).add(cost);
            }
        }
    }
}

/// The limiter's subject: the key's (`key:<name>`), the bearer token's hash without client
/// keys (`hash:<sha256>`), or the client address (`ip:<addr>`).
fn subject(session: &Session, auth: &AuthState, by: LimitBy) -> String {
    if by == LimitBy::Key {
        if let Some(key) = &auth.key {
            return key.subject.clone();
        }
        let token = session
            .req_header()
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        if let Some(token) = token {
            return format!("hash:{}", hex::encode(Sha256::digest(token)));
        }
    }
    match session.client_addr().and_then(|a| a.as_inet()) {
        Some(addr) => ratelimit::subject_for_ip(addr.ip()),
        None => "ip:-".to_owned(),
    }
}

/// A refused admission: counted, and answered 429 with the limit's code and fields.
fn refused(a: &Admission, auth: &AuthState, attempt: &mut AttemptState) -> Box<Error> {
    let reason = a.refused.unwrap_or(ratelimit::Refused::Rpm);
    let label = match reason {
        ratelimit::Refused::Rpm => "rpm",
        ratelimit::Refused::Tpm => "tpm",
        ratelimit::Refused::Daily => "daily",
    };
    METRICS.rate_limited.with([auth.key_name(), label]).inc();
    let mut reply = error::refusal(
        429,
        match reason {
            ratelimit::Refused::Rpm => "requests",
            ratelimit::Refused::Tpm => "tokens",
            ratelimit::Refused::Daily => "insufficient_quota",
        },
        reason.code(),
        reason.message(),
        Failure::RateLimited,
    );
    for (name, value) in ratelimit::headers(a) {
        if name == "retry-after" {
            attempt.retry_after_s = value.parse().ok();
        } else if let Ok(v) = HeaderValue::from_str(&value) {
            reply.headers.push((HeaderName::from_static(name), v));
        }
    }
    error::refuse(reply)
}

/// The store could not be asked: let the request through or refuse it with 503.
fn store_down(on_error: OnStoreError) -> Result<()> {
    match on_error {
        OnStoreError::Allow => {
            METRICS.limit_store_errors.with(["allow"]).inc();
            Ok(())
        }
        OnStoreError::Deny => {
            METRICS.limit_store_errors.with(["deny"]).inc();
            Err(error::refuse(error::refusal(
                503,
                "proxy_error",
                "rate_limit_unavailable",
                "the rate limiter is unavailable; retry later",
                Failure::LimitStoreDown,
            )))
        }
    }
}

/// The completion allowance a JSON body names: `max_completion_tokens` or `max_tokens`.
fn max_tokens(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Allowance {
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
    }
    let a: Allowance = serde_json::from_slice(body).ok()?;
    a.max_completion_tokens.or(a.max_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_completion_allowance_is_read_from_the_body() {
        assert_eq!(max_tokens(br#"{"model":"m","max_tokens":50}"#), Some(50));
        assert_eq!(
            max_tokens(br#"{"max_tokens":50,"max_completion_tokens":70}"#),
            Some(70)
        );
        assert_eq!(max_tokens(br#"{"model":"m"}"#), None);
        assert_eq!(max_tokens(b"not json"), None);
    }
}
