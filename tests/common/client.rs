//! Clients that talk to the proxy (or the mock): a raw HTTP/1.1 client (exact bytes out, every
//! piece's arrival time in) over plain TCP or TLS, a blocking keep-alive wrapper of it for load
//! threads, an HTTP/2 client on the `h2` crate (prior knowledge or TLS with ALPN) that also
//! tells when its connection ended, TLS connections with a chosen ALPN and versions, and curl.
//!
//! Every read is bounded by [`CLIENT_TIMEOUT`], so a test never hangs on a proxy that went quiet.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use openssl::ssl::{SslConnector, SslConnectorBuilder, SslMethod};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_openssl::SslStream;

use super::certs::TestCerts;
use super::mock::{
    find_header, has_header_token, read_h1_body, read_h1_head, read_h2_body, Framing, H1Head,
    ShowBody, ShowHeaders, Stream,
};

/// The longest a client waits for a whole response.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// A client-side TLS connection.
pub type TlsStream = Pin<Box<SslStream<TcpStream>>>;

/// A TLS client trusting `ca`, with `setup` choosing ALPN, versions, ciphers.
pub fn tls_client(ca: &Path, setup: impl FnOnce(&mut SslConnectorBuilder)) -> SslConnector {
    let mut b = SslConnector::builder(SslMethod::tls()).expect("TLS connector");
    b.set_ca_file(ca).expect("trust the test CA");
    setup(&mut b);
    b.build()
}

/// A TLS connection to `addr` made by `client` (verifying the name `localhost`).
pub async fn tls_handshake(addr: SocketAddr, client: &SslConnector) -> Result<TlsStream, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let ssl = client
        .configure()
        .and_then(|c| c.into_ssl("localhost"))
        .expect("client TLS");
    let mut tls = Box::pin(SslStream::new(ssl, tcp).expect("TLS stream"));
    tokio::time::timeout(CLIENT_TIMEOUT, tls.as_mut().connect())
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(tls)
}

/// A TLS connection to `addr` trusting `ca`, with `setup` choosing ALPN, versions, ciphers.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    setup: impl FnOnce(&mut SslConnectorBuilder),
) -> Result<TlsStream, String> {
    tls_handshake(addr, &tls_client(ca, setup)).await
}

/// A `setup` for [`tls_connect`] offering `protos` (wire format, e.g. `b"\x02h2"`) by ALPN.
pub fn alpn(protos: &'static [u8]) -> impl FnOnce(&mut SslConnectorBuilder) {
    move |b| b.set_alpn_protos(protos).expect("ALPN list")
}

/// Waits for the peer to close, reading and discarding what it sends first (an HTTP/2 server's
/// SETTINGS): `Some(after)` with the time it took, `None` if it stayed open for `limit`.
pub async fn wait_for_close<R: AsyncRead + Unpin>(io: &mut R, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, closed)
        .await
        .ok()
        .map(|_| start.elapsed())
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1
// ---------------------------------------------------------------------------------------------

/// A response as the raw client read it.
#[derive(Clone)]
pub struct H1Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The body was chunked.
    pub chunked: bool,
    /// When each body piece arrived and its size (chunks for a chunked body, reads otherwise).
    pub pieces: Vec<(Instant, usize)>,
    /// The body ended as its framing says (false: the connection dropped first).
    pub complete: bool,
}

impl std::fmt::Debug for H1Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Response")
            .field("status", &self.status)
            .field("headers", &ShowHeaders(&self.headers))
            .field("body", &ShowBody(&self.body))
            .field("chunked", &self.chunked)
            .field("pieces", &self.pieces.len())
            .field("complete", &self.complete)
            .finish()
    }
}

impl H1Response {
    /// The first value of header `name` as text (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name).map(|v| std::str::from_utf8(v).unwrap_or(""))
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("response body is JSON")
    }

    /// True when `header` is a comma-separated list containing `token` (case-insensitive).
    pub fn has_token(&self, header: &str, token: &str) -> bool {
        has_header_token(&self.headers, header, token)
    }

    /// The response said `Connection: close`.
    pub fn closes(&self) -> bool {
        self.has_token("connection", "close")
    }
}

/// A raw HTTP/1.1 connection, plain or TLS.
pub struct H1Client {
    io: BufReader<Stream>,
}

