//! Request-time errors and the one place where an error becomes an HTTP response.
//!
//! Every failure the proxy answers itself goes through [`classify`]: the status, the OpenAI-style
//! JSON body (`{"error": {"message", "type", "code"}}`) and the counter it moves. Stages return
//! typed errors (the `ErrorType` constants below); [`respond`] is the only writer of the JSON
//! error response, called from `fail_to_proxy`. Messages are fixed strings chosen here, so no
//! internal detail (addresses, OS errors) reaches a client.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType};

use crate::metrics::METRICS;

/// The request body is larger than `limits.max_body_bytes`.
pub const BODY_TOO_LARGE: ErrorType = ErrorType::Custom("BodyTooLarge");
/// The request ran past `upstream.total_timeout_ms`.
pub const DEADLINE_EXCEEDED: ErrorType = ErrorType::Custom("DeadlineExceeded");
/// DNS has not produced any address for the upstream host (yet).
pub const NO_UPSTREAM_ADDRESS: ErrorType = ErrorType::Custom("NoUpstreamAddress");
/// An endpoint answered a status in `upstream.failover_on`: the request goes to another one.
/// Retried by Pingora; it reaches a client only if the retry budget runs out.
pub const UPSTREAM_FAILOVER: ErrorType = ErrorType::Custom("UpstreamFailover");
/// Every endpoint is skipped, open or down: 503 with `Retry-After`.
pub const NO_ENDPOINT_AVAILABLE: ErrorType = ErrorType::Custom("NoEndpointAvailable");
/// The request has more header fields or header bytes than `downstream.max_headers` /
/// `downstream.max_header_bytes` allow.
pub const HEADERS_TOO_LARGE: ErrorType = ErrorType::HTTPStatus(431);
/// The request's `Content-Length` is not a number.
pub const BAD_CONTENT_LENGTH: ErrorType = ErrorType::HTTPStatus(400);
/// A stage refused the request with a [`Reply`] of its own (see [`refuse`]).
pub const REFUSED: ErrorType = ErrorType::Custom("Refused");

/// Which failure counter an error moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    ConnectionTimeout,
    ReadTimeout,
    ConnectFailed,
    UpstreamBroken,
    BadRequest,
    BodyTooLarge,
    ClientGone,
    Unexpected,
    /// No client key, or one that matches no entry (401).
    Unauthorized,
    /// Over a request, token or daily limit (429).
    RateLimited,
    /// A content policy blocked the request (400).
    PolicyBlocked,
    /// The limit store (Redis) could not be asked and `on_store_error: deny` (503).
    LimitStoreDown,
}

/// What the client is told about an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status; 0 when nothing can or should be written (the client went away).
    pub status: u16,
    pub kind: &'static str,
    pub code: &'static str,
    /// Fixed for the proxy's own failures; a refusing stage may name what refused (a policy's
    /// name), never what was matched or a credential.
    pub message: Cow<'static, str>,
    /// Extra response fields (`x-ratelimit-*`); `Retry-After` comes from `respond`'s argument.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub failure: Failure,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for Reply {}

/// A stage's refusal: the error that makes `fail_to_proxy` answer with `reply` as it is.
pub fn refuse(reply: Reply) -> Box<Error> {
    Error::create(
        REFUSED,
        ErrorSource::Downstream,
        None,
        Some(Box::new(reply)),
    )
}

/// A refusal's reply: the status, code and fields a stage chose.
pub fn refusal(
    status: u16,
    kind: &'static str,
    code: &'static str,
    message: impl Into<Cow<'static, str>>,
    failure: Failure,
) -> Reply {
    Reply {
        status,
        kind,
        code,
        message: message.into(),
        headers: Vec::new(),
        failure,
    }
}

const fn reply(
    status: u16,
    kind: &'static str,
    code: &'static str,
    message: &'static str,
    failure: Failure,
) -> Reply {
    Reply {
        status,
        kind,
        code,
        message: Cow::Borrowed(message),
        headers: Vec::new(),
        failure,
    }
}

const INVALID: &str = "invalid_request_error";
const PROXY: &str = "proxy_error";

