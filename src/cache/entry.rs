//! A stored response: what a cache hit sends back, with its full key, and its compact binary
//! form for Redis.
//!
//! Only end-to-end headers are kept: hop-by-hop ones (RFC 9110 §7.6.1, and those a `Connection`
//! header names), `Set-Cookie`, and `Content-Length` (the server frames the replayed body) are
//! dropped. A streamed answer is kept as its SSE events, each with its own terminating blank
//! line, so a replay sends the same bytes event by event; [`SseCollector`] gathers them and
//! hands them over only when the stream ended with `data: [DONE]`.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use memchr::memmem;

use super::key::CacheKey;

/// First bytes of an encoded entry: a tag and the format version.
const MAGIC: &[u8; 4] = b"AKC\x01";

/// Headers never stored (besides those a `Connection` header names).
const DROPPED_HEADERS: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "set-cookie",
    "content-length",
];

/// The body of a stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A whole (non-streamed) body.
    Whole(Bytes),
    /// The events of a completed SSE stream, in order, each ending with its blank line.
    Events(Vec<Bytes>),
}

impl Body {
    /// Bytes of body held.
    pub fn len(&self) -> usize {
        match self {
            Self::Whole(b) => b.len(),
            Self::Events(events) => events.iter().map(Bytes::len).sum(),
        }
    }

    /// Whether no body bytes are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A cached response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The full key it was stored under; checked on every hit.
    pub key: CacheKey,
    /// The request's `model`, for clearing one model's entries.
    pub model: String,
    /// When it was stored, in seconds since the Unix epoch.
    pub created_at: u64,
    /// The HTTP status (only complete 200 responses are stored, but the entry does not care).
    pub status: u16,
    /// End-to-end response headers, in order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body.
    pub body: Body,
}

/// Why stored bytes are not an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stored cache entry is corrupt: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

impl Entry {
    /// An entry stored now, keeping only the storable headers of `headers`.
    pub fn new(key: CacheKey, model: &str, status: u16, headers: &HeaderMap, body: Body) -> Self {
        let created_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            key,
            model: model.to_owned(),
            created_at,
            status,
            headers: storable_headers(headers),
            body,
        }
    }

    /// Approximate bytes held: the body plus headers and model; compared with
    /// `cache.max_entry_bytes`.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        self.body.len() + headers + self.model.len() + 64
    }

    /// The compact binary form: magic and version, the key, created_at, status, model,
    /// headers, body; lengths as little-endian `u32`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size() + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.key.0);
        out.extend_from_slice(&self.created_at.to_le_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        put_bytes(&mut out, self.model.as_bytes());
        put_len(&mut out, self.headers.len());
        for (name, value) in &self.headers {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        match &self.body {
            Body::Whole(b) => {
                out.push(0);
                put_bytes(&mut out, b);
            }
            Body::Events(events) => {
                out.push(1);
                put_len(&mut out, events.len());
                for e in events {
                    put_bytes(&mut out, e);
                }
            }
        }
        out
    }

    /// Reads [`Entry::encode`]'s form back.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { rest: bytes };
        if r.take(4)? != MAGIC {
            return Err(DecodeError("unknown format"));
        }
        let key = CacheKey(r.array::<32>()?);
        let created_at = u64::from_le_bytes(r.array::<8>()?);
        let status = u16::from_le_bytes(r.array::<2>()?);
        let model = std::str::from_utf8(r.bytes()?)
            .map_err(|_| DecodeError("model is not UTF-8"))?
            .to_owned();
        let count = r.len()?;
        let mut headers = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let name =
                HeaderName::from_bytes(r.bytes()?).map_err(|_| DecodeError("bad header name"))?;
            let value =
                HeaderValue::from_bytes(r.bytes()?).map_err(|_| DecodeError("bad header value"))?;
            headers.push((name, value));
        }
        let body = match r.take(1)?[0] {
            0 => Body::Whole(Bytes::copy_from_slice(r.bytes()?)),
            1 => {
                let n = r.len()?;
                let mut events = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    events.push(Bytes::copy_from_slice(r.bytes()?));
                }
                Body::Events(events)
            }
            _ => return Err(DecodeError("unknown body kind")),
        };
        if !r.rest.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(Self {
            key,
            model,
            created_at,
            status,
            headers,
            body,
        })
    }
}

/// The headers of `headers` a cache may store and replay.
pub fn storable_headers(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let named_by_connection: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            !DROPPED_HEADERS.contains(&name) && !named_by_connection.iter().any(|t| t == name)
        })
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Entries are bounded by `max_entry_bytes`, far below 4 GiB.
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        Ok(u32::from_le_bytes(self.array::<4>()?) as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }
}

/// Gathers an SSE response body into events while it streams, for storing once it completed.
#[derive(Debug)]
pub struct SseCollector {
    pending: Vec<u8>,
    events: Vec<Bytes>,
    bytes: usize,
    limit_bytes: usize,
    over_limit: bool,
}