impl H1Client {
    /// A plain connection; panics if the connect fails.
    pub async fn connect(addr: SocketAddr) -> H1Client {
        H1Client::try_connect(addr)
            .await
            .expect("connect to the proxy")
    }

    /// A plain connection, or why not (within 2 s).
    pub async fn try_connect(addr: SocketAddr) -> io::Result<H1Client> {
        let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        Ok(H1Client::over(Stream::Plain(tcp)))
    }

    /// HTTP/1.1 on a connection made elsewhere (e.g. by [`tls_connect`]).
    pub fn over(stream: Stream) -> H1Client {
        H1Client {
            io: BufReader::new(stream),
        }
    }

    /// HTTP/1.1 over a TLS connection made by [`tls_connect`].
    pub fn over_tls(tls: TlsStream) -> H1Client {
        H1Client::over(Stream::Tls(tls))
    }

    /// True while the peer has neither closed the connection nor sent anything unasked (what
    /// an HTTP client checks before reusing a keep-alive connection).
    pub fn is_reusable(&self) -> bool {
        if !self.io.buffer().is_empty() {
            return false;
        }
        // Peek through a second handle on the (non-blocking) socket: no runtime needed.
        let Ok(fd) = self.io.get_ref().tcp().as_fd().try_clone_to_owned() else {
            return false;
        };
        let mut byte = [0u8; 1];
        let peeked = std::net::TcpStream::from(fd).peek(&mut byte);
        matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Waits for the peer to close this connection; see [`wait_for_close`].
    pub async fn wait_for_close(&mut self, limit: Duration) -> Option<Duration> {
        wait_for_close(&mut self.io, limit).await
    }

    /// Sends `request` and reads its final response, passing each body piece to `on_piece` as
    /// it arrives. Errors (connection closed or reset, body cut short, timeout) are returned.
    pub async fn try_exchange(
        &mut self,
        request: &[u8],
        mut on_piece: impl FnMut(&[u8]),
    ) -> io::Result<H1Response> {
        let head_request = request.starts_with(b"HEAD ");
        let exchange = async {
            let context =
                |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
            self.io
                .get_mut()
                .write_all(request)
                .await
                .map_err(|e| context("write", e))?;
            loop {
                let head = read_h1_head(&mut self.io)
                    .await
                    .map_err(|e| context("read", e))?
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::UnexpectedEof, "read: connection closed")
                    })?;
                let status = response_status(&head);
                let framing = response_framing(&head, status, head_request);
                let r = read_h1_response_with(&mut self.io, head, framing, &mut on_piece).await;
                if !r.complete {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read: the body was cut short",
                    ));
                }
                if r.status >= 200 || r.status == 101 {
                    return Ok(r);
                }
            }
        };
        tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no response within the client timeout",
                ))
            })
    }

    /// Writes exactly these bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.io
            .get_mut()
            .write_all(bytes)
            .await
            .expect("write to the proxy");
    }

    /// Writes a chunked body: each chunk framed and flushed after its pause, then the last chunk.
    pub async fn send_chunks(&mut self, chunks: &[(Duration, &[u8])]) {
        for (pause, data) in chunks {
            tokio::time::sleep(*pause).await;
            let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
            frame.extend_from_slice(data);
            frame.extend_from_slice(b"\r\n");
            self.send(&frame).await;
        }
        self.send(b"0\r\n\r\n").await;
    }

    /// Sends the head of a chunked JSON POST to `target`; the body follows with
    /// [`H1Client::send_chunks`].
    pub async fn send_chunked_post_head(&mut self, target: &str) {
        let head = request_bytes(
            "POST",
            target,
            &[
                ("Content-Type", "application/json"),
                ("Transfer-Encoding", "chunked"),
            ],
            b"",
        );
        self.send(&head).await;
    }

    /// A JSON POST with `Expect: 100-continue`: sends the head, asserts that `100 Continue`
    /// arrives within 500 ms (before any of the body is sent, RFC 9110 §10.1.1), then sends
    /// `body` and reads the final response.
    pub async fn post_json_expecting_continue(&mut self, target: &str, body: &[u8]) -> H1Response {
        let len = body.len().to_string();
        let head = request_bytes(
            "POST",
            target,
            &[
                ("Content-Type", "application/json"),
                ("Content-Length", &len),
                ("Expect", "100-continue"),
            ],
            b"",
        );
        self.send(&head).await;
        let interim = tokio::time::timeout(Duration::from_millis(500), self.read_response(false))
            .await
            .expect("100 Continue before the body is sent (RFC 9110 §10.1.1)");
        assert_eq!(interim.status, 100);
        self.send(body).await;
        self.read_final_response(false).await
    }

    /// Reads one response (`head_request`: the request was HEAD, so no body follows).
    pub async fn read_response(&mut self, head_request: bool) -> H1Response {
        tokio::time::timeout(CLIENT_TIMEOUT, self.read_response_inner(head_request))
            .await
            .expect("response within the client timeout")
    }

    async fn read_response_inner(&mut self, head_request: bool) -> H1Response {
        let head = read_h1_head(&mut self.io)
            .await
            .expect("read response head")
            .expect("a response, but the proxy closed the connection (on a keep-alive connection: did it think it was draining?)");
        let status = response_status(&head);
        let framing = response_framing(&head, status, head_request);
        read_h1_response(&mut self.io, head, framing).await
    }

    /// Reads raw bytes until the peer closes the connection.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut raw = Vec::new();
        tokio::time::timeout(CLIENT_TIMEOUT, self.io.read_to_end(&mut raw))
            .await
            .expect("connection closed within the client timeout")
            .expect("read until close");
        raw
    }

    /// Reads responses until a final one (skipping interim 1xx answers such as 100 Continue).
    pub async fn read_final_response(&mut self, head_request: bool) -> H1Response {
        loop {
            let r = self.read_response(head_request).await;
            if r.status >= 200 || r.status == 101 {
                return r;
            }
        }
    }

    /// Sends a request built by [`request_bytes`] and reads its final response.
    pub async fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> H1Response {
        self.send(&request_bytes(method, target, headers, body))
            .await;
        self.read_final_response(method == "HEAD").await
    }
}

