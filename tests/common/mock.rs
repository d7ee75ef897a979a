//! The mock upstream: a real HTTP/1.1 or HTTP/2 server, plain or TLS, on `127.0.0.1:0`.
//!
//! It runs on its own Tokio runtime (so a test may block without stalling it) and records every
//! request exactly as it arrived: method, raw target, headers, body and how the body was cut.
//! What it answers is decided per request by a handler closure returning a [`Reply`], which
//! includes the faults the reliability tests need (silence, stalls, resets, garbage, closes).
//! An upstream can also go away: [`MockUpstream::stop`] (graceful) and [`MockUpstream::kill`]
//! (at once); [`DeadUpstream`] is one that is down from the start and can be brought up.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use openssl::ssl::{select_next_proto, AlpnError, Ssl, SslAcceptor, SslFiletype, SslMethod};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio_openssl::SslStream;

use super::certs::TestCerts;

/// Which protocol the mock speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 (TLS: ALPN offers `http/1.1` only).
    H1,
    /// HTTP/2 (plain: prior knowledge; TLS: ALPN offers `h2` only).
    H2,
    /// TLS only: ALPN offers `h2` then `http/1.1`, and the mock serves whichever was chosen
    /// (HTTP/1.1 when the client offered no ALPN), like a real API front end.
    Both,
}

/// The protocol a request actually arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    H1,
    H2,
}

/// One request as the mock received it.
#[derive(Clone)]
pub struct RecordedRequest {
    /// 1-based number of the accepted TCP connection it came on.
    pub conn: usize,
    pub version: Version,
    pub method: String,
    /// The request target byte for byte (HTTP/1.1), or `:path` (HTTP/2).
    pub target: Vec<u8>,
    /// `:authority` (HTTP/2 only).
    pub authority: Option<String>,
    /// Headers as received, in order (HTTP/2: lower-case names, pseudo-headers excluded).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Sizes of the body pieces as they arrived: chunk sizes for a chunked HTTP/1.1 body,
    /// DATA frame payloads on HTTP/2, socket reads for a Content-Length body.
    pub chunks: Vec<usize>,
    /// False when the client went away before the body was complete.
    pub complete: bool,
    /// When the request head arrived.
    pub received: Instant,
}

impl fmt::Debug for RecordedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordedRequest")
            .field("conn", &self.conn)
            .field("version", &self.version)
            .field("method", &self.method)
            .field("target", &String::from_utf8_lossy(&self.target))
            .field("authority", &self.authority)
            .field("headers", &ShowHeaders(&self.headers))
            .field("body", &ShowBody(&self.body))
            .field("chunks", &self.chunks)
            .field("complete", &self.complete)
            .finish()
    }
}

/// Headers as `name: value` lines in debug output.
pub struct ShowHeaders<'a>(pub &'a [(String, Vec<u8>)]);

impl fmt::Debug for ShowHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.0
                    .iter()
                    .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

/// A body as (lossy) text in debug output, cut after 1 KiB.
pub struct ShowBody<'a>(pub &'a [u8]);

impl fmt::Debug for ShowBody<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(1024)];
        let text = String::from_utf8_lossy(shown);
        if shown.len() < self.0.len() {
            write!(f, "{text:?}… ({} bytes)", self.0.len())
        } else {
            write!(f, "{text:?}")
        }
    }
}

