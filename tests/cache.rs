//! The response cache end to end: what is cached and under which key, hits replayed as they
//! were stored (streams event by event), identical requests in flight sent upstream once, the
//! memory and Redis backends (two arkgate processes sharing one Redis, Redis down and back),
//! the admin `/cache` endpoints with their token, and `arkgate cache stats|clear`.
//!
//! Every proxy has its own cache, so the counters of `GET /cache` are exact per test.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{path_str, ProxyProcess, ScratchDir};
use common::redis::RedisServer;
use common::*;

const CHAT: &str = "/api/v3/chat/completions";
const ANSWER: &str = r#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"four"}}]}"#;

/// A chat request body at temperature 0 (`extra` is spliced in before the closing brace).
fn chat(content: &str, extra: &str) -> String {
    format!(
        r#"{{"model":"m1","temperature":0,"messages":[{{"role":"user","content":"{content}"}}]{extra}}}"#
    )
}

/// A mock answering every request with `reply()`, counting nothing itself (its records do).
fn mock(reply: impl Fn() -> Reply + Send + Sync + 'static) -> MockUpstream {
    MockUpstream::start(MockConfig::h1().reply(move |_| reply()))
}

/// An in-process proxy with `cache:` set to `cache_yaml` and an admin listener.
fn cached_proxy(mock: &MockUpstream, cache_yaml: &str) -> Proxy {
    proxy(&mock.base_url(""))
        .yaml(&format!("cache: {cache_yaml}\n"))
        .admin()
        .start()
}

/// POSTs `body` to `path` with extra `headers` on a fresh connection.
async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> H1Response {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    h1(addr, "POST", path, &all, body.as_bytes()).await
}

fn cache_result(r: &H1Response) -> &str {
    r.header("x-arkgate-cache").unwrap_or("none")
}

/// `GET /cache` on the admin listener.
async fn stats(admin: SocketAddr) -> serde_json::Value {
    let r = h1(admin, "GET", "/cache", &[], b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

/// Polls `GET /cache` until `field` reaches `n` (stores happen after the answer is sent), for
/// at most 3 s; returns the last stats.
async fn stats_when(admin: SocketAddr, field: &str, n: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let s = stats(admin).await;
        if s[field].as_u64() >= Some(n) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(ms(10)).await;
    }
}

/// A request, then the same one until it is a hit (the store runs after the first answer);
/// at most 3 s. Returns the first answer and the hit.
async fn miss_then_hit(
    addr: SocketAddr,
    headers: &[(&str, &str)],
    body: &str,
) -> (H1Response, H1Response) {
    let first = post(addr, CHAT, headers, body).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let again = post(addr, CHAT, headers, body).await;
        if cache_result(&again) == "hit" || Instant::now() > deadline {
            return (first, again);
        }
        tokio::time::sleep(ms(20)).await;
    }
}

