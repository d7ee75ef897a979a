//! Zero-downtime proof over the real binary.
//!
//! A graceful upgrade done the way `systemctl reload` does it (`kill -QUIT` the old process, then
//! start the new one with `-u`) under steady HTTP/1.1 keep-alive load must lose no request and no
//! stream, the old process must drain and exit by itself, and the new process must serve the new
//! configuration. SIGTERM must let in-flight requests finish and refuse new connections only once
//! the listener is closed.
//!
//! Everything talks to 127.0.0.1 on ports picked at run time: a mock upstream (tokio, HTTP/1.1
//! keep-alive, JSON answers and an SSE endpoint), blocking HTTP/1.1 clients on threads, and
//! `arkgate` children started on temp YAML configs with short grace periods.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// `server.grace_period_seconds` in the test configs.
const GRACE_S: u64 = 3;
/// `server.graceful_shutdown_timeout_seconds` in the test configs.
const SHUTDOWN_TIMEOUT_S: u64 = 1;
/// Concurrent keep-alive clients during the upgrade.
const CLIENTS: usize = 50;
/// SSE events and their spacing. Pingora keeps accepting for 5 s after SIGQUIT (its
/// `CLOSE_TIMEOUT`) before the listener stops, so a stream started just before the signal has to
/// last longer than that to prove that the old process drains it after the handoff.
const SSE_EVENTS: usize = 50;
const SSE_GAP_MS: u64 = 150;
/// How long the mock upstream's `/slow` endpoint waits before answering.
const SLOW_MS: u64 = 1000;

/// What the mock upstream puts in every answer, and what the new config's rule turns it into.
const PING_OLD: &str = "ping-old";
const PING_NEW: &str = "ping-new";

// ---------------------------------------------------------------------------------------------
// Graceful upgrade
// ---------------------------------------------------------------------------------------------