/// The first value of header `name` in `headers` (case-insensitive).
pub fn find_header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// True when header `header` in `headers` is a comma-separated list containing `token`
/// (case-insensitive).
pub fn has_header_token(headers: &[(String, Vec<u8>)], header: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(header))
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        find_header(&self.headers, name)
    }

    /// The first value of header `name` as text ("" if it is not UTF-8).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .map(|v| std::str::from_utf8(v).unwrap_or(""))
    }

    /// Every value of header `name`, in arrival order.
    pub fn header_all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The request target as text.
    pub fn target_str(&self) -> &str {
        std::str::from_utf8(&self.target).expect("request target is UTF-8")
    }

    /// The host the request named: `Host` on HTTP/1.1, `:authority` on HTTP/2.
    pub fn host(&self) -> Option<String> {
        match self.version {
            Version::H1 => self.header_str("host").map(str::to_string),
            Version::H2 => self.authority.clone(),
        }
    }

    /// The body parsed as JSON.
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// What the mock answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response with `Content-Length` (added unless `headers` has one).
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// 200 with the received body as is, and the request's `Content-Type`.
    Echo,
    /// A streamed response: chunked on HTTP/1.1, DATA frames on HTTP/2, each written and
    /// flushed after its delay. `trailers` are sent on HTTP/2 (and as chunked trailers on
    /// HTTP/1.1).
    Chunks {
        status: u16,
        headers: Vec<(String, String)>,
        chunks: Vec<(Duration, Bytes)>,
        trailers: Option<HeaderMap>,
    },
    /// Reads the request and then says nothing until the client goes away.
    NeverRespond,
    /// Waits, then answers 200 `{"ok":true}`.
    SlowHeaders(Duration),
    /// Sends the head and `first` as a streamed body, is silent for `stall`, then ends the body.
    StallAfter {
        status: u16,
        headers: Vec<(String, String)>,
        first: Bytes,
        stall: Duration,
    },
    /// Sends 200 `text/event-stream` and `first`, then resets: a TCP RST on HTTP/1.1,
    /// RST_STREAM(INTERNAL_ERROR) on HTTP/2.
    ResetMidBody { first: Bytes },
    /// Writes these raw bytes instead of a response and closes (HTTP/2: the connection is
    /// aborted with GOAWAY(PROTOCOL_ERROR), since raw bytes cannot go inside a stream).
    Garbage(Bytes),
    /// Sends the inner reply, then closes the connection without warning (HTTP/2: GOAWAY).
    CloseAfterResponse(Box<Reply>),
    /// Says nothing for the duration, then sends the inner reply (e.g. a stream whose head
    /// arrives late and on its own).
    After(Duration, Box<Reply>),
}

impl Reply {
    /// 200 with a JSON body.
    pub fn json(body: impl Into<Bytes>) -> Reply {
        Reply::Full {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
        }
    }

    /// A response with the given status, headers and body.
    pub fn full(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        Reply::Full {
            status,
            headers: owned(headers),
            body: body.into(),
        }
    }

    /// A `text/event-stream` response: each event is sent after its delay.
    pub fn sse(events: &[(Duration, &str)]) -> Reply {
        Reply::Chunks {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            chunks: events
                .iter()
                .map(|(d, e)| (*d, Bytes::copy_from_slice(e.as_bytes())))
                .collect(),
            trailers: None,
        }
    }
}

/// `(&str, &str)` pairs as owned header pairs.
pub fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// Chooses the reply for a request.
pub type Handler = Arc<dyn Fn(&RecordedRequest) -> Reply + Send + Sync>;

/// How to start a mock upstream.
pub struct MockConfig {
    name: String,
    proto: Proto,
    tls: Option<(String, String)>,
    handler: Handler,
}

impl MockConfig {
    /// Plain HTTP/1.1 answering 200 `{"ok":true}`.
    pub fn h1() -> MockConfig {
        MockConfig::new(Proto::H1)
    }

    /// Plain HTTP/2 (prior knowledge) answering 200 `{"ok":true}`.
    pub fn h2() -> MockConfig {
        MockConfig::new(Proto::H2)
    }

