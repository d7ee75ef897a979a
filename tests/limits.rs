//! Client keys, rate limits, token budgets and cost, end to end: real sockets, a real Redis, the
//! real `arkgate` binary where instances share a Redis, and the openai Python SDK as a client.
//!
//! Every test uses key names of its own, so the process-wide counters it reads are its alone.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use arkgate::clients::hash_key;
use common::process::ProxyProcess;
use common::redis::RedisServer;
use common::*;

const ARK_KEY: &str = "ark-upstream-secret-7f3a";

/// A key file holding the upstream key, mode 0600, in a directory kept while the test runs.
struct KeyFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn key_file() -> KeyFile {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ark.key");
    std::fs::write(&path, format!("{ARK_KEY}\n")).expect("write key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    KeyFile { _dir: dir, path }
}

/// One `clients.keys[]` entry: name, client key, rpm, tpm, daily_tokens.
type Entry<'a> = (&'a str, &'a str, u64, u64, u64);

fn clients_yaml(file: &KeyFile, entries: &[Entry<'_>]) -> String {
    let mut yaml = format!(
        "clients:\n  upstream_key_file: {}\n  keys:\n",
        yaml_str(file.path.to_str().expect("UTF-8"))
    );
    for (name, key, rpm, tpm, daily) in entries {
        yaml += &format!(
            "    - {{name: {name}, key_sha256: \"{}\", rpm: {rpm}, tpm: {tpm}, daily_tokens: {daily}}}\n",
            hash_key(key)
        );
    }
    yaml
}

fn usage_json(prompt: u64, completion: u64) -> String {
    format!(
        r#"{{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
        prompt + completion
    )
}

fn chat_body(stream: bool, max_tokens: u64) -> String {
    format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"stream":{stream},"max_tokens":{max_tokens}}}"#
    )
}

/// The admission's estimate for `body`: a quarter of its bytes plus `max_tokens`.
fn estimate(body: &str, max_tokens: u64) -> u64 {
    body.len() as u64 / 4 + max_tokens
}

async fn chat(addr: SocketAddr, key: Option<&str>, body: &str) -> H1Response {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    h1(addr, "POST", "/chat/completions", &headers, body.as_bytes()).await
}

