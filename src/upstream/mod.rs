//! The upstream: its endpoints, which one a request goes to, and the services that keep them
//! fresh, all off the request path.
//!
//! - [`endpoint`]: one endpoint at run time: load, counters, breaker, `Retry-After` skip, health.
//! - [`peers`]: one endpoint's resolved addresses as ready-made `HttpPeer`s (max lifetime).
//! - [`select`]: smooth weighted round-robin and least-in-flight (pure).
//! - [`breaker`]: the circuit breaker state machine (pure).
//! - [`retry_after`]: `Retry-After` parsing (pure).
//! - [`dns`]: the background DNS refresher.
//! - [`health`]: the background active health checks.
//! - [`warmup`]: opening pooled connections at start, through the proxy itself.

pub mod breaker;
pub mod dns;
pub mod endpoint;
pub mod health;
pub mod peers;
pub mod retry_after;
pub mod select;
pub mod warmup;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::config::{Balance, Upstream};
pub use dns::DnsRefresher;
pub use endpoint::{AttemptClass, Endpoint, EndpointState, FailoverReason, InFlight};
pub use health::HealthChecker;
use select::{Candidate, SmoothRoundRobin};

/// The wait announced when no endpoint can take a request and none says for how long.
const UNKNOWN_WAIT: Duration = Duration::from_secs(1);

/// Where a request's next attempt goes.
pub enum Pick {
    Endpoint(Arc<Endpoint>),
    /// No endpoint can take it: the shortest remaining wait, in whole seconds (≥ 1).
    Unavailable {
        retry_after_s: u64,
    },
}

/// The endpoints of the upstream and the balancing between them.
pub struct Upstreams {
    cfg: Arc<Upstream>,
    endpoints: Vec<Arc<Endpoint>>,
    rr: Mutex<SmoothRoundRobin>,
    rotation: AtomicUsize,
    /// Turns for least-in-flight ties.
    ties: AtomicUsize,
    warmup_token: warmup::WarmupToken,
}

impl Upstreams {
    /// The endpoints of `cfg`, all up (health checks and the breaker take them out later).
    pub fn new(cfg: &Upstream) -> Arc<Upstreams> {
        let cfg = Arc::new(cfg.clone());
        let endpoints = (0..cfg.endpoints.len())
            .map(|i| Arc::new(Endpoint::new(i, &cfg)))
            .collect();
        Arc::new(Upstreams {
            cfg,
            endpoints,
            rr: Mutex::new(SmoothRoundRobin::default()),
            rotation: AtomicUsize::new(0),
            ties: AtomicUsize::new(0),
            warmup_token: warmup::WarmupToken::new(),
        })
    }

    /// The `upstream:` settings.
    pub fn config(&self) -> &Upstream {
        &self.cfg
    }

    /// The secret that pins warm-up requests ([`warmup`]).
    pub fn warmup_token(&self) -> &warmup::WarmupToken {
        &self.warmup_token
    }

    /// Every endpoint, in configuration order.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// A new request's start in the address rotation (round-robin across requests).
    pub fn rotation(&self) -> usize {
        self.rotation.fetch_add(1, Relaxed)
    }

    /// Whether a response with this status may be tried on another endpoint.
    pub fn fails_over(&self, status: u16) -> bool {
        self.endpoints.len() > 1 && self.cfg.failover_on.contains(&status)
    }

    /// How long an endpoint that answered a failover status with this `Retry-After` is skipped.
    pub fn skip_for(&self, retry_after: Option<&[u8]>) -> Duration {
        retry_after::skip_for(retry_after, SystemTime::now(), self.cfg.retry_after_max)
    }

    /// Picks the endpoint for an attempt at `now`, preferring those this request has not
    /// `tried` yet; a tried one is used again (its next address) only when no other can take
    /// the request.
    pub fn pick(&self, tried: &[usize], now: Instant) -> Pick {
        let mut candidates: Vec<Candidate> = Vec::with_capacity(self.endpoints.len());
        let mut soonest: Option<Instant> = None;
        for ep in &self.endpoints {
            let available = match ep.check(now) {
                Ok(()) => true,
                Err(u) => {
                    if let Some(until) = u.until {
                        soonest = Some(soonest.map_or(until, |s| s.min(until)));
                    }
                    false
                }
            };
            candidates.push(Candidate {
                weight: ep.cfg.weight,
                in_flight: ep.in_flight(),
                available,
            });
        }
        let fresh: Vec<Candidate> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| Candidate {
                available: c.available && !tried.contains(&i),
                ..*c
            })
            .collect();
        let mut set = if fresh.iter().any(|c| c.available) {
            fresh
        } else {
            candidates
        };
        while let Some(i) = self.choose(&set) {
            let ep = &self.endpoints[i];
            if ep.acquire(now) {
                return Pick::Endpoint(ep.clone());
            }
            // Its half-open probe was just taken by another request.
            set[i].available = false;
        }
        let wait = soonest.map_or(UNKNOWN_WAIT, |s| s.saturating_duration_since(now));
        Pick::Unavailable {
            retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
    }