    /// A mock speaking `proto`, answering 200 `{"ok":true}`.
    pub fn new(proto: Proto) -> MockConfig {
        MockConfig {
            name: "mock".into(),
            proto,
            tls: None,
            handler: Arc::new(|_| Reply::json(r#"{"ok":true}"#)),
        }
    }

    /// Serve TLS with the test server certificate.
    pub fn tls(mut self, certs: &TestCerts) -> MockConfig {
        let path = |p: &std::path::Path| p.to_str().expect("UTF-8 path").to_string();
        self.tls = Some((path(&certs.cert_path), path(&certs.key_path)));
        self
    }

    /// Names the mock (for failure messages when a test runs several); "mock" by default.
    pub fn name(mut self, name: &str) -> MockConfig {
        self.name = name.to_string();
        self
    }

    /// Answer every request with `handler(request)`.
    pub fn reply(
        mut self,
        handler: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    ) -> MockConfig {
        self.handler = Arc::new(handler);
        self
    }
}

/// State shared between the mock's tasks and the test.
struct Shared {
    handler: Handler,
    requests: Mutex<Vec<RecordedRequest>>,
    connections: AtomicUsize,
    closed: AtomicUsize,
    sent: Mutex<Vec<Instant>>,
    /// Set by [`MockUpstream::stop`]: accept no more, close connections once their reply is out.
    stopping: watch::Sender<bool>,
    /// The listener is still open.
    listening: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn record(&self, request: RecordedRequest) {
        lock(&self.requests).push(request);
    }

    /// Records a request and picks its reply: None for an incomplete request (the client or
    /// proxy went away mid-body), else the reply and whether it answers a HEAD.
    fn answer(&self, request: RecordedRequest, complete: bool) -> Option<(Reply, bool)> {
        if !complete {
            self.record(request);
            return None;
        }
        let reply = resolve((self.handler)(&request), &request);
        let is_head = request.method == "HEAD";
        self.record(request);
        Some((reply, is_head))
    }

    fn mark_sent(&self) {
        lock(&self.sent).push(Instant::now());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running mock upstream. Dropping it stops its runtime and closes every connection.
pub struct MockUpstream {
    pub addr: SocketAddr,
    name: String,
    tls: bool,
    shared: Arc<Shared>,
    runtime: Mutex<Option<Runtime>>,
}

impl MockUpstream {
    /// Binds `127.0.0.1:0` and starts serving; ready as soon as this returns.
    pub fn start(cfg: MockConfig) -> MockUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind mock");
        MockUpstream::start_on(cfg, listener)
    }

    /// Binds exactly `addr` (e.g. the address of an upstream that was stopped) and starts
    /// serving; ready as soon as this returns. To bring up an upstream a proxy already points
    /// at, prefer [`DeadUpstream::revive`], which never lets go of the port.
    pub fn start_at(cfg: MockConfig, addr: SocketAddr) -> MockUpstream {
        let listener = std::net::TcpListener::bind(addr).expect("bind mock at the given address");
        MockUpstream::start_on(cfg, listener)
    }

    /// Starts serving on a listener the caller bound.
    pub fn start_on(cfg: MockConfig, listener: std::net::TcpListener) -> MockUpstream {
        MockUpstream::launch(cfg, mock_runtime(), listener)
    }

    /// Listens on a socket the caller bound (a deep backlog, a [`DeadUpstream`]'s port).
    pub fn start_on_socket(cfg: MockConfig, socket: TcpSocket, backlog: u32) -> MockUpstream {
        let runtime = mock_runtime();
        let listener = {
            let _in_runtime = runtime.enter();
            let listener = socket.listen(backlog).expect("listen on the mock socket");
            listener.into_std().expect("std listener")
        };
        MockUpstream::launch(cfg, runtime, listener)
    }

    fn launch(cfg: MockConfig, runtime: Runtime, listener: std::net::TcpListener) -> MockUpstream {
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("mock address");
        let acceptor = cfg
            .tls
            .as_ref()
            .map(|(cert, key)| Arc::new(acceptor(cert, key, cfg.proto)));
        let shared = Arc::new(Shared {
            handler: cfg.handler,
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            sent: Mutex::new(Vec::new()),
            stopping: watch::channel(false).0,
            listening: true.into(),
        });
        let proto = cfg.proto;
        let accept_shared = shared.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            let mut stopping = accept_shared.stopping.subscribe();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stopped(&mut stopping) => break,
                };
                let Ok((tcp, _)) = accepted else {
                    continue;
                };
                let conn = accept_shared.connections.fetch_add(1, SeqCst) + 1;
                let shared = accept_shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    serve_connection(tcp, conn, acceptor, proto, &shared).await;
                    shared.closed.fetch_add(1, SeqCst);
                });
            }
            drop(listener);
            accept_shared.listening.store(false, SeqCst);
        });
        MockUpstream {
            addr,
            name: cfg.name,
            tls: cfg.tls.is_some(),
            shared,
            runtime: Mutex::new(Some(runtime)),
        }
    }

    /// The name given with [`MockConfig::name`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A graceful stop, like a server draining: the listener closes before this returns (new
    /// connections are refused), requests in flight get their whole reply, and each connection
    /// closes once idle (HTTP/2: GOAWAY). See [`MockUpstream::drained`].
    pub fn stop(&self) {
        self.shared.stopping.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.listening.load(SeqCst) {
            assert!(
                Instant::now() < deadline,
                "{}: the listener did not close",
                self.name
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// True once every connection has closed (after [`MockUpstream::stop`]).
    pub fn drained(&self) -> bool {
        self.closed_connections() == self.connections()
    }

    /// Gone at once, like a crashed upstream: the listener and every connection are closed
    /// (no reply finishes) before this returns. The recorded requests stay readable.
    pub fn kill(&self) {
        if let Some(rt) = lock(&self.runtime).take() {
            // A runtime may not be shut down (blocking) from inside an async test's runtime.
            let shutdown = std::thread::spawn(move || rt.shutdown_timeout(Duration::from_secs(2)));
            let _ = shutdown.join();
        }
        self.shared.listening.store(false, SeqCst);
    }

    /// `http(s)://127.0.0.1:PORT{path}`.
    pub fn base_url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(SeqCst)
    }

    /// Connections that have ended so far (closed by either side).
    pub fn closed_connections(&self) -> usize {
        self.shared.closed.load(SeqCst)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests have arrived so far.
    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// The one request the test expects to have arrived.
    pub fn only_request(&self) -> RecordedRequest {
        let requests = self.requests();
        assert_eq!(
            requests.len(),
            1,
            "expected exactly one upstream request: {requests:#?}"
        );
        requests.into_iter().next().expect("one request")
    }

    /// The most recent request.
    pub fn last_request(&self) -> RecordedRequest {
        self.requests()
            .pop()
            .expect("the upstream received a request")
    }

    /// When each streamed chunk (`Reply::Chunks`, `StallAfter`, `ResetMidBody`) was written.
    pub fn chunk_send_times(&self) -> Vec<Instant> {
        lock(&self.shared.sent).clone()
    }

    /// Waits up to `timeout` for `n` requests to have arrived; true if they did.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.request_count() < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(rt) = lock(&self.runtime).take() {
            rt.shutdown_background();
        }
    }
}

