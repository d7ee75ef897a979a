//! Which endpoint a request goes to: smooth weighted round-robin and least-in-flight, as pure
//! functions over the candidates' weights and loads (no Pingora types, no clock).

/// One endpoint as the selection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Share of the traffic (≥ 1).
    pub weight: u32,
    /// Requests in flight on it now.
    pub in_flight: usize,
    /// Whether it may take this request (healthy, circuit not open, not skipped, not tried).
    pub available: bool,
}

/// Smooth weighted round-robin (the sequence for weights 5, 1, 1 is a a b a c a a, not
/// a a a a a b c): each pick adds every available candidate's weight to its running score,
/// takes the highest score and subtracts the total weight from it. Over any window of
/// `sum(weights)` picks with the same available set, each candidate is picked exactly `weight`
/// times. Unavailable candidates neither gain nor lose score.
#[derive(Debug, Clone, Default)]
pub struct SmoothRoundRobin {
    scores: Vec<i64>,
}

impl SmoothRoundRobin {
    /// Picks among `candidates`; None when none is available.
    pub fn pick(&mut self, candidates: &[Candidate]) -> Option<usize> {
        if self.scores.len() != candidates.len() {
            self.scores = vec![0; candidates.len()];
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, c) in candidates.iter().enumerate() {
            if !c.available {
                continue;
            }
            let w = i64::from(c.weight.max(1));
            self.scores[i] += w;
            total += w;
            if best.is_none_or(|b| self.scores[i] > self.scores[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.scores[b] -= total;
        Some(b)
    }
}

/// The available candidate whose load, with this request added, is lowest relative to its
/// weight: `(in_flight + 1) / weight`, compared without division. Ties are shared in turn:
/// the `rotation`-th (mod their count) of the tied candidates wins, so equal endpoints take
/// equal shares. With every endpoint idle this favours the heaviest; under load it keeps
/// in-flight counts proportional to the weights.
pub fn least_in_flight(candidates: &[Candidate], rotation: usize) -> Option<usize> {
    // (a.in_flight+1)/a.weight vs (b.in_flight+1)/b.weight, cross-multiplied.
    let cmp = |a: &Candidate, b: &Candidate| {
        let lhs = (a.in_flight as u128 + 1) * u128::from(b.weight.max(1));
        let rhs = (b.in_flight as u128 + 1) * u128::from(a.weight.max(1));
        lhs.cmp(&rhs)
    };
    let best = candidates
        .iter()
        .filter(|c| c.available)
        .min_by(|a, b| cmp(a, b))?;
    let tied: Vec<usize> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.available && cmp(c, best).is_eq())
        .map(|(i, _)| i)
        .collect();
    tied.get(rotation % tied.len().max(1)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn up(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .map(|&weight| Candidate {
                weight,
                in_flight: 0,
                available: true,
            })
            .collect()
    }

    #[test]
    fn smooth_order_spreads_the_heavy_endpoint() {
        let mut rr = SmoothRoundRobin::default();
        let picks: Vec<usize> = (0..7)
            .map(|_| rr.pick(&up(&[5, 1, 1])).expect("pick"))
            .collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn unavailable_endpoints_are_never_picked() {
        let mut rr = SmoothRoundRobin::default();
        let mut c = up(&[1, 1, 1]);
        c[1].available = false;
        for _ in 0..10 {
            assert_ne!(rr.pick(&c), Some(1));
        }
        c.iter_mut().for_each(|c| c.available = false);
        assert_eq!(rr.pick(&c), None);
        assert_eq!(least_in_flight(&c, 0), None);
    }

    #[test]
    fn least_in_flight_follows_load_over_weight() {
        let mut c = up(&[1, 2]);
        c[0].in_flight = 1;
        c[1].in_flight = 2;
        // (1+1)/1 = 2 vs (2+1)/2 = 1.5
        assert_eq!(least_in_flight(&c, 0), Some(1));
        c[1].in_flight = 4;
        assert_eq!(least_in_flight(&c, 0), Some(0));
    }

    #[test]
    fn least_in_flight_ties_rotate() {
        let c = up(&[1, 1, 1]);
        let picks: Vec<_> = (0..3).map(|r| least_in_flight(&c, r)).collect();
        assert_eq!(picks, vec![Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn a_busy_endpoint_does_not_bias_the_tie_between_the_others() {
        let mut c = up(&[1, 1, 1]);
        c[0].in_flight = 1;
        let picks: Vec<_> = (0..4).map(|r| least_in_flight(&c, r)).collect();
        assert_eq!(picks, vec![Some(1), Some(2), Some(1), Some(2)]);
    }

    proptest! {
        /// Over one full cycle of `sum(weights)` picks, each endpoint gets exactly its weight.
        #[test]
        fn round_robin_cycle_matches_weights(weights in proptest::collection::vec(1u32..8, 1..6)) {
            let mut rr = SmoothRoundRobin::default();
            let c = up(&weights);
            let total: u32 = weights.iter().sum();
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..total {
                counts[rr.pick(&c).expect("pick")] += 1;
            }
            prop_assert_eq!(counts, weights);
        }

        /// Requests that stay in flight end up spread in proportion to the weights (within one
        /// request per endpoint).
        #[test]
        fn least_in_flight_keeps_loads_proportional(
            weights in proptest::collection::vec(1u32..5, 1..5),
            rounds in 1usize..6,
        ) {
            let mut c = up(&weights);
            let total: u32 = weights.iter().sum();
            for r in 0..(total as usize * rounds) {
                let i = least_in_flight(&c, r).expect("pick");
                c[i].in_flight += 1;
            }
            for (cand, w) in c.iter().zip(&weights) {
                let expected = *w as usize * rounds;
                prop_assert!(cand.in_flight.abs_diff(expected) <= 1, "{:?}", c);
            }
        }
    }
}
