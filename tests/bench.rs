//! `arkgate bench` end to end: the real binary against a mock upstream, directly and through
//! the real proxy, reading back its `--json` report.

mod common;
use common::*;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest one bench invocation may take before the test gives up on it.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A chat completion that reports its usage.
const COMPLETION: &str = r#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":5,"total_tokens":14}}"#;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `arkgate <args>` with `OPENAI_API_KEY` set to `key`, killed after [`RUN_TIMEOUT`].
fn arkgate(args: &[&str], key: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_arkgate"))
        .args(args)
        .env("OPENAI_API_KEY", key)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start arkgate");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for arkgate") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("arkgate {args:?} ran longer than {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(ms(10));
    };
    Run {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("the --json file exists");
    serde_json::from_str(&text).expect("the --json file is JSON")
}

fn f(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} missing in {v:#}"))
}

#[test]
fn bench_reports_counts_rates_and_percentiles_in_json() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(COMPLETION)));
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out.json");
    let url = mock.base_url("/chat/completions");
    let run = arkgate(
        &[
            "bench",
            &url,
            "-n",
            "200",
            "-c",
            "4",
            "--model",
            "m-1",
            "--json",
            out.to_str().expect("UTF-8"),
        ],
        "sk-never-printed",
    );
    assert_eq!(
        run.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );

    let r = read_json(&out);
    assert_eq!(r["requests"], 200, "{r:#}");
    assert_eq!(r["succeeded"], 200);
    assert_eq!(r["failed"], 0);
    assert_eq!(r["status"]["200"], 200);
    assert!(f(&r, "/rps") > 0.0);
    let (p50, p99) = (f(&r, "/latency_ms/p50"), f(&r, "/latency_ms/p99"));
    assert!(
        0.0 < p50 && p50 <= p99 && p99 <= f(&r, "/latency_ms/max"),
        "{r:#}"
    );
    for k in ["p90", "p95"] {
        assert!(r["latency_ms"][k].is_number(), "latency_ms.{k} missing");
    }
    assert!(f(&r, "/tokens_per_s") > 0.0);
    assert_eq!(r["completion_tokens"], 1000);
    assert!(r.get("ttft_ms").is_none() && r.get("overhead_ms").is_none());

    // Keep-alive over the connections opened up front, one request per count.
    assert_eq!(mock.request_count(), 200);
    assert_eq!(mock.connections(), 4);
    let req = mock.last_request();
    assert_eq!(req.method, "POST");
    assert_eq!(req.target_str(), "/chat/completions");
    assert_eq!(
        req.header_str("authorization"),
        Some("Bearer sk-never-printed")
    );
    let body = req.body_json();
    assert_eq!(body["model"], "m-1");
    assert_eq!(body["messages"][0]["role"], "user");

    assert!(run.stdout.contains("Requests/s"), "{}", run.stdout);
    assert!(run.stdout.contains("Latency histogram"), "{}", run.stdout);
    for text in [&run.stdout, &run.stderr] {
        assert!(
            !text.contains("sk-never-printed"),
            "the key was printed: {text}"
        );
    }
}

#[test]
fn bench_stream_measures_first_byte_first_token_and_chunk_gaps() {
    const FIRST_TOKEN_DELAY_MS: u64 = 30;
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| {
        Reply::sse(&[
            (
                ms(0),
                "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            ),
            (
                ms(FIRST_TOKEN_DELAY_MS),
                "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            ),
            (
                ms(5),
                "data: {\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n",
            ),
            (
                ms(0),
                "data: {\"choices\":[],\"usage\":{\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
            ),
        ])
    }));
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("stream.json");
    let url = mock.base_url("/chat/completions");
    let run = arkgate(
        &[
            "bench",
            &url,
            "-n",
            "40",
            "-c",
            "4",
            "--stream",
            "--json",
            out.to_str().expect("UTF-8"),
        ],
        "",
    );
    assert_eq!(
        run.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );

    let r = read_json(&out);
    assert_eq!(r["succeeded"], 40, "{r:#}");
    let ttft = f(&r, "/ttft_ms/p50");
    let ttfb = f(&r, "/ttfb_ms/p50");
    assert!(ttft >= FIRST_TOKEN_DELAY_MS as f64, "ttft {ttft} ms: {r:#}");
    assert!(ttfb < ttft, "the head comes before the first token: {r:#}");
    for k in ["p90", "p95", "p99", "max"] {
        assert!(
            r["ttft_ms"][k].is_number() && r["ttfb_ms"][k].is_number(),
            "{k}: {r:#}"
        );
    }
    assert!(f(&r, "/chunk_gap_ms/p50") >= 4.0, "{r:#}");
    assert_eq!(r["completion_tokens"], 80);
    assert!(f(&r, "/tokens_per_s") > 0.0);

    let body = mock.last_request().body_json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert!(run.stdout.contains("first token"), "{}", run.stdout);
}