/// Resolves once [`MockUpstream::stop`] was called.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

fn mock_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mock-upstream")
        .enable_all()
        .build()
        .expect("mock runtime")
}

/// An upstream that is down: a socket bound to a port of its own that never listens, so
/// connections to it are refused, and no other test can take the port while this lives.
pub struct DeadUpstream {
    socket: TcpSocket,
    addr: SocketAddr,
}

impl DeadUpstream {
    /// Binds `127.0.0.1:0` without listening.
    pub fn new() -> DeadUpstream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind the dead upstream");
        let addr = socket.local_addr().expect("dead upstream address");
        DeadUpstream { socket, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn base_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Brings the upstream up on the same port (the socket starts listening).
    pub fn revive(self, cfg: MockConfig) -> MockUpstream {
        MockUpstream::start_on_socket(cfg, self.socket, 1024)
    }
}

impl Default for DeadUpstream {
    fn default() -> Self {
        DeadUpstream::new()
    }
}

fn acceptor(cert: &str, key: &str, proto: Proto) -> SslAcceptor {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).expect("TLS acceptor");
    b.set_certificate_chain_file(cert)
        .expect("server certificate");
    b.set_private_key_file(key, SslFiletype::PEM)
        .expect("server key");
    let offer: &'static [u8] = match proto {
        Proto::H1 => b"\x08http/1.1",
        Proto::H2 => b"\x02h2",
        Proto::Both => b"\x02h2\x08http/1.1",
    };
    b.set_alpn_select_callback(move |_, client| {
        select_next_proto(offer, client).ok_or(AlpnError::NOACK)
    });
    b.build()
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// A plain or TLS connection (the mock's side or a client's).
pub enum Stream {
    Plain(TcpStream),
    Tls(Pin<Box<SslStream<TcpStream>>>),
}

impl Stream {
    /// The TCP socket under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => s.as_mut().poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => s.as_mut().poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => s.as_mut().poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => s.as_mut().poll_shutdown(cx),
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    conn: usize,
    acceptor: Option<Arc<SslAcceptor>>,
    proto: Proto,
    shared: &Arc<Shared>,
) {
    let _ = tcp.set_nodelay(true);
    let (stream, version) = match acceptor {
        None => {
            let version = if proto == Proto::H2 {
                Version::H2
            } else {
                Version::H1
            };
            (Stream::Plain(tcp), version)
        }
        Some(acceptor) => {
            let Ok(ssl) = Ssl::new(acceptor.context()) else {
                return;
            };
            let Ok(stream) = SslStream::new(ssl, tcp) else {
                return;
            };
            let mut stream = Box::pin(stream);
            if stream.as_mut().accept().await.is_err() {
                return;
            }
            let version = match stream.ssl().selected_alpn_protocol() {
                Some(b"h2") => Version::H2,
                Some(_) => Version::H1,
                None if proto == Proto::H2 => Version::H2,
                None => Version::H1,
            };
            (Stream::Tls(stream), version)
        }
    };
    match version {
        Version::H1 => serve_h1(stream, conn, shared).await,
        Version::H2 => serve_h2(stream, conn, shared).await,
    }
}