impl SseCollector {
    /// A collector that gives up (and stores nothing) past `limit_bytes` of body.
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            pending: Vec::new(),
            events: Vec::new(),
            bytes: 0,
            limit_bytes,
            over_limit: false,
        }
    }

    /// Feeds the next piece of the body, cut anywhere.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.over_limit {
            return;
        }
        self.bytes += chunk.len();
        if self.bytes > self.limit_bytes {
            self.over_limit = true;
            self.pending = Vec::new();
            self.events = Vec::new();
            return;
        }
        let scan_from = self.pending.len().saturating_sub(3);
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        let mut from = scan_from;
        while let Some(end) = event_end(&self.pending[from..]).map(|e| from + e) {
            self.events
                .push(Bytes::copy_from_slice(&self.pending[start..end]));
            start = end;
            from = end;
        }
        self.pending.drain(..start);
    }

    /// Whether the body grew past the limit (nothing will be stored).
    pub fn over_limit(&self) -> bool {
        self.over_limit
    }

    /// The events, if the stream completed: within the limit, nothing but whitespace after the
    /// last event, and the last event's data is `[DONE]`.
    pub fn finish(self) -> Option<Vec<Bytes>> {
        if self.over_limit || !self.pending.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let last = self.events.last()?;
        is_done_event(last).then_some(self.events)
    }
}

/// The end (exclusive) of the first complete event in `buf`: after `\n\n` or `\n\r\n`.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\n\r\n").map(|i| i + 3);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_done_event(event: &[u8]) -> bool {
    event
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter_map(|line| line.strip_prefix(b"data:"))
        .any(|data| data.trim_ascii() == b"[DONE]")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(body: Body) -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-request-id", HeaderValue::from_static("abc"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        headers.insert("set-cookie", HeaderValue::from_static("s=1"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("content-length", HeaderValue::from_static("12"));
        headers.insert("connection", HeaderValue::from_static("keep-alive, X-Hop"));
        headers.insert("x-hop", HeaderValue::from_static("gone"));
        Entry::new(CacheKey([7; 32]), "doubao-pro", 200, &headers, body)
    }

    #[test]
    fn hop_by_hop_and_cookies_are_not_stored() {
        let e = sample(Body::Whole(Bytes::from_static(b"{}")));
        let names: Vec<&str> = e.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["content-type", "x-request-id", "x-multi", "x-multi"],
            "{names:?}"
        );
        assert!(e.created_at > 1_600_000_000);
    }

    #[test]
    fn whole_and_streamed_entries_round_trip() {
        for body in [
            Body::Whole(Bytes::from_static(b"{\"id\":\"x\",\"choices\":[]}")),
            Body::Whole(Bytes::new()),
            Body::Events(vec![
                Bytes::from_static(b"data: {\"a\":1}\n\n"),
                Bytes::from_static(b"data: [DONE]\n\n"),
            ]),
        ] {
            let e = sample(body);
            let bytes = e.encode();
            assert_eq!(Entry::decode(&bytes), Ok(e));
        }
    }

    #[test]
    fn corrupt_bytes_are_rejected_not_panicked_on() {
        let bytes = sample(Body::Whole(Bytes::from_static(b"hello"))).encode();
        for cut in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(Entry::decode(&bad), Err(DecodeError("unknown format")));
        let mut long = bytes;
        long.push(0);
        assert_eq!(Entry::decode(&long), Err(DecodeError("trailing bytes")));
    }

    #[test]
    fn size_counts_body_and_headers() {
        let small = sample(Body::Whole(Bytes::from_static(b"x")));
        let big = sample(Body::Whole(Bytes::from(vec![b'x'; 10_000])));
        assert!(big.size() >= 10_000 && big.size() - small.size() == 9_999);
    }

    #[test]
    fn sse_events_are_split_wherever_the_body_was_cut() {
        let body =
            b"data: {\"a\":1}\n\ndata: {\"a\":2}\r\n\r\n: comment\ndata: x\n\ndata: [DONE]\n\n";
        for cut in 1..body.len() {
            let mut c = SseCollector::new(1 << 20);
            for piece in body.chunks(cut) {
                c.push(piece);
            }
            let events = c.finish().expect("complete stream");
            assert_eq!(events.len(), 4, "cut {cut}");
            assert_eq!(events.concat(), body.to_vec());
            assert_eq!(&events[1][..], b"data: {\"a\":2}\r\n\r\n");
        }
    }

    #[test]
    fn unfinished_or_oversized_streams_are_not_kept() {
        let mut c = SseCollector::new(1 << 20);
        c.push(b"data: {\"a\":1}\n\n");
        assert!(c.finish().is_none(), "no [DONE]");

        let mut c = SseCollector::new(1 << 20);
        c.push(b"data: [DONE]\n\ndata: {\"late\"");
        assert!(c.finish().is_none(), "a partial event after [DONE]");

        let mut c = SseCollector::new(20);
        c.push(b"data: {\"a\":1}\n\n");
        c.push(b"data: [DONE]\n\n");
        assert!(c.over_limit());
        assert!(c.finish().is_none());

        let mut c = SseCollector::new(1 << 20);
        c.push(b"data:[DONE]\r\n\r\n\n");
        assert_eq!(c.finish().map(|e| e.len()), Some(1));
    }
}
