//! The `ProxyHttp` implementation: one request's path through arkgate, as stages.
//!
//! Each hook calls the stages that take part in it, in order; each stage is a file that owns its
//! config (compiled at start) and its slice of [`RequestCtx`], and knows nothing of the others:
//! - `auth`: the client key (401 without a known one); the upstream key sent in its place;
//! - `client`: the client connection's timeouts and keep-alive (off while draining);
//! - `limits`: header and body limits (431, 400, 413);
//! - `body`: the body plan (stream, read ahead and replace, hold), structured output, byte rules
//!   on both bodies, re-framing;
//! - `retry`: attempts, endpoint and address choice, backoff, retry decisions, the total
//!   deadline, the warm-up pin;
//! - `failover`: a `failover_on` status goes to another endpoint before any byte reaches the
//!   client; every attempt's outcome feeds the endpoint's circuit breaker;
//! - `forwarded`: upstream target, `Host`, `X-Forwarded-*`, `Via`, hop-by-hop fields;
//! - `policy`: content policies (block, redact, flag) on the request body, JSON answers and
//!   SSE streams;
//! - `cache`: the response cache: lookup (a hit is answered here), collection, store;
//! - `ratelimit`: requests and tokens per minute and per day (429), `x-ratelimit-*`, the
//!   settlement against the real usage, cost;
//! - `observe`: request metrics;
//! - `access_log`: the sampled access line.
//!
//! Failures become responses in one place: `fail_to_proxy` → [`crate::error::classify`] →
//! [`crate::error::respond`].

mod access_log;
mod auth;
mod body;
mod cache;
mod client;
mod ctx;
mod failover;
mod forwarded;
mod limits;
mod observe;
mod policy;
mod ratelimit;
mod retry;
mod usage;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::protocols::Digest;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;

use crate::config::Config;
use crate::error::{self, classify};
use crate::metrics::METRICS;
use crate::shared::Shared;

pub use ctx::RequestCtx;

/// The proxy: every stage, compiled from the configuration at start.
pub struct Gateway {
    auth: auth::Auth,
    rate_limits: ratelimit::RateLimits,
    client: client::ClientPolicy,
    limits: limits::Limits,
    body: body::Bodies,
    retry: retry::Retries,
    failover: failover::Failover,
    forwarded: forwarded::Forwarding,
    usage: usage::UsageStage,
    cache: cache::CacheStage,
    policy: policy::PolicyStage,
    access_log: access_log::AccessLog,
}

impl Gateway {
    /// Builds the proxy (one for every listener: whether a client connection is TLS is read
    /// from the connection itself).
    pub fn new(cfg: Arc<Config>, shared: &Shared) -> Gateway {
        let (upstreams, drain) = (shared.upstreams.clone(), shared.drain.clone());
        let cache = cache::CacheStage::new(&cfg, shared);
        let policy = policy::PolicyStage::new(&cfg);
        let whole = usage::UsageStage::new(&cfg).needs_whole_body() || cache.enabled();
        Gateway {
            auth: auth::Auth::new(shared),
            rate_limits: ratelimit::RateLimits::new(&cfg, shared),
            client: client::ClientPolicy::new(&cfg, drain),
            limits: limits::Limits::new(&cfg),
            body: body::Bodies::new(&cfg, whole, policy.inspects_bodies()),
            cache,
            failover: failover::Failover::new(upstreams.clone(), cfg.upstream.max_retries),
            retry: retry::Retries::new(&cfg, upstreams),
            forwarded: forwarded::Forwarding::new(&cfg),
            usage: usage::UsageStage::new(&cfg),
            policy,
            access_log: access_log::AccessLog::new(&cfg),
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context inside every connection's request future, whose size a
    /// keep-alive connection pays while idle and which is moved into a fresh box per request.
    type CTX = Box<RequestCtx>;

    /// No downstream modules: arkgate compresses nothing for its clients, and Pingora's default
    /// (a compression module that is off) would still be built and called on every request.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> Box<RequestCtx> {
        METRICS.in_flight.inc();
        let timing = ctx::Timing::start();
        Box::new(RequestCtx {
            auth: auth::AuthState::default(),
            limit: ratelimit::LimitState::default(),
            attempt: self.retry.new_state(timing.started),
            body: body::BodyState::default(),
            log: self.access_log.new_state(),
            usage: usage::UsageState::default(),
            cache: cache::CacheState::default(),
            policy: policy::PolicyState::default(),
            timing,
        })
    }

    /// Runs first for every request: the client key, the warm-up pin, client settings, limits,
    /// the body plan, the rate limits.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<bool> {
        self.auth
            .request_filter(session.req_header(), &mut ctx.auth)?;
        self.retry.request_filter(session, &mut ctx.attempt);
        self.client.request_filter(session);
        let content_length = self.limits.request_filter(session.req_header())?;
        self.body
            .request_filter(session, &mut ctx.body, content_length, &self.limits)
            .await?;
        let path = session.req_header().uri.path();
        self.usage
            .request_filter(path, &mut ctx.body, &mut ctx.usage);
        self.policy.request_filter(&mut ctx.body, &mut ctx.policy)?;
        let (auth, body, limit) = (&ctx.auth, &ctx.body, &mut ctx.limit);
        self.rate_limits
            .request_filter(session, auth, body, content_length, limit, &mut ctx.attempt)
            .await?;
        let hit_headers = || self.rate_limits.headers(&ctx.limit);
        self.cache
            .request_filter(session, &ctx.body, hit_headers, &mut ctx.cache)
            .await
    }