    fn choose(&self, set: &[Candidate]) -> Option<usize> {
        match self.cfg.balance {
            Balance::RoundRobin => self.rr.lock().unwrap_or_else(|p| p.into_inner()).pick(set),
            Balance::LeastInFlight => select::least_in_flight(set, self.ties.fetch_add(1, Relaxed)),
        }
    }

    /// Whether an endpoint other than `except` could take a request at `now`.
    pub fn other_available(&self, except: usize, now: Instant) -> bool {
        self.endpoints
            .iter()
            .any(|ep| ep.index != except && ep.check(now).is_ok())
    }

    /// The endpoint at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(index)
    }

    /// The admin view: one object per endpoint (`name`, `base_url`, `state`, `in_flight`,
    /// `requests`, `failures`, and `skip_until` as an HTTP date while a skip is set).
    pub fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let wall = SystemTime::now();
        let list: Vec<serde_json::Value> = self
            .endpoints
            .iter()
            .map(|ep| {
                let mut v = json!({
                    "name": ep.name(),
                    "base_url": ep.cfg.base_url,
                    "weight": ep.cfg.weight,
                    "state": ep.state(now).as_str(),
                    "in_flight": ep.in_flight(),
                    "requests": ep.requests(),
                    "failures": ep.failures(),
                    "addresses": ep.peers.addresses().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                });
                v["attempts"] = AttemptClass::ALL
                    .iter()
                    .map(|c| (c.as_str().to_string(), json!(ep.attempts(*c))))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                v["failovers"] = FailoverReason::ALL
                    .iter()
                    .map(|r| (r.as_str().to_string(), json!(ep.failovers(*r))))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                if let Some(until) = ep.skip_until(now) {
                    let left = until - now;
                    v["skip_until"] = json!(httpdate::fmt_http_date(wall + left));
                    v["skip_remaining_ms"] = json!(left.as_millis() as u64);
                }
                v
            })
            .collect();
        json!({ "balance": match self.cfg.balance {
            Balance::RoundRobin => "round_robin",
            Balance::LeastInFlight => "least_in_flight",
        }, "endpoints": list })
    }
}

