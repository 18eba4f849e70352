//! GCRA, the generic cell rate algorithm (governor's algorithm), as pure
//! arithmetic shared by the memory store and the Redis script (`gcra.lua`
//! repeats these few lines in Lua).
//!
//! A limit `rate = n/per` with `burst = b` has an emission interval
//! `T = per / n` and a capacity of `b·T`. Each client keeps one number, its
//! theoretical arrival time `tat`. A request at `now` is allowed when
//! `max(tat, now) + T - now <= b·T`, and then `tat` becomes `max(tat, now) + T`.
//! Otherwise it is refused, and would pass at `max(tat, now) + T - b·T`.
//! When `tat <= now` the bucket is full again: the state can be dropped,
//! which is what lets every store expire its state by itself.
//!
//! A stored `tat` is capped at `now + b·T`, the most a bucket can ever be
//! owed: a `tat` beyond it (a Redis failover to a server whose clock is
//! behind, state written under another config) would otherwise refuse a
//! client for longer than its limit allows.
//!
//! Times are integer ticks (nanoseconds in memory, microseconds in Redis) so
//! both implementations compute the same results.

use std::time::Duration;

use crate::config::Limit;

/// One limit in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval `T`.
    pub interval: u64,
    /// Capacity `b·T`.
    pub capacity: u64,
    pub burst: u32,
}

/// The outcome of one limit for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; the new `tat` to store.
    Allow { tat: u64 },
    /// Refused; ticks until the request would pass.
    Deny { wait: u64 },
}

impl Gcra {
    /// The limit in ticks of `tick` (e.g. 1ns).
    pub fn new(limit: &Limit, tick: Duration) -> Self {
        let per = limit.rate.per.as_nanos() / tick.as_nanos().max(1);
        let interval = (per / u128::from(limit.rate.count.get())).max(1);
        let interval = u64::try_from(interval).unwrap_or(u64::MAX);
        Gcra {
            interval,
            capacity: interval.saturating_mul(u64::from(limit.burst.get())),
            burst: limit.burst.get(),
        }
    }

    /// The stored `tat`, capped at `now + capacity`.
    pub fn cap(&self, tat: u64, now: u64) -> u64 {
        tat.min(now.saturating_add(self.capacity))
    }

    /// Decides one request at `now` against the stored `tat` (0 when none).
    pub fn check(&self, tat: u64, now: u64) -> Verdict {
        let new_tat = self.cap(tat, now).max(now).saturating_add(self.interval);
        let used = new_tat - now;
        if used <= self.capacity {
            Verdict::Allow { tat: new_tat }
        } else {
            Verdict::Deny { wait: used - self.capacity }
        }
    }

    /// Requests left right now with this `tat`.
    pub fn remaining(&self, tat: u64, now: u64) -> u32 {
        let used = self.cap(tat, now).saturating_sub(now);
        let free = self.capacity.saturating_sub(used) / self.interval;
        u32::try_from(free).unwrap_or(u32::MAX).min(self.burst)
    }

