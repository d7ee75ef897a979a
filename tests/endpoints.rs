//! Several upstream endpoints: weighted balancing, failover on 429/503 before any byte reaches
//! the client (and what is never replayed), connect failover, circuit breaking, health checks,
//! graceful stop and kill under load, warm-up and the connection lifetime.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `upstream.endpoints` for these mocks, named a, b, c… with these weights.
fn endpoints(mocks: &[(&str, u32)]) -> String {
    let list: Vec<String> = mocks
        .iter()
        .enumerate()
        .map(|(i, (url, w))| {
            let name = (b'a' + i as u8) as char;
            format!("{{name: {name}, base_url: {}, weight: {w}}}", yaml_str(url))
        })
        .collect();
    format!("[{}]", list.join(", "))
}

async fn post(proxy: &Proxy, body: &str) -> H1Response {
    post_json(proxy.addr, "/chat/completions", body).await
}

/// The admin view's entry for endpoint `name`.
async fn endpoint_view(proxy: &Proxy, name: &str) -> serde_json::Value {
    let admin = proxy.admin_addr.expect("an admin listener");
    let r = h1(admin, "GET", "/upstreams", &[], b"").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    v["endpoints"]
        .as_array()
        .expect("endpoint list")
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {name} in {v}"))
}

/// Polls the admin view until endpoint `name` is in `state` (at most 5 s).
async fn wait_for_state(proxy: &Proxy, name: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = endpoint_view(proxy, name).await;
        if v["state"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {state}: {v}"
        );
        tokio::time::sleep(ms(20)).await;
    }
}