impl Upstreams {
    /// The endpoint metric families in the Prometheus text format:
    /// `arkgate_upstream_requests_total{endpoint,class}`, `arkgate_upstream_state{endpoint,state}`
    /// (1 for the current state) and `arkgate_failovers_total{endpoint,reason}`. Labels come
    /// from the configuration (endpoint names) and fixed sets, never from requests.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let now = Instant::now();
        out.push_str("# HELP arkgate_upstream_requests_total Attempts per endpoint by outcome.\n");
        out.push_str("# TYPE arkgate_upstream_requests_total counter\n");
        for ep in &self.endpoints {
            for c in AttemptClass::ALL {
                let _ = writeln!(
                    out,
                    "arkgate_upstream_requests_total{{endpoint=\"{}\",class=\"{}\"}} {}",
                    ep.name(),
                    c.as_str(),
                    ep.attempts(c)
                );
            }
        }
        out.push_str("# HELP arkgate_upstream_state Endpoint state (1 = current).\n");
        out.push_str("# TYPE arkgate_upstream_state gauge\n");
        for ep in &self.endpoints {
            let state = ep.state(now);
            for s in EndpointState::ALL {
                let _ = writeln!(
                    out,
                    "arkgate_upstream_state{{endpoint=\"{}\",state=\"{}\"}} {}",
                    ep.name(),
                    s.as_str(),
                    u8::from(s == state)
                );
            }
        }
        out.push_str("# HELP arkgate_failovers_total Failover statuses per endpoint: failed over (status_*) or passed through (reason).\n");
        out.push_str("# TYPE arkgate_failovers_total counter\n");
        for ep in &self.endpoints {
            for r in FailoverReason::ALL {
                let _ = writeln!(
                    out,
                    "arkgate_failovers_total{{endpoint=\"{}\",reason=\"{}\"}} {}",
                    ep.name(),
                    r.as_str(),
                    ep.failovers(r)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams(extra: &str) -> Arc<Upstreams> {
        let yaml = format!(
            "listen: [{{addr: \"127.0.0.1:1\"}}]\nupstream: {{endpoints: [\
             {{name: a, base_url: \"http://127.0.0.1:1\", weight: 2}}, \
             {{name: b, base_url: \"http://127.0.0.1:2\"}}]{extra}}}\n"
        );
        Upstreams::new(&crate::Config::from_yaml(&yaml).expect("config").upstream)
    }

    fn name(p: Pick) -> String {
        match p {
            Pick::Endpoint(e) => e.name().to_string(),
            Pick::Unavailable { retry_after_s } => format!("none {retry_after_s}"),
        }
    }

    #[test]
    fn picks_follow_the_weights() {
        let u = upstreams("");
        let now = Instant::now();
        let picks: Vec<String> = (0..6).map(|_| name(u.pick(&[], now))).collect();
        assert_eq!(picks.iter().filter(|n| *n == "a").count(), 4, "{picks:?}");
    }

    #[test]
    fn a_tried_endpoint_is_avoided_while_another_can_serve() {
        let u = upstreams("");
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(name(u.pick(&[0], now)), "b");
        }
        // Both tried: the request goes back to one of them (its next address).
        assert!(matches!(u.pick(&[0, 1], now), Pick::Endpoint(_)));
    }

    #[test]
    fn skipped_endpoints_are_left_out_and_the_shortest_wait_is_announced() {
        let u = upstreams("");
        let now = Instant::now();
        u.endpoints()[0].skip(now, Duration::from_secs(5));
        assert_eq!(name(u.pick(&[], now)), "b");
        assert!(!u.other_available(1, now));
        u.endpoints()[1].skip(now, Duration::from_millis(2500));
        assert_eq!(name(u.pick(&[], now)), "none 3");
        assert_eq!(name(u.pick(&[], now + Duration::from_secs(3))), "b");
    }

    #[test]
    fn an_open_circuit_takes_the_endpoint_out_until_its_probe() {
        let u = upstreams(", circuit_breaker: {failures: 2, open_ms: 1000}");
        let now = Instant::now();
        let a = &u.endpoints()[0];
        a.failure(now);
        assert_eq!(a.state(now), EndpointState::Up);
        assert!(a.failure(now));
        assert_eq!(a.state(now), EndpointState::Open);
        for _ in 0..3 {
            assert_eq!(name(u.pick(&[], now)), "b");
        }
        let later = now + Duration::from_secs(1);
        assert_eq!(a.state(later), EndpointState::HalfOpen);
        u.endpoints()[1].skip(later, Duration::from_secs(9));
        assert_eq!(name(u.pick(&[], later)), "a", "the probe");
        assert_eq!(name(u.pick(&[], later)), "none 9", "one probe at a time");
        a.success();
        assert_eq!(name(u.pick(&[], later)), "a");
    }

    #[test]
    fn a_single_endpoint_is_never_skipped_or_opened() {
        let u = Upstreams::new(
            &crate::Config::from_yaml(
                "listen: [{addr: \"127.0.0.1:1\"}]\nupstream: {base_url: \"http://127.0.0.1:1\"}",
            )
            .expect("config")
            .upstream,
        );
        let now = Instant::now();
        let ep = &u.endpoints()[0];
        for _ in 0..10 {
            ep.failure(now);
        }
        ep.skip(now, Duration::from_secs(5));
        assert!(!u.fails_over(429));
        assert_eq!(name(u.pick(&[0], now)), "default");
        assert!(ep.set_healthy(false));
        assert_eq!(
            name(u.pick(&[], now)),
            "none 1",
            "health checks still apply"
        );
    }

    #[test]
    fn status_json_lists_every_endpoint() {
        let u = upstreams("");
        let now = Instant::now();
        u.endpoints()[1].skip(now, Duration::from_secs(5));
        let _in_flight = u.endpoints()[0].begin();
        let v = u.status_json();
        let list = v["endpoints"].as_array().expect("list");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["name"], "a");
        assert_eq!(list[0]["state"], "up");
        assert_eq!(list[0]["in_flight"], 1);
        assert_eq!(list[0]["requests"], 1);
        assert!(list[0].get("skip_until").is_none());
        assert!(list[1]["skip_until"].is_string());
    }

    #[test]
    fn metrics_name_every_endpoint_state_and_reason() {
        let u = upstreams("");
        u.endpoints()[0].count_attempt(AttemptClass::Ok);
        u.endpoints()[1].count_failover(FailoverReason::Status429);
        let mut out = String::new();
        u.render_metrics(&mut out);
        assert!(
            out.contains("arkgate_upstream_requests_total{endpoint=\"a\",class=\"ok\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("arkgate_upstream_state{endpoint=\"b\",state=\"up\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("arkgate_upstream_state{endpoint=\"b\",state=\"open\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("arkgate_failovers_total{endpoint=\"b\",reason=\"status_429\"} 1\n"),
            "{out}"
        );
    }
}
