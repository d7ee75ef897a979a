//! The one place test configs are written: [`ProxyBuilder`] renders arkgate's YAML for given
//! listener addresses, and starts the real arkgate in-process on free local ports (parsed with
//! `Config::from_yaml`, built with `server::build_server`, run on its own thread until the
//! [`Proxy`] handle is dropped, which asks Pingora for a fast shutdown and waits for it). The
//! process harness runs the binary on the same YAML.
//!
//! Listener ports come from binding `127.0.0.1:0` and letting go (Pingora's `add_tcp` takes an
//! address, not a socket). Linux hands out `bind(0)` ports from a random point of the ephemeral
//! range, so another test landing on the freed port in the moment before the proxy binds it is
//! very unlikely; upstreams, which can hold their sockets, never do this (see `DeadUpstream`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::configuration::Opt;
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use tempfile::TempDir;
use tokio::sync::Notify;

use super::certs::TestCerts;

/// How long a proxy may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A YAML double-quoted scalar (JSON strings are valid YAML).
pub fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A port that was free a moment ago (Pingora's `add_tcp` takes an address, not a socket).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("address")
}

/// Builds a proxy configuration; see [`proxy`].
#[derive(Clone)]
pub struct ProxyBuilder {
    upstream: Vec<(String, String)>,
    sections: Vec<String>,
    h2c: bool,
    tls_listener: Option<(String, String)>,
    admin: bool,
    /// `admin.token_file`.
    admin_token_file: Option<String>,
    threads: usize,
    /// `server.grace_period_seconds` and `server.graceful_shutdown_timeout_seconds`.
    drain_s: (u64, u64),
}

/// Where a proxy listens.
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    /// The plain listener.
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

impl Listeners {
    /// Addresses for a config that is only checked, never run (nothing binds them).
    pub fn unbound() -> Listeners {
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Listeners {
            addr: at(1),
            tls_addr: Some(at(3)),
            admin_addr: Some(at(4)),
        }
    }
}

/// A proxy in front of `base_url`, with test-friendly defaults: 2 threads, no admin listener,
/// a 1 s connect timeout, everything else as shipped.
pub fn proxy(base_url: &str) -> ProxyBuilder {
    ProxyBuilder {
        upstream: vec![
            ("base_url".into(), yaml_str(base_url)),
            ("connect_timeout_ms".into(), "1000".into()),
        ],
        sections: Vec::new(),
        h2c: false,
        tls_listener: None,
        admin: false,
        admin_token_file: None,
        threads: 2,
        drain_s: (0, 0),
    }
}

/// A proxy in front of `upstream_base_url` with `yaml_extra` appended at the top level.
pub fn start_proxy(yaml_extra: &str, upstream_base_url: &str) -> Proxy {
    proxy(upstream_base_url).yaml(yaml_extra).start()
}

/// Which of Pingora's runtimes a rendered config asks for.
#[derive(Clone, Copy)]
enum Runtime {
    /// arkgate's default (`work_stealing` left unset).
    Default,
    /// The work-stealing runtime.
    Stealing,
}

impl ProxyBuilder {
    /// Sets `upstream.<key>` to a YAML value (replacing an earlier setting).
    pub fn upstream(mut self, key: &str, yaml_value: &str) -> ProxyBuilder {
        self.upstream.retain(|(k, _)| k != key);
        self.upstream.push((key.into(), yaml_value.into()));
        self
    }

    /// Replaces `upstream.base_url` with `upstream.endpoints` (a YAML flow list).
    pub fn endpoints(mut self, yaml_list: &str) -> ProxyBuilder {
        self.upstream.retain(|(k, _)| k != "base_url");
        self.upstream("endpoints", yaml_list)
    }

    /// Trusts the test CA for upstream TLS (verification stays on).
    pub fn trust(self, certs: &TestCerts) -> ProxyBuilder {
        let ca = yaml_str(certs.ca());
        self.upstream("ca_file", &ca)
    }

    /// Appends top-level YAML (`rewrite:`, `structured_output:`, `limits:` …).
    pub fn yaml(mut self, text: &str) -> ProxyBuilder {
        if !text.trim().is_empty() {
            self.sections.push(text.to_string());
        }
        self
    }

    /// Lets the plain listener accept HTTP/2 with prior knowledge.
    pub fn h2c(mut self) -> ProxyBuilder {
        self.h2c = true;
        self
    }

    /// Adds a TLS listener (h2 and http/1.1 by ALPN) with the test server certificate.
    pub fn tls_listener(mut self, certs: &TestCerts) -> ProxyBuilder {
        let path = |p: &std::path::Path| yaml_str(p.to_str().expect("UTF-8 path"));
        self.tls_listener = Some((path(&certs.cert_path), path(&certs.key_path)));
        self
    }

    /// Adds a TLS listener serving these PEM files (a chain file, a key made elsewhere).
    pub fn tls_listener_files(
        mut self,
        cert_path: &std::path::Path,
        key_path: &std::path::Path,
    ) -> ProxyBuilder {
        let path = |p: &std::path::Path| yaml_str(p.to_str().expect("UTF-8 path"));
        self.tls_listener = Some((path(cert_path), path(key_path)));
        self
    }

    /// Turns on the admin listener (`/metrics`, `/healthz`) on a free port.
    pub fn admin(mut self) -> ProxyBuilder {
        self.admin = true;
        self
    }