const BODY_TOO_LARGE_REPLY: Reply = reply(
    413,
    INVALID,
    "body_too_large",
    "request body exceeds the configured limit",
    Failure::BodyTooLarge,
);
const HEADERS_TOO_LARGE_REPLY: Reply = reply(
    431,
    INVALID,
    "headers_too_large",
    "request headers are too large",
    Failure::BadRequest,
);
const DEADLINE_REPLY: Reply = reply(
    504,
    PROXY,
    "upstream_timeout",
    "the request exceeded its total time limit",
    Failure::ReadTimeout,
);
const NO_ADDRESS_REPLY: Reply = reply(
    502,
    PROXY,
    "upstream_unreachable",
    "the upstream host could not be resolved",
    Failure::ConnectFailed,
);
const UNAVAILABLE_REPLY: Reply = reply(
    503,
    PROXY,
    "upstream_unavailable",
    "no upstream endpoint is available; retry later",
    Failure::ConnectFailed,
);
const CONNECT_TIMEOUT_REPLY: Reply = reply(
    504,
    PROXY,
    "upstream_connect_timeout",
    "timed out connecting to the upstream",
    Failure::ConnectionTimeout,
);
const READ_TIMEOUT_REPLY: Reply = reply(
    504,
    PROXY,
    "upstream_timeout",
    "the upstream did not answer in time",
    Failure::ReadTimeout,
);
const CONNECT_FAILED_REPLY: Reply = reply(
    502,
    PROXY,
    "upstream_connect_failed",
    "could not connect to the upstream",
    Failure::ConnectFailed,
);
const CLIENT_GONE_REPLY: Reply = reply(
    0,
    PROXY,
    "client_closed",
    "the client closed the connection",
    Failure::ClientGone,
);
const MALFORMED_REPLY: Reply = reply(
    400,
    INVALID,
    "bad_request",
    "the request is malformed",
    Failure::BadRequest,
);
const UPSTREAM_BROKEN_REPLY: Reply = reply(
    502,
    PROXY,
    "upstream_error",
    "the upstream connection failed",
    Failure::UpstreamBroken,
);
const INTERNAL_REPLY: Reply = reply(
    500,
    PROXY,
    "internal_error",
    "internal proxy error",
    Failure::Unexpected,
);

/// The reply of a refusal. Pingora wraps an error a hook returns once the upstream request has
/// begun (`request_body_filter`) in one of its own, with the peer as context: look through it.
fn refused_reply(e: &Error) -> Option<&Reply> {
    let cause = e.cause.as_ref()?;
    if let Some(reply) = cause.downcast_ref::<Reply>() {
        return Some(reply);
    }
    let inner = cause
        .downcast_ref::<Error>()
        .or_else(|| cause.downcast_ref::<Box<Error>>().map(|b| &**b))?;
    (*inner.etype() == REFUSED)
        .then(|| refused_reply(inner))
        .flatten()
}

/// Maps an error to the response the client gets. The single source of truth for statuses.
pub fn classify(e: &Error) -> Reply {
    use ErrorType::*;
    let etype = e.etype();
    if *etype == REFUSED {
        if let Some(reply) = refused_reply(e) {
            return reply.clone();
        }
    }
    match etype {
        _ if *etype == BODY_TOO_LARGE => return BODY_TOO_LARGE_REPLY,
        _ if *etype == DEADLINE_EXCEEDED => return DEADLINE_REPLY,
        _ if *etype == NO_UPSTREAM_ADDRESS => return NO_ADDRESS_REPLY,
        _ if *etype == NO_ENDPOINT_AVAILABLE || *etype == UPSTREAM_FAILOVER => {
            return UNAVAILABLE_REPLY
        }
        _ => {}
    }
    match (etype, e.esource()) {
        (HTTPStatus(413), _) => BODY_TOO_LARGE_REPLY,
        (HTTPStatus(431), _) => HEADERS_TOO_LARGE_REPLY,
        (HTTPStatus(code), _) if (400..500).contains(code) => reply(
            *code,
            INVALID,
            "bad_request",
            "the request could not be processed",
            Failure::BadRequest,
        ),
        (ConnectTimedout | TLSHandshakeTimedout, _) => CONNECT_TIMEOUT_REPLY,
        (ReadTimedout | WriteTimedout, ErrorSource::Upstream) => READ_TIMEOUT_REPLY,
        (
            ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure | SocketError
            | BindError | TLSHandshakeFailure | InvalidCert | HandshakeError | TLSWantX509Lookup,
            _,
        ) => CONNECT_FAILED_REPLY,
        (
            ReadTimedout | WriteTimedout | ReadError | WriteError | ConnectionClosed,
            ErrorSource::Downstream,
        ) => CLIENT_GONE_REPLY,
        (_, ErrorSource::Downstream) => MALFORMED_REPLY,
        (_, ErrorSource::Upstream) => UPSTREAM_BROKEN_REPLY,
        _ => INTERNAL_REPLY,
    }
}

impl Failure {
    /// The label of `arkgate_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::ConnectionTimeout => "connection_timeout",
            Failure::ReadTimeout => "read_timeout",
            Failure::ConnectFailed => "connect_failed",
            Failure::UpstreamBroken => "upstream_broken",
            Failure::BadRequest => "bad_request",
            Failure::BodyTooLarge => "body_too_large",
            Failure::ClientGone => "client_gone",
            Failure::Unexpected => "unexpected",
            Failure::Unauthorized => "unauthorized",
            Failure::RateLimited => "rate_limited",
            Failure::PolicyBlocked => "policy_blocked",
            Failure::LimitStoreDown => "limit_store_unavailable",
        }
    }

    /// Moves this failure's counters. Called once per failed request, from `fail_to_proxy`.
    pub fn count(self) {
        let m = &METRICS;
        m.failures.with([self.as_str()]).inc();
        match self {
            Failure::ConnectionTimeout => m.connection_timeout.inc(),
            Failure::ReadTimeout => m.read_timeout.inc(),
            Failure::BodyTooLarge => m.body_too_large.inc(),
            Failure::Unexpected => m.unexpected_error.inc(),
            Failure::ConnectFailed
            | Failure::UpstreamBroken
            | Failure::BadRequest
            | Failure::ClientGone
            | Failure::Unauthorized
            | Failure::RateLimited
            | Failure::PolicyBlocked
            | Failure::LimitStoreDown => {}
        }
    }

    /// True for failures the client caused (its request was refused): not proxy errors.
    pub fn is_client_error(self) -> bool {
        matches!(
            self,
            Failure::BadRequest
                | Failure::BodyTooLarge
                | Failure::Unauthorized
                | Failure::RateLimited
                | Failure::PolicyBlocked
        )
    }
}

