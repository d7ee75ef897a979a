//! The response cache stage ([`crate::cache`]) in the request's path.
//!
//! - `request_filter` (after the body stage read a small JSON body whole): a cacheable request
//!   is looked up; a hit (a stored entry, or the answer of an identical request in flight) is
//!   written from here and the request never goes upstream; a miss keeps its [`Fill`].
//! - `response_filter`: every response of a request on a cacheable path carries
//!   `X-Arkgate-Cache: hit | miss | bypass`; a 200 on a miss starts collecting the body.
//! - `response_body_filter` (last, so it sees the bytes the client receives): collects.
//! - `logging`: a 200 that ended cleanly (no error; a stream ended with `data: [DONE]`) is
//!   stored in a spawned task, so the store never delays anything; anything else drops the
//!   fill, which sends identical requests that waited on it upstream themselves.
//!
//! Bypassed (never looked up, never stored): bodies not read whole (over 64 KiB, chunked, or
//! compressed), bodies that are not JSON, `temperature` other than 0, and `Cache-Control:
//! no-store`. `Cache-Control: no-cache` skips the lookup but stores the answer.
//! Without a `cache:` section the stage does nothing and allocates nothing.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use sha2::{Digest, Sha256};

use super::body::BodyState;
use crate::cache::{cacheable, Body, Cache, CacheKey, Entry, Fill, Lookup, SseCollector};
use crate::config::Config;
use crate::shared::Shared;

/// The response header naming what the cache did.
const CACHE_HEADER: &str = "x-arkgate-cache";
const HIT: &str = "hit";
const MISS: &str = "miss";
const BYPASS: &str = "bypass";

/// The cache stage: the shared cache and what arkgate does to a request before it goes out.
pub struct CacheStage {
    cache: Option<Arc<Cache>>,
    /// SHA-256 of the structured-output policy, the request and response rule sets and the
    /// `include_usage` edit: a change to any of them makes new keys.
    transform: [u8; 32],
}

/// The cache stage's slice of the request context.
#[derive(Default)]
pub struct CacheState {
    /// `hit`, `miss` or `bypass`, for requests on a cacheable path.
    pub result: Option<&'static str>,
    fill: Option<Fill>,
    collect: Option<Collect>,
    headers: Option<HeaderMap>,
    ended: bool,
}

/// The response body as the client receives it, gathered for storing.
enum Collect {
    Whole(BytesMut),
    Sse(SseCollector),
}

impl CacheStage {
    /// The stage; inert without a `cache:` section.
    pub fn new(cfg: &Config, shared: &Shared) -> CacheStage {
        let mut h = Sha256::new();
        if shared.cache.is_some() {
            h.update(
                format!(
                    "{:?}|{:?}|{:?}|{}|{}|{:?}",
                    cfg.structured,
                    cfg.request_rules,
                    cfg.response_rules,
                    cfg.usage.stream_include_usage,
                    cfg.policies
                        .set
                        .as_ref()
                        .map(|p| p.fingerprint())
                        .unwrap_or_default(),
                    cfg.policies.stream,
                )
                .as_bytes(),
            );
        }
        CacheStage {
            cache: shared.cache.clone(),
            transform: h.finalize().into(),
        }
    }

