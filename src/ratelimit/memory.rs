//! The limiter's state in this process: one [`State`] per caller in sharded, mutex-guarded maps,
//! run through the pure rules of [`gcra`](super::gcra).
//!
//! Memory stays bounded by the active callers: an entry equal to a fresh one (both buckets full,
//! nothing counted today) carries no information, so it is removed when a check leaves it so,
//! and each shard sweeps such entries at most once a second.
//!
//! Clock: a monotonic one, anchored to the Unix time at the store's creation, so a wall-clock
//! step never makes every caller wait (or lets them all through); the UTC day is read from that
//! clock too, and so follows the wall clock's slow adjustments only as far as they were made
//! before start.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::gcra::{self, State};
use super::{Admission, Limits, Reservation};

/// Shards: enough that 2–16 worker threads rarely wait on one another.
const SHARDS: usize = 16;
/// At most one sweep of a shard per this interval.
const SWEEP_INTERVAL_US: u64 = 1_000_000;

/// The in-process store.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    epoch: Instant,
    epoch_unix_us: u64,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<String, State>,
    next_sweep_us: u64,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        let epoch_unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
            epoch_unix_us,
        }
    }

    /// The store's clock: µs since the Unix epoch.
    pub fn now_us(&self) -> u64 {
        let elapsed = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.epoch_unix_us.saturating_add(elapsed)
    }

    /// Admits one request of `who` now (see [`gcra::admit`]).
    pub fn admit(&self, who: &str, limits: &Limits, estimate: u64) -> Admission {
        self.admit_at(who, limits, estimate, self.now_us())
    }

    /// Admits one request of `who` at `now_us` (µs since the Unix epoch; tests drive it).
    pub fn admit_at(&self, who: &str, limits: &Limits, estimate: u64, now_us: u64) -> Admission {
        let mut shard = self.shard(who, now_us);
        let state = shard.entries.get(who).copied().unwrap_or_default();
        let (admission, next) = gcra::admit(&state, now_us, limits, estimate);
        if admission.allowed {
            store(&mut shard.entries, who, next, now_us);
        }
        admission
    }

    /// Settles an admitted request of `who` now (see [`gcra::settle_state`]).
    pub fn settle(&self, who: &str, limits: &Limits, reservation: &Reservation, actual: u64) {
        self.settle_at(who, limits, reservation, actual, self.now_us());
    }

    /// Settles an admitted request of `who` at `now_us`.
    pub fn settle_at(
        &self,
        who: &str,
        limits: &Limits,
        reservation: &Reservation,
        actual: u64,
        now_us: u64,
    ) {
        let mut shard = self.shard(who, now_us);
        let state = shard.entries.get(who).copied().unwrap_or_default();
        let next = gcra::settle_state(&state, now_us, limits, reservation, actual);
        if next != state {
            store(&mut shard.entries, who, next, now_us);
        }
    }

    /// Tokens `who` used (and holds reserved) today, UTC.
    pub fn daily_used(&self, who: &str) -> u64 {
        let now_us = self.now_us();
        let shard = self.shard(who, now_us);
        let day = gcra::day_index(now_us / 1_000_000);
        shard.entries.get(who).map_or(0, |s| s.daily.used_on(day))
    }

    /// Entries held (callers not idle at their last check or sweep).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).entries.len()).sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every idle entry at `now_us` from every shard.
    pub fn sweep_at(&self, now_us: u64) {
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.entries.retain(|_, s| !s.is_idle(now_us));
            shard.next_sweep_us = now_us.saturating_add(SWEEP_INTERVAL_US);
        }
    }

    /// The shard of `who`, locked, swept first when its sweep is due.
    fn shard(&self, who: &str, now_us: u64) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(who) % SHARDS as u64) as usize;
        let mut shard = lock(&self.shards[index]);
        if now_us >= shard.next_sweep_us {
            shard.entries.retain(|_, s| !s.is_idle(now_us));
            shard.next_sweep_us = now_us.saturating_add(SWEEP_INTERVAL_US);
        }
        shard
    }
}