    /// Ticks until the bucket is full again (and the state may be dropped).
    pub fn reset(&self, tat: u64, now: u64) -> u64 {
        self.cap(tat, now).saturating_sub(now)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::config::units::Rate;

    fn gcra(count: u32, per_s: u64, burst: u32) -> Gcra {
        let limit = Limit {
            rate: Rate { count: NonZeroU32::new(count).unwrap(), per: Duration::from_secs(per_s) },
            burst: NonZeroU32::new(burst).unwrap(),
        };
        Gcra::new(&limit, Duration::from_millis(1))
    }

    /// Runs `n` requests at `now`, returning how many passed and the final tat.
    fn burst(g: &Gcra, mut tat: u64, now: u64, n: u32) -> (u32, u64) {
        let mut passed = 0;
        for _ in 0..n {
            if let Verdict::Allow { tat: t } = g.check(tat, now) {
                tat = t;
                passed += 1;
            }
        }
        (passed, tat)
    }

    #[test]
    fn a_full_bucket_allows_exactly_the_burst() {
        let g = gcra(10, 1, 20); // 100ms interval, 20 deep
        let (passed, tat) = burst(&g, 0, 1_000_000, 50);
        assert_eq!(passed, 20);
        assert_eq!(g.remaining(tat, 1_000_000), 0);
        assert_eq!(g.reset(tat, 1_000_000), 2_000);
    }

    #[test]
    fn waiting_exactly_the_advertised_time_passes_and_earlier_does_not() {
        // governor's accurate_not_until, in levee's words.
        let g = gcra(10, 1, 5);
        let now = 10_000;
        let (_, tat) = burst(&g, 0, now, 5);
        let Verdict::Deny { wait } = g.check(tat, now) else { panic!("the 6th must be refused") };
        assert_eq!(wait, 100);
        assert!(matches!(g.check(tat, now + wait - 1), Verdict::Deny { .. }));
        assert!(matches!(g.check(tat, now + wait), Verdict::Allow { .. }));
    }

    #[test]
    fn the_rate_holds_over_time() {
        let g = gcra(10, 1, 1);
        let mut tat = 0;
        let mut passed = 0;
        // One attempt per millisecond for 10 seconds: 10/s means 100 (+1 at t=0).
        for now in 1..=10_000u64 {
            if let Verdict::Allow { tat: t } = g.check(tat, now) {
                tat = t;
                passed += 1;
            }
        }
        assert!((100..=101).contains(&passed), "{passed}");
    }

    #[test]
    fn a_tat_beyond_the_capacity_is_capped() {
        let g = gcra(10, 1, 5); // 100ms interval, capacity 500ms
        let now = 10_000;
        let far = now + 3_600_000; // an hour ahead: another clock, another config
        assert_eq!(g.reset(far, now), 500);
        assert_eq!(g.remaining(far, now), 0);
        let Verdict::Deny { wait } = g.check(far, now) else { panic!("a full bucket refuses") };
        assert_eq!(wait, 100, "refused for one interval, not an hour");
        // `decide` stores the cap, so the bucket drains from there.
        let mut tats = [far];
        assert!(!decide(&[g], &mut tats, now).allowed);
        assert_eq!(tats[0], now + 500, "the capped tat is stored, even on a refusal");
        assert!(decide(&[g], &mut tats, now + 100).allowed);
    }

    #[test]
    fn state_is_droppable_once_full_again() {
        let g = gcra(5000, 3600, 5000);
        let (_, tat) = burst(&g, 0, 1, 3);
        assert!(g.reset(tat, 1) > 0);
        assert_eq!(g.reset(tat, tat), 0);
        assert_eq!(g.remaining(tat, tat), 5000);
    }
}

/// The decision over all limits of a route, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Refused: ticks until the request would pass every limit.
    pub wait: u64,
    /// The limit that decided: the refusing one with the longest wait, or the
    /// allowing one with the fewest requests left. Its policy goes in the headers.
    pub tightest: usize,
    /// Requests left on the tightest limit.
    pub remaining: u32,
    /// Ticks until the tightest limit is full again.
    pub reset: u64,
}

/// Decides one request against every limit; a request must pass all of them,
/// and a refused request consumes nothing. `tats[i]` belongs to `limits[i]`.
/// Every `tat` is capped at `now + capacity` first (and stays capped, even on
/// a refusal: capping takes nothing, and a cap that is not stored would be
/// recomputed from each new `now` and never drain).
pub fn decide(limits: &[Gcra], tats: &mut [u64], now: u64) -> Outcome {
    for (g, tat) in limits.iter().zip(tats.iter_mut()) {
        *tat = g.cap(*tat, now);
    }
    let mut worst: Option<(usize, u64)> = None;
    for (i, (g, tat)) in limits.iter().zip(tats.iter()).enumerate() {
        if let Verdict::Deny { wait } = g.check(*tat, now) {
            if worst.is_none_or(|(_, w)| wait > w) {
                worst = Some((i, wait));
            }
        }
    }
    if let Some((i, wait)) = worst {
        return Outcome {
            allowed: false,
            wait,
            tightest: i,
            remaining: 0,
            reset: limits[i].reset(tats[i], now),
        };
    }
    let mut tightest = (0, u32::MAX, 0);
    for (i, (g, tat)) in limits.iter().zip(tats.iter_mut()).enumerate() {
        if let Verdict::Allow { tat: new } = g.check(*tat, now) {
            *tat = new;
        }
        let remaining = g.remaining(*tat, now);
        if remaining < tightest.1 {
            tightest = (i, remaining, g.reset(*tat, now));
        }
    }
    Outcome { allowed: true, wait: 0, tightest: tightest.0, remaining: tightest.1, reset: tightest.2 }
}

#[cfg(test)]
mod decide_tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::config::units::Rate;

    fn g(count: u32, per_s: u64, burst: u32) -> Gcra {
        Gcra::new(
            &Limit {
                rate: Rate { count: NonZeroU32::new(count).unwrap(), per: Duration::from_secs(per_s) },
                burst: NonZeroU32::new(burst).unwrap(),
            },
            Duration::from_millis(1),
        )
    }

    #[test]
    fn every_limit_must_pass_and_a_refusal_consumes_nothing() {
        let limits = [g(10, 1, 20), g(3, 60, 3)];
        let mut tats = [0, 0];
        for _ in 0..3 {
            assert!(decide(&limits, &mut tats, 1000).allowed);
        }
        let before = tats;
        let out = decide(&limits, &mut tats, 1000);
        assert!(!out.allowed);
        assert_eq!(out.tightest, 1);
        assert_eq!(out.wait, 20_000);
        assert_eq!(tats, before, "a refused request must not consume");
    }

    #[test]
    fn the_tightest_allowing_limit_is_reported() {
        let limits = [g(10, 1, 20), g(5, 60, 5)];
        let mut tats = [0, 0];
        let out = decide(&limits, &mut tats, 1000);
        assert_eq!((out.tightest, out.remaining), (1, 4));
    }
}
