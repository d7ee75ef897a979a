//! The `ProxyHttp` implementation: one request's path through arkgate.
//!
//! In hook order: [`Gateway::request_filter`] checks limits and, for JSON requests that may carry
//! a structured-output `response_format`, reads the (small) body to plan its rewrite;
//! [`Gateway::upstream_peer`] picks a resolved upstream address; [`Gateway::upstream_request_filter`]
//! maps the path onto the base URL, forces Host and fixes framing; [`Gateway::request_body_filter`]
//! streams the request body through the byte rules (or substitutes the planned body);
//! [`Gateway::response_filter`] and [`Gateway::response_body_filter`] do the same for the response,
//! chunk by chunk; [`Gateway::fail_to_proxy`] turns any failure into a JSON error via
//! [`crate::error::classify`]; [`Gateway::logging`] records metrics and the sampled access line.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::Method;
use log::{info, warn};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::Digest;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;

use crate::config::Config;
use crate::error::{self, classify, Failure};
use crate::lifecycle::DrainSignal;
use crate::metrics::METRICS;
use crate::transform::rewrite::Replacer;
use crate::transform::structured::{self, Mode};
use crate::upstream::UpstreamPool;

/// Bodies up to this size are read whole in `request_filter` when they may need a structured
/// rewrite, so the rewritten body goes out with an exact Content-Length. Equal to Pingora's retry
/// buffer, which replays them through `request_body_filter`.
const PREREAD_LIMIT_BYTES: u64 = 64 * 1024;

/// Longest pause between connect retries.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

static VIA: HeaderValue = HeaderValue::from_static("1.1 arkgate");
static IDENTITY: HeaderValue = HeaderValue::from_static("identity");
static NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
static NO: HeaderValue = HeaderValue::from_static("no");
static CHUNKED: HeaderValue = HeaderValue::from_static("chunked");
static HTTP: HeaderValue = HeaderValue::from_static("http");
static HTTPS: HeaderValue = HeaderValue::from_static("https");

/// The proxy: configuration compiled at start plus the shared upstream address pool.
pub struct Gateway {
    cfg: Arc<Config>,
    upstream: Arc<UpstreamPool>,
    drain: Arc<DrainSignal>,
    /// Whether this service's listeners are TLS (for `X-Forwarded-Proto`).
    tls_listener: bool,
    log_every: u64,
    log_counter: AtomicU64,
}

/// What happens to the request body.
#[derive(Debug, Default)]
enum BodyPlan {
    /// Forwarded as it streams in (through the request byte rules when they apply).
    #[default]
    Stream,
    /// Read whole in `request_filter` and already rewritten; substituted at the end of the body.
    Replace(Bytes),
    /// A large or chunked JSON body that may need a structured rewrite: held until complete,
    /// then rewritten; sent chunked because its final length is unknown when headers go out.
    Hold(BytesMut),
}

/// Per-request state. Created once per request; attempts (retries) reset what they replay.
pub struct RequestCtx {
    started: Instant,
    attempts: usize,
    reused: Option<bool>,
    upstream_sent: Option<Instant>,
    upstream_first_byte: Option<Instant>,
    upstream_done: Option<Instant>,
    upstream_status: Option<u16>,
    mode: Mode,
    plan: BodyPlan,
    request_rw: Option<Replacer>,
    response_rw: Option<Replacer>,
    body_in: u64,
    body_out: u64,
    sse: bool,
    deadline: Option<Instant>,
    /// The first bytes of each body, kept only with `logging.bodies: true`.
    request_sample: Option<BodySample>,
    response_sample: Option<BodySample>,
}

/// The first `limit` bytes of a body, for the access log.
struct BodySample {
    bytes: Vec<u8>,
    limit: usize,
}

impl BodySample {
    fn new(limit: usize) -> BodySample {
        BodySample {
            bytes: Vec::new(),
            limit,
        }
    }

    fn record(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        self.bytes
            .extend_from_slice(&chunk[..room.min(chunk.len())]);
    }
}

impl std::fmt::Display for BodySample {
    /// Quoted, with control and non-UTF-8 bytes escaped, so a body cannot forge log lines.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.bytes.escape_ascii())
    }
}

