//! The real `arkgate` binary as a child process, for what only a process shows: signals, the
//! graceful upgrade, its own memory, the log on stderr and `arkgate -t`.
//!
//! - [`ScratchDir`]: a temp dir for the YAML configs, logs, pid file and upgrade socket.
//! - [`ArkgateProcess`]: `arkgate ARGS` with stdout and stderr in a log file, killed on drop;
//!   [`config_test`] and its assertions run `arkgate -t`.
//! - [`ScriptedUpstream`]: a small HTTP/1.1 keep-alive upstream on its own Tokio runtime whose
//!   answer to each request is a script of timed writes.
//! - [`Client`]: a blocking HTTP/1.1 keep-alive client, for load threads.
//!
//! Everything is blocking (plain `#[test]`s drive these), and every wait is bounded.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

pub use super::proxy::free_addr;
use super::proxy::yaml_str;

/// The exit status of `arkgate` (and `arkgate -t`) on an unusable configuration.
pub const EXIT_BAD_CONFIG: i32 = 64;

/// How long a process may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Temp dir
// ---------------------------------------------------------------------------------------------

/// A directory of its own under the system temp dir, removed on drop.
pub struct ScratchDir(tempfile::TempDir);

impl ScratchDir {
    /// A new, empty directory whose name starts with `arkgate-{tag}-`.
    pub fn new(tag: &str) -> ScratchDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("arkgate-{tag}-"))
            .tempdir()
            .expect("create temp dir");
        ScratchDir(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The `server:` section of a config for a process run from here: 2 threads, its pid file
    /// and upgrade socket in this directory, and these drain times.
    pub fn server_yaml(&self, grace_period_s: u64, shutdown_timeout_s: u64) -> String {
        let path = |name: &str| yaml_str(path_str(&self.path().join(name)));
        format!(
            "server:\n  threads: 2\n  pid_file: {}\n  upgrade_sock: {}\n  \
             grace_period_seconds: {grace_period_s}\n  \
             graceful_shutdown_timeout_seconds: {shutdown_timeout_s}\n",
            path("arkgate.pid"),
            path("upgrade.sock"),
        )
    }

    /// Writes `text` to `name` in this directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

/// A path as a command-line argument (temp paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

// ---------------------------------------------------------------------------------------------
// The arkgate process
// ---------------------------------------------------------------------------------------------

/// An `arkgate` child process, logging to `<dir>/<name>.log`; killed if still alive on drop.
pub struct ArkgateProcess {
    child: Child,
    log: PathBuf,
}

impl ArkgateProcess {
    /// `arkgate ARGS` with `RUST_LOG=info` (access lines and Pingora's shutdown steps).
    pub fn spawn(dir: &ScratchDir, name: &str, args: &[&str]) -> ArkgateProcess {
        ArkgateProcess::spawn_with_log(dir, name, args, "info")
    }

    /// `arkgate ARGS` with `RUST_LOG=error`, for a process that should stay quiet.
    pub fn spawn_quiet(dir: &ScratchDir, name: &str, args: &[&str]) -> ArkgateProcess {
        ArkgateProcess::spawn_with_log(dir, name, args, "error")
    }

    fn spawn_with_log(dir: &ScratchDir, name: &str, args: &[&str], level: &str) -> ArkgateProcess {
        let log = dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let child = Command::new(env!("CARGO_BIN_EXE_arkgate"))
            .args(args)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .expect("start arkgate");
        ArkgateProcess { child, log }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`QUIT`, `TERM` …) with `kill`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for arkgate")
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls a connect to `addr` until it succeeds; panics if the process dies first.
    pub fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!("arkgate exited ({status}) before listening\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "arkgate is not listening on {addr}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ArkgateProcess {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `arkgate -t -c path`, with stderr captured.
pub fn config_test(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arkgate"))
        .args(["-t", "-c"])
        .arg(path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run arkgate -t")
}

/// Asserts that `arkgate -t` rejects `path`: exit status 64 and exactly one non-empty line on
/// stderr, which it returns. `what` names the case in failure messages.
pub fn config_test_rejection(path: &Path, what: &str) -> String {
    let out = config_test(path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        out.status.code(),
        Some(EXIT_BAD_CONFIG),
        "{what}: exit {:?}, stderr: {stderr}",
        out.status
    );
    assert_eq!(lines.len(), 1, "{what}: one line expected, got: {stderr}");
    lines[0].to_string()
}

/// Asserts that `arkgate -t` accepts `path`.
pub fn assert_config_test_accepts(path: &Path) {
    let out = config_test(path);
    assert!(
        out.status.success(),
        "{}: {:?}\n{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Scripted upstream: HTTP/1.1 keep-alive on tokio
// ---------------------------------------------------------------------------------------------

/// A request as the scripted upstream read it.
pub struct UpstreamRequest {
    /// The request target, query included.
    pub target: String,
    /// The client asked to close the connection after this request.
    pub close: bool,
    /// How many body bytes arrived (after de-chunking).
    pub body_len: usize,
}

/// What the upstream does for one request: each write after its pause, in order. A response is
/// as many writes as the test wants to time: one for a complete answer, one per SSE event.
pub type Script = Vec<(Duration, Vec<u8>)>;

/// An HTTP/1.1 keep-alive upstream answering every request with the [`Script`] its closure
/// returns. [`ScriptedUpstream::stop`] takes it down (listener and connections), like a dead
/// upstream.
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ScriptedUpstream {
    pub fn start(
        script: impl Fn(&UpstreamRequest) -> Script + Send + Sync + 'static,
    ) -> ScriptedUpstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("mock upstream runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind mock upstream");
        let addr = listener.local_addr().expect("mock upstream address");
        let script: ScriptFn = Arc::new(script);
        runtime.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve_connection(conn, script.clone()));
            }
        });
        ScriptedUpstream {
            addr,
            runtime: Some(runtime),
        }
    }

    /// Closes the listener and every connection; returns once they are gone.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A complete `200 OK` with a JSON body and its Content-Length.
pub fn json_response(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One chunk of a chunked body.
pub fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

/// The chunk that ends a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

type ScriptFn = Arc<dyn Fn(&UpstreamRequest) -> Script + Send + Sync>;

async fn serve_connection(conn: tokio::net::TcpStream, script: ScriptFn) {
    let _ = conn.set_nodelay(true);
    let (read, mut write) = conn.into_split();
    let mut read = tokio::io::BufReader::new(read);
    while let Some(req) = read_upstream_request(&mut read).await {
        for (pause, bytes) in script(&req) {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if write.write_all(&bytes).await.is_err() || write.flush().await.is_err() {
                return;
            }
        }
        if req.close {
            return;
        }
    }
}

/// Reads one request, body included; None once the connection ends or breaks the framing.
async fn read_upstream_request<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<UpstreamRequest> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let target = line.split_whitespace().nth(1)?.to_string();
    let (mut content_length, mut chunked, mut close) = (0usize, false, false);
    loop {
        line.clear();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.parse().ok()?,
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body_len = 0;
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).await.ok()?;
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.ok()? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).await.ok()?;
            body_len += size;
        }
    } else {
        let mut body = vec![0; content_length];
        r.read_exact(&mut body).await.ok()?;
        body_len = content_length;
    }
    Some(UpstreamRequest {
        target,
        close,
        body_len,
    })
}