#[tokio::test]
async fn weights_split_the_traffic_across_plain_h1_and_tls_h2_endpoints() {
    let certs = TestCerts::generate();
    let a = MockUpstream::start(MockConfig::h1().name("a"));
    let b = MockUpstream::start(MockConfig::new(Proto::Both).tls(&certs).name("b"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[
            (&a.base_url("/v1"), 3),
            (&b.base_url("/v3"), 1),
        ]))
        .trust(&certs)
        .start();
    for i in 0..8 {
        let r = post(&proxy, &format!(r#"{{"n":{i}}}"#)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!((a.request_count(), b.request_count()), (6, 2));
    assert_eq!(a.last_request().target_str(), "/v1/chat/completions");
    let last_b = b.last_request();
    assert_eq!(last_b.version, Version::H2);
    assert_eq!(last_b.target_str(), "/v3/chat/completions");
}

#[tokio::test]
async fn a_429_with_retry_after_goes_to_the_other_endpoint_which_then_takes_everything() {
    let a = MockUpstream::start(
        MockConfig::h1()
            .name("a")
            .reply(|_| Reply::full(429, &[("retry-after", "2")], r#"{"error":"slow down"}"#)),
    );
    let b = MockUpstream::start(MockConfig::h1().name("b"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .admin()
        .start();
    // A direct request to b, for the failover's added latency.
    let direct_start = Instant::now();
    let _ = post_json(b.addr, "/chat/completions", r#"{"warm":1}"#).await;
    let direct = direct_start.elapsed();

    let started = Instant::now();
    let r = post(&proxy, r#"{"n":1}"#).await;
    let failover = started.elapsed();
    assert_eq!(r.status, 200, "the client never sees the 429: {}", r.text());
    assert_eq!(a.request_count(), 1, "a saw the request exactly once");
    let gap = b.last_request().received - a.only_request().received;
    let at_a = a.only_request().received - started;
    for i in 2..8 {
        let r = post(&proxy, &format!(r#"{{"n":{i}}}"#)).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(a.request_count(), 1, "a is skipped for its Retry-After");
    assert_eq!(
        b.request_count(),
        1 + 7,
        "b served all seven (plus the direct one)"
    );
    let view = endpoint_view(&proxy, "a").await;
    assert!(view["skip_until"].is_string(), "{view}");
    assert_eq!(view["failovers"]["status_429"], 1, "{view}");
    let admin = proxy.admin_addr.expect("admin");
    let metrics = h1(admin, "GET", "/metrics", &[], b"").await.text();
    for line in [
        "arkgate_failovers_total{endpoint=\"a\",reason=\"status_429\"} 1",
        "arkgate_upstream_requests_total{endpoint=\"b\",class=\"ok\"} 7",
        "arkgate_upstream_state{endpoint=\"a\",state=\"up\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    eprintln!(
        "failover 429 on a -> 200 from b: {:.2} ms (direct request to b: {:.2} ms; reached a after {:.2} ms, b {:.2} ms after a)",
        failover.as_secs_f64() * 1e3,
        direct.as_secs_f64() * 1e3,
        at_a.as_secs_f64() * 1e3,
        gap.as_secs_f64() * 1e3,
    );
}

#[tokio::test]
async fn the_skip_ends_after_retry_after() {
    let a = MockUpstream::start(MockConfig::h1().name("a").reply(|r| {
        if r.conn == 1 {
            Reply::full(429, &[("retry-after", "1")], "")
        } else {
            Reply::json(r#"{"from":"a"}"#)
        }
    }));
    let b = MockUpstream::start(MockConfig::h1().name("b"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .start();
    assert_eq!(post(&proxy, "{}").await.status, 200);
    assert_eq!(post(&proxy, "{}").await.status, 200);
    assert_eq!(a.request_count(), 1);
    tokio::time::sleep(ms(1100)).await;
    for _ in 0..4 {
        assert_eq!(post(&proxy, "{}").await.status, 200);
    }
    assert!(a.request_count() >= 2, "a is back in rotation");
}

#[tokio::test]
async fn a_60_kib_body_is_replayed_byte_for_byte_after_a_429() {
    let a = MockUpstream::start(
        MockConfig::h1()
            .name("a")
            .reply(|_| Reply::full(429, &[], "")),
    );
    let b = MockUpstream::start(MockConfig::h1().name("b").reply(|_| Reply::Echo));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .start();
    let body: String = (0..60 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let body = format!(r#"{{"p":"{}"}}"#, &body[..body.len() - 8]);
    let r = post(&proxy, &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body.as_bytes(), "the client got b's echo");
    assert_eq!(a.only_request().body, body.as_bytes());
    assert_eq!(
        b.only_request().body,
        body.as_bytes(),
        "replayed byte for byte"
    );
}

#[tokio::test]
async fn a_body_beyond_the_retry_buffer_gets_the_429_passed_through() {
    let a = MockUpstream::start(
        MockConfig::h1()
            .name("a")
            .reply(|_| Reply::full(429, &[], "")),
    );
    let b = MockUpstream::start(MockConfig::h1().name("b").reply(|_| Reply::Echo));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .admin()
        .start();
    let body = format!(r#"{{"p":"{}"}}"#, "x".repeat(100 * 1024));
    let r = post(&proxy, &body).await;
    assert_eq!(r.status, 429, "Pingora cannot resend more than 64 KiB");
    assert_eq!(a.only_request().body.len(), body.len());
    assert_eq!(b.request_count(), 0);
    let view = endpoint_view(&proxy, "a").await;
    assert_eq!(view["failovers"]["body_not_replayable"], 1, "{view}");
}

#[tokio::test]
async fn a_500_is_passed_through_and_not_replayed() {
    let a = MockUpstream::start(
        MockConfig::h1()
            .name("a")
            .reply(|_| Reply::full(500, &[], "boom")),
    );
    let b = MockUpstream::start(MockConfig::h1().name("b"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .start();
    let r = post(&proxy, "{}").await;
    assert_eq!((r.status, r.text().as_str()), (500, "boom"));
    assert_eq!((a.request_count(), b.request_count()), (1, 0));
}

#[tokio::test]
async fn a_stream_that_breaks_after_two_events_is_not_retried() {
    let a = MockUpstream::start(MockConfig::h1().name("a").reply(|_| Reply::ResetMidBody {
        first: "data: {\"n\":1}\n\ndata: {\"n\":2}\n\n".into(),
    }));
    let b = MockUpstream::start(MockConfig::h1().name("b"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .start();
    let r = post(&proxy, r#"{"stream":true}"#).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("\"n\":2"), "{}", r.text());
    assert!(!r.complete, "the client sees the break");
    assert_eq!((a.request_count(), b.request_count()), (1, 0));
}

#[tokio::test]
async fn every_endpoint_skipped_gives_503_with_the_shortest_wait() {
    let skip = |secs: &'static str| {
        move |_: &RecordedRequest| Reply::full(429, &[("retry-after", secs)], "")
    };
    let a = MockUpstream::start(MockConfig::h1().name("a").reply(skip("7")));
    let b = MockUpstream::start(MockConfig::h1().name("b").reply(skip("4")));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .start();
    let r = post(&proxy, "{}").await;
    assert_eq!(r.status, 429, "the last endpoint's answer passes through");
    assert_eq!((a.request_count(), b.request_count()), (1, 1));
    let r = post(&proxy, "{}").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "upstream_unavailable");
    let wait: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((3..=4).contains(&wait), "the shortest wait, b's: {wait}");
    assert_eq!((a.request_count(), b.request_count()), (1, 1));
}

#[tokio::test]
async fn a_connect_failure_moves_on_and_dead_endpoints_open_their_circuits() {
    let dead = DeadUpstream::new();
    let b = MockUpstream::start(MockConfig::h1().name("b"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&dead.base_url(""), 1), (&b.base_url(""), 1)]))
        .upstream("circuit_breaker", "{failures: 2, open_ms: 3000}")
        .admin()
        .start();
    for _ in 0..4 {
        assert_eq!(post(&proxy, "{}").await.status, 200);
    }
    assert_eq!(b.request_count(), 4);
    let a = endpoint_view(&proxy, "a").await;
    assert_eq!(a["state"], "open", "{a}");
    assert_eq!(
        a["failures"], 2,
        "open after two failures, then left alone: {a}"
    );
    b.kill();
    // b is refused twice within the request's retries, which opens its circuit too.
    let r = post(&proxy, "{}").await;
    assert_eq!(r.status, 503, "both circuits open: {}", r.text());
    assert_eq!(endpoint_view(&proxy, "b").await["state"], "open");
    let wait: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=3).contains(&wait), "{wait}");
}

#[tokio::test]
async fn a_graceful_stop_under_load_fails_nothing_and_leaves_rotation() {
    let a = MockUpstream::start(
        MockConfig::h1()
            .name("a")
            .reply(|_| Reply::After(ms(20), Box::new(Reply::json(r#"{"from":"a"}"#)))),
    );
    let b = MockUpstream::start(
        MockConfig::h1()
            .name("b")
            .reply(|_| Reply::After(ms(20), Box::new(Reply::json(r#"{"from":"b"}"#)))),
    );
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .start();
    let addr = proxy.addr;
    let mut clients = Vec::new();
    for c in 0..6 {
        clients.push(tokio::spawn(async move {
            let mut client = H1Client::connect(addr).await;
            let mut statuses = Vec::new();
            for i in 0..15 {
                let body = format!(r#"{{"c":{c},"i":{i}}}"#);
                let r = client
                    .request(
                        "POST",
                        "/chat/completions",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    )
                    .await;
                if r.closes() {
                    client = H1Client::connect(addr).await;
                }
                statuses.push(r.status);
            }
            statuses
        }));
    }
    assert!(a.wait_for_requests(10, Duration::from_secs(5)).await);
    a.stop();
    let served_by_a = a.request_count();
    let mut failed = 0;
    for c in clients {
        failed += c
            .await
            .expect("client")
            .iter()
            .filter(|s| **s != 200)
            .count();
    }
    // A POST that Pingora sends on a pooled connection just as the stopping endpoint closes it
    // idle fails (as it would through nginx: it is not replayed, since it may have been read);
    // about one run in six hits that race on this machine. Each of the (at most six) pooled
    // connections to `a` can lose one request that way; nothing else may fail.
    assert!(failed <= 6, "{failed} requests failed while a drained");
    assert_eq!(
        a.request_count(),
        served_by_a,
        "no new request reaches a stopped endpoint"
    );
    let arrived = a.request_count() + b.request_count();
    assert!((90 - failed..=90).contains(&arrived), "{arrived} arrivals");
}

#[tokio::test]
async fn a_killed_endpoint_fails_only_its_requests_in_flight_and_replays_none() {
    let a = MockUpstream::start(MockConfig::h1().name("a").reply(|_| Reply::NeverRespond));
    let b = MockUpstream::start(MockConfig::h1().name("b"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .start();
    let addr = proxy.addr;
    let requests: Vec<_> = (0..6)
        .map(|i| {
            tokio::spawn(async move {
                (
                    i,
                    post_json(addr, "/chat/completions", &format!(r#"{{"id":{i}}}"#))
                        .await
                        .status,
                )
            })
        })
        .collect();
    assert!(a.wait_for_requests(3, Duration::from_secs(5)).await);
    assert!(b.wait_for_requests(3, Duration::from_secs(5)).await);
    a.kill();
    let mut failed = Vec::new();
    for r in requests {
        let (i, status) = r.await.expect("request");
        if status != 200 {
            assert_eq!(status, 502);
            failed.push(i);
        }
    }
    let ids = |m: &MockUpstream| -> Vec<i64> {
        m.requests()
            .iter()
            .map(|r| r.body_json()["id"].as_i64().expect("id"))
            .collect()
    };
    let (on_a, on_b) = (ids(&a), ids(&b));
    failed.sort();
    let mut on_a_sorted = on_a.clone();
    on_a_sorted.sort();
    assert_eq!(
        failed, on_a_sorted,
        "exactly the requests in flight on a fail"
    );
    assert!(
        on_a.iter().all(|i| !on_b.contains(i)),
        "none is replayed on b: {on_a:?} {on_b:?}"
    );
    for _ in 0..4 {
        assert_eq!(post(&proxy, "{}").await.status, 200, "new requests go to b");
    }
}

#[tokio::test]
async fn a_restarted_endpoint_comes_back_by_health_checks() {
    let dead = DeadUpstream::new();
    let b = MockUpstream::start(MockConfig::h1().name("b"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&dead.base_url("/v1"), 1), (&b.base_url("/v1"), 1)]))
        .upstream(
            "health_check",
            "{path: /models, interval_ms: 50, timeout_ms: 500, unhealthy_after: 1, healthy_after: 2}",
        )
        .admin()
        .start();
    wait_for_state(&proxy, "a", "down").await;
    for _ in 0..3 {
        assert_eq!(post(&proxy, "{}").await.status, 200);
    }
    // b answers the checks too (any answer below 500 is up).
    let checks = b
        .requests()
        .iter()
        .filter(|r| r.target_str() == "/v1/models")
        .count();
    assert!(checks >= 1);
    let a = dead.revive(MockConfig::h1().name("a"));
    wait_for_state(&proxy, "a", "up").await;
    assert!(a.requests().iter().any(|r| r.target_str() == "/v1/models"));
    for _ in 0..4 {
        assert_eq!(post(&proxy, "{}").await.status, 200);
    }
    let served = a
        .requests()
        .iter()
        .filter(|r| r.target_str() == "/v1/chat/completions")
        .count();
    assert!(served >= 1, "a is back in rotation");
}

#[tokio::test]
async fn warm_up_opens_the_connections_before_the_first_request() {
    let a = MockUpstream::start(
        MockConfig::h1()
            .name("a")
            .reply(|_| Reply::After(ms(30), Box::new(Reply::json(r#"{"ok":true}"#)))),
    );
    let proxy = proxy(&a.base_url("/v1"))
        .upstream("warmup", "{connections: 3, path: /models}")
        .admin()
        .start();
    let admin = proxy.admin_addr.expect("admin");
    let deadline = Instant::now() + Duration::from_secs(5);
    while h1(admin, "GET", "/healthz", &[], b"").await.status != 200 {
        assert!(Instant::now() < deadline, "healthz never became ready");
        tokio::time::sleep(ms(10)).await;
    }
    assert_eq!(
        a.connections(),
        3,
        "warm-up connections accepted before any client request"
    );
    let warm = a.requests();
    assert!(warm.iter().all(|r| r.target_str() == "/v1/models"));
    assert!(
        warm.iter().all(|r| r.header("x-arkgate-warmup").is_none()),
        "the pin header never leaves the proxy"
    );
    let addr = proxy.addr;
    let started = Instant::now();
    let first = post_json(addr, "/chat/completions", "{}").await;
    let warm_first = started.elapsed();
    assert_eq!(first.status, 200);
    // Three requests in flight together (each takes 30 ms upstream), started 5 ms apart: sent
    // in the same instant right after the first one ended, they dialled a fourth connection in
    // about one run in twenty (inside Pingora's pool; the cause was not pinned down).
    tokio::time::sleep(ms(5)).await;
    let mut concurrent = Vec::new();
    for _ in 0..3 {
        concurrent.push(tokio::spawn(async move {
            post_json(addr, "/chat/completions", "{}").await.status
        }));
        tokio::time::sleep(ms(5)).await;
    }
    for c in concurrent {
        assert_eq!(c.await.expect("request"), 200);
    }
    let conns: Vec<(usize, String)> = a
        .requests()
        .iter()
        .map(|r| (r.conn, r.target_str().to_string()))
        .collect();
    // Pingora's pool can lose one idle connection at the moment it is taken ("failed to
    // acquire reusable stream": its watcher saw the stream as gone) on a loaded machine, and the
    // request then dials a new one; the warm connections still carry the rest.
    let on_warm = conns
        .iter()
        .filter(|(conn, target)| *conn <= 3 && target == "/v1/chat/completions")
        .count();
    assert!(
        a.connections() <= 4 && on_warm >= 2,
        "client requests reuse the warm connections: {conns:?}"
    );

    // The same upstream without warm-up, for the first request's cost.
    let cold_mock = MockUpstream::start(
        MockConfig::h1()
            .name("cold")
            .reply(|_| Reply::After(ms(30), Box::new(Reply::json(r#"{"ok":true}"#)))),
    );
    let cold = common::proxy(&cold_mock.base_url("/v1")).start();
    let started = Instant::now();
    assert_eq!(
        post_json(cold.addr, "/chat/completions", "{}").await.status,
        200
    );
    let cold_first = started.elapsed();
    eprintln!(
        "first request (30 ms upstream, plain HTTP/1.1 on loopback): warm {:.2} ms, cold {:.2} ms",
        warm_first.as_secs_f64() * 1e3,
        cold_first.as_secs_f64() * 1e3
    );
}

#[tokio::test]
async fn a_forged_warm_up_header_is_stripped_and_ignored() {
    let a = MockUpstream::start(MockConfig::h1().name("a"));
    let b = MockUpstream::start(MockConfig::h1().name("b"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .start();
    for _ in 0..4 {
        let r = h1(
            proxy.addr,
            "POST",
            "/chat/completions",
            &[
                ("Content-Type", "application/json"),
                ("x-arkgate-warmup", "00.1.0"),
            ],
            b"{}",
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!((a.request_count(), b.request_count()), (2, 2), "not pinned");
    assert!(a
        .requests()
        .iter()
        .chain(b.requests().iter())
        .all(|r| r.header("x-arkgate-warmup").is_none()));
}

#[tokio::test]
async fn a_connection_older_than_max_lifetime_is_replaced() {
    let a = MockUpstream::start(MockConfig::h1().name("a"));
    let proxy = proxy(&a.base_url(""))
        .upstream("max_lifetime_ms", "1000")
        .start();
    let mut client = H1Client::connect(proxy.addr).await;
    assert_eq!(send(&mut client).await, 200);
    assert_eq!(send(&mut client).await, 200);
    let conns: Vec<usize> = a.requests().iter().map(|r| r.conn).collect();
    assert_eq!(conns, vec![1, 1], "reused within its lifetime");
    tokio::time::sleep(ms(1100)).await;
    assert_eq!(send(&mut client).await, 200);
    assert_eq!(
        a.last_request().conn,
        2,
        "a fresh connection once the old one is too old"
    );
}

/// A JSON POST on an open client connection; its status.
async fn send(client: &mut H1Client) -> u16 {
    client
        .request(
            "POST",
            "/chat/completions",
            &[("Content-Type", "application/json")],
            b"{}",
        )
        .await
        .status
}

#[tokio::test]
async fn a_429_over_http2_fails_over_for_an_h2c_client_with_the_body_intact() {
    let certs = TestCerts::generate();
    let a = MockUpstream::start(
        MockConfig::new(Proto::H2)
            .tls(&certs)
            .name("a")
            .reply(|_| Reply::full(429, &[("retry-after", "5")], "")),
    );
    let b = MockUpstream::start(
        MockConfig::new(Proto::H2)
            .tls(&certs)
            .name("b")
            .reply(|_| Reply::Echo),
    );
    let proxy = proxy("")
        .endpoints(&endpoints(&[(&a.base_url(""), 1), (&b.base_url(""), 1)]))
        .trust(&certs)
        .h2c()
        .start();
    let client = H2Client::connect(proxy.addr).await;
    let body = format!(r#"{{"p":"{}"}}"#, "y".repeat(20 * 1024));
    let r = client.post_json("/chat/completions", body.as_bytes()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body.as_bytes());
    assert_eq!(a.only_request().version, Version::H2);
    assert_eq!(b.only_request().body, body.as_bytes());
}

#[tokio::test]
async fn least_in_flight_sends_new_requests_away_from_a_busy_endpoint() {
    let certs = TestCerts::generate();
    let a = MockUpstream::start(MockConfig::h1().name("a").reply(|_| Reply::NeverRespond));
    let b = MockUpstream::start(MockConfig::new(Proto::Both).tls(&certs).name("b"));
    let c = MockUpstream::start(MockConfig::new(Proto::H2).tls(&certs).name("c"));
    let proxy = proxy("")
        .endpoints(&endpoints(&[
            (&a.base_url(""), 1),
            (&b.base_url(""), 1),
            (&c.base_url(""), 1),
        ]))
        .upstream("balance", "least_in_flight")
        .trust(&certs)
        .start();
    let addr = proxy.addr;
    // Requests until one sticks on a; it stays in flight there.
    let stuck = tokio::spawn(async move {
        loop {
            let r = post_json(addr, "/chat/completions", "{}").await;
            assert_eq!(r.status, 200, "only the one on a never returns");
        }
    });
    assert!(a.wait_for_requests(1, Duration::from_secs(5)).await);
    for _ in 0..6 {
        assert_eq!(post(&proxy, "{}").await.status, 200);
    }
    assert_eq!(a.request_count(), 1, "the busy endpoint gets nothing new");
    assert!(b.request_count() >= 3 && c.request_count() >= 3);
    stuck.abort();
}

#[tokio::test]
async fn warm_up_over_http2_opens_one_connection_per_address() {
    let certs = TestCerts::generate();
    let a = MockUpstream::start(MockConfig::new(Proto::H2).tls(&certs).name("a").reply(|r| {
        if r.target_str() == "/v1/models" {
            Reply::json("{}")
        } else {
            Reply::SlowHeaders(ms(200))
        }
    }));
    let proxy = proxy(&a.base_url("/v1"))
        .upstream("http_version", "h2")
        .upstream("warmup", "{connections: 4}")
        .trust(&certs)
        .admin()
        .start();
    let admin = proxy.admin_addr.expect("admin");
    let deadline = Instant::now() + Duration::from_secs(5);
    while h1(admin, "GET", "/healthz", &[], b"").await.status != 200 {
        assert!(Instant::now() < deadline, "healthz never became ready");
        tokio::time::sleep(ms(10)).await;
    }
    assert_eq!((a.connections(), a.request_count()), (1, 1));
    let addr = proxy.addr;
    let started = Instant::now();
    assert_eq!(h1(addr, "GET", "/models", &[], b"").await.status, 200);
    let warm_first = started.elapsed();
    // Each starts once the mock holds the one before (Pingora pops a connection while it opens a
    // stream on it, so a request in that very instant would dial another; once the stream's
    // headers reach the mock the connection is back in the pool); all four are in flight together.
    let mut concurrent = Vec::new();
    for i in 0..4 {
        concurrent.push(tokio::spawn(async move {
            post_json(addr, "/chat/completions", "{}").await.status
        }));
        assert!(a.wait_for_requests(3 + i, Duration::from_secs(5)).await);
    }
    assert_eq!(a.request_count(), 6, "all four are in flight at once");
    for c in concurrent {
        assert_eq!(c.await.expect("request"), 200);
    }
    assert_eq!(a.connections(), 1, "the streams share the warm connection");

    // The same kind of upstream without warm-up, for the first request's cost (TLS + h2 setup).
    let cold_mock = MockUpstream::start(MockConfig::new(Proto::H2).tls(&certs).name("cold"));
    let cold = common::proxy(&cold_mock.base_url("/v1"))
        .upstream("http_version", "h2")
        .trust(&certs)
        .start();
    let started = Instant::now();
    assert_eq!(h1(cold.addr, "GET", "/models", &[], b"").await.status, 200);
    let cold_first = started.elapsed();
    eprintln!(
        "first request (TLS HTTP/2 upstream on loopback): warm {:.2} ms, cold {:.2} ms",
        warm_first.as_secs_f64() * 1e3,
        cold_first.as_secs_f64() * 1e3
    );
}
