//! In-flight coalescing: identical requests that miss the cache at once reach the upstream once.
//!
//! The first caller for a key becomes the leader and holds a [`Leader`] guard; callers that
//! arrive while it is in flight become followers and wait (at most the configured time) for
//! the leader's result. The leader either completes with a value, which every follower gets,
//! or goes away without one (the upstream failed, the answer was not storable, its client
//! left): then the followers are released at once to go upstream themselves. A failure is
//! never handed to followers, and nothing waits unbounded.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// A flight's state as followers see it.
#[derive(Clone)]
enum Flight<V> {
    Pending,
    Done(V),
}

/// One flight in the map: its id (so a leader removes only its own) and the followers' end.
type FlightEntry<V> = (u64, watch::Receiver<Flight<V>>);

/// The flights in progress, by key.
pub struct Coalescer<K, V> {
    flights: Mutex<HashMap<K, FlightEntry<V>>>,
    next_id: AtomicU64,
    wait: Duration,
}

/// The caller's part in a flight.
pub enum Role<K: Eq + Hash + Clone, V: Clone> {
    /// First for this key: go upstream, then [`Leader::complete`] (or drop to release).
    Leader(Leader<K, V>),
    /// Another caller is in flight for this key: [`Follower::wait`] for its result.
    Follower(Follower<V>),
}

/// The guard of the one caller that goes upstream for a key. Dropping it without
/// [`Leader::complete`] releases the followers.
pub struct Leader<K: Eq + Hash + Clone, V: Clone> {
    owner: Arc<Coalescer<K, V>>,
    key: K,
    id: u64,
    tx: watch::Sender<Flight<V>>,
}

/// A caller waiting on a leader.
pub struct Follower<V> {
    rx: watch::Receiver<Flight<V>>,
    wait: Duration,
}

impl<K: Eq + Hash + Clone, V: Clone> Coalescer<K, V> {
    /// A coalescer whose followers wait at most `wait` for a leader.
    pub fn new(wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            flights: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            wait,
        })
    }

    /// Joins the flight for `key`, starting it if there is none.
    pub fn join(self: &Arc<Self>, key: K) -> Role<K, V> {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, rx)) = flights.get(&key) {
            return Role::Follower(Follower {
                rx: rx.clone(),
                wait: self.wait,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(Flight::Pending);
        flights.insert(key.clone(), (id, rx));
        Role::Leader(Leader {
            owner: Arc::clone(self),
            key,
            id,
            tx,
        })
    }

    /// Flights in progress.
    pub fn in_flight(&self) -> usize {
        self.flights.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Leader<K, V> {
    /// The key this leader fetches.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Hands `value` to every follower, current and arriving until the flight is removed.
    pub fn complete(self, value: V) {
        // Followers that joined already hold a receiver; `send_replace` works without any.
        self.tx.send_replace(Flight::Done(value));
        // Drop removes the flight from the map.
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Drop for Leader<K, V> {
    fn drop(&mut self) {
        let mut flights = self.owner.flights.lock().unwrap_or_else(|p| p.into_inner());
        // Remove only our own flight (the key may already belong to a newer one).
        if flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            flights.remove(&self.key);
        }
        // Dropping `tx` wakes followers still pending: they see the sender gone.
    }
}

impl<V: Clone> Follower<V> {
    /// The leader's value, or `None` when the leader went away without one or did not finish
    /// within the wait: the caller then goes upstream itself.
    pub async fn wait(mut self) -> Option<V> {
        let outcome = tokio::time::timeout(
            self.wait,
            self.rx.wait_for(|f| matches!(f, Flight::Done(_))),
        )
        .await;
        match outcome {
            Ok(Ok(flight)) => match &*flight {
                Flight::Done(v) => Some(v.clone()),
                Flight::Pending => None,
            },
            // Sender dropped without a value, or the wait ran out.
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_identical_callers_make_one_leader_and_fifty_answers() {
        let c: Arc<Coalescer<&'static str, u64>> = Coalescer::new(Duration::from_secs(5));
        let upstream_calls = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let c = Arc::clone(&c);
            let calls = Arc::clone(&upstream_calls);
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                match c.join("k") {
                    Role::Leader(leader) => {
                        calls.fetch_add(1, Ordering::SeqCst);
                        // Slow enough that every other task joins while in flight.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        leader.complete(42);
                        Some(42)
                    }
                    Role::Follower(f) => f.wait().await,
                }
            }));
        }
        let mut answers = 0;
        for t in tasks {
            assert_eq!(t.await.expect("task"), Some(42));
            answers += 1;
        }
        assert_eq!(answers, 50);
        assert_eq!(upstream_calls.load(Ordering::SeqCst), 1);
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_followers_at_once() {
        let c: Arc<Coalescer<u32, String>> = Coalescer::new(Duration::from_secs(30));
        let Role::Leader(leader) = c.join(1) else {
            panic!("first caller leads")
        };
        let followers: Vec<_> = (0..10)
            .map(|_| match c.join(1) {
                Role::Follower(f) => tokio::spawn(f.wait()),
                Role::Leader(_) => panic!("second caller must follow"),
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = std::time::Instant::now();
        drop(leader);
        for f in followers {
            assert_eq!(f.await.expect("task"), None);
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "released, not timed out"
        );
        assert!(
            matches!(c.join(1), Role::Leader(_)),
            "the key is free again"
        );
    }

    #[tokio::test]
    async fn followers_give_up_after_the_wait() {
        let c: Arc<Coalescer<u32, u32>> = Coalescer::new(Duration::from_millis(50));
        let Role::Leader(_leader) = c.join(7) else {
            panic!("first caller leads")
        };
        let Role::Follower(f) = c.join(7) else {
            panic!("second caller follows")
        };
        let start = std::time::Instant::now();
        assert_eq!(f.wait().await, None);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(50) && took < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn different_keys_fly_separately_and_late_joiners_see_the_value() {
        let c: Arc<Coalescer<u32, u32>> = Coalescer::new(Duration::from_secs(1));
        let Role::Leader(a) = c.join(1) else {
            panic!("leads 1")
        };
        let Role::Leader(b) = c.join(2) else {
            panic!("leads 2")
        };
        let Role::Follower(f) = c.join(1) else {
            panic!("follows 1")
        };
        a.complete(10);
        assert_eq!(f.wait().await, Some(10));
        drop(b);
        assert_eq!(c.in_flight(), 0);
    }
}