// ---------------------------------------------------------------------------------------------
// Blocking HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// A complete HTTP/1.1 response.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The response said `Connection: close`.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive client the way HTTP clients behave: it reuses its connection unless the last
/// answer said `Connection: close` or the server has closed it since (checked before sending).
pub struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    /// How many connections it has opened.
    pub connects: usize,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            conn: None,
            connects: 0,
        }
    }

    /// Sends one request and reads the complete answer. Any error while the request is in
    /// flight is returned (and the connection dropped).
    pub fn send(&mut self, request: &[u8]) -> Result<Response, String> {
        if self.conn.as_ref().is_some_and(|c| !still_open(c)) {
            self.conn = None;
        }
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => {
                let c = connect(self.addr).map_err(|e| format!("connect: {e}"))?;
                self.connects += 1;
                self.conn.insert(c)
            }
        };
        let result = conn
            .get_mut()
            .write_all(request)
            .map_err(|e| format!("write: {e}"))
            .and_then(|_| read_response(conn).map_err(|e| format!("read: {e}")));
        match &result {
            Ok(r) if !r.closes() => {}
            _ => self.conn = None,
        }
        result
    }

    /// `GET path`; panics on a connection error (for the admin listener).
    pub fn get(&mut self, path: &str) -> Response {
        self.send(&request("GET", path, &[], ""))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

/// A fresh connection with a 15 s read timeout.
pub fn connect(addr: SocketAddr) -> io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

/// True while the peer has neither closed the connection nor sent anything unasked.
fn still_open(conn: &BufReader<TcpStream>) -> bool {
    if !conn.buffer().is_empty() {
        return false;
    }
    let stream = conn.get_ref();
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let open = matches!(stream.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    open && stream.set_nonblocking(false).is_ok()
}

/// A request to `arkgate.test`; any method but GET carries `body` as JSON with its length.
pub fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!("{method} {target} HTTP/1.1\r\nHost: arkgate.test\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    text.push_str("\r\n");
    text.push_str(body);
    text.into_bytes()
}

/// `POST path` with a JSON body.
pub fn post(path: &str, body: &str) -> Vec<u8> {
    request("POST", path, &[], body)
}

fn read_line(r: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line)
}

/// The status and headers of a response.
pub fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<(u16, Vec<(String, String)>)> {
    let status_line = read_line(r)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, status_line.clone()))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        let line = line.trim_end();
        if line.is_empty() {
            return Ok((status, headers));
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
}

pub fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    })
}

/// One chunk of a chunked body; None after the last chunk (and its trailers).
pub fn read_chunk(r: &mut BufReader<TcpStream>) -> io::Result<Option<Vec<u8>>> {
    let size_line = read_line(r)?;
    let size = size_line
        .trim()
        .split(';')
        .next()
        .and_then(|s| usize::from_str_radix(s, 16).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, size_line.clone()))?;
    if size == 0 {
        while !read_line(r)?.trim().is_empty() {}
        return Ok(None);
    }
    let mut chunk = vec![0; size + 2];
    r.read_exact(&mut chunk)?;
    chunk.truncate(size);
    Ok(Some(chunk))
}

/// A complete response: chunked, with a Content-Length, or up to the close.
pub fn read_response(r: &mut BufReader<TcpStream>) -> io::Result<Response> {
    let (status, headers) = read_head(r)?;
    let content_length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    if is_chunked(&headers) {
        while let Some(chunk) = read_chunk(r)? {
            body.extend_from_slice(&chunk);
        }
    } else if let Some(n) = content_length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if status != 204 && status != 304 {
        r.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}