fn header_u64(r: &H1Response, name: &str) -> u64 {
    r.header(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing or not a number: {r:?}"))
}

async fn admin_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let r = h1(admin, "GET", path, &[], b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

/// `/keys`'s entry for `name` once `ready` holds (the logging hook settles after the client has
/// its answer), or after 3 s.
async fn key_status(
    admin: SocketAddr,
    name: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let all = admin_json(admin, "/keys").await;
        let entry = all["keys"]
            .as_array()
            .and_then(|k| k.iter().find(|e| e["name"] == name).cloned())
            .expect("the key is listed");
        if ready(&entry) || Instant::now() > deadline {
            return entry;
        }
        tokio::time::sleep(ms(10)).await;
    }
}

#[tokio::test]
async fn requests_without_a_known_key_get_401_and_nothing_goes_upstream() {
    let file = key_file();
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(1, 1))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&clients_yaml(&file, &[("auth-a", "ak-auth-good", 0, 0, 0)]))
        .start();
    let body = chat_body(false, 5);
    for key in [None, Some("ak-auth-wrong"), Some(""), Some("ak-auth-goo")] {
        let r = chat(proxy.addr, key, &body).await;
        assert_eq!(r.status, 401, "{key:?}: {r:?}");
        let e = r.json();
        assert_eq!(e["error"]["code"], "invalid_api_key");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    let basic = h1(
        proxy.addr,
        "POST",
        "/chat/completions",
        &[("Authorization", "Basic YWs6YXV0aA==")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(basic.status, 401);
    assert_eq!(mock.request_count(), 0, "nothing went upstream");
    assert_eq!(
        chat(proxy.addr, Some("ak-auth-good"), &body).await.status,
        200
    );
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn the_upstream_sees_the_ark_key_and_never_the_clients() {
    let file = key_file();
    let client_key = "ak-upstream-view-client-key";
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(1, 1))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&clients_yaml(&file, &[("view-a", client_key, 0, 0, 0)]))
        .start();
    for stream in [false, true] {
        let r = chat(proxy.addr, Some(client_key), &chat_body(stream, 5)).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let recorded = mock.requests();
    assert_eq!(recorded.len(), 2);
    for req in &recorded {
        assert_eq!(
            req.header_all("authorization"),
            vec![format!("Bearer {ARK_KEY}").as_bytes()],
            "{req:?}"
        );
        let everything = format!("{req:?}");
        assert!(!everything.contains(client_key), "{everything}");
        assert!(!everything.contains(&hash_key(client_key)), "{everything}");
    }
}

/// The openai SDK (no retries): `ok` calls, then one that must fail; prints what it saw.
const SDK_SCRIPT: &str = r#"
import json, sys, openai
base, key, ok = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=10)
out = {"ok": 0}
for _ in range(ok):
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    out["ok"] += 1
try:
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    out["error"] = None
except openai.APIStatusError as e:
    out["error"] = type(e).__name__
    out["status"] = e.status_code
    out["code"] = e.code
    out["headers"] = {k: v for k, v in e.response.headers.items()}
print(json.dumps(out))
"#;

async fn run_sdk(addr: SocketAddr, key: &str, ok: u64) -> serde_json::Value {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg("-c")
        .arg(SDK_SCRIPT)
        .arg(format!("http://{addr}"))
        .arg(key)
        .arg(ok.to_string())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the SDK script ends within 60 s")
        .expect("python3 runs (install the SDK with .ci/setup)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("the script prints JSON")
}

#[tokio::test]
async fn the_openai_sdk_gets_a_rate_limit_error_after_rpm_requests_and_other_keys_do_not() {
    let file = key_file();
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(3, 2))));
    let keys = [
        ("sdk-a", "ak-sdk-a", 3, 0, 0),
        ("sdk-b", "ak-sdk-b", 3, 0, 0),
    ];
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&clients_yaml(&file, &keys))
        .admin()
        .start();
    let a = run_sdk(proxy.addr, "ak-sdk-a", 3).await;
    assert_eq!(a["ok"], 3, "{a}");
    assert_eq!(a["error"], "RateLimitError", "{a}");
    assert_eq!(a["status"], 429);
    assert_eq!(a["code"], "rate_limit_exceeded");
    let h = &a["headers"];
    assert_eq!(h["x-ratelimit-limit-requests"], "3", "{h}");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0", "{h}");
    assert!(h["x-ratelimit-reset-requests"].is_string(), "{h}");
    let retry: u64 = h["retry-after"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("retry-after");
    assert!((1..=20).contains(&retry), "{h}");
    assert_eq!(mock.request_count(), 3);

    // Admitted answers carry the fields too; the other key has its own bucket.
    let r = chat(proxy.addr, Some("ak-sdk-b"), &chat_body(false, 5)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("2"));
    let m = metrics(proxy.admin_addr.expect("admin")).await;
    assert_eq!(
        m.get("arkgate_rate_limited_total{key=\"sdk-a\",reason=\"rpm\"}"),
        Some(&1.0)
    );
    assert_eq!(
        m.get("arkgate_rate_limited_total{key=\"sdk-b\",reason=\"rpm\"}"),
        None
    );
}

