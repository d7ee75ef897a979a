//! The floor reference for `benches/load.sh`: the least a Pingora 0.9 proxy can do per request,
//! built from the same dependency versions as arkgate.
//!
//! One `upstream_peer` (a fixed plain-HTTP address), a path prefix prepended in
//! `upstream_request_filter`, the `Host` header set; no body filters, no metrics, no logging.
//! Whatever arkgate costs above this is arkgate's own; what this costs above nginx is Pingora's.
//! It uses the same global allocator as the `arkgate` binary (the crate's allocator feature), so
//! the ratio between the two is not an allocator's.
//!
//! ```text
//! bare_pingora --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--prefix /api/v3] [--threads N]
//!              [--tls-cert PEM --tls-key PEM] [--upstream-tls] [--work-stealing]
//! ```
//! It runs Pingora's single-threaded runtimes, as arkgate does by default; `--work-stealing`
//! switches to Pingora's default work-stealing runtime.
//! `--tls-cert`/`--tls-key` make the listener TLS (HTTP/1.1 only, as arkgate's default); with
//! `--upstream-tls` the upstream is reached over TLS (certificate not verified: a bench mock).

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;

arkgate::global_allocator!();

/// The forwarder: one upstream address and one path prefix.
struct Bare {
    upstream: String,
    prefix: String,
    upstream_tls: bool,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(
            self.upstream.as_str(),
            self.upstream_tls,
            "localhost".into(),
        );
        peer.options.verify_cert = false;
        peer.options.verify_hostname = false;
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        if !self.prefix.is_empty() {
            let mut path = String::with_capacity(self.prefix.len() + 64);
            path.push_str(&self.prefix);
            path.push_str(req.uri.path_and_query().map_or("/", |p| p.as_str()));
            let uri = path
                .parse::<http::Uri>()
                .map_err(|e| Error::because(ErrorType::InternalError, "bad path", e))?;
            req.set_uri(uri);
        }
        req.insert_header("Host", self.upstream.as_str())?;
        Ok(())
    }
}

/// `--name value` from the command line, or `default`.
fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = arg(&args, "--listen", "127.0.0.1:18099");
    let upstream = arg(&args, "--upstream", "127.0.0.1:18098");
    let prefix = arg(&args, "--prefix", "");
    let threads = arg(&args, "--threads", "1").parse().unwrap_or(1);
    let conf = ServerConf {
        threads,
        work_stealing: args.iter().any(|a| a == "--work-stealing"),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let upstream_tls = args.iter().any(|a| a == "--upstream-tls");
    let bare = Bare {
        upstream,
        prefix,
        upstream_tls,
    };
    let mut svc = http_proxy_service(&server.configuration, bare);
    let (cert, key) = (arg(&args, "--tls-cert", ""), arg(&args, "--tls-key", ""));
    if cert.is_empty() {
        svc.add_tcp(&listen);
    } else {
        let settings = pingora::listeners::tls::TlsSettings::intermediate(&cert, &key)
            .expect("--tls-cert and --tls-key name a usable certificate and key");
        svc.add_tls_with_settings(&listen, None, settings);
    }
    server.add_service(svc);
    server.bootstrap();
    server.run_forever();
}