    /// Turns on the admin listener with `admin.token_file` set to `path`.
    pub fn admin_token_file(mut self, path: &std::path::Path) -> ProxyBuilder {
        self.admin = true;
        self.admin_token_file = Some(yaml_str(path.to_str().expect("UTF-8 path")));
        self
    }

    pub fn threads(mut self, n: usize) -> ProxyBuilder {
        self.threads = n;
        self
    }

    /// How long a stop drains: `server.grace_period_seconds` and
    /// `server.graceful_shutdown_timeout_seconds` (0 and 0 by default).
    pub fn drain(mut self, grace_period_s: u64, shutdown_timeout_s: u64) -> ProxyBuilder {
        self.drain_s = (grace_period_s, shutdown_timeout_s);
        self
    }

    /// Free ports for the listeners this config has.
    pub fn free_listeners(&self) -> Listeners {
        Listeners {
            addr: free_addr(),
            tls_addr: self.tls_listener.as_ref().map(|_| free_addr()),
            admin_addr: self.admin.then(free_addr),
        }
    }

    /// The YAML for listeners `at`, with the pid file and upgrade socket in `dir`.
    pub fn render(&self, at: &Listeners, dir: &std::path::Path) -> String {
        self.render_for(at, dir, Runtime::Default)
    }

    /// [`render`](Self::render), with `server.work_stealing: true` for [`Runtime::Stealing`].
    fn render_for(&self, at: &Listeners, dir: &std::path::Path, runtime: Runtime) -> String {
        let mut yaml = format!(
            "listen:\n  - {{addr: \"{}\", h2c: {}}}\n",
            at.addr, self.h2c
        );
        if let (Some(a), Some((cert, key))) = (at.tls_addr, &self.tls_listener) {
            yaml +=
                &format!("  - {{addr: \"{a}\", tls: {{cert_path: {cert}, key_path: {key}}}}}\n");
        }
        yaml += "upstream:\n";
        for (k, v) in &self.upstream {
            yaml += &format!("  {k}: {v}\n");
        }
        match at.admin_addr.filter(|_| self.admin) {
            Some(a) => match &self.admin_token_file {
                Some(t) => yaml += &format!("admin: {{addr: \"{a}\", token_file: {t}}}\n"),
                None => yaml += &format!("admin: {{addr: \"{a}\"}}\n"),
            },
            None => yaml += "admin: {addr: ~}\n",
        }
        let path = |name: &str| yaml_str(dir.join(name).to_str().expect("UTF-8 path"));
        yaml += &format!(
            "server: {{{}threads: {}, pid_file: {}, upgrade_sock: {}, grace_period_seconds: {}, graceful_shutdown_timeout_seconds: {}}}\n",
            match runtime {
                Runtime::Default => "",
                Runtime::Stealing => "work_stealing: true, ",
            },
            self.threads,
            path("arkgate.pid"),
            path("upgrade.sock"),
            self.drain_s.0,
            self.drain_s.1,
        );
        for section in &self.sections {
            yaml += section;
            if !section.ends_with('\n') {
                yaml.push('\n');
            }
        }
        yaml
    }

    /// Writes the YAML, builds the server and waits until every listener accepts connections.
    pub fn start(self) -> Proxy {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().expect("temp dir for the proxy");
        let at = self.free_listeners();
        let (addr, tls_addr, admin_addr) = (at.addr, at.tls_addr, at.admin_addr);
        // In-process proxies run on Pingora's work-stealing runtime. Its single-threaded
        // runtimes (arkgate's default) find their handles through a thread-local keyed by
        // recycled thread ids, so a test process that starts and stops many servers would hand
        // a new server's connections to an earlier server's stopped runtime. One server per
        // process is unaffected: the tests that run the real binary (`common::process`) keep
        // the default.
        let yaml = self.render_for(&at, dir.path(), Runtime::Stealing);
        std::fs::write(dir.path().join("arkgate.yaml"), &yaml).expect("write config");

        let cfg = arkgate::Config::from_yaml(&yaml)
            .unwrap_or_else(|e| panic!("test config rejected: {e}\n{yaml}"));
        let mut server = arkgate::server::build_server(cfg, Opt::default())
            .unwrap_or_else(|e| panic!("server not built: {e}\n{yaml}"));
        server.bootstrap();
        let stop = Arc::new(Notify::new());
        let signal = StopSignal(stop.clone());
        let thread = std::thread::Builder::new()
            .name("arkgate".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(signal),
                })
            })
            .expect("spawn the proxy thread");

        for a in [Some(addr), tls_addr, admin_addr].into_iter().flatten() {
            wait_until_listening(a);
        }
        Proxy {
            addr,
            tls_addr,
            admin_addr,
            yaml,
            _dir: dir,
            stop,
            thread: Some(thread),
        }
    }
}

/// Polls a TCP connect until it succeeds.
fn wait_until_listening(addr: SocketAddr) {
    let deadline = Instant::now() + START_TIMEOUT;
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "proxy never listened on {addr}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Tells Pingora's main loop to shut down fast when notified.
struct StopSignal(Arc<Notify>);

#[async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::FastShutdown
    }
}

/// A running arkgate. Dropping it shuts the server down.
pub struct Proxy {
    /// The plain listener.
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// The configuration it runs (for failure messages).
    pub yaml: String,
    _dir: TempDir,
    stop: Arc<Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// `http://ADDR{path}` on the plain listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `https://127.0.0.1:PORT{path}` on the TLS listener.
    pub fn tls_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.tls_addr.expect("a TLS listener"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // notify_one keeps a permit, so a stop sent before the main loop waits is not lost.
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
