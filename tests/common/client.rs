//! Clients that talk to the proxy: a raw HTTP/1.1 client (exact bytes out, every chunk's arrival
//! time in), an HTTP/2 client on the `h2` crate (prior knowledge or TLS with ALPN), and curl.
//!
//! Every read is bounded by [`CLIENT_TIMEOUT`], so a test never hangs on a proxy that went quiet.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use openssl::ssl::{SslConnector, SslMethod};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use super::certs::TestCerts;
use super::mock::{read_h1_body, read_h1_head, Framing, H1Head, ShowBody, ShowHeaders};

/// The longest a client waits for a whole response.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

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
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| std::str::from_utf8(v).unwrap_or(""))
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("response body is JSON")
    }
}

/// A raw HTTP/1.1 connection to the proxy.
pub struct H1Client {
    io: BufReader<TcpStream>,
}

impl H1Client {
    pub async fn connect(addr: SocketAddr) -> H1Client {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        tcp.set_nodelay(true).expect("nodelay");
        H1Client {
            io: BufReader::new(tcp),
        }
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
        let framing = if head_request || status == 204 || status == 304 || status < 200 {
            Framing::Length(0)
        } else {
            head.framing()
        };
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

/// Reads the body that follows `head`, framed as `framing` says, timing each piece.
pub async fn read_h1_response<R: AsyncBufReadExt + Unpin>(
    io: &mut R,
    head: H1Head,
    framing: Framing,
) -> H1Response {
    let mut pieces = Vec::new();
    let (body, complete) = read_h1_body(io, framing, |n| pieces.push((Instant::now(), n))).await;
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

/// An HTTP/2 connection to the proxy; cheap to clone for concurrent streams.
#[derive(Clone)]
pub struct H2Client {
    send: h2::client::SendRequest<Bytes>,
    base: String,
}

impl H2Client {
    /// HTTP/2 with prior knowledge (the proxy listener needs `h2c: true`).
    pub async fn connect(addr: SocketAddr) -> H2Client {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        tcp.set_nodelay(true).expect("nodelay");
        H2Client::handshake(tcp, format!("http://{addr}")).await
    }

    /// HTTP/2 over TLS, ALPN `h2`, verifying the proxy's certificate against the test CA.
    pub async fn connect_tls(addr: SocketAddr, certs: &TestCerts) -> H2Client {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        tcp.set_nodelay(true).expect("nodelay");
        let mut b = SslConnector::builder(SslMethod::tls()).expect("connector");
        b.set_ca_file(&certs.ca_path).expect("trust the test CA");
        b.set_alpn_protos(b"\x02h2").expect("ALPN");
        let ssl = b
            .build()
            .configure()
            .and_then(|c| c.into_ssl("localhost"))
            .expect("client TLS");
        let mut tls = Box::pin(SslStream::new(ssl, tcp).expect("TLS stream"));
        tls.as_mut()
            .connect()
            .await
            .expect("TLS handshake with the proxy");
        assert_eq!(
            tls.ssl().selected_alpn_protocol(),
            Some(&b"h2"[..]),
            "proxy chose h2"
        );
        H2Client::handshake(TlsIo(tls), format!("https://localhost:{}", addr.port())).await
    }

    async fn handshake<T>(io: T, base: String) -> H2Client
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, connection) = h2::client::handshake(io).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        H2Client { send, base }
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
        self.request_chunks(method, path, headers, &chunks).await
    }

    /// A JSON POST (`content-type: application/json`).
    pub async fn post_json(&self, path: &str, body: &[u8]) -> H2Response {
        self.request("POST", path, &[("content-type", "application/json")], body)
            .await
    }

    /// Sends a request whose body goes out as DATA frames, each after its pause.
    pub async fn request_chunks(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        chunks: &[(Duration, &[u8])],
    ) -> H2Response {
        tokio::time::timeout(
            CLIENT_TIMEOUT,
            self.request_inner(method, path, headers, chunks),
        )
        .await
        .expect("h2 response within the client timeout")
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        chunks: &[(Duration, &[u8])],
    ) -> H2Response {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(()).expect("valid request");
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .expect("h2 connection ready");
        let (response, mut stream) = send
            .send_request(req, chunks.is_empty())
            .expect("send h2 request");
        for (i, (pause, data)) in chunks.iter().enumerate() {
            tokio::time::sleep(*pause).await;
            stream
                .send_data(Bytes::copy_from_slice(data), i + 1 == chunks.len())
                .expect("send h2 body");
        }
        let response = response.await.expect("h2 response head");
        let (parts, mut body) = response.into_parts();
        let mut data = Vec::new();
        let mut pieces = Vec::new();
        let mut error = None;
        while let Some(piece) = body.data().await {
            match piece {
                Ok(piece) => {
                    let _ = body.flow_control().release_capacity(piece.len());
                    pieces.push((Instant::now(), piece.len()));
                    data.extend_from_slice(&piece);
                }
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        let trailers = match error {
            None => body.trailers().await.unwrap_or_else(|e| {
                error = Some(e.to_string());
                None
            }),
            Some(_) => None,
        };
        H2Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: data,
            pieces,
            trailers,
            error,
        }
    }
}

/// A pinned TLS stream as a plain `Unpin` IO object for the h2 crate.
struct TlsIo(Pin<Box<SslStream<TcpStream>>>);

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.as_mut().poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.as_mut().poll_shutdown(cx)
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