#[tokio::test]
async fn tokens_per_minute_are_settled_from_the_usage_of_a_json_answer() {
    let file = key_file();
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(20, 80))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&clients_yaml(
            &file,
            &[("tpm-json", "ak-tpm-json", 0, 200, 0)],
        ))
        .yaml("prices: [{match: \"m*\", prompt_per_million: 2.0, completion_per_million: 8.0}]\n")
        .admin()
        .start();
    let admin = proxy.admin_addr.expect("admin");
    let body = chat_body(false, 10);
    let est = estimate(&body, 10);
    let first = chat(proxy.addr, Some("ak-tpm-json"), &body).await;
    assert_eq!(first.status, 200);
    assert_eq!(header_u64(&first, "x-ratelimit-limit-tokens"), 200);
    assert_eq!(
        header_u64(&first, "x-ratelimit-remaining-tokens"),
        200 - est
    );
    key_status(admin, "tpm-json", |k| k["tokens_today"] == 100).await;

    // Settled at 100: the next admission sees 200 − 100 − estimate (plus a few refilled).
    let second = chat(proxy.addr, Some("ak-tpm-json"), &body).await;
    assert_eq!(second.status, 200);
    let left = header_u64(&second, "x-ratelimit-remaining-tokens");
    assert!((100 - est..=100 - est + 5).contains(&left), "{left}");
    key_status(admin, "tpm-json", |k| k["tokens_today"] == 200).await;

    let third = chat(proxy.addr, Some("ak-tpm-json"), &body).await;
    assert_eq!(third.status, 429, "{third:?}");
    assert_eq!(third.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(third.header("x-ratelimit-limit-tokens"), Some("200"));
    assert!(third.header("retry-after").is_some());
    assert_eq!(mock.request_count(), 2);
    let m = metrics(admin).await;
    let cost = m
        .get("arkgate_cost_total{key=\"tpm-json\",model=\"m\"}")
        .copied()
        .unwrap_or(0.0);
    // Two answers of 20 prompt and 80 completion tokens at 2 and 8 per million.
    assert!((cost - 2.0 * 680e-6).abs() < 1e-9, "{cost}");
    assert_eq!(
        m.get("arkgate_tokens_total{key=\"tpm-json\",model=\"m\",type=\"completion\"}"),
        Some(&160.0)
    );
    assert_eq!(
        m.get("arkgate_rate_limited_total{key=\"tpm-json\",reason=\"tpm\"}"),
        Some(&1.0)
    );
}

fn sse_with_usage(prompt: u64, completion: u64) -> Reply {
    let delta =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
    let usage = format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion},\"total_tokens\":{}}}}}\n\n",
        prompt + completion
    );
    Reply::sse(&[(ms(0), delta), (ms(5), &usage), (ms(5), "data: [DONE]\n\n")])
}

#[tokio::test]
async fn a_stream_whose_client_did_not_ask_for_usage_is_settled_and_gets_no_usage_chunk() {
    let file = key_file();
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| sse_with_usage(40, 60)));
    let proxy = proxy(&mock.base_url("/v1"))
        // A token limit turns include_usage on even when the usage section turns it off.
        .yaml("usage: {stream_include_usage: false}\n")
        .yaml(&clients_yaml(
            &file,
            &[("tpm-sse", "ak-tpm-sse", 0, 200, 0)],
        ))
        .admin()
        .start();
    let admin = proxy.admin_addr.expect("admin");
    let body = chat_body(true, 10);
    let est = estimate(&body, 10);
    let first = chat(proxy.addr, Some("ak-tpm-sse"), &body).await;
    assert_eq!(first.status, 200);
    assert!(first.text().contains("[DONE]"), "{first:?}");
    assert!(!first.text().contains("prompt_tokens"), "{first:?}");
    assert_eq!(
        mock.only_request().body_json()["stream_options"]["include_usage"],
        true
    );
    key_status(admin, "tpm-sse", |k| k["tokens_today"] == 100).await;
    let second = chat(proxy.addr, Some("ak-tpm-sse"), &body).await;
    let left = header_u64(&second, "x-ratelimit-remaining-tokens");
    assert!((100 - est..=100 - est + 5).contains(&left), "{left}");

    // Two streams of 100 tokens spent the minute's 200.
    key_status(admin, "tpm-sse", |k| k["tokens_today"] == 200).await;
    let r = chat(proxy.addr, Some("ak-tpm-sse"), &body).await;
    assert_eq!(r.status, 429, "the bucket is spent: {r:?}");
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test]
async fn the_daily_budget_refuses_with_insufficient_quota_once_spent() {
    let file = key_file();
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(50, 50))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&clients_yaml(
            &file,
            &[("daily-a", "ak-daily-a", 0, 0, 150)],
        ))
        .admin()
        .start();
    let admin = proxy.admin_addr.expect("admin");
    let body = chat_body(false, 1);
    for n in [100, 200] {
        assert_eq!(
            chat(proxy.addr, Some("ak-daily-a"), &body).await.status,
            200
        );
        key_status(admin, "daily-a", |k| k["tokens_today"] == n).await;
    }
    let r = chat(proxy.addr, Some("ak-daily-a"), &body).await;
    assert_eq!(r.status, 429, "{r:?}");
    let e = r.json();
    assert_eq!(e["error"]["code"], "insufficient_quota");
    assert_eq!(e["error"]["type"], "insufficient_quota");
    assert!(header_u64(&r, "retry-after") >= 1);
    assert_eq!(mock.request_count(), 2);
    let k = key_status(admin, "daily-a", |_| true).await;
    assert_eq!(k["requests_today"], 3);
    assert_eq!(k["remaining_daily_tokens"], 0);
    assert_eq!(k["daily_tokens"], 150);
}