/// The status code of a response head.
pub fn response_status(head: &H1Head) -> u16 {
    std::str::from_utf8(&head.start[1])
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("numeric status")
}

/// How the body after a response head is framed (none after HEAD, 1xx, 204 and 304).
fn response_framing(head: &H1Head, status: u16, head_request: bool) -> Framing {
    if head_request || status == 204 || status == 304 || status < 200 {
        Framing::Length(0)
    } else {
        head.framing()
    }
}

/// Reads the body that follows `head`, framed as `framing` says, timing each piece.
pub async fn read_h1_response<R: AsyncBufReadExt + Unpin>(
    io: &mut R,
    head: H1Head,
    framing: Framing,
) -> H1Response {
    read_h1_response_with(io, head, framing, |_| {}).await
}

async fn read_h1_response_with<R: AsyncBufReadExt + Unpin>(
    io: &mut R,
    head: H1Head,
    framing: Framing,
    mut on_piece: impl FnMut(&[u8]),
) -> H1Response {
    let mut pieces = Vec::new();
    let (body, complete) = read_h1_body(io, framing, |d| {
        pieces.push((Instant::now(), d.len()));
        on_piece(d);
    })
    .await;
    H1Response {
        status: response_status(&head),
        chunked: framing == Framing::Chunked,
        headers: head.headers,
        body,
        pieces,
        complete,
    }
}