impl Gateway {
    /// Builds the proxy for one listening service.
    pub fn new(
        cfg: Arc<Config>,
        upstream: Arc<UpstreamPool>,
        drain: Arc<DrainSignal>,
        tls_listener: bool,
    ) -> Gateway {
        let rate = cfg.logging.sample_rate;
        let log_every = if rate <= 0.0 {
            0
        } else {
            (1.0 / rate).round().max(1.0) as u64
        };
        Gateway {
            cfg,
            upstream,
            drain,
            tls_listener,
            log_every,
            log_counter: AtomicU64::new(0),
        }
    }

    fn over_limit(&self, n: u64) -> bool {
        let max = self.cfg.limits.max_body_bytes;
        max != 0 && n > max
    }

    /// A request that may carry `response_format: json_schema`: a JSON POST with a body.
    fn is_structured_candidate(&self, req: &RequestHeader) -> bool {
        if req.method != Method::POST || req.headers.contains_key(header::CONTENT_ENCODING) {
            return false;
        }
        match req.headers.get(header::CONTENT_TYPE) {
            None => true,
            Some(ct) => memchr::memmem::find(ct.as_bytes(), b"json").is_some(),
        }
    }

    /// Decides the mode for a complete JSON body and returns the bytes to send.
    fn plan_json_body(&self, body: Bytes, ctx: &mut RequestCtx) -> Bytes {
        let policy = &self.cfg.structured;
        let mentions = structured::mentions_json_schema(&body);
        let inspection = if mentions || policy.has_model_rules() {
            match structured::inspect(&body) {
                Ok(i) => Some(i),
                Err(skip) => {
                    if mentions {
                        METRICS.structured_skipped.inc();
                        info!("structured output left untouched: {}", skip.as_str());
                    }
                    None
                }
            }
        } else {
            None
        };
        let model = inspection.as_ref().and_then(|i| i.model.as_deref());
        ctx.mode = policy.mode_for(model);
        match ctx.mode {
            Mode::Passthrough => body,
            Mode::Bytes => {
                let rules = &self.cfg.request_rules;
                if rules.is_empty() {
                    return body;
                }
                rewrite_chunk(&mut Replacer::new(rules.clone()), Some(body), true)
            }
            Mode::Downgrade => match inspection.map(|i| i.downgrade()) {
                Some(Ok(v)) => {
                    METRICS.structured_downgraded.inc();
                    Bytes::from(v)
                }
                Some(Err(structured::Skip::NoJsonSchema)) | None => body,
                Some(Err(skip)) => {
                    METRICS.structured_skipped.inc();
                    info!("structured output left untouched: {}", skip.as_str());
                    body
                }
            },
        }
    }

