//! Server assembly: turns a validated [`Config`] into a Pingora [`Server`] with its services.
//!
//! Everything that can fail (certificates, addresses) is checked here, before `bootstrap()`, so
//! `arkgate -t` validates all of it. Services: the proxy (plain and TLS listeners; h2c
//! listeners), the DNS refresher, the health checks, the warm-up ([`crate::upstream`]), the
//! drain watcher ([`crate::lifecycle`]), and the admin listener ([`crate::admin`]).
//!
//! One upstream connection pool: Pingora's pool lives inside each `HttpProxy`, so every
//! service shares one proxy app. Plain and TLS clients use the same app (whether a client is
//! TLS is read from its connection, not from the service); only h2c clients need a second app,
//! because Pingora's h2c switch is a setting of the app.

use std::sync::Arc;

use pingora::apps::HttpServerOptions;
use pingora::connectors::ConnectorOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora_proxy::{http_proxy, HttpProxy};

use crate::admin::AdminApp;
use crate::config::{Config, ConfigError, Listener};
use crate::downstream::ConnectionPolicy;
use crate::lifecycle::DrainWatcher;
use crate::proxy::Gateway;
use crate::shared::Shared;
use crate::upstream::warmup::{Readiness, Warmer};
use crate::upstream::{DnsRefresher, HealthChecker};