#[tokio::test]
async fn a_hit_after_a_miss_has_the_same_content_and_one_upstream_arrival() {
    let up = mock(|| {
        Reply::full(
            200,
            &[("content-type", "application/json"), ("x-up", "1")],
            ANSWER,
        )
    });
    let p = cached_proxy(&up, "{}");
    let body = chat("2+2?", "");
    let first = post(p.addr, CHAT, &[], &body).await;
    assert_eq!((first.status, cache_result(&first)), (200, "miss"));
    stats_when(p.admin_addr.expect("admin"), "stores", 1).await;
    let hit = post(p.addr, CHAT, &[], &body).await;
    assert_eq!((hit.status, cache_result(&hit)), (200, "hit"));
    assert_eq!(hit.body, first.body);
    assert_eq!(hit.header("x-up"), Some("1"));
    assert_eq!(hit.header("content-type"), Some("application/json"));
    assert_eq!(up.request_count(), 1);
    let s = stats(p.admin_addr.expect("admin")).await;
    assert_eq!(
        (s["hits"].as_u64(), s["misses"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (s["backend"].as_str(), s["entries"].as_u64()),
        (Some("memory"), Some(1))
    );
}

#[tokio::test]
async fn only_temperature_zero_is_cached_and_other_paths_carry_no_header() {
    let up = mock(|| Reply::json(ANSWER));
    let p = cached_proxy(&up, "{}");
    for body in [
        r#"{"model":"m1","temperature":0.7,"messages":[]}"#,
        r#"{"model":"m1","messages":[]}"#,
        "not json",
    ] {
        for _ in 0..2 {
            let r = post(p.addr, CHAT, &[], body).await;
            assert_eq!((r.status, cache_result(&r)), (200, "bypass"), "{body}");
        }
    }
    let other = post(p.addr, "/api/v3/models", &[], &chat("x", "")).await;
    assert_eq!(cache_result(&other), "none");
    assert_eq!(up.request_count(), 7);
    let s = stats(p.admin_addr.expect("admin")).await;
    assert_eq!(
        (s["bypasses"].as_u64(), s["stores"].as_u64()),
        (Some(6), Some(0))
    );
}

#[tokio::test]
async fn key_order_and_whitespace_do_not_matter() {
    let up = mock(|| Reply::json(ANSWER));
    let p = cached_proxy(&up, "{}");
    let (first, _) = miss_then_hit(p.addr, &[], &chat("order", "")).await;
    assert_eq!(cache_result(&first), "miss");
    let reordered = "{ \"messages\" : [ {\"content\":\"order\", \"role\":\"user\"} ],\n \"temperature\": 0.0, \"model\":\"m1\" }";
    let r = post(p.addr, CHAT, &[], reordered).await;
    assert_eq!(cache_result(&r), "hit");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn any_other_change_is_a_miss() {
    let up = mock(|| Reply::json(ANSWER));
    let p = cached_proxy(&up, "{}");
    miss_then_hit(p.addr, &[], &chat("base", "")).await;
    let variants = [
        chat("changed", ""),
        chat("base", r#","max_tokens":5"#),
        chat(
            "base",
            r#","tools":[{"type":"function","function":{"name":"f"}}]"#,
        ),
        chat("base", "").replace("m1", "m2"),
        chat("base", r#","stream":true"#),
    ];
    for v in &variants {
        let r = post(p.addr, CHAT, &[], v).await;
        assert_eq!(cache_result(&r), "miss", "{v}");
    }
    assert_eq!(up.request_count(), 1 + variants.len());
}

#[tokio::test]
async fn another_api_key_misses_under_api_key_scope_and_hits_under_global() {
    let up = mock(|| Reply::json(ANSWER));
    let per_key = cached_proxy(&up, "{scope: api_key}");
    let body = chat("scoped", "");
    let a = [("Authorization", "Bearer key-a")];
    let b = [("Authorization", "Bearer key-b")];
    miss_then_hit(per_key.addr, &a, &body).await;
    assert_eq!(
        cache_result(&post(per_key.addr, CHAT, &b, &body).await),
        "miss"
    );

    let global = cached_proxy(&up, "{scope: global}");
    miss_then_hit(global.addr, &a, &body).await;
    assert_eq!(
        cache_result(&post(global.addr, CHAT, &b, &body).await),
        "hit"
    );
}

#[tokio::test]
async fn embeddings_are_cached_at_any_temperature() {
    let up = mock(|| Reply::json(r#"{"data":[{"embedding":[0.1]}]}"#));
    let p = cached_proxy(&up, "{}");
    let body = r#"{"model":"e1","input":"hello"}"#;
    let first = post(p.addr, "/v1/embeddings", &[], body).await;
    assert_eq!(cache_result(&first), "miss");
    stats_when(p.admin_addr.expect("admin"), "stores", 1).await;
    let hit = post(p.addr, "/v1/embeddings", &[], body).await;
    assert_eq!((cache_result(&hit), hit.body == first.body), ("hit", true));
}

const EVENTS: [&str; 4] = [
    "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
];

#[tokio::test]
async fn a_stream_is_replayed_event_by_event_with_done() {
    let up = mock(|| {
        let events: Vec<(Duration, &str)> = EVENTS.iter().map(|e| (ms(5), *e)).collect();
        Reply::sse(&events)
    });
    let p = cached_proxy(&up, "{}");
    let body = chat("stream", r#","stream":true"#);
    let first = post(p.addr, CHAT, &[], &body).await;
    let s = stats_when(p.admin_addr.expect("admin"), "stores", 1).await;
    assert_eq!(s["stores"].as_u64(), Some(1), "{s}");
    let hit = post(p.addr, CHAT, &[], &body).await;
    assert_eq!((cache_result(&first), cache_result(&hit)), ("miss", "hit"));
    assert_eq!(hit.text(), EVENTS.concat());
    assert_eq!(hit.header("content-type"), Some("text/event-stream"));
    assert!(hit.chunked, "a replayed stream is chunked");
    assert!(
        hit.pieces.len() >= EVENTS.len(),
        "{} pieces",
        hit.pieces.len()
    );
    assert_eq!(up.request_count(), 1);
    let whole = post(p.addr, CHAT, &[], &chat("stream", "")).await;
    assert_eq!(
        cache_result(&whole),
        "miss",
        "streamed and whole answers are separate"
    );
}

#[tokio::test]
async fn a_stream_is_replayed_over_http2_and_chunked_bodies_bypass() {
    let up = mock(|| {
        let events: Vec<(Duration, &str)> = EVENTS.iter().map(|e| (ms(2), *e)).collect();
        Reply::sse(&events)
    });
    let p = proxy(&up.base_url(""))
        .yaml("cache: {}\n")
        .admin()
        .h2c()
        .start();
    let body = chat("h2", r#","stream":true"#);
    let len = body.len().to_string();
    let headers = [
        ("content-type", "application/json"),
        ("content-length", len.as_str()),
    ];
    let h2 = H2Client::connect(p.addr).await;
    let first = h2.request("POST", CHAT, &headers, body.as_bytes()).await;
    assert_eq!(first.header("x-arkgate-cache"), Some("miss"));
    stats_when(p.admin_addr.expect("admin"), "stores", 1).await;
    let hit = h2.request("POST", CHAT, &headers, body.as_bytes()).await;
    assert_eq!(
        (hit.status, hit.header("x-arkgate-cache")),
        (200, Some("hit"))
    );
    assert_eq!((hit.text(), hit.error.as_deref()), (EVENTS.concat(), None));
    assert!(
        hit.pieces.len() >= EVENTS.len(),
        "{} DATA frames",
        hit.pieces.len()
    );
    assert_eq!(up.request_count(), 1);

    // No Content-Length (HTTP/2 without one): the body is not read whole, so never cached.
    let unknown = h2.post_json(CHAT, body.as_bytes()).await;
    assert_eq!(unknown.header("x-arkgate-cache"), Some("bypass"));
}

#[tokio::test]
async fn a_stream_cut_midway_or_without_done_is_not_stored() {
    let up = MockUpstream::start(MockConfig::h1().reply(|r| {
        if r.body_json()["messages"][0]["content"] == "reset" {
            Reply::ResetMidBody {
                first: bytes::Bytes::from_static(EVENTS[0].as_bytes()),
            }
        } else {
            Reply::sse(&[(ms(1), EVENTS[0]), (ms(1), EVENTS[1])])
        }
    }));
    let p = cached_proxy(&up, "{}");
    for content in ["reset", "no-done"] {
        let body = chat(content, r#","stream":true"#);
        let mut c = H1Client::connect(p.addr).await;
        let _ = c.try_exchange(&json_post_bytes(CHAT, &body), |_| {}).await;
        tokio::time::sleep(ms(100)).await;
        assert_eq!(cache_result(&post(p.addr, CHAT, &[], &body).await), "miss");
    }
    assert_eq!(up.request_count(), 4);
    assert_eq!(
        stats(p.admin_addr.expect("admin")).await["stores"].as_u64(),
        Some(0)
    );
}

#[tokio::test]
async fn error_answers_are_not_stored() {
    let up = MockUpstream::start(MockConfig::h1().reply(|r| {
        let status = r.body_json()["messages"][0]["content"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        Reply::full(status, &[("content-type", "application/json")], "{}")
    }));
    let p = cached_proxy(&up, "{}");
    for status in ["400", "429", "500"] {
        let body = chat(status, "");
        let first = post(p.addr, CHAT, &[], &body).await;
        assert_eq!(first.status.to_string(), status);
        tokio::time::sleep(ms(50)).await;
        let again = post(p.addr, CHAT, &[], &body).await;
        assert_eq!(cache_result(&again), "miss", "{status}");
    }
    assert_eq!(
        stats(p.admin_addr.expect("admin")).await["stores"].as_u64(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_identical_cold_requests_reach_the_upstream_once() {
    let up = mock(|| Reply::After(ms(500), Box::new(Reply::json(ANSWER))));
    let p = Arc::new(cached_proxy(&up, "{}"));
    let body = Arc::new(chat("fifty", ""));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (addr, body) = (p.addr, Arc::clone(&body));
            tokio::spawn(async move { post(addr, CHAT, &[], &body).await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        let r = t.await.expect("client task");
        assert_eq!(r.status, 200);
        results.push((cache_result(&r).to_string(), r.body));
    }
    assert_eq!(up.request_count(), 1, "one upstream arrival");
    assert!(results.iter().all(|(_, b)| b == ANSWER.as_bytes()));
    assert_eq!(results.iter().filter(|(c, _)| c == "miss").count(), 1);
    let s = stats(p.admin_addr.expect("admin")).await;
    assert_eq!(
        (s["hits"].as_u64(), s["misses"].as_u64()),
        (Some(49), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_first_client_goes_away_the_others_are_still_answered() {
    let up = mock(|| Reply::After(ms(400), Box::new(Reply::json(ANSWER))));
    let p = cached_proxy(&up, "{}");
    let body = chat("leader-leaves", "");
    let mut leader = H1Client::connect(p.addr).await;
    leader.send(&json_post_bytes(CHAT, &body)).await;
    assert!(up.wait_for_requests(1, Duration::from_secs(3)).await);
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let (addr, body) = (p.addr, body.clone());
            tokio::spawn(async move { post(addr, CHAT, &[], &body).await })
        })
        .collect();
    tokio::time::sleep(ms(50)).await;
    drop(leader);
    for w in waiting {
        let r = w.await.expect("client task");
        assert_eq!((r.status, r.text()), (200, ANSWER.to_string()));
    }
    assert!(up.request_count() <= 6);
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let up = mock(|| Reply::json(ANSWER));
    let p = cached_proxy(&up, "{ttl_s: 1}");
    let body = chat("ttl", "");
    let (_, hit) = miss_then_hit(p.addr, &[], &body).await;
    assert_eq!(cache_result(&hit), "hit");
    tokio::time::sleep(ms(1100)).await;
    assert_eq!(cache_result(&post(p.addr, CHAT, &[], &body).await), "miss");
}

#[tokio::test]
async fn answers_over_max_entry_bytes_are_not_stored() {
    let big = format!(r#"{{"content":"{}"}}"#, "x".repeat(2000));
    let up = mock(move || Reply::json(big.clone()));
    let p = cached_proxy(&up, "{max_entry_bytes: 1000}");
    let body = chat("big", "");
    assert_eq!(post(p.addr, CHAT, &[], &body).await.body.len(), 2014);
    tokio::time::sleep(ms(100)).await;
    assert_eq!(cache_result(&post(p.addr, CHAT, &[], &body).await), "miss");
    assert_eq!(
        stats(p.admin_addr.expect("admin")).await["stores"].as_u64(),
        Some(0)
    );
}

#[tokio::test]
async fn no_cache_skips_the_lookup_but_stores_and_no_store_skips_both() {
    let up = mock(|| Reply::json(ANSWER));
    let p = cached_proxy(&up, "{}");
    let admin = p.admin_addr.expect("admin");
    let body = chat("directives", "");
    miss_then_hit(p.addr, &[], &body).await;
    let no_cache = [("Cache-Control", "no-cache")];
    assert_eq!(
        cache_result(&post(p.addr, CHAT, &no_cache, &body).await),
        "miss"
    );
    assert_eq!(up.request_count(), 2);

    let fresh = chat("stored-by-no-cache", "");
    post(p.addr, CHAT, &no_cache, &fresh).await;
    stats_when(admin, "stores", 2).await;
    assert_eq!(cache_result(&post(p.addr, CHAT, &[], &fresh).await), "hit");

    let no_store = [("Cache-Control", "no-store")];
    let other = chat("never-stored", "");
    assert_eq!(
        cache_result(&post(p.addr, CHAT, &no_store, &body).await),
        "bypass"
    );
    assert_eq!(
        cache_result(&post(p.addr, CHAT, &no_store, &other).await),
        "bypass"
    );
    tokio::time::sleep(ms(100)).await;
    assert_eq!(cache_result(&post(p.addr, CHAT, &[], &other).await), "miss");
}

#[tokio::test]
async fn clear_and_clear_by_model_with_the_admin_token() {
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "adm1n-t0ken\n").expect("write token");
    let up = mock(|| Reply::json(ANSWER));
    let p = proxy(&up.base_url(""))
        .yaml("cache: {}\n")
        .admin_token_file(&token_file)
        .start();
    let admin = p.admin_addr.expect("admin");
    let (a, b) = (chat("clear", ""), chat("clear", "").replace("m1", "m2"));
    miss_then_hit(p.addr, &[], &a).await;
    miss_then_hit(p.addr, &[], &b).await;

    let bad = [("Authorization", "Bearer wrong")];
    assert_eq!(
        h1(admin, "DELETE", "/cache?model=m1", &[], b"")
            .await
            .status,
        401
    );
    assert_eq!(h1(admin, "DELETE", "/cache", &bad, b"").await.status, 401);
    assert_eq!(
        stats(admin).await["entries"].as_u64(),
        Some(2),
        "GET needs no token"
    );

    let good = [("Authorization", "Bearer adm1n-t0ken")];
    assert_eq!(
        h1(admin, "DELETE", "/cache?model=m1", &good, b"")
            .await
            .status,
        200
    );
    assert_eq!(cache_result(&post(p.addr, CHAT, &[], &a).await), "miss");
    assert_eq!(cache_result(&post(p.addr, CHAT, &[], &b).await), "hit");
    assert_eq!(h1(admin, "DELETE", "/cache", &good, b"").await.status, 200);
    assert_eq!(cache_result(&post(p.addr, CHAT, &[], &b).await), "miss");
}

/// The config of an arkgate process on a Redis-backed cache.
fn redis_proxy(up: &MockUpstream, redis: &RedisServer) -> ProxyBuilder {
    proxy(&up.base_url(""))
        .admin()
        .yaml(&format!(
            "cache: {{backend: redis, scope: api_key}}\nredis: {{url: \"{}\", timeout_ms: 100}}\n",
            redis.url()
        ))
        .yaml("logging: {format: json, sample_rate: 1.0}\n")
}

/// Every key and value under the test Redis, as text (lossy).
fn redis_dump(redis: &RedisServer) -> String {
    let port = redis.addr().port().to_string();
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let keys = cli(&["--scan"]);
    let mut dump = keys.clone();
    for key in keys.lines().filter(|k| !k.is_empty()) {
        dump += &cli(&["GET", key]);
    }
    dump
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_redis_and_the_credential_is_never_stored() {
    let redis = RedisServer::start();
    let up = mock(|| Reply::json(ANSWER));
    let one = ProxyProcess::start(&redis_proxy(&up, &redis), "cache-fleet-1");
    let two = ProxyProcess::start(&redis_proxy(&up, &redis), "cache-fleet-2");
    let secret = "sk-very-secret-credential-42";
    let auth = format!("Bearer {secret}");
    let headers = [("Authorization", auth.as_str())];
    let body = chat("fleet", "");
    let first = post(one.addr(), CHAT, &headers, &body).await;
    assert_eq!(cache_result(&first), "miss");
    stats_when(one.admin(), "stores", 1).await;
    let via_two = post(two.addr(), CHAT, &headers, &body).await;
    assert_eq!(
        (cache_result(&via_two), via_two.body == first.body),
        ("hit", true)
    );
    assert_eq!(up.request_count(), 1);

    let dump = redis_dump(&redis);
    assert!(dump.contains("arkgate:cache:"), "{dump}");
    assert!(!dump.contains(secret), "the credential reached Redis");

    assert_eq!(
        h1(one.admin(), "DELETE", "/cache", &[], b"").await.status,
        200
    );
    assert_eq!(
        cache_result(&post(two.addr(), CHAT, &headers, &body).await),
        "miss"
    );
    two.wait_for_log_lines("\"cache\":\"hit\"", 1);
    for p in [&one, &two] {
        assert!(!p.log().contains(secret), "the credential reached the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_never_fails_a_request_and_hits_resume_after_a_restart() {
    let mut redis = RedisServer::start();
    let up = mock(|| Reply::json(ANSWER));
    let p = ProxyProcess::start_quiet(&redis_proxy(&up, &redis), "cache-redis-down");
    let body = chat("down", "");
    miss_then_hit(p.addr(), &[], &body).await;

    redis.kill();
    assert!(!redis.answers_ping());
    for i in 0..3 {
        let r = post(p.addr(), CHAT, &[], &chat(&format!("while-down-{i}"), "")).await;
        assert_eq!((r.status, r.text()), (200, ANSWER.to_string()));
        assert_eq!(cache_result(&r), "miss", "{}", stats(p.admin()).await);
    }
    let s = stats_when(p.admin(), "errors", 1).await;
    assert!(s["errors"].as_u64() >= Some(1), "{s}");
    let m = h1(p.admin(), "GET", "/metrics", &[], b"").await.text();
    assert!(!m.contains("arkgate_cache_errors_total 0\n"), "{m}");

    redis.restart();
    let (_, hit) = miss_then_hit(p.addr(), &[], &body).await;
    assert_eq!(
        cache_result(&hit),
        "hit",
        "hits resume without restarting arkgate"
    );
}

/// Runs `arkgate cache ARGS` and returns (success, stdout, stderr).
fn cache_cli(args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_arkgate"))
        .arg("cache")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run arkgate cache");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "arkgate cache {args:?} hung");
        std::thread::sleep(ms(20));
    }
    let out = child.wait_with_output().expect("output");
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_command_talks_to_a_running_arkgate() {
    let dir = ScratchDir::new("cache-cli-token");
    let token_file = dir.write("admin.token", "cli-t0ken\n");
    let up = mock(|| Reply::json(ANSWER));
    let builder = proxy(&up.base_url(""))
        .yaml("cache: {}\n")
        .admin_token_file(&token_file);
    let p = ProxyProcess::start(&builder, "cache-cli");
    let conf = p.dir().path().join("arkgate.yaml");
    let conf = path_str(&conf);
    let body = chat("cli", "");
    miss_then_hit(p.addr(), &[], &body).await;

    let (ok, out, err) = cache_cli(&["stats", "-c", conf]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
    assert_eq!(
        (s["backend"].as_str(), s["entries"].as_u64()),
        (Some("memory"), Some(1))
    );

    let (ok, _, err) = cache_cli(&["clear", "--model", "m1", "-c", conf]);
    assert!(ok, "{err}");
    assert_eq!(
        cache_result(&post(p.addr(), CHAT, &[], &body).await),
        "miss"
    );
    let (ok, out, err) = cache_cli(&["clear", "-c", conf]);
    assert!(ok && out.contains("\"cleared\":true"), "{out} {err}");
    assert!(
        !p.log().contains("cli-t0ken"),
        "the admin token reached the log"
    );
}

#[tokio::test]
async fn an_answer_from_an_h2_upstream_that_ends_with_trailers_is_stored() {
    let certs = TestCerts::generate();
    let up = MockUpstream::start(MockConfig::new(Proto::H2).tls(&certs).reply(|_| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-done", "1".parse().expect("header value"));
        Reply::Chunks {
            status: 200,
            headers: mock::owned(&[("content-type", "application/json")]),
            chunks: vec![(ms(0), ANSWER.into())],
            trailers: Some(trailers),
        }
    }));
    let p = proxy(&up.base_url(""))
        .trust(&certs)
        .yaml("cache: {}\n")
        .admin()
        .start();
    let body = chat("trailers", "");
    let (first, hit) = miss_then_hit(p.addr, &[], &body).await;
    assert_eq!(cache_result(&first), "miss");
    assert_eq!(cache_result(&hit), "hit");
    assert_eq!(
        (first.body.as_slice(), hit.body.as_slice()),
        (ANSWER.as_bytes(), ANSWER.as_bytes())
    );
    assert_eq!(up.request_count(), 1);
}
