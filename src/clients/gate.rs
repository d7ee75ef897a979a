//! The client keys as the proxy uses them, built once at start: the key table, each key's
//! shared record (name, limits, the limiter's subject, today's counts for `/keys`), and the
//! upstream `Authorization` value that replaces the client's.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;

use super::{KeyTable, UpstreamKey};
use crate::ratelimit::{gcra, subject_for_key, Limiter, Limits};

/// One configured key, shared by every request that presents it. Holds no secret.
#[derive(Debug)]
pub struct KeyRecord {
    /// The configured name (the `key` label of metrics).
    pub name: String,
    /// Its limits (0 = unlimited in each).
    pub limits: Limits,
    /// The limiter's subject for it (`key:<name>`).
    pub subject: String,
    today: DayCounts,
}

/// Requests and tokens of one UTC day, reset when the day turns.
#[derive(Debug, Default)]
struct DayCounts {
    day: AtomicU64,
    requests: AtomicU64,
    tokens: AtomicU64,
}

/// Today's counts of a key on this instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Today {
    /// Requests admitted today (UTC).
    pub requests: u64,
    /// Tokens the upstream reported today.
    pub tokens: u64,
}

/// Today's UTC day number.
pub fn utc_day() -> u64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    gcra::day_index(secs)
}

impl KeyRecord {
    /// Moves today's counts on to `day` when it is a later one.
    fn roll(&self, day: u64) {
        let seen = self.today.day.load(Relaxed);
        if seen != day
            && self
                .today
                .day
                .compare_exchange(seen, day, Relaxed, Relaxed)
                .is_ok()
        {
            self.today.requests.store(0, Relaxed);
            self.today.tokens.store(0, Relaxed);
        }
    }

    /// Counts one request (admitted past the key check).
    pub fn count_request(&self) {
        self.roll(utc_day());
        self.today.requests.fetch_add(1, Relaxed);
    }

    /// Counts the tokens an answer used.
    pub fn count_tokens(&self, n: u64) {
        self.roll(utc_day());
        self.today.tokens.fetch_add(n, Relaxed);
    }

    /// Today's counts on this instance.
    pub fn today(&self) -> Today {
        self.roll(utc_day());
        Today {
            requests: self.today.requests.load(Relaxed),
            tokens: self.today.tokens.load(Relaxed),
        }
    }
}

/// The client keys, ready for requests.
pub struct ClientKeys {
    table: KeyTable,
    records: Vec<Arc<KeyRecord>>,
    upstream_authorization: HeaderValue,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKeys")
            .field("keys", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl ClientKeys {
    /// Builds the keys and the upstream `Authorization: Bearer <key>` value (marked sensitive,
    /// so HTTP/2 never indexes it). Fails only for a key with bytes a header cannot hold.
    pub fn new(table: KeyTable, upstream: &UpstreamKey) -> Result<ClientKeys, String> {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", upstream.secret))
            .map_err(|_| "clients.upstream_key_file: the key holds bytes a header cannot carry")?;
        value.set_sensitive(true);
        let records = table
            .keys()
            .iter()
            .map(|k| {
                Arc::new(KeyRecord {
                    name: k.name.clone(),
                    limits: k.limits,
                    subject: subject_for_key(&k.name),
                    today: DayCounts::default(),
                })
            })
            .collect();
        Ok(ClientKeys {
            table,
            records,
            upstream_authorization: value,
        })
    }

    /// The record of the key whose token is `bearer` (compared by hash in constant time).
    pub fn lookup(&self, bearer: &[u8]) -> Option<&Arc<KeyRecord>> {
        let key = self.table.lookup(bearer)?;
        let index = self.table.keys().iter().position(|k| k.name == key.name)?;
        self.records.get(index)
    }

    /// Every key's record, in config order.
    pub fn records(&self) -> &[Arc<KeyRecord>] {
        &self.records
    }

    /// `GET /keys`: per key, its name, limits, today's requests and tokens on this instance and
    /// the day's remaining budget as the limiter counts it (shared by every instance with the
    /// Redis store; `null` when unlimited or when the store cannot be asked). No secret.
    pub async fn status_json(&self, limiter: Option<&Limiter>) -> serde_json::Value {
        let mut keys = Vec::with_capacity(self.records.len());
        for r in &self.records {
            let today = r.today();
            let remaining = match (limiter, r.limits.daily_tokens) {
                (Some(l), budget) if budget > 0 => l
                    .daily_used(&r.subject)
                    .await
                    .ok()
                    .map(|used| budget.saturating_sub(used)),
                _ => None,
            };
            keys.push(serde_json::json!({
                "name": r.name,
                "rpm": r.limits.rpm,
                "tpm": r.limits.tpm,
                "daily_tokens": r.limits.daily_tokens,
                "requests_today": today.requests,
                "tokens_today": today.tokens,
                "remaining_daily_tokens": remaining,
            }));
        }
        serde_json::json!({ "keys": keys })
    }

    /// The `Authorization` value sent upstream in place of the client's.
    pub fn upstream_authorization(&self) -> &HeaderValue {
        &self.upstream_authorization
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::{hash_key, KeyEntry};

    #[test]
    fn lookup_gives_the_record_and_counts_roll_by_day() {
        let table = KeyTable::new(vec![KeyEntry {
            name: "a".into(),
            key_sha256: hash_key("ak-1"),
            rpm: 3,
            tpm: 0,
            daily_tokens: 0,
        }])
        .expect("valid");
        let upstream = UpstreamKey {
            secret: "sk-up".into(),
            warning: None,
        };
        let keys = ClientKeys::new(table, &upstream).expect("valid");
        assert!(keys.upstream_authorization().is_sensitive());
        assert!(!format!("{keys:?}").contains("sk-up"));
        let a = keys.lookup(b"ak-1").expect("known");
        assert_eq!((a.name.as_str(), a.subject.as_str()), ("a", "key:a"));
        assert!(keys.lookup(b"ak-2").is_none());
        a.count_request();
        a.count_tokens(7);
        assert_eq!(
            a.today(),
            Today {
                requests: 1,
                tokens: 7
            }
        );
        a.roll(utc_day() + 1);
        assert_eq!(a.today.requests.load(Relaxed), 0);
    }
}