    /// Once per attempt: picks an endpoint and address; backs off before a retry.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<Box<HttpPeer>> {
        self.body.new_attempt(&mut ctx.body);
        self.retry.upstream_peer(&mut ctx.attempt).await
    }

    /// Nothing was sent: always safe to retry (on another endpoint), up to
    /// `upstream.max_retries`.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Box<RequestCtx>,
        e: Box<Error>,
    ) -> Box<Error> {
        self.retry.fail_to_connect(&mut ctx.attempt, e)
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        self.retry.connected(&mut ctx.attempt, reused);
        Ok(())
    }

    /// The request line and headers as they leave for the upstream.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        self.forwarded
            .upstream_request_filter(session, req, ctx.attempt.endpoint())?;
        self.body.upstream_request_filter(req, &ctx.body)?;
        self.auth.upstream_request_filter(req)?;
        self.policy.upstream_request_filter(req)?;
        ctx.timing.upstream_sent = Some(Instant::now());
        Ok(())
    }

    /// Each piece of the request body on its way upstream.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        self.retry.check_deadline(&ctx.attempt)?;
        self.body
            .request_body_filter(body, end_of_stream, &mut ctx.body, &self.limits)?;
        let path = session.req_header().uri.path();
        self.usage
            .request_body_filter(path, body, end_of_stream, &ctx.body, &mut ctx.usage);
        self.policy
            .request_body_filter(body, end_of_stream, &ctx.body, &mut ctx.policy)?;
        ctx.log.request_chunk(body.as_ref());
        Ok(())
    }

    /// The upstream's response header, before anything is written to the client: the last
    /// point where a failover status can still go to another endpoint.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        // Nothing has been written to the client yet: a late header still becomes a clean 504.
        self.retry.check_deadline(&ctx.attempt)?;
        ctx.timing
            .upstream_first_byte
            .get_or_insert_with(Instant::now);
        ctx.timing.upstream_status = Some(resp.status.as_u16());
        if resp.status.is_server_error() {
            METRICS.upstream_5xx.inc();
        }
        let replayable = ctx.body.replayable();
        self.failover
            .upstream_response_filter(session, resp, &mut ctx.attempt, replayable)
    }

    /// The response header on its way to the client.
    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        let from_upstream = ctx.timing.upstream_status.is_some();
        self.usage
            .response_filter(resp, from_upstream, &mut ctx.usage);
        let model = ctx.usage.model.as_deref();
        self.policy
            .response_filter(session, resp, model, from_upstream, &mut ctx.policy)?;
        self.body
            .response_filter(session, resp, &mut ctx.body, from_upstream)?;
        // The cache keeps the header as the upstream and the body stages made it, before the
        // fields that belong to this request alone (timing, rate-limit state).
        self.cache.response_filter(resp, &mut ctx.cache)?;
        observe::response_filter(resp, &ctx.timing)?;
        self.rate_limits.response_filter(resp, &ctx.limit)?;
        self.forwarded.response_filter(resp)
    }

    /// Each response chunk, forwarded as soon as it arrives (held back only for a split match).
    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<Option<Duration>> {
        self.retry.check_deadline(&ctx.attempt)?;
        if end_of_stream {
            ctx.timing.upstream_done = Some(Instant::now());
        }
        self.usage
            .response_body_filter(body, end_of_stream, &mut ctx.usage);
        self.policy
            .response_body_filter(session, body, end_of_stream, &mut ctx.policy);
        self.body
            .response_body_filter(body, end_of_stream, &mut ctx.body);
        ctx.log.response_chunk(body.as_ref());
        self.cache
            .response_body_filter(body.as_ref(), end_of_stream, &mut ctx.cache);
        Ok(None)
    }

    /// An HTTP/2 upstream that ends with trailers never sends a final body chunk: flush the
    /// held-back bytes here (they replace the trailers as the last body chunk).
    async fn response_trailer_filter(
        &self,
        session: &mut Session,
        _trailers: &mut http::HeaderMap,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<Option<Bytes>> {
        ctx.timing.upstream_done.get_or_insert_with(Instant::now);
        self.usage.finish(&mut ctx.usage);
        let mut tail = self
            .policy
            .response_trailer_filter(session, &mut ctx.policy);
        let tail = if tail.is_some() {
            // The policies' tail goes through the byte rules like any other chunk.
            self.body
                .response_body_filter(&mut tail, true, &mut ctx.body);
            tail.or_else(|| Some(Bytes::new()))
        } else {
            self.body.response_trailer_filter(&mut ctx.body)
        };
        // The trailers end the body: the cache sees its last bytes and its end here.
        self.cache
            .response_body_filter(tail.as_ref(), true, &mut ctx.cache);
        Ok(tail)
    }

    /// Failures after the request may have reached the upstream (see `retry`).
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Box<RequestCtx>,
        client_reused: bool,
    ) -> Box<Error> {
        let e = e.more_context(format!("peer {peer}"));
        let replayable = ctx.body.replayable();
        self.retry
            .error_while_proxy(session, &mut ctx.attempt, e, replayable, client_reused)
    }

    /// The one place a failure becomes a client response (see [`crate::error::classify`]).
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Box<RequestCtx>,
    ) -> FailToProxy {
        let reply = classify(e);
        reply.failure.count();
        FailToProxy {
            error_code: error::respond(session, &reply, ctx.attempt.retry_after_s).await,
            can_reuse_downstream: false,
        }
    }

    /// Refused requests (431, 413, …) are the client's doing: no error log line for them. Nor
    /// for a limit store that is down: the store logs that at most once a second.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Box<RequestCtx>, e: &Error) -> bool {
        let failure = classify(e).failure;
        failure.is_client_error() || failure == error::Failure::LimitStoreDown
    }

    /// A failover on a status is routine: no retry warning for it.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &Box<RequestCtx>,
        e: &Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        *e.etype() == error::UPSTREAM_FAILOVER
    }

    /// Always last: metrics and the (sampled) access line.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Box<RequestCtx>) {
        METRICS.in_flight.dec();
        let written = session.response_written().map(|r| r.status.as_u16());
        let status = match (written, e) {
            (Some(s), _) => s,
            (None, Some(err)) => classify(err).status,
            (None, None) => 0,
        };
        self.usage.finish(&mut ctx.usage);
        self.policy.logging(&mut ctx.policy);
        ctx.log.cache = self.cache.logging(e.is_some(), status, &mut ctx.cache);
        observe::request_done(ctx, status);
        let went_upstream = ctx.timing.upstream_status.is_some();
        let (auth, usage, limit) = (&ctx.auth, &ctx.usage, &mut ctx.limit);
        self.rate_limits
            .logging(auth, usage, status, went_upstream, limit)
            .await;
        self.access_log.logging(session, ctx, status, e);
    }

    /// Used in Pingora's own error log lines: method and path only (no query, no headers).
    fn request_summary(&self, session: &Session, _ctx: &Box<RequestCtx>) -> String {
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }
}