fn redis_limit_yaml(redis: &RedisServer, rpm: u64, on_error: &str) -> String {
    format!(
        "redis: {{url: {}, timeout_ms: 200}}\nrate_limit: {{store: redis, by: key, rpm: {rpm}, on_store_error: {on_error}}}\n",
        yaml_str(&redis.url())
    )
}

#[tokio::test]
async fn two_instances_sharing_a_redis_admit_exactly_the_limit_together() {
    let redis = RedisServer::start();
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(1, 1))));
    let builder = proxy(&mock.base_url("/v1")).yaml(&redis_limit_yaml(&redis, 10, "allow"));
    let one = ProxyProcess::start_quiet(&builder, "limits-one");
    let two = ProxyProcess::start_quiet(&builder, "limits-two");
    let body = chat_body(false, 1);
    let mut tasks = Vec::new();
    for i in 0..30 {
        let addr = if i % 2 == 0 { one.addr() } else { two.addr() };
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            chat(addr, Some("sk-shared-by-both"), &body).await.status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let status = tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("bounded")
            .expect("task");
        statuses.push(status);
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(mock.request_count(), 10, "{statuses:?}");
    assert_eq!((admitted, refused), (10, 20), "{statuses:?}");
}

#[tokio::test]
async fn a_redis_outage_follows_on_store_error_and_limits_return_with_redis() {
    let mut redis = RedisServer::start();
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(1, 1))));
    let allow = proxy(&mock.base_url("/v1"))
        .yaml(&redis_limit_yaml(&redis, 2, "allow"))
        .start();
    let deny = proxy(&mock.base_url("/v1"))
        .yaml(&redis_limit_yaml(&redis, 2, "deny"))
        .start();
    let body = chat_body(false, 1);
    assert_eq!(
        chat(allow.addr, Some("sk-outage-a"), &body).await.status,
        200
    );
    assert_eq!(
        chat(deny.addr, Some("sk-outage-d"), &body).await.status,
        200
    );

    redis.kill();
    for _ in 0..3 {
        assert_eq!(
            chat(allow.addr, Some("sk-outage-a"), &body).await.status,
            200
        );
        let r = chat(deny.addr, Some("sk-outage-d"), &body).await;
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.json()["error"]["code"], "rate_limit_unavailable");
    }

    redis.restart();
    // A fresh Redis: two requests fit again, then 429 (after the client's reconnect back-off).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut statuses = Vec::new();
    while Instant::now() < deadline && !statuses.ends_with(&[429]) {
        statuses.push(chat(allow.addr, Some("sk-outage-a2"), &body).await.status);
        tokio::time::sleep(ms(50)).await;
    }
    assert!(statuses.ends_with(&[200, 200, 429]), "{statuses:?}");
    let r = chat(deny.addr, Some("sk-outage-d2"), &body).await;
    assert_eq!(r.status, 200, "deny admits again once Redis answers: {r:?}");
}

