//! `/metrics` on the admin listener, read as a map from `name{labels}` to value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::client::h1;

/// The Prometheus text as a map from `name{labels}` to value (comments and blank lines skipped).
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// `GET /metrics` on `admin`, parsed.
pub async fn metrics(admin: SocketAddr) -> HashMap<String, f64> {
    let r = h1(admin, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200);
    parse_metrics(&r.text())
}

/// `/metrics` once `ready` holds (counters move in the `logging` hook, which runs after the
/// client already has the whole answer), or after 3 s.
pub async fn metrics_when(
    admin: SocketAddr,
    ready: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = metrics(admin).await;
        if ready(&m) || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