#[test]
fn graceful_upgrade_under_keepalive_load_loses_no_request() {
    let dir = TempDir::new("upgrade");
    let upstream = MockUpstream::start();
    let listen = free_addr();
    let admin = free_addr();
    let old_cfg = dir.write(
        "old.yaml",
        &config(listen, admin, upstream.addr, &dir, "[]"),
    );
    let new_rule = format!("[{{find: {PING_OLD}, replace: {PING_NEW}, on: [response]}}]");
    let new_cfg = dir.write(
        "new.yaml",
        &config(listen, admin, upstream.addr, &dir, &new_rule),
    );

    let mut old = Proc::spawn("old", &["-c", path_str(&old_cfg)], &dir);
    old.wait_listening(listen);
    old.wait_listening(admin);
    let first = Client::new(listen)
        .send(&chat_request(0))
        .expect("the old process answers");
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(first.text().contains(PING_OLD), "{}", first.text());

    // A keep-alive admin connection opened now stays with the old process through the upgrade.
    let mut old_admin = Client::new(admin);
    assert_eq!(get(&mut old_admin, "/healthz").status, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let stop = stop.clone();
            thread::spawn(move || load_worker(listen, id, &stop))
        })
        .collect();
    // Steady load on the old process alone for a moment before anything changes.
    thread::sleep(Duration::from_millis(1000));

    let sse_started = Arc::new(AtomicBool::new(false));
    let sse = {
        let started = sse_started.clone();
        thread::spawn(move || sse_stream(listen, SSE_EVENTS, SSE_GAP_MS, &started))
    };
    wait_until(
        "the SSE stream's first event",
        Duration::from_secs(10),
        || sse_started.load(SeqCst),
    );

    // systemd's ExecReload order: SIGQUIT to the old process, then the new one with -u.
    let quit_at = Instant::now();
    old.signal("QUIT");
    let mut new = Proc::spawn("new", &["-u", "-c", path_str(&new_cfg)], &dir);

    // The old process says it is draining on the connection it already has.
    wait_until(
        "/healthz 503 from the draining process",
        Duration::from_secs(5),
        || get(&mut old_admin, "/healthz").status == 503,
    );

    // The old process must drain and exit by itself; note when it stops accepting.
    let stop_needle = format!("Shutting down {listen}");
    let mut stopped_accepting_at = None;
    let deadline = quit_at + Duration::from_secs(30);
    let old_status = loop {
        if stopped_accepting_at.is_none() && old.log().contains(&stop_needle) {
            stopped_accepting_at = Some(Instant::now());
        }
        if let Some(status) = old.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the old process did not exit within 30 s of SIGQUIT\n{}",
            old.log()
        );
        thread::sleep(Duration::from_millis(20));
    };
    let exited_at = Instant::now();
    if stopped_accepting_at.is_none() && old.log().contains(&stop_needle) {
        stopped_accepting_at = Some(exited_at);
    }

    // Load on the new process alone for a moment, then stop.
    thread::sleep(Duration::from_millis(1000));
    stop.store(true, SeqCst);
    let records: Vec<Record> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("load worker panicked"))
        .collect();
    let sse = sse.join().expect("SSE reader panicked");

    let window: Vec<&Record> = records
        .iter()
        .filter(|r| r.started >= quit_at && r.started <= exited_at)
        .collect();
    let failures: Vec<&Record> = records.iter().filter(|r| r.error.is_some()).collect();
    let reconnects = window.iter().filter(|r| r.fresh_connection).count();
    let after: Vec<&Record> = records.iter().filter(|r| r.started > exited_at).collect();
    let stopped_accepting_at =
        stopped_accepting_at.expect("the old process logged that its listener stopped");
    let sse_span = match (sse.events.first(), sse.events.last()) {
        (Some(first), Some(last)) => last.0 - first.0,
        _ => Duration::ZERO,
    };

    let mut report = String::new();
    let _ = writeln!(
        report,
        "graceful upgrade: {CLIENTS} keep-alive clients; requests total={}, during the upgrade window \
         (SIGQUIT → old process exit, {:.1} s)={}, failed={}; new connections in the window={reconnects}; \
         after the old process exited={}",
        records.len(),
        (exited_at - quit_at).as_secs_f64(),
        window.len(),
        failures.len(),
        after.len(),
    );
    let _ = writeln!(
        report,
        "  old process: stopped accepting {:.1} s after SIGQUIT, exited after {:.1} s ({old_status}); \
         SSE: {}/{SSE_EVENTS} events over {:.1} s, done={}, ended {:.1} s after the listener stopped",
        (stopped_accepting_at - quit_at).as_secs_f64(),
        (exited_at - quit_at).as_secs_f64(),
        sse.events.len(),
        sse_span.as_secs_f64(),
        sse.done,
        sse.ended.saturating_duration_since(stopped_accepting_at).as_secs_f64(),
    );
    for f in failures.iter().take(10) {
        let _ = writeln!(
            report,
            "  FAILED request started {:+.3} s from SIGQUIT on a {} connection: {}",
            signed_secs(f.started, quit_at),
            if f.fresh_connection { "new" } else { "reused" },
            f.error.as_deref().unwrap_or_default(),
        );
    }
    // Written to the real stderr so the counts show in CI output even when the test passes.
    let _ = io::stderr().write_all(report.as_bytes());

    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the upgrade\n{report}",
        failures.len(),
        records.len()
    );
    assert!(
        window.len() >= CLIENTS,
        "too little load during the upgrade\n{report}"
    );
    assert!(
        old_status.success(),
        "the old process exited with {old_status}\n{}",
        old.log()
    );
    assert!(
        new.try_wait().is_none(),
        "the new process is gone\n{}",
        new.log()
    );

    assert!(
        sse.error.is_none(),
        "SSE stream broke: {:?}\n{report}",
        sse.error
    );
    assert_eq!(sse.events.len(), SSE_EVENTS, "SSE events lost\n{report}");
    assert!(sse.done, "SSE stream ended without [DONE]\n{report}");
    for (i, (_, event)) in sse.events.iter().enumerate() {
        assert!(
            event.contains(&format!("\"i\":{i},")),
            "SSE event {i} out of order: {event}"
        );
    }
    assert!(
        sse_span >= Duration::from_millis(SSE_GAP_MS * (SSE_EVENTS as u64 - 1) * 8 / 10),
        "SSE events were not streamed as they came\n{report}"
    );
    assert!(
        sse.ended > stopped_accepting_at,
        "the SSE stream should outlive the old listener to prove the drain\n{report}"
    );

    assert!(
        !after.is_empty(),
        "no requests after the old process exited\n{report}"
    );
    let stale = after.iter().filter(|r| !r.saw_new_rule).count();
    assert_eq!(
        stale, 0,
        "requests after the upgrade without the new rule\n{report}"
    );
    let check = Client::new(listen)
        .send(&chat_request(0))
        .expect("the new process answers");
    assert_eq!(check.status, 200);
    assert!(check.text().contains(PING_NEW), "{}", check.text());
    assert!(!check.text().contains(PING_OLD), "{}", check.text());
    assert_eq!(get(&mut Client::new(admin), "/healthz").status, 200);
}

