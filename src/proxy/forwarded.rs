//! What a request and its response carry across the proxy: the upstream target (base path +
//! the client's path and query, byte for byte), `Host`, `X-Forwarded-*` (appended to only for a
//! trusted peer), `Via`, hop-by-hop fields, and the no-buffering hints on SSE responses.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use crate::config::{Cidr, Config};
use crate::upstream::Endpoint;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static VIA: HeaderValue = HeaderValue::from_static("1.1 arkgate");
static NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
static NO: HeaderValue = HeaderValue::from_static("no");
static HTTP: HeaderValue = HeaderValue::from_static("http");
static HTTPS: HeaderValue = HeaderValue::from_static("https");

/// Header and target mapping, compiled from `forwarded:`; the base path and `Host` are the
/// attempt's endpoint's.
pub struct Forwarding {
    trusted: Vec<Cidr>,
    via: bool,
}

impl Forwarding {
    pub fn new(cfg: &Config) -> Forwarding {
        Forwarding {
            trusted: cfg.forwarded.trusted_proxies.clone(),
            via: cfg.forwarded.via_header,
        }
    }

    /// The request line and headers as they leave for `endpoint`.
    pub fn upstream_request_filter(
        &self,
        session: &Session,
        req: &mut RequestHeader,
        endpoint: Option<&Arc<Endpoint>>,
    ) -> Result<()> {
        let ep = endpoint
            .map(|e| &e.cfg)
            .or_err(ErrorType::InternalError, "no endpoint for the attempt")?;
        let target = upstream_target(&ep.base_path, client_target(session.req_header()));
        let uri =
            http::Uri::try_from(target).or_err(ErrorType::InvalidHTTPHeader, "request target")?;
        req.set_uri(uri);
        req.insert_header(header::HOST, ep.host_header.clone())?;
        if req.headers.contains_key(&PROXY_CONNECTION) {
            req.remove_header(&PROXY_CONNECTION);
        }
        self.set_forwarded_headers(session, req)
    }

    /// The response header on its way to the client.
    pub fn response_filter(&self, resp: &mut ResponseHeader) -> Result<()> {
        remove_hop_by_hop(resp);
        let is_sse = resp
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
        if is_sse {
            resp.insert_header("x-accel-buffering", NO.clone())?;
            resp.insert_header(header::CACHE_CONTROL, NO_CACHE.clone())?;
        }
        if self.via {
            resp.append_header("Via", VIA.clone())?;
        }
        Ok(())
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
        let ip = ip_value(client).or_err(ErrorType::InternalError, "client address")?;
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
            let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
            let proto = if tls { &HTTPS } else { &HTTP };
            req.insert_header("X-Forwarded-Proto", proto.clone())?;
        }
        if !(trusted && req.headers.contains_key("x-real-ip")) {
            req.insert_header("X-Real-IP", ip)?;
        }
        Ok(())
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }
}

/// The client address as a header value. IPv4, nearly every client, is written without
/// `core::fmt`, whose machinery cost more than the rest of the forwarded headers.
fn ip_value(ip: IpAddr) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let text = match ip {
        IpAddr::V4(v4) => {
            let mut text = Vec::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push(b'.');
                }
                text.extend_from_slice(digits.format(octet).as_bytes());
            }
            text
        }
        IpAddr::V6(v6) => v6.to_string().into_bytes(),
    };
    HeaderValue::from_maybe_shared(Bytes::from(text))
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

/// Drops the upstream's connection-specific fields: those its `Connection` header names, and the
/// standard hop-by-hop ones (RFC 9110 §7.6.1). Pingora frames the client connection itself.
fn remove_hop_by_hop(resp: &mut ResponseHeader) {
    // Most answers carry none of them: one look at each name, not a removal per field.
    let hop_by_hop =
        |n: &HeaderName| n == header::CONNECTION || n == KEEP_ALIVE || n == PROXY_CONNECTION;
    if !resp.headers.keys().any(hop_by_hop) {
        return;
    }
    if let Some(named) = resp
        .headers
        .get(header::CONNECTION)
        .map(|_| named_fields(resp))
    {
        for name in named {
            resp.remove_header(&name);
        }
    }
    for name in [&KEEP_ALIVE, &PROXY_CONNECTION, &header::CONNECTION] {
        resp.remove_header(name);
    }
}

/// The field names the response's `Connection` header lists.
fn named_fields(resp: &ResponseHeader) -> Vec<http::HeaderName> {
    resp.headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(base: &str, raw: &str) -> String {
        String::from_utf8(upstream_target(base, raw.as_bytes())).expect("utf8")
    }

    #[test]
    fn client_addresses_are_written_as_text() {
        let cases = [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.0.9",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ];
        for case in cases {
            let ip: IpAddr = case.parse().expect("address");
            assert_eq!(ip_value(ip).expect("value").to_str().ok(), Some(case));
        }
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