    /// Whether the body stage must read small JSON bodies whole for this stage.
    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// After the body plan: looks the request up. `Ok(true)`: a hit was written.
    /// `hit_headers`: fields of this request that a hit carries too (the `x-ratelimit-*` of its
    /// admission), asked for only on a hit.
    pub async fn request_filter(
        &self,
        session: &mut Session,
        body: &BodyState,
        hit_headers: impl FnOnce() -> Vec<(&'static str, String)>,
        st: &mut CacheState,
    ) -> Result<bool> {
        let Some(cache) = self.cache.as_ref() else {
            return Ok(false);
        };
        let req = session.req_header();
        if req.method != Method::POST || !is_cache_path(req.uri.path()) {
            return Ok(false);
        }
        let directives = CacheControl::of(&req.headers);
        let Some((key, model)) = self
            .key(cache, session, body)
            .filter(|_| !directives.no_store)
        else {
            cache.bypass();
            st.result = Some(BYPASS);
            return Ok(false);
        };
        if directives.no_cache {
            st.fill = Some(cache.refill(key, &model));
            st.result = Some(MISS);
            return Ok(false);
        }
        match cache.lookup(key, &model).await {
            Lookup::Hit(entry) => {
                st.result = Some(HIT);
                write_hit(session, &entry, hit_headers()).await?;
                Ok(true)
            }
            Lookup::Miss(fill) => {
                st.fill = Some(fill);
                st.result = Some(MISS);
                Ok(false)
            }
        }
    }

    /// The key and model of a cacheable request whose body was read whole.
    fn key(
        &self,
        cache: &Cache,
        session: &Session,
        body: &BodyState,
    ) -> Option<(CacheKey, String)> {
        let raw = body.raw.as_ref()?;
        let req = session.req_header();
        let value: serde_json::Value = serde_json::from_slice(raw).ok()?;
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let c = cacheable(path, &value)?;
        let credential = req
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let scope = cache.scope(credential);
        let key = CacheKey::compute(path, &scope, &self.transform, c.stream, &value);
        Some((key, c.model))
    }

    /// The response header: the `X-Arkgate-Cache` field; a 200 on a miss starts collecting.
    pub fn response_filter(&self, resp: &mut ResponseHeader, st: &mut CacheState) -> Result<()> {
        let Some(result) = st.result else {
            return Ok(());
        };
        if st.fill.is_some() {
            if resp.status == http::StatusCode::OK {
                st.headers = Some(resp.headers.clone());
                let limit = self
                    .cache
                    .as_ref()
                    .map_or(0, |c| c.config().max_entry_bytes);
                st.collect = Some(if is_event_stream(&resp.headers) {
                    Collect::Sse(SseCollector::new(limit))
                } else {
                    Collect::Whole(BytesMut::new())
                });
            } else {
                st.fill = None; // releases identical requests waiting on this one
            }
        }
        resp.insert_header(CACHE_HEADER, result)
    }

    /// Each response chunk as the client receives it (this stage runs last).
    pub fn response_body_filter(&self, chunk: Option<&Bytes>, end: bool, st: &mut CacheState) {
        let Some(collect) = st.collect.as_mut() else {
            return;
        };
        let limit = self
            .cache
            .as_ref()
            .map_or(0, |c| c.config().max_entry_bytes);
        let over = match (collect, chunk) {
            (Collect::Whole(buf), Some(b)) => {
                buf.extend_from_slice(b);
                buf.len() > limit
            }
            (Collect::Sse(sse), Some(b)) => {
                sse.push(b);
                sse.over_limit()
            }
            (_, None) => false,
        };
        if over {
            // Too large to store: identical requests waiting on it go upstream themselves.
            st.collect = None;
            st.fill = None;
        }
        st.ended |= end;
    }

    /// The request is over: stores a cleanly finished 200 (in a spawned task); anything else
    /// drops the fill. Sets the access log's `cache` field.
    pub fn logging(&self, failed: bool, status: u16, st: &mut CacheState) -> Option<&'static str> {
        let fill = st.fill.take();
        let (Some(cache), Some(fill), Some(collect), Some(headers)) = (
            self.cache.as_ref(),
            fill,
            st.collect.take(),
            st.headers.take(),
        ) else {
            return st.result;
        };
        if failed || status != 200 || !st.ended {
            return st.result;
        }
        let body = match collect {
            Collect::Whole(buf) => Body::Whole(buf.freeze()),
            Collect::Sse(sse) => match sse.finish() {
                Some(events) => Body::Events(events),
                None => return st.result, // cut before `data: [DONE]`
            },
        };
        let cache = Arc::clone(cache);
        tokio::spawn(async move {
            cache.complete(fill, 200, &headers, body).await;
        });
        st.result
    }
}

/// Writes a stored response: status, stored headers and `X-Arkgate-Cache: hit`; a stream event
/// by event, each flushed.
async fn write_hit(
    session: &mut Session,
    entry: &Entry,
    extra: Vec<(&'static str, String)>,
) -> Result<()> {
    let mut resp =
        ResponseHeader::build(entry.status, Some(entry.headers.len() + extra.len() + 2))?;
    for (name, value) in &entry.headers {
        resp.append_header(name.clone(), value.clone())?;
    }
    for (name, value) in extra {
        resp.insert_header(name, value)?;
    }
    resp.insert_header(CACHE_HEADER, HIT)?;
    match &entry.body {
        Body::Whole(bytes) => {
            resp.insert_header(header::CONTENT_LENGTH, bytes.len())?;
            session.write_response_header(Box::new(resp), false).await?;
            session.write_response_body(Some(bytes.clone()), true).await
        }
        Body::Events(events) => {
            if !session.is_http2() {
                // Chunked on HTTP/1.1: every chunk is flushed as it is written.
                resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
            }
            session.write_response_header(Box::new(resp), false).await?;
            for event in events {
                session
                    .write_response_body(Some(event.clone()), false)
                    .await?;
            }
            session.write_response_body(None, true).await
        }
    }
}

/// The endpoints the cache may answer (also under a prefix such as `/api/v3`).
fn is_cache_path(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    ["/chat/completions", "/completions", "/embeddings"]
        .iter()
        .any(|p| path.ends_with(p))
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| memchr::memmem::find(v.as_bytes(), b"text/event-stream").is_some())
}

/// The request's `Cache-Control` directives the cache obeys.
#[derive(Debug, Default, PartialEq, Eq)]
struct CacheControl {
    no_cache: bool,
    no_store: bool,
}

impl CacheControl {
    fn of(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        let tokens = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        for t in tokens {
            cc.no_cache |= t.eq_ignore_ascii_case("no-cache");
            cc.no_store |= t.eq_ignore_ascii_case("no-store");
        }
        cc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_match_by_their_last_segments() {
        assert!(is_cache_path("/chat/completions"));
        assert!(is_cache_path("/api/v3/chat/completions/"));
        assert!(is_cache_path("/v1/completions"));
        assert!(is_cache_path("/api/v3/embeddings"));
        assert!(!is_cache_path("/models"));
    }

    #[test]
    fn cache_control_directives() {
        let mut h = HeaderMap::new();
        assert_eq!(CacheControl::of(&h), CacheControl::default());
        h.append(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        h.append(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert_eq!(
            CacheControl::of(&h),
            CacheControl {
                no_cache: true,
                no_store: true
            }
        );
    }
}