/// One request made by a load worker.
struct Record {
    started: Instant,
    /// This request opened a new connection (first request, or the last answer said close).
    fresh_connection: bool,
    /// The answer carried the new config's replacement.
    saw_new_rule: bool,
    /// Why the request failed: no complete answer, a non-2xx status, or a connection error.
    error: Option<String>,
}

/// POSTs in a loop over one keep-alive connection (reconnecting when told to) until `stop`.
fn load_worker(addr: SocketAddr, id: usize, stop: &AtomicBool) -> Vec<Record> {
    let mut client = Client::new(addr);
    let request = chat_request(id);
    let mut records = Vec::new();
    while !stop.load(SeqCst) {
        let started = Instant::now();
        let connects = client.connects;
        let result = client.send(&request);
        let fresh_connection = client.connects != connects;
        let (saw_new_rule, error) = match result {
            Ok(r) if r.status / 100 != 2 => (false, Some(format!("status {}", r.status))),
            Ok(r) => {
                let text = r.text();
                match (text.contains(PING_OLD), text.contains(PING_NEW)) {
                    (true, false) => (false, None),
                    (false, true) => (true, None),
                    _ => (false, Some(format!("unexpected body {text}"))),
                }
            }
            Err(e) => (false, Some(e)),
        };
        records.push(Record {
            started,
            fresh_connection,
            saw_new_rule,
            error,
        });
    }
    records
}

fn chat_request(id: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"hello from client {id}"}}]}}"#
    );
    post("/v1/chat/completions", &body)
}

/// What an SSE reader saw.
struct SseOutcome {
    events: Vec<(Instant, String)>,
    done: bool,
    error: Option<String>,
    ended: Instant,
}

