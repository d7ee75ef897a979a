//! A small, fast HTTP/1.1 upstream for `benches/load.sh`, standing in for ARK.
//!
//! It answers every request, whatever the method and path, with one fixed chat completion (about
//! 300 bytes, with `Content-Length`), or with a paced SSE stream, and keeps connections alive.
//! Request bodies are read whole (`Content-Length` or chunked) and checked for the text
//! `json_schema`, so a run can show whether a proxy rewrote them. Both the JSON answer and every
//! SSE event contain `json_schema` too, so a proxy's response rewrite has work to do.
//!
//! ```text
//! mock_upstream --port N [--delay-ms D] [--sse-chunks N --sse-gap-ms G] [--threads T]
//!               [--tls-cert PEM --tls-key PEM]
//! ```
//! - `--delay-ms D`: wait D ms after reading a request before answering (default 0).
//! - `--sse-chunks N`: answer `text/event-stream`, chunked, N `data: {...}` events, the first at
//!   once and then one every `--sse-gap-ms G` (default 20), paced from the start of the stream.
//! - `--threads T`: tokio worker threads (default 1: a current-thread runtime, the cheapest when
//!   the mock is pinned to one core).
//! - `--tls-cert PEM --tls-key PEM`: speak TLS (HTTP/1.1 by ALPN) with this certificate and key,
//!   for the TLS-on-both-sides shape of `benches/percore.sh`.
//!
//! `GET /__stats` answers one JSON line and is not itself counted:
//! `{"accepted":A,"connections":C,"requests":R,"json_schema_bodies":S}` where `accepted` counts
//! every TCP connection, `connections` those that carried at least one counted request (the
//! upstream connections a proxy used), `requests` the answered requests, and
//! `json_schema_bodies` the request bodies that still contained `json_schema`. The same line is
//! printed on stdout at exit (SIGINT or SIGTERM).

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use memchr::memmem;
use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Largest request head accepted; more gets 431 and a close.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body accepted; more gets 413 and a close.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Listen backlog: thousands of clients may connect at once (capped by `net.core.somaxconn`).
const BACKLOG: u32 = 8192;
/// Spare room kept in a connection's read buffer before each read.
const READ_RESERVE_BYTES: usize = 4096;

/// The non-streaming answer: an OpenAI-shaped chat completion of about 300 bytes.
const COMPLETION: &str = concat!(
    r#"{"id":"chatcmpl-0123456789abcdef","object":"chat.completion","created":1700000000,"#,
    r#""model":"deepseek-v3-250324","choices":[{"index":0,"message":{"role":"assistant","#,
    r#""content":"{\"city\":\"Paris\",\"format\":\"json_schema\"}"},"finish_reason":"stop"}],"#,
    r#""usage":{"prompt_tokens":42,"completion_tokens":12,"total_tokens":54}}"#
);

/// One SSE event (the chunked framing is added at start).
const SSE_EVENT: &str = concat!(
    r#"data: {"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk","#,
    r#""created":1700000000,"model":"deepseek-v3-250324","choices":[{"index":0,"#,
    r#""delta":{"content":"a token about json_schema"},"finish_reason":null}]}"#,
    "\n\n"
);

static ACCEPTED: AtomicU64 = AtomicU64::new(0);
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static SCHEMA_BODIES: AtomicU64 = AtomicU64::new(0);

/// Command-line settings.
struct Options {
    port: u16,
    delay: Duration,
    sse_chunks: usize,
    sse_gap: Duration,
    threads: usize,
    /// Certificate chain and key (PEM): serve TLS.
    tls: Option<(String, String)>,
}

/// Everything a connection needs, built once: the settings and the pre-encoded answers.
struct Shared {
    delay: Duration,
    sse_chunks: usize,
    sse_gap: Duration,
    /// Full keep-alive answer: status line, headers and body.
    completion: Vec<u8>,
    /// The same with `Connection: close`.
    completion_close: Vec<u8>,
    /// SSE status line and headers.
    sse_head: Vec<u8>,
    sse_head_close: Vec<u8>,
    /// One event framed as one HTTP/1.1 chunk.
    sse_chunk: Vec<u8>,
}

