//! Operations over real sockets and the real binary: what an operator sees.
//!
//! `/metrics` and `/healthz` on the admin listener, the access log on stderr (sampled, errors
//! always, never a credential), and `arkgate -t` on good and bad configuration files. Each test
//! starts its own `arkgate` process on free 127.0.0.1 ports, in front of a small mock upstream.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::process::{
    assert_config_test_accepts, config_test_rejection, ProxyProcess, ScratchDir,
};
use common::{
    json_post_bytes as post, ms, proxy, request_bytes, BlockingClient as Client, MockConfig,
    MockUpstream, RecordedRequest, Reply,
};

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
    let gateway = Gateway::start("metrics", "{sample_rate: 0}");
    let (listen, admin) = (gateway.proxy.addr(), gateway.proxy.admin());

    let before = scrape(admin);
    assert_eq!(before["arkgate_requests_total{class=\"2xx\"}"], 0.0);
    assert_eq!(
        before["arkgate_request_duration_seconds_count{class=\"2xx\"}"],
        0.0
    );

    // Keep-alive clients, so upstream connections are both opened and reused; every body
    // carries the default rule's `json_schema`, and so does every answer.
    let body = r#"{"model":"m","response_format":{"type":"json_schema"},"messages":[]}"#;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            thread::spawn(move || {
                let mut client = Client::new(listen);
                for _ in 0..PER_CLIENT {
                    let r = client
                        .send(&post("/v1/chat/completions", body))
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
        .send(&post("/v1/sse", r#"{"stream":true}"#))
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
    assert_eq!(
        m("arkgate_request_duration_seconds_count{class=\"2xx\"}"),
        total
    );
    assert_eq!(
        m("arkgate_request_duration_seconds_bucket{class=\"2xx\",le=\"+Inf\"}"),
        total
    );
    assert!(m("arkgate_request_duration_seconds_sum{class=\"2xx\"}") > 0.0);
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

    let health = Client::new(admin).get("/healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.text().trim(), "ok");
}

#[test]
fn metrics_count_bytes_rewritten() {
    let gateway = Gateway::start("rewritten", "{sample_rate: 0}");
    let body = r#"{"model":"m","response_format":{"type":"json_schema"}}"#;
    let r = Client::new(gateway.proxy.addr())
        .send(&post("/v1/chat/completions", body))
        .expect("request through arkgate");
    assert_eq!(r.status, 200);
    // One `json_schema` in the request body and one in the answer.
    let mut rewritten = 0.0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while rewritten < 22.0 && Instant::now() < deadline {
        rewritten = scrape(gateway.proxy.admin())["arkgate_bytes_rewritten_total"];
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rewritten, 22.0);
}

// ---------------------------------------------------------------------------------------------
// Access log
// ---------------------------------------------------------------------------------------------

/// A request carrying a credential in every place a client may put one.
fn request_with_secrets() -> Vec<u8> {
    request_bytes(
        "POST",
        &format!("/v1/chat/completions?api_key={SECRET}&user=1"),
        &[
            ("Authorization", &format!("Bearer sk-{SECRET}")),
            ("Cookie", &format!("session={SECRET}")),
            ("X-Api-Key", SECRET),
            ("api-key", SECRET),
            ("Content-Type", "application/json"),
        ],
        format!(r#"{{"model":"m","user":"{SECRET}-in-body","messages":[]}}"#).as_bytes(),
    )
}

#[test]
fn access_log_has_one_line_per_request_and_no_credentials() {
    let gateway = Gateway::start("accesslog", "{sample_rate: 1}");

    let ok = Client::new(gateway.proxy.addr())
        .send(&request_with_secrets())
        .expect("request through arkgate");
    assert_eq!(ok.status, 200, "{}", ok.text());
    let lines = gateway.proxy.wait_for_log_lines(ACCESS_TARGET, 1);
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
    gateway.upstream.kill();
    let failed = Client::new(gateway.proxy.addr())
        .send(&request_with_secrets())
        .expect("arkgate answers even with the upstream down");
    assert_eq!(failed.status, 502, "{}", failed.text());
    let lines = gateway.proxy.wait_for_log_lines(ACCESS_TARGET, 2);
    assert!(lines[1].contains("status=502"), "{}", lines[1]);

    let log = gateway.proxy.log();
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
    let gateway = Gateway::start(
        "bodylog",
        "{sample_rate: 1, bodies: true, body_max_bytes: 24}",
    );

    let body = r#"{"model":"m","messages":[{"role":"user","content":"a long question"}]}"#;
    let ok = Client::new(gateway.proxy.addr())
        .send(&post("/v1/chat/completions", body))
        .expect("request through arkgate");
    assert_eq!(ok.status, 200, "{}", ok.text());
    let lines = gateway.proxy.wait_for_log_lines(ACCESS_TARGET, 1);
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
    let gateway = Gateway::start("sample0", "{sample_rate: 0}");

    // One keep-alive connection: each request's logging hook has run before the next request
    // is read, so once the last request's line is there, any earlier line would be too.
    let mut client = Client::new(gateway.proxy.addr());
    let body = r#"{"model":"m","messages":[]}"#;
    for _ in 0..5 {
        let r = client
            .send(&post("/v1/chat/completions", body))
            .expect("request through arkgate");
        assert_eq!(r.status, 200);
        assert!(!r.closes());
    }
    gateway.upstream.kill();
    let failed = client
        .send(&post("/v1/chat/completions", body))
        .expect("arkgate answers even with the upstream down");
    assert_eq!(failed.status, 502, "{}", failed.text());

    let lines = gateway.proxy.wait_for_log_lines(ACCESS_TARGET, 1);
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
    let dir = ScratchDir::new("badconf");
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
        let line = config_test_rejection(&path, extra);
        assert!(line.contains(key), "{extra}: `{key}` not named in: {line}");
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
        assert_config_test_accepts(&path);
        checked.push(path);
    }
    assert!(
        checked.iter().any(|p| p.ends_with("arkgate.yaml")),
        "conf/arkgate.yaml was not checked: {checked:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Harness: arkgate in front of a mock upstream, /metrics
// ---------------------------------------------------------------------------------------------

/// What the upstream answers on any path but `…/sse`: JSON that mentions `json_schema`.
const CHAT_ANSWER: &str = r#"{"object":"chat.completion","choices":[{"message":{"role":"assistant","content":"{\"format\":\"json_schema\"}"}}]}"#;

/// A running `arkgate` on free ports, in front of its own upstream. Drops in field order: the
/// process first, then the upstream.
struct Gateway {
    proxy: ProxyProcess,
    upstream: MockUpstream,
}

impl Gateway {
    /// Starts arkgate with `logging` (a YAML mapping) and waits until both listeners accept.
    fn start(tag: &str, logging: &str) -> Gateway {
        let upstream = MockUpstream::start(MockConfig::h1().reply(answer));
        let config = proxy(&upstream.base_url("/api/v3"))
            .upstream("http_version", "h1")
            .upstream("read_timeout_ms", "5000")
            .upstream("max_retries", "1")
            .yaml(&format!("logging: {logging}\n"))
            .admin()
            .drain(1, 1);
        Gateway {
            proxy: ProxyProcess::start(&config, tag),
            upstream,
        }
    }
}

/// [`CHAT_ANSWER`] on any path, and a short SSE stream on `…/sse`.
fn answer(req: &RecordedRequest) -> Reply {
    if !req.target_str().ends_with("/sse") {
        return Reply::json(CHAT_ANSWER);
    }
    Reply::sse(&[
        (ms(0), "data: {\"i\":0}\n\n"),
        (ms(20), "data: {\"i\":1}\n\n"),
        (ms(20), "data: [DONE]\n\n"),
    ])
}

/// `/metrics` as a map from `name{labels}` to value.
fn scrape(admin: SocketAddr) -> HashMap<String, f64> {
    let r = Client::new(admin).get("/metrics");
    assert_eq!(r.status, 200);
    common::parse_metrics(&r.text())
}