/// Reads one streamed chat completion to its end, timing every event.
fn sse_stream(addr: SocketAddr, events: usize, gap_ms: u64, started: &AtomicBool) -> SseOutcome {
    let mut outcome = SseOutcome {
        events: Vec::new(),
        done: false,
        error: None,
        ended: Instant::now(),
    };
    let path = format!("/v1/sse?events={events}&gap_ms={gap_ms}");
    let result = (|| -> Result<(), String> {
        let mut conn = connect(addr).map_err(|e| format!("connect: {e}"))?;
        conn.get_mut()
            .write_all(&post(&path, r#"{"model":"m","stream":true,"messages":[]}"#))
            .map_err(|e| format!("write: {e}"))?;
        let (status, headers) = read_head(&mut conn).map_err(|e| format!("head: {e}"))?;
        if status != 200 || !is_chunked(&headers) {
            return Err(format!("unexpected head {status} {headers:?}"));
        }
        let mut pending = String::new();
        while let Some(chunk) = read_chunk(&mut conn).map_err(|e| format!("body: {e}"))? {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                let data = event.trim().trim_start_matches("data: ").to_string();
                if data == "[DONE]" {
                    outcome.done = true;
                } else {
                    outcome.events.push((Instant::now(), data));
                    started.store(true, SeqCst);
                }
            }
        }
        Ok(())
    })();
    outcome.error = result.err();
    outcome.ended = Instant::now();
    outcome
}

// ---------------------------------------------------------------------------------------------
// SIGTERM
// ---------------------------------------------------------------------------------------------

/// How a connection attempt made after SIGTERM ended.
#[derive(Debug)]
enum Probe {
    /// A complete answer (accepted before the listener closed).
    Served,
    /// Connection refused: the listener is closed.
    Refused,
    /// Connected, then no complete answer: what must never happen.
    Broken(String),
}

#[test]
fn sigterm_finishes_in_flight_requests_then_refuses_connections() {
    const SLOW_REQUESTS: usize = 5;
    let dir = TempDir::new("sigterm");
    let upstream = MockUpstream::start();
    let listen = free_addr();
    let admin = free_addr();
    let cfg = dir.write(
        "arkgate.yaml",
        &config(listen, admin, upstream.addr, &dir, "[]"),
    );
    let mut proc = Proc::spawn("arkgate", &["-c", path_str(&cfg)], &dir);
    proc.wait_listening(listen);

    // A keep-alive connection that is idle when the signal comes.
    let mut idle = Client::new(listen);
    let r = idle.send(&chat_request(0)).expect("first request");
    assert_eq!(r.status, 200);
    assert!(!r.closes(), "keep-alive expected before shutdown");

    let slow: Vec<_> = (0..SLOW_REQUESTS)
        .map(|_| {
            thread::spawn(move || {
                let started = Instant::now();
                let r = Client::new(listen).send(&post("/v1/slow", r#"{"model":"m"}"#));
                (r, started.elapsed())
            })
        })
        .collect();
    wait_until(
        "the slow requests to reach the upstream",
        Duration::from_secs(10),
        || upstream.stats.slow_started.load(SeqCst) == SLOW_REQUESTS,
    );

    let term_at = Instant::now();
    proc.signal("TERM");

    let exited = Arc::new(AtomicBool::new(false));
    let refused_seen = Arc::new(AtomicBool::new(false));
    let prober = {
        let exited = exited.clone();
        let refused_seen = refused_seen.clone();
        thread::spawn(move || {
            let mut probes = Vec::new();
            while !exited.load(SeqCst) && term_at.elapsed() < Duration::from_secs(15) {
                let probe = probe_once(listen);
                if matches!(probe, Probe::Refused) {
                    refused_seen.store(true, SeqCst);
                }
                probes.push((term_at.elapsed(), probe));
                thread::sleep(Duration::from_millis(10));
            }
            probes
        })
    };
    wait_until(
        "the listener to refuse connections",
        Duration::from_secs(3),
        || refused_seen.load(SeqCst),
    );

    // The idle keep-alive connection is still served during the drain, and told to close.
    let drained = idle
        .send(&chat_request(1))
        .expect("a request on an idle keep-alive connection during the drain is served");
    assert_eq!(drained.status, 200, "{}", drained.text());
    assert!(
        drained.closes(),
        "a response during the drain must carry `Connection: close`, got {:?}",
        drained.header("connection")
    );

    for handle in slow {
        let (result, took) = handle.join().expect("slow client panicked");
        let r = result.expect("an in-flight request completes after SIGTERM");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains(PING_OLD), "{}", r.text());
        assert!(took >= Duration::from_millis(SLOW_MS), "{took:?}");
    }

    let limit = Duration::from_secs(GRACE_S + SHUTDOWN_TIMEOUT_S) + Duration::from_millis(1500);
    let status = proc
        .wait_exit(limit + Duration::from_secs(10))
        .expect("the process exits after SIGTERM");
    let took = term_at.elapsed();
    exited.store(true, SeqCst);
    let probes = prober.join().expect("prober panicked");

    let served = probes
        .iter()
        .filter(|p| matches!(p.1, Probe::Served))
        .count();
    let refused = probes
        .iter()
        .filter(|p| matches!(p.1, Probe::Refused))
        .count();
    let _ = writeln!(
        io::stderr(),
        "sigterm: {SLOW_REQUESTS} in-flight requests completed; probes after the signal: served={served} \
         refused={refused} broken={}; exited after {:.2} s ({status})",
        probes.len() - served - refused,
        took.as_secs_f64(),
    );
    for (at, probe) in &probes {
        if let Probe::Broken(why) = probe {
            panic!("a connection made {at:?} after SIGTERM was accepted and then broken: {why}");
        }
    }
    let first_refused = probes
        .iter()
        .position(|p| matches!(p.1, Probe::Refused))
        .expect("the listener was closed before exit");
    assert!(
        probes[first_refused..]
            .iter()
            .all(|p| matches!(p.1, Probe::Refused)),
        "a connection was served after the listener had refused one: {probes:?}"
    );
    assert!(status.success(), "exit status {status}\n{}", proc.log());
    assert!(
        took <= limit,
        "exit took {took:?}, more than grace + timeout ({limit:?})\n{}",
        proc.log()
    );
}

/// One fresh connection and one request.
fn probe_once(addr: SocketAddr) -> Probe {
    let mut conn = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(s) => BufReader::new(s),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Probe::Refused,
        Err(e) => return Probe::Broken(format!("connect: {e}")),
    };
    let _ = conn
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)));
    let result = conn
        .get_mut()
        .write_all(&post("/v1/chat/completions", r#"{"model":"m"}"#))
        .and_then(|_| read_response(&mut conn));
    match result {
        Ok(r) if r.status == 200 => Probe::Served,
        Ok(r) => Probe::Broken(format!("status {}", r.status)),
        Err(e) => Probe::Broken(e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Harness: temp dir, config, the arkgate process
// ---------------------------------------------------------------------------------------------

fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    dir: &TempDir,
    rewrite: &str,
) -> String {
    let d = dir.0.display();
    format!(
        r#"listen:
  - addr: "{listen}"
upstream:
  base_url: "http://{upstream}/api/v3"
  http_version: h1
  connect_timeout_ms: 1000
  read_timeout_ms: 10000
rewrite: {rewrite}
logging:
  sample_rate: 0
admin:
  addr: "{admin}"
server:
  threads: 2
  pid_file: "{d}/arkgate.pid"
  upgrade_sock: "{d}/upgrade.sock"
  grace_period_seconds: {GRACE_S}
  graceful_shutdown_timeout_seconds: {SHUTDOWN_TIMEOUT_S}
"#
    )
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

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A port that was free a moment ago (bound to :0, then released).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}

/// Polls `ready` every 10 ms until it holds; panics after `limit`.
fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn signed_secs(t: Instant, origin: Instant) -> f64 {
    if t >= origin {
        (t - origin).as_secs_f64()
    } else {
        -(origin - t).as_secs_f64()
    }
}

/// An `arkgate` child process, logging to a file in the temp dir; killed if still alive on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, args: &[&str], dir: &TempDir) -> Proc {
        let log = dir.0.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let child = Command::new(env!("CARGO_BIN_EXE_arkgate"))
            .args(args)
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

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for arkgate")
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
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
    fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
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

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mock upstream: HTTP/1.1 keep-alive on tokio
// ---------------------------------------------------------------------------------------------

/// What the mock upstream has seen.
#[derive(Default)]
struct UpstreamStats {
    slow_started: AtomicUsize,
}

/// Answers JSON on any path, `…/slow` after [`SLOW_MS`], and streams SSE on `…/sse`.
struct MockUpstream {
    addr: SocketAddr,
    stats: Arc<UpstreamStats>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl MockUpstream {
    fn start() -> MockUpstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("mock upstream runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind mock upstream");
        let addr = listener.local_addr().expect("mock upstream address");
        let stats = Arc::new(UpstreamStats::default());
        let shared = stats.clone();
        runtime.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve_upstream_connection(conn, shared.clone()));
            }
        });
        MockUpstream {
            addr,
            stats,
            runtime: Some(runtime),
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

struct MockRequest {
    target: String,
    close: bool,
    body_len: usize,
}

async fn serve_upstream_connection(conn: tokio::net::TcpStream, stats: Arc<UpstreamStats>) {
    let _ = conn.set_nodelay(true);
    let (read, mut write) = conn.into_split();
    let mut read = tokio::io::BufReader::new(read);
    while let Some(req) = read_mock_request(&mut read).await {
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let param = |name: &str, default: u64| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(default)
        };
        let written = match path.rsplit('/').next() {
            Some("sse") => {
                let events = param("events", 20) as usize;
                let gap = Duration::from_millis(param("gap_ms", 150));
                write_sse(&mut write, events, gap).await
            }
            Some("slow") => {
                stats.slow_started.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_millis(SLOW_MS)).await;
                write.write_all(&json_answer(req.body_len)).await
            }
            _ => write.write_all(&json_answer(req.body_len)).await,
        };
        if written.is_err() || req.close {
            return;
        }
    }
}

