//! Server assembly: turns a validated [`Config`] into a Pingora [`Server`] with its services.
//!
//! Everything that can fail (certificates, addresses) is checked here, before `bootstrap()`, so
//! `arkgate -t` validates all of it. Services: the proxy (one per listener group), the DNS
//! refresher, the drain watcher ([`crate::lifecycle`]), and the admin listener ([`crate::admin`]).

use std::sync::Arc;

use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora_proxy::{http_proxy, HttpProxy};

use crate::admin::AdminApp;
use crate::config::{Config, ConfigError, Listener};
use crate::downstream::ConnectionPolicy;
use crate::lifecycle::{DrainSignal, DrainWatcher};
use crate::proxy::Gateway;
use crate::upstream::{DnsRefresher, UpstreamPool};

/// A service name, which listeners it takes, and whether they are TLS.
type ListenerGroup = (&'static str, fn(&Listener) -> bool, bool);

/// Builds the server and all its services. Does not bind or fork: `main` (or a test) calls
/// `bootstrap()` and `run*()` afterwards.
pub fn build_server(cfg: Config, mut opt: Opt) -> Result<Server, ConfigError> {
    // Our file is not Pingora's: its `server:` section is mapped into ServerConf below.
    opt.conf = None;
    crate::config::files::check_files(&cfg)?;
    let conf = server_conf(&cfg);
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    let cfg = Arc::new(cfg);
    let pool = UpstreamPool::new(cfg.upstream.clone());
    let drain = Arc::new(DrainSignal::default());
    if cfg.upstream.tls && !cfg.upstream.tls_verify {
        log::warn!("upstream certificate verification is OFF (upstream.tls_verify: false)");
    }
    add_proxy_services(&mut server, &cfg, &pool, &drain)?;
    add_support_services(&mut server, &cfg, &pool, drain);
    Ok(server)
}

/// The proxy services. Listeners that share server options share a service: plain,
/// plain+h2c, TLS.
fn add_proxy_services(
    server: &mut Server,
    cfg: &Arc<Config>,
    pool: &Arc<UpstreamPool>,
    drain: &Arc<DrainSignal>,
) -> Result<(), ConfigError> {
    let groups: [ListenerGroup; 3] = [
        ("arkgate http", |l| l.tls.is_none() && !l.h2c, false),
        ("arkgate h2c", |l| l.tls.is_none() && l.h2c, false),
        ("arkgate tls", |l| l.tls.is_some(), true),
    ];
    for (name, pick, tls) in groups {
        let listeners: Vec<&Listener> = cfg.listeners.iter().filter(|l| pick(l)).collect();
        if listeners.is_empty() {
            continue;
        }
        let h2c = listeners.iter().any(|l| l.h2c);
        let build = |h2c: bool| {
            let gateway = Gateway::new(cfg.clone(), pool.clone(), drain.clone(), tls);
            proxy_app(server, cfg, gateway, h2c)
        };
        let app = ConnectionPolicy {
            inner: build(h2c),
            h1_only: h2c.then(|| build(false)),
            drain: drain_period(cfg),
            first_request: cfg.downstream.client_timeout,
        };
        let mut svc = Service::new(name.to_string(), app);
        for l in listeners {
            let addr = l.addr.to_string();
            match &l.tls {
                None => svc.add_tcp(&addr),
                Some(files) => {
                    let settings = crate::config::files::tls_settings(files)?;
                    svc.add_tls_with_settings(&addr, None, settings);
                }
            }
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

/// DNS refresh, the drain watcher and the admin listener.
fn add_support_services(
    server: &mut Server,
    cfg: &Config,
    pool: &Arc<UpstreamPool>,
    drain: Arc<DrainSignal>,
) {
    if pool.needs_dns() {
        server.add_service(background_service(
            "dns refresher",
            DnsRefresher { pool: pool.clone() },
        ));
    }
    server.add_service(background_service(
        "drain watcher",
        DrainWatcher {
            phases: server.watch_execution_phase(),
            drain: drain.clone(),
        },
    ));
    if let Some(addr) = cfg.admin_addr {
        let mut admin = Service::new("arkgate admin".to_string(), AdminApp { drain });
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
