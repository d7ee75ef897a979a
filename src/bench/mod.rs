//! `arkgate bench`: a load generator for chat completions endpoints, with a baseline mode that
//! measures the latency a gateway adds, and `bench compare` for two saved runs.
//!
//! - this file: the command line, its validation into a [`Plan`], and the rounds.
//! - [`client`]: connections and the load loop.
//! - [`report`]: figures, text output, JSON and comparison.
//!
//! Nothing here runs on the proxy's paths: the HTTP client and histograms are reached only
//! through this subcommand.

pub mod client;
pub mod report;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use openssl::ssl::SslConnector;

use client::{Budget, Conn, Endpoint, Load, Progress};
use report::{Report, Stats};

/// Exit status when the run went through but no request succeeded, or a file could not be written.
const EXIT_RUN_FAILED: u8 = 1;
/// Exit status for unusable arguments (bad URL, unreadable body file, bad header).
const EXIT_BAD_ARGS: u8 = 2;

/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

const DEFAULT_PROMPT: &str = "Reply with one short sentence about the sea.";

/// `arkgate bench URL [OPTIONS]` or `arkgate bench compare A.json B.json`.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  \
                  arkgate bench http://127.0.0.1:8000/chat/completions -n 500 -c 8 --model M\n  \
                  arkgate bench http://127.0.0.1:8000/chat/completions --stream --duration 30s\n  \
                  arkgate bench http://127.0.0.1:8000/chat/completions \\\n      \
                  --baseline http://127.0.0.1:9000/chat/completions --json gw.json\n  \
                  arkgate bench compare before.json after.json\n\n\
                  Exit status: 0 when requests succeeded, 1 when none did (or the JSON file \
                  could not be written), 2 for unusable arguments."
)]
pub struct BenchArgs {
    /// Compare two saved runs instead of running one.
    #[command(subcommand)]
    pub action: Option<BenchAction>,

    #[command(flatten)]
    pub run: BenchRun,
}

/// `bench`'s own subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchAction {
    /// Print two `--json` reports side by side, with the ratio B/A of every figure.
    Compare {
        /// The first report (A).
        a: PathBuf,
        /// The second report (B).
        b: PathBuf,
    },
}

/// The API key: kept out of `Debug` output.
#[derive(Clone)]
pub struct ApiKey(String);

impl From<String> for ApiKey {
    fn from(s: String) -> Self {
        ApiKey(s)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<hidden>)")
    }
}

/// The options of a load run.
#[derive(Debug, Args)]
pub struct BenchRun {
    /// The full endpoint URL, e.g. http://127.0.0.1:8000/chat/completions
    #[arg(value_name = "URL", required = true)]
    pub url: Option<String>,

    /// A second endpoint measured in alternating rounds (e.g. the upstream without the
    /// gateway); the report then shows the latency the first URL adds.
    #[arg(long, value_name = "URL")]
    pub baseline: Option<String>,

    /// Requests per URL, split evenly across rounds.
    #[arg(short = 'n', long = "requests", default_value_t = 1000, conflicts_with = "duration",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,

    /// Run for this long per URL instead of a request count (e.g. 30s, 500ms, 2m), split
    /// evenly across rounds.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Connections per URL, opened before timing starts; each carries one request at a time.
    #[arg(short = 'c', long = "connections", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,

    /// The model named in the request body.
    #[arg(long, default_value = "gpt-4o-mini", conflicts_with = "body_file")]
    pub model: String,