/// An HTTP/1.1 request: `Host: arkgate.test` unless `headers` has one, `Content-Length` for a
/// non-empty body unless `headers` frames it.
pub fn request_bytes(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut out = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
    if !has("host") {
        out.extend_from_slice(b"Host: arkgate.test\r\n");
    }
    for (n, v) in headers {
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    if !body.is_empty() && !has("content-length") && !has("transfer-encoding") {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// One request on a fresh connection.
pub async fn h1(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> H1Response {
    H1Client::connect(addr)
        .await
        .request(method, target, headers, body)
        .await
}

/// A JSON POST on a fresh connection.
pub async fn post_json(addr: SocketAddr, target: &str, body: &str) -> H1Response {
    h1(
        addr,
        "POST",
        target,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
}

/// A JSON POST to `target` (`Content-Type: application/json`, `Content-Length`).
pub fn json_post_bytes(target: &str, body: &str) -> Vec<u8> {
    request_bytes(
        "POST",
        target,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// Blocking HTTP/1.1, for load threads and plain `#[test]`s
// ---------------------------------------------------------------------------------------------

/// A keep-alive client the way HTTP clients behave, for threads outside any runtime: it reuses
/// its connection unless the last answer said `Connection: close` or the server has closed it
/// since (checked before sending). An [`H1Client`] on a runtime of its own.
pub struct BlockingClient {
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    conn: Option<H1Client>,
    /// How many connections it has opened.
    pub connects: usize,
}

impl BlockingClient {
    pub fn new(addr: SocketAddr) -> BlockingClient {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime");
        BlockingClient {
            addr,
            runtime,
            conn: None,
            connects: 0,
        }
    }

    /// Sends one request and reads the complete answer. Any error while the request is in
    /// flight is returned (and the connection dropped); its kind is the socket's (refused,
    /// reset …), its message says which step failed.
    pub fn send(&mut self, request: &[u8]) -> io::Result<H1Response> {
        self.stream(request, |_| {})
    }

    /// [`BlockingClient::send`], passing each body piece to `on_piece` as it arrives.
    pub fn stream(
        &mut self,
        request: &[u8],
        on_piece: impl FnMut(&[u8]),
    ) -> io::Result<H1Response> {
        if self.conn.as_ref().is_some_and(|c| !c.is_reusable()) {
            self.conn = None;
        }
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => {
                let c = self
                    .runtime
                    .block_on(H1Client::try_connect(self.addr))
                    .map_err(|e| io::Error::new(e.kind(), format!("connect: {e}")))?;
                self.connects += 1;
                self.conn.insert(c)
            }
        };
        let result = self.runtime.block_on(conn.try_exchange(request, on_piece));
        match &result {
            Ok(r) if !r.closes() => {}
            _ => self.conn = None,
        }
        result
    }

    /// `GET path`; panics on a connection error (for the admin listener).
    pub fn get(&mut self, path: &str) -> H1Response {
        self.send(&request_bytes("GET", path, &[], b""))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/2
// ---------------------------------------------------------------------------------------------

/// A response as the HTTP/2 client read it.
#[derive(Debug)]
pub struct H2Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// When each DATA frame arrived and its size.
    pub pieces: Vec<(Instant, usize)>,
    pub trailers: Option<HeaderMap>,
    /// Why the body ended early (a stream reset, a closed connection); None for a clean end.
    pub error: Option<String>,
}

impl H2Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap_or(""))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// How and when an HTTP/2 connection ended.
pub type Ended = (Instant, Result<(), String>);

/// An HTTP/2 connection; cheap to clone for concurrent streams. It stays open while a clone
/// lives (the client never closes on its own), and tells when the server closed it.
#[derive(Clone)]
pub struct H2Client {
    send: h2::client::SendRequest<Bytes>,
    base: String,
    ended: watch::Receiver<Option<Ended>>,
}

impl H2Client {
    /// HTTP/2 with prior knowledge (the proxy listener needs `h2c: true`).
    pub async fn connect(addr: SocketAddr) -> H2Client {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        tcp.set_nodelay(true).expect("nodelay");
        H2Client::handshake(Stream::Plain(tcp), format!("http://{addr}")).await
    }

    /// HTTP/2 over TLS, ALPN `h2`, verifying the proxy's certificate against the test CA.
    pub async fn connect_tls(addr: SocketAddr, certs: &TestCerts) -> H2Client {
        let tls = tls_connect(addr, &certs.ca_path, alpn(b"\x02h2"))
            .await
            .expect("TLS handshake with the proxy");
        assert_eq!(
            tls.ssl().selected_alpn_protocol(),
            Some(&b"h2"[..]),
            "proxy chose h2"
        );
        let base = format!("https://localhost:{}", addr.port());
        H2Client::handshake(Stream::Tls(tls), base).await
    }

    /// The HTTP/2 handshake on `io`; request URIs start with `base` (`scheme://authority`).
    pub async fn handshake<T>(io: T, base: String) -> H2Client
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, connection) = tokio::time::timeout(CLIENT_TIMEOUT, h2::client::handshake(io))
            .await
            .expect("h2 handshake within the client timeout")
            .expect("h2 handshake");
        let (ended_tx, ended) = watch::channel(None);
        tokio::spawn(async move {
            let result = connection.await.map_err(|e| e.to_string());
            ended_tx.send_replace(Some((Instant::now(), result)));
        });
        H2Client { send, base, ended }
    }

    /// The server has closed the connection (or it broke).
    pub fn is_closed(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// Waits up to `limit` for the connection to end: when, and with what error (None: still
    /// open).
    pub async fn closed_within(&self, limit: Duration) -> Option<Ended> {
        let mut ended = self.ended.clone();
        let closed = tokio::time::timeout(limit, ended.wait_for(|e| e.is_some()))
            .await
            .ok()?
            .ok()?
            .clone();
        closed
    }

    /// How many concurrent streams the server allows (its SETTINGS).
    pub fn max_send_streams(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Sends a request with `body` (none if empty) and reads the whole response.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> H2Response {
        let chunks: Vec<(Duration, &[u8])> = if body.is_empty() {
            vec![]
        } else {
            vec![(Duration::ZERO, body)]
        };
        self.try_request(method, path, headers, &chunks)
            .await
            .expect("an h2 response")
    }

    /// A JSON POST (`content-type: application/json`).
    pub async fn post_json(&self, path: &str, body: &[u8]) -> H2Response {
        self.request("POST", path, &[("content-type", "application/json")], body)
            .await
    }

    /// A bodiless GET; `Err` when no response head arrived (stream reset, closed connection,
    /// the client timeout).
    pub async fn try_get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<H2Response, String> {
        self.try_request("GET", path, headers, &[]).await
    }

    /// Sends a request whose body goes out as DATA frames, each after its pause, and reads the
    /// whole response; `Err` when no response head arrived (stream reset, closed connection,
    /// the client timeout).
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        chunks: &[(Duration, &[u8])],
    ) -> Result<H2Response, String> {
        let exchange = async {
            let mut req = http::Request::builder()
                .method(method)
                .uri(format!("{}{path}", self.base));
            for (n, v) in headers {
                req = req.header(*n, *v);
            }
            let req = req.body(()).map_err(|e| e.to_string())?;
            let mut send = self.send.clone().ready().await.map_err(|e| e.to_string())?;
            let (response, mut stream) = send
                .send_request(req, chunks.is_empty())
                .map_err(|e| e.to_string())?;
            for (i, (pause, data)) in chunks.iter().enumerate() {
                tokio::time::sleep(*pause).await;
                stream
                    .send_data(Bytes::copy_from_slice(data), i + 1 == chunks.len())
                    .expect("send h2 body");
            }
            let (parts, mut body) = response.await.map_err(|e| e.to_string())?.into_parts();
            let mut pieces = Vec::new();
            let (data, error) =
                read_h2_body(&mut body, |d| pieces.push((Instant::now(), d.len()))).await;
            let mut error = error.map(|e| e.to_string());
            let trailers = match error {
                None => body.trailers().await.unwrap_or_else(|e| {
                    error = Some(e.to_string());
                    None
                }),
                Some(_) => None,
            };
            Ok::<_, String>(H2Response {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: data,
                pieces,
                trailers,
                error,
            })
        };
        tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .map_err(|_| "no h2 response within the client timeout".to_string())?
    }
}

// ---------------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------------

/// What curl received.
#[derive(Debug)]
pub struct CurlOutput {
    pub status: u16,
    /// `1.1` or `2`.
    pub http_version: String,
    /// Headers of the final response, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl CurlOutput {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Runs `curl -sS` with `args` (plus a 10 s limit) and returns the final response.
pub async fn curl(args: &[&str]) -> CurlOutput {
    let dir = tempfile::tempdir().expect("temp dir for curl");
    let head_path = dir.path().join("head");
    let body_path = dir.path().join("body");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "%{http_version}", "-D"])
        .arg(&head_path)
        .arg("-o")
        .arg(&body_path)
        .args(args)
        .output()
        .await
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&head_path).expect("curl headers");
    // With interim responses there are several header blocks; the last one is the answer.
    let last = head
        .trim_end()
        .rsplit("\r\n\r\n")
        .next()
        .expect("a header block");
    let mut lines = last.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("curl status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    CurlOutput {
        status,
        http_version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        headers,
        body: std::fs::read(&body_path).unwrap_or_default(),
    }
}
