//! The bench load loop: connections opened before timing starts, one worker per connection,
//! each sending chat completions back to back and recording what it measures into its own
//! [`Stats`] (merged when the round ends, so workers share nothing but two counters).
//!
//! HTTP/1.1 keep-alive over TCP, or over TLS (openssl) where ALPN picks HTTP/2 or HTTP/1.1.
//! Every request runs under a timeout; every failure is counted with a reason, never raised.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use tokio::net::TcpStream;

use super::report::{record, Stats};

/// The longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Body bytes kept from a non-streamed response to read its `usage` (the rest is read and dropped).
const MAX_KEPT_BODY: usize = 4 << 20;

/// ALPN offer: HTTP/2, then HTTP/1.1.
const ALPN: &[u8] = b"\x02h2\x08http/1.1";

/// Where requests go: one URL, parsed once.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The URL as given (for reports).
    pub url: String,
    uri: Uri,
    /// The origin-form target for HTTP/1.1 (`/path?query`).
    target: Uri,
    host: String,
    port: u16,
    tls: bool,
    host_header: HeaderValue,
}

impl Endpoint {
    /// Parses an `http://` or `https://` URL with a host.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "{url}: the URL must start with http:// or https://"
                ))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url}: the URL has no host"))?
            .clone();
        let host = authority.host().trim_matches(['[', ']']).to_string();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let target: Uri = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| format!("{url}: {e}"))?;
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("{url}: bad host: {e}"))?;
        Ok(Endpoint {
            url: url.to_string(),
            uri,
            target,
            host,
            port,
            tls,
            host_header,
        })
    }

    /// Whether the endpoint needs TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }
}

/// A TLS client configuration (verification on unless `insecure`), ALPN h2 and http/1.1.
pub fn tls_connector(insecure: bool) -> Result<SslConnector, String> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
    b.set_alpn_protos(ALPN).map_err(|e| e.to_string())?;
    if insecure {
        b.set_verify(SslVerifyMode::NONE);
    }
    Ok(b.build())
}

/// One open connection.
pub enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn ready(&mut self) -> bool {
        match self {
            Conn::H1(s) => s.ready().await.is_ok(),
            Conn::H2(s) => s.ready().await.is_ok(),
        }
    }
}

/// Opens one connection to `ep` (TCP, then TLS when the URL is https).
pub async fn connect(ep: &Endpoint, tls: Option<&SslConnector>) -> Result<Conn, String> {
    let open = async {
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if !ep.tls {
            return handshake(tcp, false).await;
        }
        let connector = tls.ok_or("https without a TLS configuration")?;
        let ssl = connector
            .configure()
            .and_then(|c| c.into_ssl(&ep.host))
            .map_err(|e| format!("tls: {e}"))?;
        let mut stream =
            tokio_openssl::SslStream::new(ssl, tcp).map_err(|e| format!("tls: {e}"))?;
        Pin::new(&mut stream)
            .connect()
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let h2 = stream.ssl().selected_alpn_protocol() == Some(b"h2");
        handshake(stream, h2).await
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| "connect: timed out".to_string())?
}

async fn handshake<IO>(io: IO, h2: bool) -> Result<Conn, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H2(send))
    } else {
        let (send, conn) = http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H1(send))
    }
}

/// What every request of a run carries.
pub struct Load {
    pub body: Bytes,
    /// Content type, authorization and `--header`s.
    pub headers: HeaderMap,
    pub stream: bool,
    pub timeout: Duration,
}

/// When a round stops starting requests.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Count(u64),
    Until(Instant),
}

/// Counters a progress line reads while a round runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub failed: AtomicU64,
}

/// Runs one round with one worker per slot of `conns` and returns the slots (a connection
/// still usable, or `None` where one broke and could not be reopened) with the round's figures.
pub async fn run_round(
    ep: Arc<Endpoint>,
    tls: Option<Arc<SslConnector>>,
    load: Arc<Load>,
    conns: Vec<Option<Conn>>,
    budget: Budget,
    progress: Arc<Progress>,
) -> (Vec<Option<Conn>>, Stats) {
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = conns
        .into_iter()
        .map(|conn| {
            let w = Worker {
                ep: ep.clone(),
                tls: tls.clone(),
                load: load.clone(),
                issued: issued.clone(),
                progress: progress.clone(),
                budget,
                stats: Stats::default(),
            };
            tokio::spawn(w.run(conn))
        })
        .collect();
    let mut total = Stats::default();
    let mut kept = Vec::new();
    for w in workers {
        match w.await {
            Ok((conn, stats)) => {
                total.merge(&stats);
                kept.push(conn);
            }
            Err(e) => {
                total.fail(format!("worker stopped: {e}"));
                kept.push(None);
            }
        }
    }
    total.elapsed = started.elapsed();
    (kept, total)
}