    /// Writes a JSON error response directly (used before anything went upstream).
    async fn respond(&self, session: &mut Session, reply: error::Reply) -> Result<()> {
        let body = reply.body();
        let mut resp = ResponseHeader::build(reply.status, Some(3))?;
        resp.insert_header(header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    /// The request body plan applied to one chunk (see [`BodyPlan`]).
    fn filter_request_chunk(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.check_deadline(ctx)?;
        match &mut ctx.plan {
            BodyPlan::Replace(planned) => {
                // The raw body is replayed from the retry buffer; send the planned one instead.
                *body = Some(if end_of_stream {
                    planned.clone()
                } else {
                    Bytes::new()
                });
                return Ok(());
            }
            BodyPlan::Hold(buf) => {
                if let Some(chunk) = body.take() {
                    ctx.body_in += chunk.len() as u64;
                    buf.extend_from_slice(&chunk);
                }
                if self.over_limit(buf.len() as u64) {
                    METRICS.body_too_large.inc();
                    return Error::e_explain(error::BODY_TOO_LARGE, "body over limit");
                }
                if !end_of_stream {
                    // Never `None` mid-stream: Pingora would take it as the end of the body.
                    *body = Some(Bytes::new());
                    return Ok(());
                }
                let whole = std::mem::take(buf).freeze();
                let planned = self.plan_json_body(whole, ctx);
                *body = Some(planned);
                return Ok(());
            }
            BodyPlan::Stream => {}
        }
        if let Some(chunk) = body.as_ref() {
            ctx.body_in += chunk.len() as u64;
            if self.over_limit(ctx.body_in) {
                METRICS.body_too_large.inc();
                return Error::e_explain(error::BODY_TOO_LARGE, "body over limit");
            }
        }
        if let Some(rw) = ctx.request_rw.as_mut() {
            let out = rewrite_chunk(rw, body.take(), end_of_stream);
            *body = if out.is_empty() && end_of_stream {
                None
            } else {
                Some(out)
            };
        }
        Ok(())
    }

    fn check_deadline(&self, ctx: &RequestCtx) -> Result<()> {
        match ctx.deadline {
            Some(d) if Instant::now() > d => {
                Error::e_explain(error::DEADLINE_EXCEEDED, "total request deadline")
            }
            _ => Ok(()),
        }
    }

    /// `X-Forwarded-For` (appended to only for a trusted peer), `X-Forwarded-Proto`, `X-Real-IP`.
    /// Names are title-case literals: Pingora keeps them as given, without copying.
    fn set_forwarded_headers(&self, session: &Session, req: &mut RequestHeader) -> Result<()> {
        let Some(client) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        else {
            return Ok(());
        };
        let trusted = self.is_trusted(client);
        let ip = HeaderValue::try_from(client.to_string())
            .or_err(ErrorType::InternalError, "client address")?;
        let xff = if trusted && req.headers.contains_key("x-forwarded-for") {
            // Several field lines are one list (RFC 9110 §5.3): keep every hop a trusted peer sent.
            let mut list = Vec::new();
            for v in req.headers.get_all("x-forwarded-for") {
                list.extend_from_slice(v.as_bytes());
                list.extend_from_slice(b", ");
            }
            list.extend_from_slice(ip.as_bytes());
            HeaderValue::from_bytes(&list).or_err(ErrorType::InternalError, "forwarded-for")?
        } else {
            ip.clone()
        };
        req.insert_header("X-Forwarded-For", xff)?;
        if !(trusted && req.headers.contains_key("x-forwarded-proto")) {
            let proto = if self.tls_listener { &HTTPS } else { &HTTP };
            req.insert_header("X-Forwarded-Proto", proto.clone())?;
        }
        if !(trusted && req.headers.contains_key("x-real-ip")) {
            req.insert_header("X-Real-IP", ip)?;
        }
        Ok(())
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.cfg
            .forwarded
            .trusted_proxies
            .iter()
            .any(|c| c.contains(ip))
    }

    fn should_log(&self, status: u16, failed: bool) -> bool {
        if failed || status >= 500 || status == 0 {
            return true;
        }
        self.log_every != 0
            && self
                .log_counter
                .fetch_add(1, Relaxed)
                .is_multiple_of(self.log_every)
    }
}

/// `base_path` + the request's path and query, byte for byte, with exactly one slash between.
fn upstream_target(base_path: &str, raw: &[u8]) -> Vec<u8> {
    let mut target = Vec::with_capacity(base_path.len() + raw.len() + 1);
    target.extend_from_slice(base_path.as_bytes());
    match raw.first() {
        Some(b'/') => target.extend_from_slice(raw),
        Some(b'*') | None => target.push(b'/'),
        Some(_) => {
            target.push(b'/');
            target.extend_from_slice(raw);
        }
    }
    target
}

/// The request target as the client sent it: origin-form bytes, or the path and query of an
/// absolute-form / HTTP/2 URI.
fn client_target(req: &RequestHeader) -> &[u8] {
    let raw = req.raw_path();
    if raw.first() == Some(&b'/') {
        return raw;
    }
    req.uri
        .path_and_query()
        .map_or(b"/", |pq| pq.as_str().as_bytes())
}

/// Feeds one chunk (None: no bytes, only the end flag) and counts what was replaced.
fn rewrite_chunk(rw: &mut Replacer, chunk: Option<Bytes>, end: bool) -> Bytes {
    let (replacements, matched) = (rw.replacements(), rw.matched_bytes());
    let out = rw.push(chunk.unwrap_or_default(), end);
    METRICS.replacements.add(rw.replacements() - replacements);
    METRICS.bytes_rewritten.add(rw.matched_bytes() - matched);
    out
}

/// Drops the upstream's connection-specific fields: those its `Connection` header names, and the
/// standard hop-by-hop ones (RFC 9110 §7.6.1). Pingora frames the client connection itself.
fn remove_hop_by_hop(resp: &mut ResponseHeader) {
    let named: Vec<http::HeaderName> = resp
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        resp.remove_header(&name);
    }
    for name in ["keep-alive", "proxy-connection", "connection"] {
        resp.remove_header(name);
    }
}

/// True when a body is sent with a content coding (gzip, br, …): byte rules cannot apply to it.
fn is_encoded(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        METRICS.in_flight.inc();
        let started = Instant::now();
        RequestCtx {
            started,
            attempts: 0,
            reused: None,
            upstream_sent: None,
            upstream_first_byte: None,
            upstream_done: None,
            upstream_status: None,
            mode: Mode::Bytes,
            plan: BodyPlan::Stream,
            request_rw: None,
            response_rw: None,
            body_in: 0,
            body_out: 0,
            sse: false,
            deadline: self.cfg.upstream.total_timeout.map(|t| started + t),
            request_sample: self
                .cfg
                .logging
                .bodies
                .then(|| BodySample::new(self.cfg.logging.body_max_bytes)),
            response_sample: self
                .cfg
                .logging
                .bodies
                .then(|| BodySample::new(self.cfg.logging.body_max_bytes)),
        }
    }