/// Turns an `Echo` into the response it stands for.
fn resolve(reply: Reply, request: &RecordedRequest) -> Reply {
    match reply {
        Reply::After(delay, inner) => Reply::After(delay, Box::new(resolve(*inner, request))),
        Reply::Echo => Reply::Full {
            status: 200,
            headers: vec![(
                "content-type".into(),
                request
                    .header_str("content-type")
                    .unwrap_or("application/octet-stream")
                    .to_string(),
            )],
            body: Bytes::from(request.body.clone()),
        },
        other => other,
    }
}

fn ok_body() -> Reply {
    Reply::json(r#"{"ok":true}"#)
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1
// ---------------------------------------------------------------------------------------------

/// A parsed HTTP/1.1 request or response head.
pub struct H1Head {
    /// Request: method, target, version. Response: version, status, reason.
    pub start: [Vec<u8>; 3],
    pub headers: Vec<(String, Vec<u8>)>,
}

impl H1Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        find_header(&self.headers, name)
    }

    /// True when `header` is a comma-separated list containing `token` (case-insensitive).
    pub fn has_token(&self, header: &str, token: &str) -> bool {
        has_header_token(&self.headers, header, token)
    }

    /// The framing of the body that follows this head.
    pub fn framing(&self) -> Framing {
        if self.has_token("transfer-encoding", "chunked") {
            return Framing::Chunked;
        }
        match self.header("content-length") {
            Some(v) => Framing::Length(
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .expect("numeric Content-Length"),
            ),
            None => Framing::None,
        }
    }
}

/// How an HTTP/1.1 body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(usize),
    /// No body (requests), or until the connection closes (responses).
    None,
}

fn trim_line(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n")
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .unwrap_or(line)
}

/// Reads a head: a start line and header lines up to the empty line. `Ok(None)` on a clean EOF
/// before the first byte.
pub async fn read_h1_head<R: AsyncBufReadExt + Unpin>(io: &mut R) -> io::Result<Option<H1Head>> {
    let mut line = Vec::new();
    loop {
        line.clear();
        if io.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        if !trim_line(&line).is_empty() {
            break;
        }
    }
    let mut parts = trim_line(&line).splitn(3, |b| *b == b' ');
    let mut start: [Vec<u8>; 3] = Default::default();
    for part in start.iter_mut() {
        *part = parts.next().unwrap_or_default().to_vec();
    }
    let mut headers = Vec::new();
    loop {
        line.clear();
        if io.read_until(b'\n', &mut line).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let l = trim_line(&line);
        if l.is_empty() {
            break;
        }
        let colon = l
            .iter()
            .position(|b| *b == b':')
            .ok_or(io::ErrorKind::InvalidData)?;
        let name = String::from_utf8_lossy(&l[..colon]).to_string();
        headers.push((name, l[colon + 1..].trim_ascii().to_vec()));
    }
    Ok(Some(H1Head { start, headers }))
}

/// Reads a body with the given framing, calling `piece` with each piece as it arrives.
/// Returns the body and whether it was complete.
pub async fn read_h1_body<R: AsyncBufReadExt + Unpin>(
    io: &mut R,
    framing: Framing,
    mut piece: impl FnMut(&[u8]),
) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    match framing {
        Framing::Length(n) => {
            let mut buf = vec![0u8; 64 * 1024];
            while body.len() < n {
                let want = (n - body.len()).min(buf.len());
                match io.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => return (body, false),
                    Ok(got) => {
                        body.extend_from_slice(&buf[..got]);
                        piece(&buf[..got]);
                    }
                }
            }
            (body, true)
        }
        Framing::Chunked => {
            let mut line = Vec::new();
            loop {
                line.clear();
                if !matches!(io.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
                    return (body, false);
                }
                let size = trim_line(&line)
                    .split(|b| *b == b';')
                    .next()
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
                let Some(size) = size else {
                    return (body, false);
                };
                if size == 0 {
                    // Trailer section, up to the empty line.
                    loop {
                        line.clear();
                        if !matches!(io.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
                            return (body, false);
                        }
                        if trim_line(&line).is_empty() {
                            return (body, true);
                        }
                    }
                }
                let start = body.len();
                body.resize(start + size, 0);
                if io.read_exact(&mut body[start..]).await.is_err() {
                    body.truncate(start);
                    return (body, false);
                }
                piece(&body[start..]);
                line.clear();
                if !matches!(io.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
                    return (body, false);
                }
            }
        }
        Framing::None => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) => return (body, true),
                    Err(_) => return (body, false),
                    Ok(got) => {
                        body.extend_from_slice(&buf[..got]);
                        piece(&buf[..got]);
                    }
                }
            }
        }
    }
}