struct Worker {
    ep: Arc<Endpoint>,
    tls: Option<Arc<SslConnector>>,
    load: Arc<Load>,
    issued: Arc<AtomicU64>,
    progress: Arc<Progress>,
    budget: Budget,
    stats: Stats,
}

impl Worker {
    fn may_start(&self) -> bool {
        match self.budget {
            Budget::Count(n) => self.issued.fetch_add(1, Relaxed) < n,
            Budget::Until(t) => Instant::now() < t,
        }
    }

    async fn run(mut self, mut conn: Option<Conn>) -> (Option<Conn>, Stats) {
        while self.may_start() {
            let ready = match conn.as_mut() {
                Some(c) => c.ready().await,
                None => false,
            };
            if !ready {
                // Reopened outside the clock: the request's time is the exchange alone.
                self.stats.reconnects += 1;
                match connect(&self.ep, self.tls.as_deref()).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        conn = None;
                        self.finish(Err(e));
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let request = self.request(matches!(c, Conn::H2(_)));
            let start = Instant::now();
            let outcome =
                match tokio::time::timeout(self.load.timeout, exchange(c, request, start)).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("timeout after {:?}", self.load.timeout)),
                };
            if outcome.is_err() {
                // Whatever was in flight on it is lost; start the next request on a fresh one.
                conn = None;
            }
            self.finish(outcome.map(|s| (s, start.elapsed())));
        }
        (conn, self.stats)
    }

    fn request(&self, h2: bool) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.load.body.clone()));
        *req.method_mut() = Method::POST;
        *req.headers_mut() = self.load.headers.clone();
        if h2 {
            *req.uri_mut() = self.ep.uri.clone();
        } else {
            *req.uri_mut() = self.ep.target.clone();
            req.headers_mut().insert(HOST, self.ep.host_header.clone());
        }
        req
    }

    fn finish(&mut self, outcome: Result<(Sample, Duration), String>) {
        self.progress.done.fetch_add(1, Relaxed);
        let s = &mut self.stats;
        let failed = match outcome {
            Err(reason) => {
                s.fail(reason);
                true
            }
            Ok((sample, total)) => {
                *s.status.entry(sample.status).or_default() += 1;
                if let Some(d) = sample.server_timing {
                    record(&mut s.server_timing, d);
                }
                if (200..300).contains(&sample.status) {
                    s.succeeded += 1;
                    record(&mut s.latency, total);
                    record(&mut s.ttfb, sample.ttfb);
                    if let Some(t) = sample.ttft {
                        record(&mut s.ttft, t);
                    }
                    for g in sample.gaps {
                        record(&mut s.chunk_gap, g);
                    }
                    s.completion_tokens += sample.completion_tokens.unwrap_or(0);
                    false
                } else {
                    s.fail(format!("status {}", sample.status));
                    true
                }
            }
        };
        if failed {
            self.progress.failed.fetch_add(1, Relaxed);
        }
    }
}

/// What one exchange measured.
struct Sample {
    status: u16,
    ttfb: Duration,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    completion_tokens: Option<u64>,
    server_timing: Option<Duration>,
}

async fn exchange(
    conn: &mut Conn,
    req: Request<Full<Bytes>>,
    start: Instant,
) -> Result<Sample, String> {
    let resp = match conn {
        Conn::H1(s) => s.send_request(req).await,
        Conn::H2(s) => s.send_request(req).await,
    }
    .map_err(|e| describe(&e))?;
    let ttfb = start.elapsed();
    let status = resp.status().as_u16();
    let server_timing = resp
        .headers()
        .get_all("server-timing")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(arkgate_duration);
    let is_sse = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut sample = Sample {
        status,
        ttfb,
        ttft: None,
        gaps: Vec::new(),
        completion_tokens: None,
        server_timing,
    };
    let mut body: Incoming = resp.into_body();
    let mut kept = BytesMut::new();
    let mut sse = SseScanner::default();
    let mut last_content: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {}", describe(&e)))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        if is_sse {
            sse.push(data, |event| {
                let seen = read_event(event);
                if let Some(t) = seen.completion_tokens {
                    sample.completion_tokens = Some(t);
                }
                if seen.content {
                    let now = Instant::now();
                    if sample.ttft.is_none() {
                        sample.ttft = Some(now - start);
                    }
                    if let Some(prev) = last_content {
                        sample.gaps.push(now - prev);
                    }
                    last_content = Some(now);
                }
            });
        } else if kept.len() < MAX_KEPT_BODY {
            kept.extend_from_slice(data);
        }
    }
    if !is_sse {
        sample.completion_tokens = serde_json::from_slice::<serde_json::Value>(&kept)
            .ok()
            .and_then(|v| completion_tokens(&v));
    }
    Ok(sample)
}