/// `arkgate key new` prints a key and its hash; `arkgate key hash` gives the same hash.
fn new_key_from_the_binary() -> (String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arkgate"))
        .args(["key", "new"])
        .output()
        .expect("run arkgate key new");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .expect("field printed")
    };
    let (key, hash) = (field("key:"), field("key_sha256:"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_arkgate"))
        .args(["key", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run arkgate key hash");
    use std::io::Write;
    writeln!(child.stdin.take().expect("stdin"), "{key}").expect("write key");
    let out = child.wait_with_output().expect("hash output");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), hash);
    assert_eq!(hash, hash_key(&key));
    (key, hash)
}

#[tokio::test]
async fn no_key_appears_in_the_log_metrics_keys_or_error_bodies() {
    let (client_key, client_hash) = new_key_from_the_binary();
    let file = key_file();
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(5, 5))));
    let builder = proxy(&mock.base_url("/v1"))
        .yaml(&clients_yaml(
            &file,
            &[("quiet-a", &client_key, 1, 1000, 100_000)],
        ))
        .yaml("logging: {sample_rate: 1.0, format: json}\n")
        .admin();
    let p = ProxyProcess::start(&builder, "limits-secrets");
    let body = chat_body(false, 5);
    let mut seen = String::new();
    for key in [
        Some(client_key.as_str()),
        Some(client_key.as_str()),
        Some("ak-wrong"),
        None,
    ] {
        let r = chat(p.addr(), key, &body).await;
        seen += &format!("{r:?}\n");
    }
    assert!(
        seen.contains("status: 200") && seen.contains("status: 429"),
        "{seen}"
    );
    assert!(seen.contains("status: 401"), "{seen}");
    seen += &h1(p.admin(), "GET", "/metrics", &[], b"").await.text();
    seen += &h1(p.admin(), "GET", "/keys", &[], b"").await.text();
    // The access lines are written once the requests end.
    p.wait_for_log_lines("/chat/completions", 4);
    seen += &p.log();
    assert!(seen.contains("quiet-a"), "the key's name is shown: {seen}");
    for secret in [client_key.as_str(), client_hash.as_str(), ARK_KEY] {
        assert!(!seen.contains(secret), "{secret} leaked:\n{seen}");
    }
}

#[tokio::test]
async fn by_client_ip_counts_the_address_whatever_the_token_and_defaults_apply() {
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(1, 1))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml("rate_limit: {by: client_ip, rpm: 2}\n")
        .start();
    let body = chat_body(false, 1);
    let statuses = [
        chat(proxy.addr, Some("sk-ip-one"), &body).await.status,
        chat(proxy.addr, Some("sk-ip-two"), &body).await.status,
        chat(proxy.addr, None, &body).await.status,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(mock.request_count(), 2);
    // Without clients: the client's own Authorization goes upstream untouched.
    assert_eq!(
        mock.requests()[0].header_str("authorization"),
        Some("Bearer sk-ip-one")
    );
}

#[tokio::test]
async fn a_cache_hit_is_admitted_but_spends_no_tokens() {
    let file = key_file();
    let mock = MockUpstream::start(MockConfig::h1().reply(|_| Reply::json(usage_json(20, 80))));
    let proxy = proxy(&mock.base_url("/v1"))
        .yaml(&clients_yaml(
            &file,
            &[("tpm-cache", "ak-tpm-cache", 0, 200, 0)],
        ))
        .yaml("cache: {}\n")
        .admin()
        .start();
    let admin = proxy.admin_addr.expect("admin");
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"max_tokens":10}"#;
    let est = estimate(body, 10);
    let first = chat(proxy.addr, Some("ak-tpm-cache"), body).await;
    assert_eq!(
        (first.status, first.header("x-arkgate-cache")),
        (200, Some("miss"))
    );
    key_status(admin, "tpm-cache", |k| k["tokens_today"] == 100).await;
    // 100 spent: every hit reserves the estimate and gives it back, so none is ever refused,
    // where keeping the estimates would refuse the third.
    for i in 0..5 {
        let hit = chat(proxy.addr, Some("ak-tpm-cache"), body).await;
        assert_eq!(
            (hit.status, hit.header("x-arkgate-cache")),
            (200, Some("hit")),
            "hit {i}"
        );
        // The reservation is settled in the logging hook, after the client has its answer.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let last = chat(proxy.addr, Some("ak-tpm-cache"), body).await;
    assert_eq!(last.status, 200);
    assert!(
        est < 100
            && (100 - est..=100 - est + 10)
                .contains(&header_u64(&last, "x-ratelimit-remaining-tokens")),
        "{last:?}"
    );
    assert_eq!(mock.request_count(), 1);
}