/// What a connection does after a reply.
enum After {
    KeepAlive,
    Close,
}

async fn serve_h1(stream: Stream, conn: usize, shared: &Shared) {
    let mut io = BufReader::new(stream);
    let mut stopping = shared.stopping.subscribe();
    loop {
        // An idle keep-alive connection closes when the mock stops.
        let head = tokio::select! {
            head = read_h1_head(&mut io) => head,
            _ = stopped(&mut stopping) => {
                let _ = io.shutdown().await;
                return;
            }
        };
        let Ok(Some(head)) = head else {
            return;
        };
        let received = Instant::now();
        // Like a real server, invite the body of an `Expect: 100-continue` request.
        if head.has_token("expect", "100-continue") && invite_body(&mut io).await.is_err() {
            return;
        }
        let framing = match head.framing() {
            // A request without framing has no body.
            Framing::None => Framing::Length(0),
            f => f,
        };
        let mut chunks = Vec::new();
        let (body, complete) = read_h1_body(&mut io, framing, |d| chunks.push(d.len())).await;
        let [method, target, _version] = &head.start;
        let request = RecordedRequest {
            conn,
            version: Version::H1,
            method: String::from_utf8_lossy(method).to_string(),
            target: target.clone(),
            authority: None,
            headers: head.headers.clone(),
            body,
            chunks,
            complete,
            received,
        };
        let Some((reply, is_head)) = shared.answer(request, complete) else {
            return;
        };
        let close_requested = head.has_token("connection", "close") || *stopping.borrow();
        match write_h1_reply(&mut io, reply, is_head, shared).await {
            Ok(After::KeepAlive) if !close_requested => continue,
            _ => {
                let _ = io.shutdown().await;
                return;
            }
        }
    }
}

async fn invite_body<W: AsyncWrite + Unpin>(io: &mut W) -> io::Result<()> {
    io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    io.flush().await
}

fn status_line(status: u16) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Status");
    format!("HTTP/1.1 {status} {reason}\r\n")
}

