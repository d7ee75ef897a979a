//! Operations over real sockets and the real binary: what an operator sees.
//!
//! `/metrics` and `/healthz` on the admin listener, the access log on stderr (sampled, errors
//! always, never a credential), and `arkgate -t` on good and bad configuration files. Each test
//! starts its own `arkgate` process on free 127.0.0.1 ports, in front of a small mock upstream.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The exit status for an unusable configuration.
const EXIT_BAD_CONFIG: i32 = 64;

/// Every credential the access-log test sends carries this marker.
const SECRET: &str = "SECRET";

/// What identifies an access line in the log (the `log` target of arkgate's access lines).
const ACCESS_TARGET: &str = "arkgate::access";

// ---------------------------------------------------------------------------------------------
// Metrics and health
// ---------------------------------------------------------------------------------------------

#[test]
fn metrics_counters_move_after_a_short_load() {
    const CLIENTS: usize = 3;
    const PER_CLIENT: usize = 10;
    let dir = TempDir::new("metrics");
    let upstream = MockUpstream::start();
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = dir.write(
        "arkgate.yaml",
        &config(listen, admin, upstream.addr, &dir, 0.0),
    );
    let mut proc = Proc::spawn(&cfg, &dir);
    proc.wait_listening(listen);
    proc.wait_listening(admin);

    let before = scrape(admin);
    assert_eq!(before["arkgate_requests_total{class=\"2xx\"}"], 0.0);
    assert_eq!(before["arkgate_request_duration_seconds_count"], 0.0);

    // Keep-alive clients, so upstream connections are both opened and reused; every body
    // carries the default rule's `json_schema`, and so does every answer.
    let body = r#"{"model":"m","response_format":{"type":"json_schema"},"messages":[]}"#;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            thread::spawn(move || {
                let mut client = Client::new(listen);
                for _ in 0..PER_CLIENT {
                    let r = client
                        .send(&request("POST", "/v1/chat/completions", &[], body))
                        .expect("request through arkgate");
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert!(r.text().contains("json_object"), "{}", r.text());
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("load client panicked");
    }
    let sse = Client::new(listen)
        .send(&request("POST", "/v1/sse", &[], r#"{"stream":true}"#))
        .expect("SSE through arkgate");
    assert_eq!(sse.status, 200);
    assert!(sse.text().contains("[DONE]"), "{}", sse.text());
    let total = (CLIENTS * PER_CLIENT + 1) as f64;

    // The logging hook (which counts) runs just after the response leaves: poll for it.
    let mut after = scrape(admin);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (after["arkgate_requests_total{class=\"2xx\"}"] < total
        || after["arkgate_in_flight_requests"] != 0.0)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(20));
        after = scrape(admin);
    }
    let m = |name: &str| -> f64 {
        *after
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    assert_eq!(m("arkgate_requests_total{class=\"2xx\"}"), total);
    for class in ["1xx", "3xx", "4xx", "5xx", "aborted"] {
        assert_eq!(
            m(&format!("arkgate_requests_total{{class=\"{class}\"}}")),
            0.0
        );
    }
    assert_eq!(m("arkgate_in_flight_requests"), 0.0);
    assert_eq!(m("arkgate_request_duration_seconds_count"), total);
    assert_eq!(
        m("arkgate_request_duration_seconds_bucket{le=\"+Inf\"}"),
        total
    );
    assert!(m("arkgate_request_duration_seconds_sum") > 0.0);
    assert_eq!(m("arkgate_overhead_duration_seconds_count"), total);
    assert_eq!(m("arkgate_upstream_first_byte_seconds_count"), total);
    let new = m("arkgate_upstream_connections_new_total");
    let reused = m("arkgate_upstream_connections_reused_total");
    assert!(new >= 1.0, "no upstream connection opened");
    assert!(reused >= 1.0, "no upstream connection reused");
    assert_eq!(new + reused, total, "one upstream attempt per request");
    assert!(
        m("arkgate_replacements_total") >= (CLIENTS * PER_CLIENT) as f64,
        "replacements did not move"
    );
    let sent = (CLIENTS * PER_CLIENT * body.len()) as f64;
    assert!(m("arkgate_downstream_bytes_in_total") >= sent);
    assert!(m("arkgate_downstream_bytes_out_total") > 0.0);
    for name in [
        "arkgate_retries_total",
        "arkgate_connection_timeout_total",
        "arkgate_read_timeout_total",
        "arkgate_retry_exhausted_total",
        "arkgate_unexpected_error_total",
        "arkgate_upstream_5xx_total",
        "arkgate_draining",
    ] {
        assert_eq!(m(name), 0.0, "{name}");
    }

    let health = Client::new(admin)
        .send(&request("GET", "/healthz", &[], ""))
        .expect("GET /healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.text().trim(), "ok");
}

#[test]
fn metrics_count_bytes_rewritten() {
    let dir = TempDir::new("rewritten");
    let upstream = MockUpstream::start();
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = dir.write(
        "arkgate.yaml",
        &config(listen, admin, upstream.addr, &dir, 0.0),
    );
    let mut proc = Proc::spawn(&cfg, &dir);
    proc.wait_listening(listen);
    proc.wait_listening(admin);
    let body = r#"{"model":"m","response_format":{"type":"json_schema"}}"#;
    let r = Client::new(listen)
        .send(&request("POST", "/v1/chat/completions", &[], body))
        .expect("request through arkgate");
    assert_eq!(r.status, 200);
    // One `json_schema` in the request body and one in the answer.
    let mut rewritten = 0.0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while rewritten < 22.0 && Instant::now() < deadline {
        rewritten = scrape(admin)["arkgate_bytes_rewritten_total"];
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rewritten, 22.0);
}

// ---------------------------------------------------------------------------------------------
// Access log
// ---------------------------------------------------------------------------------------------

/// A request carrying a credential in every place a client may put one.
fn request_with_secrets() -> Vec<u8> {
    request(
        "POST",
        &format!("/v1/chat/completions?api_key={SECRET}&user=1"),
        &[
            ("Authorization", &format!("Bearer sk-{SECRET}")),
            ("Cookie", &format!("session={SECRET}")),
            ("X-Api-Key", SECRET),
            ("api-key", SECRET),
        ],
        &format!(r#"{{"model":"m","user":"{SECRET}-in-body","messages":[]}}"#),
    )
}

#[test]
fn access_log_has_one_line_per_request_and_no_credentials() {
    let dir = TempDir::new("accesslog");
    let mut upstream = MockUpstream::start();
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = dir.write(
        "arkgate.yaml",
        &config(listen, admin, upstream.addr, &dir, 1.0),
    );
    let mut proc = Proc::spawn(&cfg, &dir);
    proc.wait_listening(listen);

    let ok = Client::new(listen)
        .send(&request_with_secrets())
        .expect("request through arkgate");
    assert_eq!(ok.status, 200, "{}", ok.text());
    let lines = proc.wait_for_access_lines(1);
    let line = &lines[0];
    for part in [
        "POST /v1/chat/completions",
        "status=200",
        "upstream_status=200",
        "in=",
        "out=",
        "total_ms=",
        "ttfb_ms=",
        "retries=0",
        "reused=no",
    ] {
        assert!(
            line.contains(part),
            "`{part}` missing from the access line: {line}"
        );
    }
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric {name} in {line}"))
    };
    assert!(field("in=") > 0, "{line}");
    assert_eq!(field("out=") as usize, ok.body.len(), "{line}");

    // An error is logged too (upstream down → 502), also without credentials.
    upstream.stop();
    let failed = Client::new(listen)
        .send(&request_with_secrets())
        .expect("arkgate answers even with the upstream down");
    assert_eq!(failed.status, 502, "{}", failed.text());
    let lines = proc.wait_for_access_lines(2);
    assert!(lines[1].contains("status=502"), "{}", lines[1]);

    let log = proc.log();
    assert!(
        !log.contains(SECRET),
        "a credential reached the log:\n{}",
        log.lines()
            .filter(|l| l.contains(SECRET))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn bodies_are_logged_only_when_asked_and_then_truncated() {
    let dir = TempDir::new("bodylog");
    let upstream = MockUpstream::start();
    let (listen, admin) = (free_addr(), free_addr());
    let yaml = config(listen, admin, upstream.addr, &dir, 1.0).replace(
        "logging:\n",
        "logging:\n  bodies: true\n  body_max_bytes: 24\n",
    );
    let cfg = dir.write("arkgate.yaml", &yaml);
    let mut proc = Proc::spawn(&cfg, &dir);
    proc.wait_listening(listen);

    let body = r#"{"model":"m","messages":[{"role":"user","content":"a long question"}]}"#;
    let ok = Client::new(listen)
        .send(&request("POST", "/v1/chat/completions", &[], body))
        .expect("request through arkgate");
    assert_eq!(ok.status, 200, "{}", ok.text());
    let lines = proc.wait_for_access_lines(1);
    let line = &lines[0];
    // The first 24 bytes of the request body, quoted and escaped, and no more of it.
    assert!(
        line.contains(r#"req_body="{\"model\":\"m\",\"messages\":" "#),
        "{line}"
    );
    assert!(!line.contains("a long question"), "{line}");
    assert!(line.contains("resp_body=\""), "{line}");
}

#[test]
fn unsampled_successes_are_not_logged_but_errors_are() {
    let dir = TempDir::new("sample0");
    let mut upstream = MockUpstream::start();
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = dir.write(
        "arkgate.yaml",
        &config(listen, admin, upstream.addr, &dir, 0.0),
    );
    let mut proc = Proc::spawn(&cfg, &dir);
    proc.wait_listening(listen);

    // One keep-alive connection: each request's logging hook has run before the next request
    // is read, so once the last request's line is there, any earlier line would be too.
    let mut client = Client::new(listen);
    let body = r#"{"model":"m","messages":[]}"#;
    for _ in 0..5 {
        let r = client
            .send(&request("POST", "/v1/chat/completions", &[], body))
            .expect("request through arkgate");
        assert_eq!(r.status, 200);
        assert!(!r.closes());
    }
    upstream.stop();
    let failed = client
        .send(&request("POST", "/v1/chat/completions", &[], body))
        .expect("arkgate answers even with the upstream down");
    assert_eq!(failed.status, 502, "{}", failed.text());

    let lines = proc.wait_for_access_lines(1);
    assert_eq!(
        lines.len(),
        1,
        "only the error is logged:\n{}",
        lines.join("\n")
    );
    assert!(lines[0].contains("status=502"), "{}", lines[0]);
}

// ---------------------------------------------------------------------------------------------
// arkgate -t
// ---------------------------------------------------------------------------------------------

#[test]
fn config_test_rejects_a_bad_file_with_one_line_naming_the_key() {
    let dir = TempDir::new("badconf");
    let base = "listen: [{addr: \"127.0.0.1:1\"}]\n";
    let cases = [
        ("upstream: {bsae_url: \"http://127.0.0.1:2\"}\n", "bsae_url"),
        ("logging: {sample_rate: 2}\n", "logging.sample_rate"),
        ("server: {threads: 0}\n", "server.threads"),
        ("admin: {addr: nowhere}\n", "admin.addr"),
        (
            "upstream: {read_timeout_ms: 0}\n",
            "upstream.read_timeout_ms",
        ),
    ];
    for (i, (extra, key)) in cases.iter().enumerate() {
        let path = dir.write(&format!("bad{i}.yaml"), &format!("{base}{extra}"));
        let out = config_test(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            out.status.code(),
            Some(EXIT_BAD_CONFIG),
            "{extra}: exit {:?}, stderr: {stderr}",
            out.status
        );
        assert_eq!(lines.len(), 1, "{extra}: one line expected, got: {stderr}");
        assert!(
            lines[0].contains(key),
            "{extra}: `{key}` not named in: {}",
            lines[0]
        );
    }
}

#[test]
fn config_test_accepts_the_shipped_configs() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut checked = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&conf)
        .expect("read conf/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).expect("read config");
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("shipped config is YAML");
        let needs_certs = yaml["listen"]
            .as_sequence()
            .is_some_and(|ls| ls.iter().any(|l| l.get("tls").is_some()));
        if needs_certs {
            continue;
        }
        let out = config_test(&path);
        assert!(
            out.status.success(),
            "{}: {:?}\n{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(path);
    }
    assert!(
        checked.iter().any(|p| p.ends_with("arkgate.yaml")),
        "conf/arkgate.yaml was not checked: {checked:?}"
    );
}

fn config_test(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_arkgate"))
        .args(["-t", "-c"])
        .arg(path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run arkgate -t")
}

// ---------------------------------------------------------------------------------------------
// Harness: temp dir, config, the arkgate process, /metrics
// ---------------------------------------------------------------------------------------------

fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    dir: &TempDir,
    sample_rate: f64,
) -> String {
    let d = dir.0.display();
    format!(
        r#"listen:
  - addr: "{listen}"
upstream:
  base_url: "http://{upstream}/api/v3"
  http_version: h1
  connect_timeout_ms: 1000
  read_timeout_ms: 5000
  max_retries: 1
logging:
  sample_rate: {sample_rate}
admin:
  addr: "{admin}"
server:
  threads: 2
  pid_file: "{d}/arkgate.pid"
  upgrade_sock: "{d}/upgrade.sock"
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
"#
    )
}

/// `/metrics` as a map from `name{labels}` to value.
fn scrape(admin: SocketAddr) -> HashMap<String, f64> {
    let r = Client::new(admin)
        .send(&request("GET", "/metrics", &[], ""))
        .expect("GET /metrics");
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path =
            std::env::temp_dir().join(format!("arkgate-{tag}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port that was free a moment ago (bound to :0, then released).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}

/// `arkgate -c FILE` with `RUST_LOG=info`, stdout and stderr captured in a file; killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cfg: &Path, dir: &TempDir) -> Proc {
        let log = dir.0.join("arkgate.log");
        let file = std::fs::File::create(&log).expect("create log file");
        let child = Command::new(env!("CARGO_BIN_EXE_arkgate"))
            .arg("-c")
            .arg(cfg)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .expect("start arkgate");
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn access_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(ACCESS_TARGET))
            .map(str::to_string)
            .collect()
    }

    /// Polls the log until it holds at least `n` access lines; panics after 5 s.
    fn wait_for_access_lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.access_lines();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{n} access lines expected, log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls a connect to `addr` until it succeeds; panics if the process dies first.
    fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("wait for arkgate") {
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

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Mock upstream: HTTP/1.1 keep-alive on tokio
// ---------------------------------------------------------------------------------------------

/// Answers JSON that mentions `json_schema` on any path, and a short SSE stream on `…/sse`.
/// [`MockUpstream::stop`] takes it down (listener and connections), like a dead upstream.
struct MockUpstream {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl MockUpstream {
    fn start() -> MockUpstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("mock upstream runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind mock upstream");
        let addr = listener.local_addr().expect("mock upstream address");
        runtime.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve_upstream_connection(conn));
            }
        });
        MockUpstream {
            addr,
            runtime: Some(runtime),
        }
    }

    /// Closes the listener and every connection; returns once they are gone.
    fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_upstream_connection(conn: tokio::net::TcpStream) {
    let _ = conn.set_nodelay(true);
    let (read, mut write) = conn.into_split();
    let mut read = tokio::io::BufReader::new(read);
    while let Some((target, close)) = read_mock_request(&mut read).await {
        let written = if target.ends_with("/sse") {
            write_sse(&mut write).await
        } else {
            let body = r#"{"object":"chat.completion","choices":[{"message":{"role":"assistant","content":"{\"format\":\"json_schema\"}"}}]}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            write.write_all(answer.as_bytes()).await
        };
        if written.is_err() || close {
            return;
        }
    }
}

async fn write_sse<W: AsyncWrite + Unpin>(w: &mut W) -> io::Result<()> {
    w.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await?;
    for event in [
        "data: {\"i\":0}\n\n",
        "data: {\"i\":1}\n\n",
        "data: [DONE]\n\n",
    ] {
        w.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
            .await?;
        w.flush().await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.write_all(b"0\r\n\r\n").await?;
    w.flush().await
}

/// Reads one request; returns its target and whether the client asked to close.
async fn read_mock_request<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<(String, bool)> {
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
        }
    } else {
        let mut body = vec![0; content_length];
        r.read_exact(&mut body).await.ok()?;
    }
    Some((target, close))
}

// ---------------------------------------------------------------------------------------------
// Blocking HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// A complete HTTP/1.1 response.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive client: one connection, reopened after `Connection: close` or an error.
struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        Client { addr, conn: None }
    }

    fn send(&mut self, request: &[u8]) -> Result<Response, String> {
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => {
                let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
                    .map_err(|e| format!("connect: {e}"))?;
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                self.conn.insert(BufReader::new(stream))
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
}

fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
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

fn read_response(r: &mut BufReader<TcpStream>) -> io::Result<Response> {
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
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let content_length = response
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    if chunked {
        loop {
            let size_line = read_line(r)?;
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, size_line.clone()))?;
            if size == 0 {
                while !read_line(r)?.trim().is_empty() {}
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            response.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = content_length {
        response.body.resize(n, 0);
        r.read_exact(&mut response.body)?;
    } else if status != 204 && status != 304 {
        r.read_to_end(&mut response.body)?;
    }
    Ok(response)
}