    /// The user message of the request body.
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_PROMPT, conflicts_with = "body_file")]
    pub prompt: String,

    /// Send this file as the request body instead (with --stream, "stream": true is set in it).
    #[arg(long, value_name = "FILE")]
    pub body_file: Option<PathBuf>,

    /// Ask for a streamed (SSE) answer and measure time to first byte, time to first token
    /// and the gap between chunks.
    #[arg(long)]
    pub stream: bool,

    /// Sent as `Authorization: Bearer <KEY>`; never printed.
    #[arg(
        long,
        value_name = "KEY",
        env = "OPENAI_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<ApiKey>,

    /// An extra request header, repeatable.
    #[arg(short = 'H', long = "header", value_name = "'NAME: VALUE'")]
    pub headers: Vec<String>,

    /// Rounds per URL with --baseline, alternating which URL goes first.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,

    /// The longest one request may take, body included.
    #[arg(long, value_name = "TIME", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Accept any TLS certificate (for a gateway with a self-signed one).
    #[arg(short = 'k', long)]
    pub insecure: bool,

    /// Also write the figures to this file as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Parses `30s`, `500ms`, `2m`, `1h` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a time such as 30s, 500ms or 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use ms, s, m or h)"
            ))
        }
    };
    let d = Duration::try_from_secs_f64(secs).map_err(|e| format!("`{text}`: {e}"))?;
    if d.is_zero() {
        return Err(format!("`{text}`: must be more than zero"));
    }
    Ok(d)
}

/// Runs `arkgate bench …` and returns its exit status.
pub fn run(args: BenchArgs) -> ExitCode {
    match args.action {
        Some(BenchAction::Compare { a, b }) => compare_files(&a, &b),
        None => run_load(args.run),
    }
}

fn compare_files(a: &std::path::Path, b: &std::path::Path) -> ExitCode {
    let read = |p: &std::path::Path| -> Result<Report, String> {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: not a bench report: {e}", p.display()))
    };
    match (read(a), read(b)) {
        (Ok(ra), Ok(rb)) => {
            print!(
                "{}",
                report::compare(&a.display().to_string(), &ra, &b.display().to_string(), &rb)
            );
            ExitCode::SUCCESS
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("arkgate bench compare: {e}");
            ExitCode::from(EXIT_BAD_ARGS)
        }
    }
}

/// A validated run: endpoints parsed, body and headers built.
struct Plan {
    gateway: Arc<Endpoint>,
    baseline: Option<Arc<Endpoint>>,
    requests: u64,
    duration: Option<Duration>,
    connections: usize,
    rounds: u32,
    load: Arc<Load>,
    insecure: bool,
    json: Option<PathBuf>,
}

impl Plan {
    fn from_args(a: BenchRun) -> Result<Plan, String> {
        let url = a.url.as_deref().ok_or("a URL is required")?;
        let gateway = Arc::new(Endpoint::parse(url)?);
        let baseline = a
            .baseline
            .as_deref()
            .map(Endpoint::parse)
            .transpose()?
            .map(Arc::new);
        let body = match &a.body_file {
            Some(path) => {
                let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                if a.stream {
                    streamed_file_body(&raw).map_err(|e| format!("{}: {e}", path.display()))?
                } else {
                    Bytes::from(raw)
                }
            }
            None => chat_body(&a.model, &a.prompt, a.stream),
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(ApiKey(key)) = &a.api_key {
            let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "the API key has characters a header cannot carry".to_string())?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        for h in &a.headers {
            let (name, value) = parse_header(h)?;
            headers.insert(name, value);
        }
        Ok(Plan {
            gateway,
            baseline,
            requests: a.requests,
            duration: a.duration,
            connections: a.connections as usize,
            rounds: a.rounds,
            load: Arc::new(Load {
                body,
                headers,
                stream: a.stream,
                timeout: a.timeout,
            }),
            insecure: a.insecure,
            json: a.json,
        })
    }
}

/// The chat completions body built from `--model` and `--prompt`.
fn chat_body(model: &str, prompt: &str, stream: bool) -> Bytes {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    Bytes::from(body.to_string())
}

/// A body file with `"stream": true` (and usage asked for, unless the file says otherwise).
fn streamed_file_body(raw: &[u8]) -> Result<Bytes, String> {
    let mut v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| format!("not JSON ({e}), so --stream cannot set stream"))?;
    let obj = v
        .as_object_mut()
        .ok_or("not a JSON object, so --stream cannot set stream")?;
    obj.insert("stream".into(), true.into());
    obj.entry("stream_options")
        .or_insert_with(|| serde_json::json!({"include_usage": true}));
    Ok(Bytes::from(v.to_string()))
}