fn h1_head(status: u16, headers: &[(String, String)], extra: &[(&str, String)]) -> Vec<u8> {
    let mut head = status_line(status).into_bytes();
    let given = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    for (n, v) in headers {
        head.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    for (n, v) in extra {
        if !given(n) {
            head.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
    }
    head.extend_from_slice(b"\r\n");
    head
}

async fn write_chunk<W: AsyncWrite + Unpin>(io: &mut W, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(()); // an empty chunk would end the body
    }
    let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
    frame.extend_from_slice(data);
    frame.extend_from_slice(b"\r\n");
    io.write_all(&frame).await?;
    io.flush().await
}

const CHUNKED: (&str, &str) = ("transfer-encoding", "chunked");

async fn write_h1_reply(
    io: &mut BufReader<Stream>,
    reply: Reply,
    is_head: bool,
    shared: &Shared,
) -> io::Result<After> {
    let (reply, close_after) = match reply {
        Reply::CloseAfterResponse(inner) => (*inner, true),
        other => (other, false),
    };
    let after = match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let no_body = is_head || status == 204 || status == 304 || status < 200;
            let length = [("content-length", body.len().to_string())];
            let extra: &[(&str, String)] = if status == 204 || status < 200 {
                &[]
            } else {
                &length
            };
            io.write_all(&h1_head(status, &headers, extra)).await?;
            if !no_body {
                io.write_all(&body).await?;
            }
            io.flush().await?;
            After::KeepAlive
        }
        Reply::Chunks {
            status,
            headers,
            chunks,
            trailers,
        } => {
            io.write_all(&h1_head(status, &headers, &[(CHUNKED.0, CHUNKED.1.into())]))
                .await?;
            io.flush().await?;
            for (delay, data) in chunks {
                tokio::time::sleep(delay).await;
                write_chunk(io, &data).await?;
                shared.mark_sent();
            }
            let mut end = b"0\r\n".to_vec();
            for (n, v) in trailers.iter().flatten() {
                end.extend_from_slice(n.as_str().as_bytes());
                end.extend_from_slice(b": ");
                end.extend_from_slice(v.as_bytes());
                end.extend_from_slice(b"\r\n");
            }
            end.extend_from_slice(b"\r\n");
            io.write_all(&end).await?;
            io.flush().await?;
            After::KeepAlive
        }
        Reply::NeverRespond => {
            wait_for_eof(io).await;
            After::Close
        }
        Reply::SlowHeaders(delay) => {
            tokio::time::sleep(delay).await;
            Box::pin(write_h1_reply(io, ok_body(), is_head, shared)).await?
        }
        Reply::StallAfter {
            status,
            headers,
            first,
            stall,
        } => {
            io.write_all(&h1_head(status, &headers, &[(CHUNKED.0, CHUNKED.1.into())]))
                .await?;
            write_chunk(io, &first).await?;
            shared.mark_sent();
            tokio::time::sleep(stall).await;
            io.write_all(b"0\r\n\r\n").await?;
            io.flush().await?;
            After::KeepAlive
        }
        Reply::ResetMidBody { first } => {
            let headers = owned(&[("content-type", "text/event-stream")]);
            io.write_all(&h1_head(200, &headers, &[(CHUNKED.0, CHUNKED.1.into())]))
                .await?;
            write_chunk(io, &first).await?;
            shared.mark_sent();
            // Linger 0: closing sends RST instead of FIN. (Deprecated because a non-zero linger
            // blocks on drop; a zero linger never does.)
            #[allow(deprecated)]
            io.get_ref().tcp().set_linger(Some(Duration::ZERO))?;
            After::Close
        }
        Reply::Garbage(bytes) => {
            io.write_all(&bytes).await?;
            io.flush().await?;
            After::Close
        }
        Reply::After(delay, inner) => {
            tokio::time::sleep(delay).await;
            Box::pin(write_h1_reply(io, *inner, is_head, shared)).await?
        }
        Reply::Echo | Reply::CloseAfterResponse(_) => unreachable!("resolved and unwrapped above"),
    };
    Ok(if close_after { After::Close } else { after })
}

/// Reads and discards until the peer closes (or errors).
async fn wait_for_eof<R: AsyncRead + Unpin>(io: &mut R) {
    let mut buf = [0u8; 4096];
    while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
}

// ---------------------------------------------------------------------------------------------
// HTTP/2
// ---------------------------------------------------------------------------------------------

/// What a stream asks of its connection.
enum ConnAction {
    /// GOAWAY and close once the open streams are done.
    Close,
    /// GOAWAY(PROTOCOL_ERROR) and close now.
    Abort,
}

async fn serve_h2(stream: Stream, conn: usize, shared: &Arc<Shared>) {
    let Ok(mut h2) = h2::server::handshake(stream).await else {
        return;
    };
    let (actions_tx, mut actions) = mpsc::unbounded_channel();
    let mut stopping = shared.stopping.subscribe();
    loop {
        tokio::select! {
            _ = stopped(&mut stopping) => {
                // Streams in flight finish; the client is told to open no more.
                h2.graceful_shutdown();
                while let Some(Ok(_)) = h2.accept().await {}
                return;
            }
            next = h2.accept() => match next {
                Some(Ok((request, respond))) => {
                    let shared = shared.clone();
                    let actions = actions_tx.clone();
                    tokio::spawn(async move {
                        serve_h2_stream(request, respond, conn, &shared, actions).await;
                    });
                }
                _ => return,
            },
            Some(action) = actions.recv() => {
                match action {
                    ConnAction::Close => h2.graceful_shutdown(),
                    ConnAction::Abort => h2.abrupt_shutdown(h2::Reason::PROTOCOL_ERROR),
                }
                // Drive the connection until it has finished closing.
                while let Some(Ok(_)) = h2.accept().await {}
                return;
            }
        }
    }
}