/// An error's message with its causes (hyper's own text is often generic).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `usage.completion_tokens` of a response or chunk.
fn completion_tokens(v: &serde_json::Value) -> Option<u64> {
    v.get("usage")?.get("completion_tokens")?.as_u64()
}

/// What one SSE `data:` payload says.
#[derive(Debug, Default, PartialEq)]
struct EventSeen {
    /// `choices[0].delta.content` is a non-empty string.
    content: bool,
    completion_tokens: Option<u64>,
}

fn read_event(data: &[u8]) -> EventSeen {
    if data == b"[DONE]" {
        return EventSeen::default();
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return EventSeen::default();
    };
    let content = v
        .pointer("/choices/0/delta/content")
        .and_then(|c| c.as_str())
        .is_some_and(|c| !c.is_empty());
    EventSeen {
        content,
        completion_tokens: completion_tokens(&v),
    }
}

/// Splits a byte stream into SSE events and hands each event's `data` (lines joined by `\n`)
/// to a callback, however the stream was cut.
#[derive(Debug, Default)]
struct SseScanner {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
}

impl SseScanner {
    fn push(&mut self, mut chunk: &[u8], mut on_event: impl FnMut(&[u8])) {
        while let Some(i) = memchr::memchr(b'\n', chunk) {
            self.line.extend_from_slice(&chunk[..i]);
            chunk = &chunk[i + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                if self.has_data {
                    on_event(&self.data);
                }
                self.data.clear();
                self.has_data = false;
            } else if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            line.clear();
            self.line = line;
        }
        self.line.extend_from_slice(chunk);
    }
}

/// The `dur` of the `arkgate` metric in a `Server-Timing` value
/// (`arkgate;dur=0.42, upstream;dur=20.1` → 0.42 ms).
pub fn arkgate_duration(value: &str) -> Option<Duration> {
    value.split(',').find_map(|metric| {
        let mut parts = metric.split(';').map(str::trim);
        if parts.next()? != "arkgate" {
            return None;
        }
        let ms: f64 = parts.find_map(|p| p.strip_prefix("dur="))?.parse().ok()?;
        (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = SseScanner::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |e| out.push(String::from_utf8_lossy(e).into_owned()));
        }
        out
    }

    #[test]
    fn sse_events_come_out_whole_however_the_stream_is_cut() {
        let stream =
            b"data: {\"a\":1}\n\n: comment\nevent: x\ndata: one\ndata: two\r\n\r\ndata:[DONE]\n\n";
        let whole = events(&[stream]);
        assert_eq!(whole, ["{\"a\":1}", "one\ntwo", "[DONE]"]);
        for cut in 0..stream.len() {
            assert_eq!(
                events(&[&stream[..cut], &stream[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytes), whole);
    }

    #[test]
    fn content_and_usage_are_read_from_chunks() {
        let seen = read_event(br#"{"choices":[{"delta":{"content":"Hi"}}]}"#);
        assert_eq!(
            seen,
            EventSeen {
                content: true,
                completion_tokens: None
            }
        );
        let role_only = read_event(br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#);
        assert!(!role_only.content);
        let usage = read_event(br#"{"choices":[],"usage":{"completion_tokens":7}}"#);
        assert_eq!(usage.completion_tokens, Some(7));
        assert_eq!(read_event(b"[DONE]"), EventSeen::default());
        assert_eq!(read_event(b"not json"), EventSeen::default());
    }

    #[test]
    fn server_timing_gives_the_arkgate_metric_only() {
        let d = arkgate_duration("arkgate;dur=0.5, upstream;dur=20.25").expect("arkgate");
        assert_eq!(d, Duration::from_micros(500));
        let d = arkgate_duration("upstream;dur=3, arkgate;desc=\"x\";dur=1.25").expect("arkgate");
        assert_eq!(d, Duration::from_micros(1250));
        assert_eq!(arkgate_duration("upstream;dur=20"), None);
        assert_eq!(arkgate_duration("arkgate;dur=-1"), None);
        assert_eq!(arkgate_duration("arkgate"), None);
    }

    #[test]
    fn endpoints_parse_into_host_port_and_target() {
        let ep = Endpoint::parse("http://127.0.0.1:8000/v1/chat/completions?x=1").expect("url");
        assert_eq!(
            (ep.host.as_str(), ep.port, ep.tls),
            ("127.0.0.1", 8000, false)
        );
        assert_eq!(ep.target, "/v1/chat/completions?x=1");
        let ep = Endpoint::parse("https://[::1]/chat").expect("url");
        assert_eq!((ep.host.as_str(), ep.port, ep.tls), ("::1", 443, true));
        assert!(Endpoint::parse("ftp://x/y").is_err());
        assert!(Endpoint::parse("/chat/completions").is_err());
    }
}