/// Keeps `next` for `who`, or forgets `who` when `next` is idle.
fn store(entries: &mut HashMap<String, State>, who: &str, next: State, now_us: u64) {
    if next.is_idle(now_us) {
        entries.remove(who);
    } else if let Some(slot) = entries.get_mut(who) {
        *slot = next;
    } else {
        entries.insert(who.to_owned(), next);
    }
}

/// A poisoned shard holds plain numbers that are valid whatever a panicking holder did.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::gcra::WINDOW_US;
    use crate::ratelimit::Refused;

    const T0: u64 = 1_750_000_000 * 1_000_000;

    fn rpm(n: u64) -> Limits {
        Limits {
            rpm: n,
            ..Limits::default()
        }
    }

    #[test]
    fn callers_have_separate_buckets() {
        let store = MemoryStore::new();
        for _ in 0..3 {
            assert!(store.admit_at("a", &rpm(3), 0, T0).allowed);
        }
        assert_eq!(
            store.admit_at("a", &rpm(3), 0, T0).refused,
            Some(Refused::Rpm)
        );
        assert!(store.admit_at("b", &rpm(3), 0, T0).allowed);
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn idle_entries_are_dropped_once_their_bucket_is_full() {
        let store = MemoryStore::new();
        for i in 0..1000 {
            assert!(store.admit_at(&format!("ip:{i}"), &rpm(60), 0, T0).allowed);
        }
        assert_eq!(store.len(), 1000);
        // One request of a 60 rpm bucket refills in 1 s; a sweep at +2 s finds them all idle.
        store.sweep_at(T0 + 2 * 1_000_000);
        assert!(store.is_empty());
    }

    #[test]
    fn a_shard_sweeps_itself_when_touched_after_its_interval() {
        let store = MemoryStore::new();
        for i in 0..1000 {
            store.admit_at(&format!("ip:{i}"), &rpm(60), 0, T0);
        }
        // One new caller per shard, a minute later: each shard sweeps before taking it.
        let mut seen = [false; SHARDS];
        let mut added = 0;
        for i in 0.. {
            let who = format!("late:{i}");
            let index = (store.hasher.hash_one(&who) % SHARDS as u64) as usize;
            if !seen[index] {
                seen[index] = true;
                store.admit_at(&who, &rpm(60), 0, T0 + WINDOW_US);
                added += 1;
            }
            if added == SHARDS {
                break;
            }
        }
        assert_eq!(store.len(), SHARDS);
    }

    #[test]
    fn daily_counts_keep_an_entry_until_the_day_turns() {
        let store = MemoryStore::new();
        let limits = Limits {
            daily_tokens: 1000,
            ..Limits::default()
        };
        let a = store.admit_at("k", &limits, 100, T0);
        store.sweep_at(T0 + 3600 * 1_000_000);
        assert_eq!(store.len(), 1);
        store.sweep_at(T0 + gcra::until_next_day_us(T0));
        assert!(store.is_empty());
        // Settling a reservation of a day that is over changes nothing.
        store.settle_at("k", &limits, &a.reservation, 900, T0 + 86_400 * 1_000_000);
        assert!(store.is_empty());
    }

    #[test]
    fn settlement_refunds_an_overestimate() {
        let store = MemoryStore::new();
        let limits = Limits {
            tpm: 1000,
            ..Limits::default()
        };
        let a = store.admit_at("k", &limits, 800, T0);
        assert_eq!(a.tokens.remaining, 200);
        store.settle_at("k", &limits, &a.reservation, 100, T0);
        let b = store.admit_at("k", &limits, 0, T0);
        assert_eq!(b.tokens.remaining, 900);
    }

    #[test]
    fn the_clock_is_unix_time_and_moves_forward() {
        let store = MemoryStore::new();
        let a = store.now_us();
        let b = store.now_us();
        assert!(b >= a);
        assert!(a > T0 / 2, "µs since the epoch");
    }
}