/// A service name and which listeners it takes.
type ListenerGroup = (&'static str, fn(&Listener) -> bool);

/// The proxy apps, shared by every service (and so is each app's upstream connection pool).
struct ProxyApps {
    /// HTTP/1.1 and TLS (h2 by ALPN) clients of every listener.
    main: Arc<HttpProxy<Gateway>>,
    /// h2c clients (prior knowledge), when a listener allows them: Pingora's h2c switch is
    /// per app, so they need an app (and a pool) of their own.
    h2c: Option<Arc<HttpProxy<Gateway>>>,
}

/// Builds the server and all its services. Does not bind or fork: `main` (or a test) calls
/// `bootstrap()` and `run*()` afterwards.
pub fn build_server(cfg: Config, mut opt: Opt) -> Result<Server, ConfigError> {
    // Our file is not Pingora's: its `server:` section is mapped into ServerConf below.
    opt.conf = None;
    crate::config::files::check_files(&cfg)?;
    let conf = server_conf(&cfg);
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    let cfg = Arc::new(cfg);
    let shared = Shared::new(&cfg)?;
    let any_tls = cfg.upstream.endpoints.iter().any(|e| e.tls);
    if any_tls && !cfg.upstream.tls_verify {
        log::warn!("upstream certificate verification is OFF (upstream.tls_verify: false)");
    }
    let build = |h2c: bool| {
        let gateway = Gateway::new(cfg.clone(), &shared);
        proxy_app(&server, &cfg, gateway, h2c)
    };
    let apps = ProxyApps {
        main: build(false),
        h2c: cfg.listeners.iter().any(|l| l.h2c).then(|| build(true)),
    };
    add_proxy_services(&mut server, &cfg, &apps)?;
    add_support_services(&mut server, &cfg, &shared, &apps);
    Ok(server)
}

/// The proxy services: plain and TLS listeners in one, h2c listeners in another (whose
/// connections go to the h2c app only when they start with the HTTP/2 preface).
fn add_proxy_services(
    server: &mut Server,
    cfg: &Arc<Config>,
    apps: &ProxyApps,
) -> Result<(), ConfigError> {
    let groups: [ListenerGroup; 2] = [("arkgate", |l| !l.h2c), ("arkgate h2c", |l| l.h2c)];
    for (name, pick) in groups {
        let listeners: Vec<&Listener> = cfg.listeners.iter().filter(|l| pick(l)).collect();
        if listeners.is_empty() {
            continue;
        }
        let (inner, h1_only) = match (&apps.h2c, listeners.iter().any(|l| l.h2c)) {
            (Some(h2c), true) => (h2c.clone(), Some(apps.main.clone())),
            _ => (apps.main.clone(), None),
        };
        let app = ConnectionPolicy {
            inner,
            h1_only,
            drain: drain_period(cfg),
            first_request: cfg.downstream.client_timeout,
        };
        let mut svc = Service::new(name.to_string(), app);
        for l in listeners {
            let mut endpoint = ListenerConfig::tcp(l.addr.to_string())
                .l4_buffer(L4BufferSettings::default().read(l.read_buffer_bytes));
            if let Some(files) = &l.tls {
                endpoint = endpoint.tls(crate::config::files::tls_settings(files)?);
            }
            svc.add_listener(endpoint);
        }
        server.add_service(svc);
    }
    Ok(())
}

/// One Pingora HTTP proxy app around `gateway`, with our HTTP/1.1 and HTTP/2 server settings.
fn proxy_app(
    server: &Server,
    cfg: &Config,
    gateway: Gateway,
    h2c: bool,
) -> Arc<HttpProxy<Gateway>> {
    let mut proxy = http_proxy(&server.configuration, gateway);
    let mut options = HttpServerOptions::default();
    options.h2c = h2c;
    options.h2_idle_timeout = Some(cfg.downstream.h2_idle_timeout);
    proxy.server_options = Some(options);
    let mut h2 = pingora::protocols::http::v2::server::H2Options::new();
    h2.max_concurrent_streams(cfg.downstream.h2_max_concurrent_streams)
        .max_header_list_size(header_list_limit(cfg));
    proxy.h2_options = Some(h2);
    Arc::new(proxy)
}

/// DNS refresh, health checks, warm-up, the drain watcher and the admin listener.
fn add_support_services(server: &mut Server, cfg: &Config, shared: &Arc<Shared>, apps: &ProxyApps) {
    let upstreams = &shared.upstreams;
    if DnsRefresher::needed(upstreams) {
        server.add_service(background_service(
            "dns refresher",
            DnsRefresher {
                upstreams: upstreams.clone(),
            },
        ));
    }
    let options = ConnectorOptions::from_server_conf(&server.configuration);
    if let Some(checker) = HealthChecker::new(upstreams.clone(), options) {
        server.add_service(background_service("health checks", checker));
    }
    let readiness = match &cfg.upstream.warmup {
        Some(_) => {
            let readiness = Readiness::waiting(cfg.upstream.connect_timeout);
            server.add_service(background_service(
                "warm-up",
                Warmer {
                    app: apps.main.clone(),
                    upstreams: upstreams.clone(),
                    readiness: readiness.clone(),
                },
            ));
            readiness
        }
        None => Readiness::ready(),
    };
    server.add_service(background_service(
        "drain watcher",
        DrainWatcher {
            phases: server.watch_execution_phase(),
            drain: shared.drain.clone(),
        },
    ));
    if let Some(addr) = cfg.admin_addr {
        let app = AdminApp {
            shared: shared.clone(),
            readiness,
        };
        let mut admin = Service::new("arkgate admin".to_string(), app);
        admin.add_tcp(&addr.to_string());
        server.add_service(admin);
    }
}

/// Pingora's settings, from the `server:` and `upstream:` sections.
fn server_conf(cfg: &Config) -> ServerConf {
    let s = &cfg.server;
    ServerConf {
        threads: s.threads,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        daemon: s.daemon,
        error_log: s.error_log.clone(),
        grace_period_seconds: Some(s.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout_seconds),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        work_stealing: s.work_stealing,
        // Pingora counts every attempt against this cap, the first one included.
        max_retries: cfg.upstream.max_retries + 1,
        ca_file: cfg
            .upstream
            .ca_file
            .as_ref()
            .and_then(|p| p.to_str())
            .map(str::to_string),
        ..ServerConf::default()
    }
}

/// HTTP/2's own header-list cap (RFC 9113 counts 32 bytes of overhead per field), matching the
/// HTTP/1.1 check in the proxy, which answers 431.
fn header_list_limit(cfg: &Config) -> u32 {
    let d = &cfg.downstream;
    d.max_headers
        .checked_mul(32)
        .and_then(|overhead| overhead.checked_add(d.max_header_bytes))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(u32::MAX)
}

/// How long idle keep-alive connections stay open after shutdown starts: the grace period less
/// one second, so they close before the runtimes are stopped.
fn drain_period(cfg: &Config) -> std::time::Duration {
    std::time::Duration::from_secs(cfg.server.grace_period_seconds.saturating_sub(1))
}
