//! The circuit breaker of one endpoint (passive health): a pure state machine over explicit
//! instants, so tests drive it without sleeping.
//!
//! Closed: requests flow; `failures` consecutive failures open the circuit. Open: no request
//! for `open` ms. Then half-open: one request (the probe) is let through; its success closes the
//! circuit, its failure opens it again. A probe that never reports back (its client went away)
//! is replaced by a new one after another `open` period, so the circuit cannot stick half-open.

use std::time::{Duration, Instant};

/// What the breaker says about an endpoint (as shown by the admin view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed {
        consecutive: u32,
    },
    Open {
        until: Instant,
    },
    /// `probe`: when the probe request was let through, if one is out.
    HalfOpen {
        probe: Option<Instant>,
    },
}

/// One endpoint's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    failures: u32,
    open: Duration,
    inner: Inner,
}

impl Breaker {
    /// A closed breaker that opens after `failures` consecutive failures, for `open`.
    pub fn new(failures: u32, open: Duration) -> Breaker {
        Breaker {
            failures: failures.max(1),
            open,
            inner: Inner::Closed { consecutive: 0 },
        }
    }

    /// The state at `now` (an open circuit whose time is up reads half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// When an open circuit lets its probe through; None unless open at `now`.
    pub fn open_until(&self, now: Instant) -> Option<Instant> {
        match self.inner {
            Inner::Open { until } if now < until => Some(until),
            _ => None,
        }
    }

    /// Whether a request could be let through at `now` (without taking the probe).
    pub fn available(&self, now: Instant) -> bool {
        match self.inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } => now >= until,
            Inner::HalfOpen { probe: None } => true,
            Inner::HalfOpen { probe: Some(at) } => now >= at + self.open,
        }
    }

    /// Lets a request through at `now` if allowed; when half-open, it becomes the probe.
    pub fn acquire(&mut self, now: Instant) -> bool {
        if !self.available(now) {
            return false;
        }
        if !matches!(self.inner, Inner::Closed { .. }) {
            self.inner = Inner::HalfOpen { probe: Some(now) };
        }
        true
    }

    /// A request succeeded: the circuit closes (or stays closed) and the count restarts.
    pub fn success(&mut self) {
        self.inner = Inner::Closed { consecutive: 0 };
    }

    /// A request failed at `now`. Returns true when this failure opened the circuit.
    pub fn failure(&mut self, now: Instant) -> bool {
        match self.inner {
            Inner::Closed { consecutive } => {
                let consecutive = consecutive + 1;
                if consecutive >= self.failures {
                    self.inner = Inner::Open {
                        until: now + self.open,
                    };
                    true
                } else {
                    self.inner = Inner::Closed { consecutive };
                    false
                }
            }
            Inner::HalfOpen { .. } => {
                self.inner = Inner::Open {
                    until: now + self.open,
                };
                true
            }
            // A late report from a request let through before the circuit opened.
            Inner::Open { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OPEN: Duration = Duration::from_secs(30);

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t = Instant::now();
        let mut b = Breaker::new(3, OPEN);
        assert!(!b.failure(t));
        assert!(!b.failure(t));
        b.success();
        assert!(!b.failure(t));
        assert!(!b.failure(t));
        assert_eq!(b.state(t), BreakerState::Closed);
        assert!(b.failure(t));
        assert_eq!(b.state(t), BreakerState::Open);
        assert!(!b.available(t + OPEN / 2));
        assert_eq!(b.open_until(t), Some(t + OPEN));
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_success_closes() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.failure(t);
        let later = t + OPEN;
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.acquire(later), "the probe");
        assert!(!b.acquire(later), "only one probe at a time");
        b.success();
        assert_eq!(b.state(later), BreakerState::Closed);
        assert!(b.acquire(later) && b.acquire(later));
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let t = Instant::now();
        let mut b = Breaker::new(2, OPEN);
        b.failure(t);
        b.failure(t);
        let later = t + OPEN;
        assert!(b.acquire(later));
        assert!(b.failure(later));
        assert_eq!(b.state(later), BreakerState::Open);
        assert!(b.available(later + OPEN));
    }

    #[test]
    fn a_lost_probe_is_replaced_after_another_period() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.failure(t);
        assert!(b.acquire(t + OPEN));
        assert!(!b.acquire(t + OPEN + OPEN / 2));
        assert!(b.acquire(t + OPEN * 2));
    }

    proptest! {
        /// Whatever the history, a closed breaker lets requests through and an open one does
        /// not; a success always closes it.
        #[test]
        fn state_and_availability_agree(events in proptest::collection::vec(0u8..3, 0..60)) {
            let t0 = Instant::now();
            let mut b = Breaker::new(3, Duration::from_millis(100));
            for (i, e) in events.iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64 * 40);
                match e {
                    0 => { b.failure(now); }
                    1 => { b.success(); prop_assert_eq!(b.state(now), BreakerState::Closed); }
                    _ => { b.acquire(now); }
                }
                match b.state(now) {
                    BreakerState::Closed => prop_assert!(b.available(now)),
                    BreakerState::Open => prop_assert!(!b.available(now)),
                    BreakerState::HalfOpen => {}
                }
            }
        }
    }
}