#[test]
fn bench_baseline_shows_the_latency_the_proxy_adds() {
    const UPSTREAM_DELAY_MS: u64 = 20;
    let event = "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\ndata: [DONE]\n\n";
    let mock = MockUpstream::start(
        MockConfig::h1().reply(move |_| Reply::sse(&[(ms(UPSTREAM_DELAY_MS), event)])),
    );
    let proxy = proxy(&mock.base_url("")).start();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("baseline.json");
    let gateway = proxy.url("/chat/completions");
    let direct = mock.base_url("/chat/completions");
    let run = arkgate(
        &[
            "bench",
            &gateway,
            "--baseline",
            &direct,
            "-n",
            "120",
            "-c",
            "4",
            "--rounds",
            "3",
            "--timeout",
            "10s",
            "--json",
            out.to_str().expect("UTF-8"),
        ],
        "",
    );
    assert_eq!(
        run.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );

    let r = read_json(&out);
    assert_eq!(r["requests"], 120, "{r:#}");
    assert_eq!(r["failed"], 0, "{r:#}");
    assert_eq!(r["baseline"]["requests"], 120, "{r:#}");
    assert_eq!(r["baseline"]["failed"], 0, "{r:#}");
    let delay = UPSTREAM_DELAY_MS as f64;
    assert!(f(&r, "/latency_ms/p50") >= delay, "{r:#}");
    assert!(f(&r, "/baseline/latency_ms/p50") >= delay, "{r:#}");
    let added = f(&r, "/overhead_ms/p50");
    assert!(added < delay, "added p50 {added} ms: {r:#}");
    assert!(r["overhead_ms"]["p99"].is_number());
    assert_eq!(mock.request_count(), 240);
    assert!(run.stdout.contains("Added latency"), "{}", run.stdout);
}

#[test]
fn bench_compare_prints_both_runs_with_ratios() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(COMPLETION)));
    let dir = tempfile::tempdir().expect("temp dir");
    let a = dir.path().join("a.json");
    let url = mock.base_url("/chat/completions");
    let run = arkgate(
        &[
            "bench",
            &url,
            "-n",
            "100",
            "-c",
            "2",
            "--json",
            a.to_str().expect("UTF-8"),
        ],
        "",
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    // B: the same run with half the throughput and twice the median latency.
    let mut b_json = read_json(&a);
    let rps = f(&b_json, "/rps");
    let p50 = f(&b_json, "/latency_ms/p50");
    b_json["rps"] = (rps / 2.0).into();
    b_json["latency_ms"]["p50"] = (p50 * 2.0).into();
    let b = dir.path().join("b.json");
    std::fs::write(&b, b_json.to_string()).expect("write b.json");

    let run = arkgate(
        &[
            "bench",
            "compare",
            a.to_str().expect("UTF-8"),
            b.to_str().expect("UTF-8"),
        ],
        "",
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let row = |name: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in:\n{}", run.stdout))
            .to_string()
    };
    assert!(row("latency_ms.p50").ends_with("2.00x"), "{}", run.stdout);
    assert!(row("rps").ends_with("0.50x"), "{}", run.stdout);
    assert!(row("requests").ends_with("1.00x"), "{}", run.stdout);
}

#[test]
fn bench_says_why_when_it_cannot_run() {
    let run = arkgate(
        &["bench", "ftp://127.0.0.1/chat/completions", "-n", "1"],
        "",
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("http:// or https://"), "{}", run.stderr);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = closed.local_addr().expect("address");
    drop(closed);
    let url = format!("http://{addr}/chat/completions");
    let run = arkgate(&["bench", &url, "-n", "5", "-c", "2"], "");
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("no connection could be opened"),
        "{}",
        run.stderr
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.json");
    let run = arkgate(
        &[
            "bench",
            "compare",
            missing.to_str().expect("UTF-8"),
            missing.to_str().expect("UTF-8"),
        ],
        "",
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}