fn json_answer(received: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"{PING_OLD}"}}}}],"received":{received}}}"#
    );
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn write_sse<W: AsyncWrite + Unpin>(
    w: &mut W,
    events: usize,
    gap: Duration,
) -> io::Result<()> {
    w.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await?;
    w.flush().await?;
    for i in 0..events {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        let event = format!("data: {{\"i\":{i},\"delta\":\"{PING_OLD}\"}}\n\n");
        w.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
            .await?;
        w.flush().await?;
    }
    let done = "data: [DONE]\n\n";
    w.write_all(format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len()).as_bytes())
        .await?;
    w.flush().await
}

async fn read_mock_request<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<MockRequest> {
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
    Some(MockRequest {
        target,
        close,
        body_len,
    })
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

/// A keep-alive client the way HTTP clients behave: it reuses its connection unless the last
/// answer said `Connection: close` or the server has closed it since (checked before sending).
struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    connects: usize,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            conn: None,
            connects: 0,
        }
    }

    /// Sends one request and reads the complete answer. Any error while the request is in
    /// flight is returned (and the connection dropped).
    fn send(&mut self, request: &[u8]) -> Result<Response, String> {
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
}

fn connect(addr: SocketAddr) -> io::Result<BufReader<TcpStream>> {
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

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: arkgate.test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// GET over `client`; panics on a connection error (used for the admin listener).
fn get(client: &mut Client, path: &str) -> Response {
    let request = format!("GET {path} HTTP/1.1\r\nHost: arkgate.test\r\n\r\n");
    client
        .send(request.as_bytes())
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
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

fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<(u16, Vec<(String, String)>)> {
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

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    })
}

/// One chunk of a chunked body; None after the last chunk (and its trailers).
fn read_chunk(r: &mut BufReader<TcpStream>) -> io::Result<Option<Vec<u8>>> {
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

fn read_response(r: &mut BufReader<TcpStream>) -> io::Result<Response> {
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