/// Reads an HTTP/2 body to its end (trailers excepted), giving back flow-control capacity and
/// calling `piece` with each DATA frame's payload. Returns the body and the error that cut it
/// short, if any.
pub async fn read_h2_body(
    body: &mut h2::RecvStream,
    mut piece: impl FnMut(&[u8]),
) -> (Vec<u8>, Option<h2::Error>) {
    let mut data = Vec::new();
    while let Some(next) = body.data().await {
        match next {
            Ok(frame) => {
                let _ = body.flow_control().release_capacity(frame.len());
                piece(&frame);
                data.extend_from_slice(&frame);
            }
            Err(e) => return (data, Some(e)),
        }
    }
    (data, None)
}

async fn serve_h2_stream(
    request: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    conn: usize,
    shared: &Shared,
    actions: mpsc::UnboundedSender<ConnAction>,
) {
    let received = Instant::now();
    let (parts, mut body) = request.into_parts();
    let mut chunks = Vec::new();
    let (data, error) = read_h2_body(&mut body, |d| chunks.push(d.len())).await;
    let complete = error.is_none();
    if complete {
        let _ = body.trailers().await;
    }
    let request = RecordedRequest {
        conn,
        version: Version::H2,
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes()
            .to_vec(),
        authority: parts.uri.authority().map(|a| a.to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: data,
        chunks,
        complete,
        received,
    };
    let Some((reply, is_head)) = shared.answer(request, complete) else {
        return;
    };
    let _ = write_h2_reply(respond, reply, is_head, shared, &actions).await;
}

fn h2_head(
    status: u16,
    headers: &[(String, String)],
    extra: &[(&str, String)],
) -> http::Response<()> {
    let mut b = http::Response::builder().status(status);
    let given = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    for (n, v) in headers {
        b = b.header(n.as_str(), v.as_str());
    }
    for (n, v) in extra {
        if !given(n) {
            b = b.header(*n, v.as_str());
        }
    }
    b.body(()).expect("valid response head")
}

async fn write_h2_reply(
    mut respond: h2::server::SendResponse<Bytes>,
    reply: Reply,
    is_head: bool,
    shared: &Shared,
    actions: &mpsc::UnboundedSender<ConnAction>,
) -> Result<(), h2::Error> {
    let (reply, close_after) = match reply {
        Reply::CloseAfterResponse(inner) => (*inner, true),
        other => (other, false),
    };
    match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let length = [("content-length", body.len().to_string())];
            let head = h2_head(status, &headers, &length);
            if is_head || body.is_empty() {
                respond.send_response(head, true)?;
            } else {
                respond.send_response(head, false)?.send_data(body, true)?;
            }
        }
        Reply::Chunks {
            status,
            headers,
            chunks,
            trailers,
        } => {
            let mut stream = respond.send_response(h2_head(status, &headers, &[]), false)?;
            for (delay, data) in chunks {
                tokio::time::sleep(delay).await;
                stream.send_data(data, false)?;
                shared.mark_sent();
            }
            match trailers {
                Some(t) => stream.send_trailers(t)?,
                None => stream.send_data(Bytes::new(), true)?,
            }
        }
        Reply::NeverRespond => {
            let _ = poll_fn(|cx| respond.poll_reset(cx)).await;
        }
        Reply::SlowHeaders(delay) => {
            tokio::time::sleep(delay).await;
            Box::pin(write_h2_reply(respond, ok_body(), is_head, shared, actions)).await?;
        }
        Reply::StallAfter {
            status,
            headers,
            first,
            stall,
        } => {
            let mut stream = respond.send_response(h2_head(status, &headers, &[]), false)?;
            stream.send_data(first, false)?;
            shared.mark_sent();
            tokio::time::sleep(stall).await;
            stream.send_data(Bytes::new(), true)?;
        }
        Reply::ResetMidBody { first } => {
            let headers = owned(&[("content-type", "text/event-stream")]);
            let mut stream = respond.send_response(h2_head(200, &headers, &[]), false)?;
            stream.send_data(first, false)?;
            shared.mark_sent();
            // Let the DATA frame leave before the reset discards what is still queued.
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.send_reset(h2::Reason::INTERNAL_ERROR);
        }
        Reply::Garbage(_) => {
            let _ = actions.send(ConnAction::Abort);
        }
        Reply::After(delay, inner) => {
            tokio::time::sleep(delay).await;
            Box::pin(write_h2_reply(respond, *inner, is_head, shared, actions)).await?;
        }
        Reply::Echo | Reply::CloseAfterResponse(_) => unreachable!("resolved and unwrapped above"),
    }
    if close_after {
        let _ = actions.send(ConnAction::Close);
    }
    Ok(())
}
