//! Picking an endpoint: `p2c` (least in-flight of two random picks, as in
//! Finagle and Envoy's least-request) or `round_robin`.
//!
//! Power of two choices avoids both the herd effect of "least loaded of all"
//! and round robin's blindness to a slow endpoint, at the cost of two random
//! numbers and two atomic loads.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Balance;

/// Chooses among `n` endpoints whose in-flight counts `load(i)` reports, skipping
/// those for which `usable(i)` is false. Returns `None` only when `n == 0`; when
/// no endpoint is usable, balancing ignores `usable` (panic mode, as Envoy does).
pub fn pick(
    policy: Balance,
    n: usize,
    rr: &AtomicUsize,
    load: impl Fn(usize) -> usize,
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    if n <= 1 {
        return (n == 1).then_some(0);
    }
    let any_usable = (0..n).any(&usable);
    let ok = |i: usize| !any_usable || usable(i);
    match policy {
        Balance::RoundRobin => {
            let start = rr.fetch_add(1, Ordering::Relaxed);
            (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
        }
        Balance::P2c => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            match (ok(a), ok(b)) {
                (true, true) => Some(if load(b) < load(a) { b } else { a }),
                (true, false) => Some(a),
                (false, true) => Some(b),
                (false, false) => (0..n).filter(|&i| ok(i)).min_by_key(|&i| load(i)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_and_skips() {
        let rr = AtomicUsize::new(0);
        let picks: Vec<_> =
            (0..6).map(|_| pick(Balance::RoundRobin, 3, &rr, |_| 0, |_| true).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let picks: Vec<_> =
            (0..4).map(|_| pick(Balance::RoundRobin, 3, &rr, |_| 0, |i| i != 1).unwrap()).collect();
        assert!(!picks.contains(&1));
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let rr = AtomicUsize::new(0);
        // Endpoint 0 is busy: with two endpoints p2c always compares both.
        for _ in 0..100 {
            assert_eq!(pick(Balance::P2c, 2, &rr, |i| if i == 0 { 10 } else { 1 }, |_| true), Some(1));
        }
    }

    #[test]
    fn all_unusable_still_balances() {
        let rr = AtomicUsize::new(0);
        assert!(pick(Balance::P2c, 3, &rr, |_| 0, |_| false).is_some());
        assert_eq!(pick(Balance::P2c, 0, &rr, |_| 0, |_| true), None);
    }
}
