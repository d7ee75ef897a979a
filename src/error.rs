//! Request-time errors and the one place where an error becomes an HTTP response.
//!
//! Every failure the proxy answers itself goes through [`classify`]: the status, the OpenAI-style
//! JSON body (`{"error": {"message", "type", "code"}}`) and the counter it moves. Stages return
//! typed errors (the `ErrorType` constants below); [`respond`] is the only writer of the JSON
//! error response, called from `fail_to_proxy`. Messages are fixed strings chosen here, so no
//! internal detail (addresses, OS errors) reaches a client.

use bytes::Bytes;
use http::header;
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
/// The request has more header fields or header bytes than `downstream.max_headers` /
/// `downstream.max_header_bytes` allow.
pub const HEADERS_TOO_LARGE: ErrorType = ErrorType::HTTPStatus(431);
/// The request's `Content-Length` is not a number.
pub const BAD_CONTENT_LENGTH: ErrorType = ErrorType::HTTPStatus(400);

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
}

/// What the client is told about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status; 0 when nothing can or should be written (the client went away).
    pub status: u16,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: &'static str,
    pub failure: Failure,
}

/// Maps an error to the response the client gets. The single source of truth for statuses.
pub fn classify(e: &Error) -> Reply {
    use ErrorType::*;
    let etype = e.etype();
    let source = e.esource();
    let reply = |status, kind, code, message, failure| Reply {
        status,
        kind,
        code,
        message,
        failure,
    };
    if *etype == BODY_TOO_LARGE {
        return reply(
            413,
            "invalid_request_error",
            "body_too_large",
            "request body exceeds the configured limit",
            Failure::BodyTooLarge,
        );
    }
    if *etype == DEADLINE_EXCEEDED {
        return reply(
            504,
            "proxy_error",
            "upstream_timeout",
            "the request exceeded its total time limit",
            Failure::ReadTimeout,
        );
    }
    if *etype == NO_UPSTREAM_ADDRESS {
        return reply(
            502,
            "proxy_error",
            "upstream_unreachable",
            "the upstream host could not be resolved",
            Failure::ConnectFailed,
        );
    }
    match (etype, source) {
        (HTTPStatus(413), _) => reply(
            413,
            "invalid_request_error",
            "body_too_large",
            "request body exceeds the configured limit",
            Failure::BodyTooLarge,
        ),
        (HTTPStatus(431), _) => reply(
            431,
            "invalid_request_error",
            "headers_too_large",
            "request headers are too large",
            Failure::BadRequest,
        ),
        (HTTPStatus(code), _) if (400..500).contains(code) => reply(
            *code,
            "invalid_request_error",
            "bad_request",
            "the request could not be processed",
            Failure::BadRequest,
        ),
        (ConnectTimedout | TLSHandshakeTimedout, _) => reply(
            504,
            "proxy_error",
            "upstream_connect_timeout",
            "timed out connecting to the upstream",
            Failure::ConnectionTimeout,
        ),
        (ReadTimedout | WriteTimedout, ErrorSource::Upstream) => reply(
            504,
            "proxy_error",
            "upstream_timeout",
            "the upstream did not answer in time",
            Failure::ReadTimeout,
        ),
        (
            ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure | SocketError
            | BindError | TLSHandshakeFailure | InvalidCert | HandshakeError | TLSWantX509Lookup,
            _,
        ) => reply(
            502,
            "proxy_error",
            "upstream_connect_failed",
            "could not connect to the upstream",
            Failure::ConnectFailed,
        ),
        (
            ReadTimedout | WriteTimedout | ReadError | WriteError | ConnectionClosed,
            ErrorSource::Downstream,
        ) => reply(
            0,
            "proxy_error",
            "client_closed",
            "the client closed the connection",
            Failure::ClientGone,
        ),
        (_, ErrorSource::Downstream) => reply(
            400,
            "invalid_request_error",
            "bad_request",
            "the request is malformed",
            Failure::BadRequest,
        ),
        (_, ErrorSource::Upstream) => reply(
            502,
            "proxy_error",
            "upstream_error",
            "the upstream connection failed",
            Failure::UpstreamBroken,
        ),
        _ => reply(
            500,
            "proxy_error",
            "internal_error",
            "internal proxy error",
            Failure::Unexpected,
        ),
    }
}

impl Failure {
    /// Moves this failure's counter. Called once per failed request, from `fail_to_proxy`.
    pub fn count(self) {
        let m = &METRICS;
        match self {
            Failure::ConnectionTimeout => m.connection_timeout.inc(),
            Failure::ReadTimeout => m.read_timeout.inc(),
            Failure::ConnectFailed => m.connect_failed.inc(),
            Failure::UpstreamBroken => m.upstream_broken.inc(),
            Failure::BadRequest => m.bad_request.inc(),
            Failure::BodyTooLarge => m.body_too_large.inc(),
            Failure::ClientGone => m.client_gone.inc(),
            Failure::Unexpected => m.unexpected_error.inc(),
        }
    }

    /// True for failures the client caused (its request was refused): not proxy errors.
    pub fn is_client_error(self) -> bool {
        matches!(self, Failure::BadRequest | Failure::BodyTooLarge)
    }
}

/// Writes `reply` as the JSON error response, unless a response has already started (a failure
/// mid-stream): then nothing is written and the connection is ended, so the client sees an
/// error instead of a clean but truncated body. Returns the status written (0: none).
pub async fn respond(session: &mut Session, reply: &Reply) -> u16 {
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
    if let Ok(mut resp) = ResponseHeader::build(reply.status, Some(3)) {
        let _ = resp.insert_header(header::CONTENT_TYPE, "application/json");
        let _ = resp.insert_header(header::CONTENT_LENGTH, body.len().to_string());
        let _ = session
            .as_downstream_mut()
            .write_error_response(resp, body)
            .await;
    }
    reply.status
}

impl Reply {
    /// The OpenAI-style JSON body. All parts are fixed ASCII strings without quotes or
    /// backslashes, so no escaping is needed.
    pub fn body(&self) -> Bytes {
        Bytes::from(format!(
            r#"{{"error":{{"message":"{}","type":"{}","code":"{}"}}}}"#,
            self.message, self.kind, self.code
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
    }

    #[test]
    fn body_is_openai_error_shape() {
        let r = classify(&Error::new(ErrorType::InternalError));
        let v: serde_json::Value = serde_json::from_slice(&r.body()).expect("json");
        assert_eq!(v["error"]["type"], "proxy_error");
        assert_eq!(v["error"]["code"], "internal_error");
        assert_eq!(v["error"]["message"], "internal proxy error");
    }
}