/// `Name: value` as a header.
fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("header `{text}`: expected 'NAME: VALUE'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("header `{text}`: bad name"))?;
    let mut value =
        HeaderValue::from_str(value.trim()).map_err(|_| format!("header `{text}`: bad value"))?;
    if name == AUTHORIZATION {
        value.set_sensitive(true);
    }
    Ok((name, value))
}

fn run_load(args: BenchRun) -> ExitCode {
    let plan = match Plan::from_args(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("arkgate bench: {e}");
            return ExitCode::from(EXIT_BAD_ARGS);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arkgate bench: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUN_FAILED);
        }
    };
    let report = match runtime.block_on(execute(&plan)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arkgate bench: {e}");
            return ExitCode::from(EXIT_RUN_FAILED);
        }
    };
    print!("{}", report.render());
    if let Some(path) = &plan.json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|text| std::fs::write(path, text + "\n").map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("arkgate bench: {}: {e}", path.display());
            return ExitCode::from(EXIT_RUN_FAILED);
        }
    }
    let none_succeeded =
        report.succeeded == 0 || report.baseline.as_ref().is_some_and(|b| b.succeeded == 0);
    if none_succeeded {
        ExitCode::from(EXIT_RUN_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// One URL's side of the run: its connections and what they measured so far.
struct Side {
    name: &'static str,
    ep: Arc<Endpoint>,
    conns: Vec<Option<Conn>>,
    stats: Stats,
}

/// Opens every connection, runs the rounds (alternating sides with a baseline) and builds the report.
async fn execute(plan: &Plan) -> Result<Report, String> {
    let needs_tls = plan.gateway.is_tls() || plan.baseline.as_ref().is_some_and(|b| b.is_tls());
    let tls: Option<Arc<SslConnector>> = if needs_tls {
        Some(Arc::new(client::tls_connector(plan.insecure)?))
    } else {
        None
    };
    let mut sides = vec![open_side("gateway", &plan.gateway, plan, tls.clone()).await?];
    if let Some(b) = &plan.baseline {
        sides.push(open_side("baseline", b, plan, tls.clone()).await?);
    }
    let rounds = if sides.len() > 1 { plan.rounds } else { 1 };
    let show_progress = std::io::stderr().is_terminal();
    for round in 0..rounds {
        let budget_count = share(plan.requests, rounds, round);
        let order: Vec<usize> = if round % 2 == 0 {
            (0..sides.len()).collect()
        } else {
            (0..sides.len()).rev().collect()
        };
        for i in order {
            let side = &mut sides[i];
            let budget = match plan.duration {
                Some(d) => Budget::Until(Instant::now() + d / rounds),
                None if budget_count == 0 => continue,
                None => Budget::Count(budget_count),
            };
            let progress = Arc::new(Progress::default());
            let label = if rounds > 1 {
                format!("{} round {}/{rounds}", side.name, round + 1)
            } else {
                side.name.to_string()
            };
            let stop = Arc::new(AtomicBool::new(false));
            let printer = show_progress
                .then(|| tokio::spawn(print_progress(label, progress.clone(), stop.clone())));
            let conns = std::mem::take(&mut side.conns);
            let (conns, stats) = client::run_round(
                side.ep.clone(),
                tls.clone(),
                plan.load.clone(),
                conns,
                budget,
                progress,
            )
            .await;
            stop.store(true, Relaxed);
            if let Some(p) = printer {
                let _ = p.await;
            }
            side.conns = conns;
            side.stats.merge(&stats);
        }
    }
    let stream = plan.load.stream;
    let mut reports = sides
        .iter()
        .map(|s| Report::from_stats(&s.ep.url, &s.stats, stream));
    let gateway = reports.next().ok_or("no gateway side")?;
    Ok(match reports.next() {
        Some(baseline) => gateway.with_baseline(baseline),
        None => gateway,
    })
}

/// Requests for round `round` of `rounds` when `total` are split evenly.
fn share(total: u64, rounds: u32, round: u32) -> u64 {
    let rounds = u64::from(rounds);
    total / rounds + u64::from(u64::from(round) < total % rounds)
}

/// Opens the side's connections concurrently; fails only if none opens.
async fn open_side(
    name: &'static str,
    ep: &Arc<Endpoint>,
    plan: &Plan,
    tls: Option<Arc<SslConnector>>,
) -> Result<Side, String> {
    let attempts: Vec<_> = (0..plan.connections)
        .map(|_| {
            let (ep, tls) = (ep.clone(), tls.clone());
            tokio::spawn(async move { client::connect(&ep, tls.as_deref()).await })
        })
        .collect();
    let mut first_error = None;
    let mut conns = Vec::with_capacity(attempts.len());
    for attempt in attempts {
        let result = attempt
            .await
            .unwrap_or_else(|e| Err(format!("connect: {e}")));
        match result {
            Ok(c) => conns.push(Some(c)),
            Err(e) => {
                first_error.get_or_insert(e);
                conns.push(None);
            }
        }
    }
    let opened = conns.iter().filter(|c| c.is_some()).count();
    if opened == 0 {
        let reason = first_error.unwrap_or_default();
        return Err(format!(
            "{}: no connection could be opened: {reason}",
            ep.url
        ));
    }
    if let Some(e) = first_error {
        eprintln!(
            "arkgate bench: {}: {opened} of {} connections opened ({e}); the others retry",
            ep.url, plan.connections
        );
    }
    Ok(Side {
        name,
        ep: ep.clone(),
        conns,
        stats: Stats::default(),
    })
}

/// Redraws one stderr line until `stop`, then clears it.
async fn print_progress(label: String, p: Arc<Progress>, stop: Arc<AtomicBool>) {
    let started = Instant::now();
    while !stop.load(Relaxed) {
        tokio::time::sleep(PROGRESS_EVERY).await;
        let done = p.done.load(Relaxed);
        let failed = p.failed.load(Relaxed);
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        eprint!("\r\x1b[K{label}: {done} done, {failed} failed, {rate:.0} req/s");
    }
    eprint!("\r\x1b[K");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn requests_split_evenly_over_rounds() {
        let shares: Vec<u64> = (0..3).map(|r| share(100, 3, r)).collect();
        assert_eq!(shares, [34, 33, 33]);
        assert_eq!((0..3).map(|r| share(2, 3, r)).sum::<u64>(), 2);
    }

    #[test]
    fn the_built_body_asks_for_a_stream_and_its_usage() {
        let v: serde_json::Value =
            serde_json::from_slice(&chat_body("m", "hi", true)).expect("JSON");
        assert_eq!(v["model"], "m");
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        let v: serde_json::Value =
            serde_json::from_slice(&chat_body("m", "hi", false)).expect("JSON");
        assert!(v.get("stream").is_none());
    }

    #[test]
    fn a_body_file_gets_stream_set_and_keeps_the_rest() {
        let body = streamed_file_body(br#"{"model":"x","stream_options":{"include_usage":false}}"#)
            .expect("object");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], false);
        assert!(streamed_file_body(b"[1]").is_err());
        assert!(streamed_file_body(b"nope").is_err());
    }

    #[test]
    fn headers_parse_and_the_key_is_never_in_debug_output() {
        let (n, v) = parse_header("X-Trace:  abc ").expect("header");
        assert_eq!((n.as_str(), v.to_str().ok()), ("x-trace", Some("abc")));
        assert!(parse_header("no colon").is_err());
        let key = ApiKey("sk-secret".into());
        assert!(!format!("{key:?}").contains("sk-secret"));
    }
}