fn usage() -> String {
    "usage: mock_upstream --port N [--delay-ms D] [--sse-chunks N --sse-gap-ms G] [--threads T] \
     [--tls-cert PEM --tls-key PEM]"
        .to_string()
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        port: 0,
        delay: Duration::ZERO,
        sse_chunks: 0,
        sse_gap: Duration::from_millis(20),
        threads: 1,
        tls: None,
    };
    let mut port = None;
    let (mut cert, mut key) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(usage());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{}", usage()))?;
        let number = |what: &str| -> Result<u64, String> {
            value
                .parse::<u64>()
                .map_err(|_| format!("{what}: `{value}` is not a whole number"))
        };
        match flag.as_str() {
            "--port" => {
                port = Some(
                    u16::try_from(number("--port")?)
                        .map_err(|_| format!("--port: {value} is out of range"))?,
                )
            }
            "--delay-ms" => opts.delay = Duration::from_millis(number("--delay-ms")?),
            "--sse-chunks" => {
                opts.sse_chunks = usize::try_from(number("--sse-chunks")?)
                    .map_err(|_| format!("--sse-chunks: {value} is out of range"))?
            }
            "--sse-gap-ms" => opts.sse_gap = Duration::from_millis(number("--sse-gap-ms")?),
            "--tls-cert" => cert = Some(value),
            "--tls-key" => key = Some(value),
            "--threads" => {
                opts.threads = usize::try_from(number("--threads")?)
                    .ok()
                    .filter(|t| *t >= 1)
                    .ok_or_else(|| format!("--threads: {value} must be at least 1"))?
            }
            other => return Err(format!("unknown option {other}\n{}", usage())),
        }
    }
    opts.port = port.ok_or_else(|| format!("--port is required\n{}", usage()))?;
    opts.tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(format!("--tls-cert and --tls-key go together\n{}", usage())),
    };
    Ok(opts)
}

impl Shared {
    fn new(o: &Options) -> Shared {
        let completion = |close: bool| {
            let mut v = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
                COMPLETION.len(),
                if close { "Connection: close\r\n" } else { "" }
            )
            .into_bytes();
            v.extend_from_slice(COMPLETION.as_bytes());
            v
        };
        let sse_head = |close: bool| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                 Transfer-Encoding: chunked\r\n{}\r\n",
                if close { "Connection: close\r\n" } else { "" }
            )
            .into_bytes()
        };
        Shared {
            delay: o.delay,
            sse_chunks: o.sse_chunks,
            sse_gap: o.sse_gap,
            completion: completion(false),
            completion_close: completion(true),
            sse_head: sse_head(false),
            sse_head_close: sse_head(true),
            sse_chunk: format!("{:x}\r\n{SSE_EVENT}\r\n", SSE_EVENT.len()).into_bytes(),
        }
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
}

/// A parsed request head: only what the mock acts on.
#[derive(Debug)]
struct Head {
    len: usize,
    framing: Framing,
    close: bool,
    stats: bool,
}

/// Why a request cannot be served; the connection is answered with `status` and closed.
#[derive(Debug)]
struct BadRequest {
    status: &'static str,
}

const BAD_REQUEST: BadRequest = BadRequest {
    status: "400 Bad Request",
};

/// Parses a request head from the start of `buf`; `Ok(None)` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, BadRequest> {
    let Some(end) = memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD_BYTES {
            return Err(BadRequest {
                status: "431 Request Header Fields Too Large",
            });
        }
        return Ok(None);
    };
    let text = &buf[..end];
    let mut lines = text
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().ok_or(BAD_REQUEST)?;
    let mut parts = request_line.split(|b| *b == b' ');
    let (_method, target, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) if !m.is_empty() => (m, t, v),
        _ => return Err(BAD_REQUEST),
    };
    let mut close = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        _ => return Err(BAD_REQUEST),
    };
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let colon = memchr::memchr(b':', line).ok_or(BAD_REQUEST)?;
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or(BAD_REQUEST)?;
            if length.is_some_and(|prev| prev != n) {
                return Err(BAD_REQUEST);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            if !chunked {
                return Err(BAD_REQUEST);
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) if n > MAX_BODY_BYTES => {
            return Err(BadRequest {
                status: "413 Content Too Large",
            })
        }
        (false, Some(0)) | (false, None) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    let stats = target == b"/__stats" || target.starts_with(b"/__stats?");
    Ok(Some(Head {
        len: end + 4,
        framing,
        close,
        stats,
    }))
}