    /// Runs first for every request: client timeouts, the body limit, and the body plan.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let down = &self.cfg.downstream;
        session.set_read_timeout(Some(down.client_timeout));
        session.set_write_timeout(Some(down.client_timeout));
        // Only the idle timeout is ours to choose. Keep-alive that Pingora already turned off (the
        // client asked to close, HTTP/1.0, or the request arrived after shutdown began) stays
        // off: re-enabling it during a drain would keep clients on a connection that is dropped
        // when the drain ends. Once draining, answer with `Connection: close` so clients move
        // to the new process while both still accept.
        if session.get_keepalive().is_some() {
            let keep = down.keepalive_timeout.as_secs();
            let keep = (keep > 0 && !self.drain.is_draining()).then_some(keep);
            session.set_keepalive(keep);
        }

        let headers = &session.req_header().headers;
        let header_bytes: usize = headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if headers.len() > down.max_headers || header_bytes > down.max_header_bytes {
            self.respond(session, classify(&Error::new(ErrorType::HTTPStatus(431))))
                .await?;
            return Ok(true);
        }

        let content_length = match session.req_header().headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) => Some(n),
                None => {
                    let reply = classify(&Error::new(ErrorType::HTTPStatus(400)));
                    self.respond(session, reply).await?;
                    return Ok(true);
                }
            },
        };
        if content_length.is_some_and(|n| self.over_limit(n)) {
            METRICS.body_too_large.inc();
            self.respond(session, classify(&Error::new(error::BODY_TOO_LARGE)))
                .await?;
            return Ok(true);
        }

        let policy = &self.cfg.structured;
        let has_body = !session.as_downstream_mut().is_body_empty();
        if !policy.inspects_bodies()
            || !has_body
            || !self.is_structured_candidate(session.req_header())
        {
            ctx.mode = policy.mode_for(None);
            // A byte rule cannot see through a compressed body: leave it as it is.
            let encoded = is_encoded(&session.req_header().headers);
            if ctx.mode == Mode::Bytes && !self.cfg.request_rules.is_empty() && !encoded {
                ctx.request_rw = Some(Replacer::new(self.cfg.request_rules.clone()));
            }
            return Ok(false);
        }
        match content_length {
            Some(n) if n <= PREREAD_LIMIT_BYTES => {
                // Read the whole body now so the rewritten body gets an exact Content-Length.
                // Pingora's retry buffer keeps the raw bytes and replays them (with end of
                // stream) through request_body_filter, where the planned body is substituted.
                session.as_downstream_mut().enable_retry_buffering();
                if session.req_header().headers.contains_key(header::EXPECT) {
                    // The client waits for an invitation before sending the body we read here.
                    session
                        .as_downstream_mut()
                        .write_continue_response()
                        .await?;
                }
                let mut buf = BytesMut::with_capacity(n as usize);
                while let Some(chunk) = session.read_request_body().await? {
                    buf.extend_from_slice(&chunk);
                    if self.over_limit(buf.len() as u64) {
                        METRICS.body_too_large.inc();
                        return Error::e_explain(error::BODY_TOO_LARGE, "body over limit");
                    }
                }
                ctx.body_in = buf.len() as u64;
                let planned = self.plan_json_body(buf.freeze(), ctx);
                ctx.plan = BodyPlan::Replace(planned);
            }
            _ => ctx.plan = BodyPlan::Hold(BytesMut::new()),
        }
        Ok(false)
    }

    /// Once per attempt: picks an upstream address; backs off before a retry.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        if ctx.attempts > 0 {
            METRICS.retries.inc();
            let backoff = Duration::from_millis(10 << ctx.attempts.min(5)).min(MAX_BACKOFF);
            tokio::time::sleep(backoff).await;
        }
        let attempt = ctx.attempts;
        ctx.attempts += 1;
        // A retry replays the raw body from the start: forget what the last attempt held.
        if let Some(rw) = ctx.request_rw.as_mut() {
            rw.reset();
        }
        if let BodyPlan::Hold(buf) = &mut ctx.plan {
            buf.clear();
        }
        let mut peer = self.upstream.peer(attempt).ok_or_else(|| {
            Error::explain(error::NO_UPSTREAM_ADDRESS, "no resolved upstream address")
        })?;
        if let Some(deadline) = ctx.deadline {
            // Let the wait for the response header end at the deadline, not a read timeout later.
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or(Duration::from_millis(1));
            let o = &mut peer.options;
            o.read_timeout = o.read_timeout.map(|t| t.min(left)).or(Some(left));
        }
        Ok(peer)
    }

    /// Nothing was sent: always safe to retry, up to `upstream.max_retries`.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        METRICS.upstream_connect_failures.inc();
        // One budget for the whole request: attempts so far, whatever made them retry.
        if ctx.attempts <= self.cfg.upstream.max_retries {
            e.set_retry(true);
        } else {
            if self.cfg.upstream.max_retries > 0 {
                METRICS.retry_exhausted.inc();
            }
            e.set_retry(false);
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.reused = Some(reused);
        if reused {
            METRICS.upstream_connections_reused.inc();
        } else {
            METRICS.upstream_connections_new.inc();
        }
        Ok(())
    }

    /// The request line and headers as they leave for the upstream.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let up = &self.cfg.upstream;
        let target = upstream_target(&up.base_path, client_target(session.req_header()));
        let uri =
            http::Uri::try_from(target).or_err(ErrorType::InvalidHTTPHeader, "request target")?;
        req.set_uri(uri);
        req.insert_header(header::HOST, up.host_header.clone())?;
        req.remove_header("proxy-connection");
        self.set_forwarded_headers(session, req)?;

        let rewrites_responses = ctx.mode == Mode::Bytes && !self.cfg.response_rules.is_empty();
        let may_rewrite_responses = rewrites_responses
            || matches!(ctx.plan, BodyPlan::Hold(_)) && self.cfg.structured.has_bytes_mode();
        if may_rewrite_responses {
            // A byte rule cannot see through compression: ask for the body as is.
            req.insert_header("Accept-Encoding", IDENTITY.clone())?;
        }
        match &ctx.plan {
            BodyPlan::Replace(body) => {
                // The body was already read (after answering any `Expect` ourselves).
                req.remove_header(&header::EXPECT);
                req.remove_header(&header::TRANSFER_ENCODING);
                req.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
            }
            BodyPlan::Hold(_) => {
                // The final length is known only at the end: re-framed as chunked on HTTP/1.1.
                req.remove_header(&header::CONTENT_LENGTH);
            }
            BodyPlan::Stream => {
                if ctx
                    .request_rw
                    .as_ref()
                    .is_some_and(|_| self.cfg.request_rules.changes_length())
                {
                    req.remove_header(&header::CONTENT_LENGTH);
                }
            }
        }
        ctx.upstream_sent = Some(Instant::now());
        Ok(())
    }

    /// Each piece of the request body on its way upstream.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.filter_request_chunk(body, end_of_stream, ctx)?;
        if let (Some(sample), Some(b)) = (ctx.request_sample.as_mut(), body.as_ref()) {
            sample.record(b);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Nothing has been written to the client yet: a late header still becomes a clean 504.
        self.check_deadline(ctx)?;
        let now = Instant::now();
        ctx.upstream_first_byte.get_or_insert(now);
        ctx.upstream_status = Some(resp.status.as_u16());
        if resp.status.is_server_error() {
            METRICS.upstream_5xx.inc();
        }
        Ok(())
    }

    /// The response header on its way to the client: framing for rewritten bodies, SSE hints.
    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        remove_hop_by_hop(resp);
        let rules = &self.cfg.response_rules;
        let status = resp.status;
        // 1xx, 204 and 304 never have a body; a HEAD response describes the body a GET would get.
        let bodiless = status.is_informational()
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED;
        let head = session.req_header().method == Method::HEAD;
        let rewrite = ctx.mode == Mode::Bytes
            && !rules.is_empty()
            && !bodiless
            && !is_encoded(&resp.headers)
            && ctx.upstream_status.is_some();
        if rewrite {
            if !head {
                ctx.response_rw = Some(Replacer::new(rules.clone()));
            }
            if rules.changes_length() {
                // The rewritten length is unknown until the end: re-frame.
                resp.remove_header(&header::CONTENT_LENGTH);
                resp.remove_header(&header::ACCEPT_RANGES);
                if !head && !session.is_http2() {
                    resp.insert_header(header::TRANSFER_ENCODING, CHUNKED.clone())?;
                }
            }
            // The bytes may differ from what the upstream's strong validator describes.
            if let Some(etag) = resp.headers.get(header::ETAG) {
                if !etag.as_bytes().starts_with(b"W/") {
                    let mut weak = b"W/".to_vec();
                    weak.extend_from_slice(etag.as_bytes());
                    if let Ok(v) = HeaderValue::from_bytes(&weak) {
                        resp.insert_header(header::ETAG, v)?;
                    }
                }
            }
        }
        let is_sse = resp
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
        if is_sse {
            ctx.sse = true;
            resp.insert_header("x-accel-buffering", NO.clone())?;
            resp.insert_header(header::CACHE_CONTROL, NO_CACHE.clone())?;
        }
        if self.cfg.forwarded.via_header {
            resp.append_header("Via", VIA.clone())?;
        }
        Ok(())
    }

    /// Each response chunk, forwarded as soon as it arrives (held back only for a split match).
    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        self.check_deadline(ctx)?;
        if end_of_stream {
            ctx.upstream_done = Some(Instant::now());
        }
        if let Some(rw) = ctx.response_rw.as_mut() {
            let out = rewrite_chunk(rw, body.take(), end_of_stream);
            *body = if out.is_empty() { None } else { Some(out) };
        }
        if let Some(b) = body.as_ref() {
            ctx.body_out += b.len() as u64;
            if let Some(sample) = ctx.response_sample.as_mut() {
                sample.record(b);
            }
        }
        Ok(None)
    }

    /// An HTTP/2 upstream that ends with trailers never sends a final body chunk: flush the
    /// held-back bytes here (they replace the trailers as the last body chunk).
    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        _trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Bytes>> {
        ctx.upstream_done.get_or_insert_with(Instant::now);
        match ctx.response_rw.as_mut() {
            Some(rw) if rw.held() > 0 => {
                let tail = rewrite_chunk(rw, None, true);
                ctx.body_out += tail.len() as u64;
                Ok(Some(tail))
            }
            _ => Ok(None),
        }
    }

    /// Failures after the request may have reached the upstream: never retry a request that is
    /// not idempotent; an idempotent one only when a reused connection failed.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer {peer}"));
        let idempotent = session.req_header().method.is_idempotent();
        let replayable =
            !session.as_ref().retry_buffer_truncated() && !matches!(ctx.plan, BodyPlan::Hold(_));
        if idempotent
            && replayable
            && client_reused
            && ctx.attempts <= self.cfg.upstream.max_retries
        {
            e.retry.decide_reuse(client_reused);
        } else {
            e.set_retry(false);
        }
        e
    }

    /// The one place a failure becomes a client response (see [`crate::error::classify`]).
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let reply = classify(e);
        match reply.failure {
            Failure::ConnectionTimeout => METRICS.connection_timeout.inc(),
            Failure::ReadTimeout => METRICS.read_timeout.inc(),
            Failure::Unexpected => METRICS.unexpected_error.inc(),
            _ => {}
        }
        let mut status = reply.status;
        if status != 0 {
            if session
                .response_written()
                .is_some_and(|r| !r.status.is_informational())
            {
                // Mid-stream failure: the client already has a status; end the connection so it
                // sees an error instead of a clean but truncated body.
                status = 0;
            } else {
                let body = reply.body();
                if let Ok(mut resp) = ResponseHeader::build(reply.status, Some(3)) {
                    let _ = resp.insert_header(header::CONTENT_TYPE, "application/json");
                    let _ = resp.insert_header(header::CONTENT_LENGTH, body.len().to_string());
                    let _ = session
                        .as_downstream_mut()
                        .write_error_response(resp, body)
                        .await;
                }
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// Always last: metrics and the (sampled) access line. Never logs headers or bodies.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        METRICS.in_flight.dec();
        let total = ctx.started.elapsed();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let status = match (status, e) {
            (0, Some(err)) => classify(err).status,
            (s, _) => s,
        };
        METRICS.count_status(status);
        METRICS.total_time.observe(total);
        let upstream_wait = match (
            ctx.upstream_sent,
            ctx.upstream_done.or(ctx.upstream_first_byte),
        ) {
            (Some(sent), Some(done)) if done > sent => done - sent,
            _ => Duration::ZERO,
        };
        METRICS
            .overhead_time
            .observe(total.saturating_sub(upstream_wait));
        let ttfb = ctx.upstream_first_byte.map(|t| t - ctx.started);
        if let Some(t) = ttfb {
            METRICS.stream_first_byte.observe(t);
        }
        METRICS.bytes_in.add(ctx.body_in);
        METRICS.bytes_out.add(ctx.body_out);

        if !self.should_log(status, e.is_some()) {
            return;
        }
        let req = session.req_header();
        let path = req.uri.path();
        let query = if req.uri.query().is_some() {
            "?…"
        } else {
            ""
        };
        let line = format!(
            "{} {}{} status={} upstream_status={} in={} out={} total_ms={:.1} ttfb_ms={} retries={} reused={} mode={:?}{}",
            req.method,
            path,
            query,
            status,
            ctx.upstream_status.map_or("-".to_string(), |s| s.to_string()),
            ctx.body_in,
            ctx.body_out,
            total.as_secs_f64() * 1e3,
            ttfb.map_or("-".to_string(), |t| format!("{:.1}", t.as_secs_f64() * 1e3)),
            ctx.attempts.saturating_sub(1),
            ctx.reused.map_or("-", |r| if r { "yes" } else { "no" }),
            ctx.mode,
            e.map_or(String::new(), |err| format!(" error={}", err.etype().as_str())),
        );
        let line = match (&ctx.request_sample, &ctx.response_sample) {
            (Some(req), Some(resp)) => format!("{line} req_body={req} resp_body={resp}"),
            _ => line,
        };
        if e.is_some() || status >= 500 {
            warn!(target: "arkgate::access", "{line} [{}]", METRICS.failure_summary());
        } else {
            info!(target: "arkgate::access", "{line}");
        }
    }

    /// Used in Pingora's own error log lines: method and path only (no query, no headers).
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(base: &str, raw: &str) -> String {
        String::from_utf8(upstream_target(base, raw.as_bytes())).expect("utf8")
    }

    #[test]
    fn path_joins_with_one_slash() {
        assert_eq!(
            target("/api/v3", "/chat/completions"),
            "/api/v3/chat/completions"
        );
        assert_eq!(target("/api/v3", "/"), "/api/v3/");
        assert_eq!(target("", "/x"), "/x");
        assert_eq!(target("", "*"), "/");
        assert_eq!(target("/api/v3", "x"), "/api/v3/x");
    }

    #[test]
    fn query_is_kept_byte_for_byte() {
        assert_eq!(
            target("/api/v3", "/models?a=1&b=%2F&c=&d"),
            "/api/v3/models?a=1&b=%2F&c=&d"
        );
    }
}