/// Writes `reply` as the JSON error response, unless a response has already started (a failure
/// mid-stream): then nothing is written and the connection is ended, so the client sees an
/// error instead of a clean but truncated body. `retry_after_s` adds a `Retry-After` header.
/// Returns the status written (0: none).
pub async fn respond(session: &mut Session, reply: &Reply, retry_after_s: Option<u64>) -> u16 {
    if reply.status == 0 {
        return 0;
    }
    if session
        .response_written()
        .is_some_and(|r| !r.status.is_informational())
    {
        return 0;
    }
    let body = reply.body();
    if let Ok(mut resp) = ResponseHeader::build(reply.status, Some(4)) {
        let _ = resp.insert_header(header::CONTENT_TYPE, "application/json");
        if let Some(secs) = retry_after_s {
            let _ = resp.insert_header(header::RETRY_AFTER, secs.to_string());
        }
        for (name, value) in &reply.headers {
            let _ = resp.append_header(name.clone(), value.clone());
        }
        let _ = resp.insert_header(header::CONTENT_LENGTH, body.len().to_string());
        let _ = session
            .as_downstream_mut()
            .write_error_response(resp, body)
            .await;
    }
    reply.status
}

impl Reply {
    /// The OpenAI-style JSON body. `kind` and `code` are fixed ASCII identifiers; the message
    /// is escaped as a JSON string.
    pub fn body(&self) -> Bytes {
        let message = serde_json::Value::from(self.message.as_ref()).to_string();
        Bytes::from(format!(
            r#"{{"error":{{"message":{message},"type":"{}","code":"{}"}}}}"#,
            self.kind, self.code
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(et: ErrorType, src: ErrorSource) -> u16 {
        let mut e = Error::new(et);
        e.esource = src;
        classify(&e).status
    }

    #[test]
    fn a_refusal_wrapped_by_pingora_keeps_its_reply() {
        let refused = refuse(refusal(
            400,
            "invalid_request_error",
            "content_policy_violation",
            "request blocked by content policy p",
            Failure::PolicyBlocked,
        ));
        let wrapped = Error::because(REFUSED, "peer addr: 127.0.0.1:1", refused);
        let reply = classify(&wrapped);
        assert_eq!(
            (reply.status, reply.code),
            (400, "content_policy_violation")
        );
    }

    #[test]
    fn error_table() {
        use ErrorSource::*;
        use ErrorType::*;
        assert_eq!(status_of(ConnectRefused, Upstream), 502);
        assert_eq!(status_of(TLSHandshakeFailure, Upstream), 502);
        assert_eq!(status_of(ConnectTimedout, Upstream), 504);
        assert_eq!(status_of(ReadTimedout, Upstream), 504);
        assert_eq!(status_of(ConnectionClosed, Upstream), 502);
        assert_eq!(status_of(InvalidHTTPHeader, Downstream), 400);
        assert_eq!(status_of(ReadError, Downstream), 0);
        assert_eq!(status_of(BODY_TOO_LARGE, Internal), 413);
        assert_eq!(status_of(HTTPStatus(413), Downstream), 413);
        assert_eq!(status_of(DEADLINE_EXCEEDED, Internal), 504);
        assert_eq!(status_of(InternalError, Internal), 500);
        assert_eq!(status_of(NO_UPSTREAM_ADDRESS, Internal), 502);
        assert_eq!(status_of(NO_ENDPOINT_AVAILABLE, Internal), 503);
        assert_eq!(status_of(UPSTREAM_FAILOVER, Upstream), 503);
    }

    #[test]
    fn body_is_openai_error_shape() {
        let r = classify(&Error::new(ErrorType::InternalError));
        let v: serde_json::Value = serde_json::from_slice(&r.body()).expect("json");
        assert_eq!(v["error"]["type"], "proxy_error");
        assert_eq!(v["error"]["code"], "internal_error");
        assert_eq!(v["error"]["message"], "internal proxy error");
    }

    #[test]
    fn a_refusal_keeps_its_reply() {
        let mut reply = refusal(
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
            "limit \"team-a\" reached",
            Failure::RateLimited,
        );
        reply.headers.push((
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderValue::from_static("10"),
        ));
        let got = classify(&refuse(reply.clone()));
        assert_eq!(got, reply);
        assert!(got.failure.is_client_error());
        let v: serde_json::Value = serde_json::from_slice(&got.body()).expect("json");
        assert_eq!(v["error"]["message"], "limit \"team-a\" reached");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    }
}