/// Walks a chunked body at the start of `buf`. Returns the bytes it spans and whether any chunk
/// contains `json_schema`, or `Ok(None)` while it is incomplete. Trailers are skipped.
fn scan_chunked(buf: &[u8]) -> Result<Option<(usize, bool)>, BadRequest> {
    let mut pos = 0;
    let mut schema = false;
    let mut total = 0usize;
    loop {
        let Some(eol) = memmem::find(&buf[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[pos..pos + eol];
        let size_text = line
            .split(|b| *b == b';')
            .next()
            .unwrap_or(line)
            .trim_ascii();
        let size = std::str::from_utf8(size_text)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or(BAD_REQUEST)?;
        total = total.saturating_add(size);
        if total > MAX_BODY_BYTES {
            return Err(BadRequest {
                status: "413 Content Too Large",
            });
        }
        pos += eol + 2;
        if size == 0 {
            // Optional trailers, then the empty line that ends the body.
            loop {
                let Some(eol) = memmem::find(&buf[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((pos, schema)));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        schema |= memmem::find(&buf[pos..pos + size], b"json_schema").is_some();
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(BAD_REQUEST);
        }
        pos += size + 2;
    }
}

/// Reads more bytes into `buf`; false when the peer closed or the read failed.
async fn fill<S: AsyncRead + Unpin>(sock: &mut S, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < READ_RESERVE_BYTES / 4 {
        buf.reserve(READ_RESERVE_BYTES);
    }
    matches!(sock.read_buf(buf).await, Ok(n) if n > 0)
}

fn stats_line() -> String {
    format!(
        r#"{{"accepted":{},"connections":{},"requests":{},"json_schema_bodies":{}}}"#,
        ACCEPTED.load(Relaxed),
        CONNECTIONS.load(Relaxed),
        REQUESTS.load(Relaxed),
        SCHEMA_BODIES.load(Relaxed)
    )
}

async fn reject<S: AsyncWrite + Unpin>(sock: &mut S, bad: BadRequest) {
    let answer = format!(
        "HTTP/1.1 {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        bad.status
    );
    let _ = sock.write_all(answer.as_bytes()).await;
}

/// Serves one connection until the client closes it or asks to.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S, shared: Arc<Shared>) {
    let mut buf = BytesMut::with_capacity(READ_RESERVE_BYTES);
    let mut counted = false;
    loop {
        let head = loop {
            match parse_head(&buf) {
                Ok(Some(head)) => break head,
                Ok(None) => {
                    if !fill(&mut sock, &mut buf).await {
                        return;
                    }
                }
                Err(bad) => return reject(&mut sock, bad).await,
            }
        };
        let (consumed, schema) = match head.framing {
            Framing::Empty => (head.len, false),
            Framing::Length(n) => {
                while buf.len() < head.len + n {
                    if !fill(&mut sock, &mut buf).await {
                        return;
                    }
                }
                let body = &buf[head.len..head.len + n];
                (head.len + n, memmem::find(body, b"json_schema").is_some())
            }
            Framing::Chunked => loop {
                match scan_chunked(&buf[head.len..]) {
                    Ok(Some((n, schema))) => break (head.len + n, schema),
                    Ok(None) => {
                        if !fill(&mut sock, &mut buf).await {
                            return;
                        }
                    }
                    Err(bad) => return reject(&mut sock, bad).await,
                }
            },
        };
        buf.advance(consumed);

        if head.stats {
            let body = stats_line();
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
                body.len(),
                if head.close { "Connection: close\r\n" } else { "" }
            );
            if sock.write_all(answer.as_bytes()).await.is_err() || head.close {
                return;
            }
            continue;
        }

        if !counted {
            counted = true;
            CONNECTIONS.fetch_add(1, Relaxed);
        }
        REQUESTS.fetch_add(1, Relaxed);
        if schema {
            SCHEMA_BODIES.fetch_add(1, Relaxed);
        }
        if !shared.delay.is_zero() {
            tokio::time::sleep(shared.delay).await;
        }
        let written = if shared.sse_chunks > 0 {
            stream_events(&mut sock, &shared, head.close).await
        } else {
            let answer = if head.close {
                &shared.completion_close
            } else {
                &shared.completion
            };
            sock.write_all(answer).await
        };
        if written.is_err() || head.close {
            return;
        }
    }
}

/// Writes the SSE head and `sse_chunks` events paced `sse_gap` apart from the first, then ends
/// the chunked body.
async fn stream_events<S: AsyncWrite + Unpin>(
    sock: &mut S,
    shared: &Shared,
    close: bool,
) -> std::io::Result<()> {
    let head = if close {
        &shared.sse_head_close
    } else {
        &shared.sse_head
    };
    sock.write_all(head).await?;
    let start = Instant::now();
    for i in 0..shared.sse_chunks {
        if i > 0 {
            let due = start + shared.sse_gap * u32::try_from(i).unwrap_or(u32::MAX);
            tokio::time::sleep_until(due).await;
        }
        sock.write_all(&shared.sse_chunk).await?;
    }
    sock.write_all(b"0\r\n\r\n").await
}

/// A TLS acceptor for the certificate chain and key, HTTP/1.1 by ALPN.
fn tls_acceptor(cert: &str, key: &str) -> Result<Arc<SslAcceptor>, Box<dyn Error>> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
    b.set_certificate_chain_file(cert)?;
    b.set_private_key_file(key, SslFiletype::PEM)?;
    b.set_alpn_select_callback(|_, client| {
        openssl::ssl::select_next_proto(b"\x08http/1.1", client)
            .ok_or(openssl::ssl::AlpnError::NOACK)
    });
    Ok(Arc::new(b.build()))
}

/// The TLS handshake, then [`serve`] over the TLS stream.
async fn serve_tls(sock: TcpStream, acceptor: Arc<SslAcceptor>, shared: Arc<Shared>) {
    let Ok(ssl) = Ssl::new(acceptor.context()) else {
        return;
    };
    let Ok(mut stream) = tokio_openssl::SslStream::new(ssl, sock) else {
        return;
    };
    if std::pin::Pin::new(&mut stream).accept().await.is_ok() {
        serve(stream, shared).await;
    }
}

async fn run(opts: Options) -> Result<(), Box<dyn Error>> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], opts.port));
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .map_err(|e| format!("cannot bind {addr}: {e}"))?;
    let listener = socket.listen(BACKLOG)?;
    let shared = Arc::new(Shared::new(&opts));
    let tls = opts
        .tls
        .as_ref()
        .map(|(c, k)| tls_acceptor(c, k))
        .transpose()?;
    let mode = if opts.sse_chunks > 0 {
        format!(
            "sse {} chunks {} ms apart",
            opts.sse_chunks,
            opts.sse_gap.as_millis()
        )
    } else {
        "json".to_string()
    };
    println!(
        "mock_upstream listening on {addr} ({mode}, delay {} ms)",
        opts.delay.as_millis()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => {
                    ACCEPTED.fetch_add(1, Relaxed);
                    // Answers are single writes; never wait for an ACK to send them.
                    let _ = sock.set_nodelay(true);
                    match &tls {
                        None => drop(tokio::spawn(serve(sock, shared.clone()))),
                        Some(acceptor) => {
                            drop(tokio::spawn(serve_tls(sock, acceptor.clone(), shared.clone())))
                        }
                    }
                }
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    eprintln!("mock_upstream: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    println!("{}", stats_line());
    Ok(())
}

fn main() -> std::process::ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return std::process::ExitCode::from(64);
        }
    };
    let runtime = if opts.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()
    };
    let result = runtime
        .map_err(|e| Box::new(e) as Box<dyn Error>)
        .and_then(|rt| rt.block_on(run(opts)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock_upstream: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_with_content_length() {
        let h = parse_head(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(h.len, 48);
        assert!(!h.close && !h.stats);
    }

    #[test]
    fn incomplete_head_waits() {
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .expect("valid")
            .is_none());
    }

    #[test]
    fn connection_close_and_http10() {
        let h = parse_head(b"GET /__stats HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(h.close && h.stats);
        let h = parse_head(b"GET / HTTP/1.0\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(h.close);
    }

    #[test]
    fn chunked_body_is_walked_with_trailers() {
        let body = b"5\r\njson_\r\n6;x=y\r\nschema\r\n0\r\nA: b\r\n\r\nNEXT";
        let (n, schema) = scan_chunked(body).expect("valid").expect("complete");
        assert_eq!(&body[n..], b"NEXT");
        // Split across chunks: not seen, by design (only whole chunks are searched).
        assert!(!schema);
        let (_, schema) = scan_chunked(b"b\r\njson_schema\r\n0\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(schema);
        assert!(scan_chunked(b"5\r\nhel").expect("valid").is_none());
        assert!(scan_chunked(b"zz\r\n").is_err());
    }

    #[test]
    fn answers_are_well_framed() {
        let s = Shared::new(&Options {
            port: 1,
            delay: Duration::ZERO,
            sse_chunks: 2,
            sse_gap: Duration::from_millis(1),
            threads: 1,
            tls: None,
        });
        let text = String::from_utf8(s.completion.clone()).expect("utf8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head");
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!((250..=350).contains(&body.len()), "{}", body.len());
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
        let (n, _) = scan_chunked(&[s.sse_chunk.as_slice(), b"0\r\n\r\n"].concat())
            .expect("valid")
            .expect("complete");
        assert_eq!(n, s.sse_chunk.len() + 5);
    }
}
