//! The real `arkgate` binary as a child process, for what only a process shows: signals, the
//! graceful upgrade, its own memory, the log on stderr and `arkgate -t`.
//!
//! - [`ScratchDir`]: a temp dir for the YAML configs, logs, pid file and upgrade socket.
//! - [`ArkgateProcess`]: `arkgate ARGS` with stdout and stderr in a log file, killed on drop;
//!   [`config_test`] and its assertions run `arkgate -t`.
//! - [`ProxyProcess`]: `arkgate -c FILE` on the YAML a [`ProxyBuilder`] renders for free ports,
//!   listening before it is returned.
//!
//! The upstream is the mock ([`super::mock`]) and the client the blocking one
//! ([`super::client::BlockingClient`]). Everything is blocking, and every wait is bounded.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub use super::proxy::free_addr;
use super::proxy::{Listeners, ProxyBuilder};

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

    /// Writes the config `proxy` renders for `at` (pid file and upgrade socket in here) to
    /// `name` and returns its path.
    pub fn write_config(&self, name: &str, proxy: &ProxyBuilder, at: &Listeners) -> PathBuf {
        self.write(name, &proxy.render(at, self.path()))
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

    /// `arkgate ARGS` with `RUST_LOG=level`.
    pub fn spawn_with_log(
        dir: &ScratchDir,
        name: &str,
        args: &[&str],
        level: &str,
    ) -> ArkgateProcess {
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
// arkgate on a ProxyBuilder config
// ---------------------------------------------------------------------------------------------

/// `arkgate -c FILE` on free ports, in a scratch directory of its own; killed on drop.
pub struct ProxyProcess {
    /// Where it listens.
    pub at: Listeners,
    pub process: ArkgateProcess,
    dir: ScratchDir,
}

impl ProxyProcess {
    /// Starts arkgate on `proxy`'s config with `RUST_LOG=info` and waits until every listener
    /// accepts connections.
    pub fn start(proxy: &ProxyBuilder, tag: &str) -> ProxyProcess {
        ProxyProcess::start_with_log(proxy, tag, "info")
    }

    /// The same with `RUST_LOG=error`, for a process that should stay quiet.
    pub fn start_quiet(proxy: &ProxyBuilder, tag: &str) -> ProxyProcess {
        ProxyProcess::start_with_log(proxy, tag, "error")
    }

    fn start_with_log(proxy: &ProxyBuilder, tag: &str, level: &str) -> ProxyProcess {
        let dir = ScratchDir::new(tag);
        let at = proxy.free_listeners();
        let conf = dir.write_config("arkgate.yaml", proxy, &at);
        let mut process =
            ArkgateProcess::spawn_with_log(&dir, "arkgate", &["-c", path_str(&conf)], level);
        for addr in [Some(at.addr), at.tls_addr, at.admin_addr]
            .into_iter()
            .flatten()
        {
            process.wait_listening(addr);
        }
        ProxyProcess { at, process, dir }
    }

    /// The plain listener.
    pub fn addr(&self) -> SocketAddr {
        self.at.addr
    }

    /// The admin listener.
    pub fn admin(&self) -> SocketAddr {
        self.at.admin_addr.expect("an admin listener")
    }

    pub fn dir(&self) -> &ScratchDir {
        &self.dir
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Polls the log until at least `n` lines contain `needle`, and returns those lines;
    /// panics after 5 s.
    pub fn wait_for_log_lines(&self, needle: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            let lines: Vec<String> = log
                .lines()
                .filter(|l| l.contains(needle))
                .map(str::to_string)
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{n} lines with `{needle}` expected, log:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's resident set size, in KiB (`VmRSS` in `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line")
    }

    /// How many file descriptors the process holds.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.process.id()))
            .expect("read /proc/PID/fd")
            .count()
    }
}
