//! Callback bombs: a client whose request rate keeps multiplying.
//!
//! Each client's requests are counted per `interval` (intervals aligned on the
//! detector's clock). A completed interval *grew* when its count is at least
//! `min_rate` and at least `growth_factor` times the previous one, less a
//! tenth of that as counting noise (at least one request: a doubling rate
//! split across interval borders can count 22 after 12). `growth_intervals` growths in a row is a bomb. The
//! interval that completes the streak does not have to finish: the client is
//! quarantined on the request that makes it grow, so a client doubling from
//! 2/s is caught at 32 requests in its 32/s second, long before a static limit
//! set for honest bursts would trip.
//!
//! What is not a bomb: a steady rate, however high (no growth); a one-off jump
//! such as a reconnect burst (one growth, then none); a slow ramp below
//! `growth_factor`. Known false positive, by design: an honest client that
//! itself multiplies its rate `growth_intervals` times in a row above
//! `min_rate` (raise `growth_intervals` for routes that see such ramps).
//!
//! A quarantine lasts `quarantine`, doubled for each relapse "soon" after the
//! last release (within one `quarantine` plus twice the `growth_intervals + 1`
//! intervals a new streak takes: a bomb that restarts from its base rate must
//! first climb back above `min_rate`), at most 64×. Requests made during a
//! quarantine are still counted, so a client still multiplying when released
//! is caught again at once.

/// Per-client growth and quarantine state: 20 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Growth {
    /// Index of the interval `cur` counts.
    pub interval: u32,
    pub cur: u32,
    pub prev: u32,
    pub streak: u8,
    /// Relapses so far: the quarantine doubles with each.
    pub strikes: u8,
    /// The detector that wrote this record (`Storm::id`; 0: none): a record
    /// another detector wrote (before a reload that changed the settings)
    /// reads as none (`stack/clients.rs`).
    pub owner: u16,
    /// The quarantine's end in deciseconds on the detector's clock, rounded
    /// up (32 bits last 13.6 years; milliseconds would wrap in 49 days);
    /// 0: never quarantined. Relapses are told from it: a new quarantine
    /// soon after it ended is one.
    quarantine_end: u32,
}

// The size the module docs and the README state (a table slot adds the 8-byte key).
const _: () = assert!(std::mem::size_of::<Growth>() == 20);

impl Growth {
    /// A fresh record written by the detector `owner`.
    pub fn new(owner: u16) -> Growth {
        Growth { owner, ..Growth::default() }
    }

    /// When the last quarantine ends (ended), in milliseconds; 0: never.
    pub fn quarantined_until(&self) -> u64 {
        crate::stack::from_deciseconds(self.quarantine_end)
    }

    fn quarantine_until(&mut self, ms: u64) {
        self.quarantine_end = crate::stack::to_deciseconds(ms);
    }
}

/// The rules of one route, in the detector's units.
#[derive(Debug, Clone, Copy)]
pub struct GrowthRules {
    pub interval_ms: u64,
    pub factor: f64,
    pub intervals: u8,
    /// `min_rate` as requests per interval.
    pub min_count: u32,
    pub quarantine_ms: u64,
}

/// What one request does to its client's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Newly quarantined, or still quarantined: milliseconds left.
    Quarantined {
        left_ms: u64,
        new: bool,
    },
}

impl GrowthRules {
    /// How long after a release a new quarantine counts as a relapse: one
    /// quarantine plus twice the time a streak takes (a bomb restarting from
    /// its base rate first climbs back above `min_rate`).
    pub fn relapse_window_ms(&self) -> u64 {
        let streak = (u64::from(self.intervals) + 1).saturating_mul(self.interval_ms);
        self.quarantine_ms.saturating_add(streak.saturating_mul(2))
    }

    /// Whether `cur` is `factor` times `prev`, less counting noise: a tenth
    /// of the growth looked for, and at least one request. A rate that
    /// doubles exactly gives counts exactly twice the last, so with one
    /// request of slack a single request that a delay moved across an
    /// interval's edge hid a bomb for three more intervals.
    fn grew(&self, cur: u32, prev: u32) -> bool {
        // The integer tests first: nearly every request fails one of them,
        // and then skips the floating-point division.
        if cur < self.min_count || prev == 0 {
            return false;
        }
        let wanted = self.factor * f64::from(prev);
        let noise = (wanted / 10.0).max(1.0);
        f64::from(cur) + noise >= wanted
    }

    /// Counts one request at `now_ms`. `needed` is the streak that makes a bomb
    /// (`intervals`, or 1 while the route's aggregate is alarming).
    pub fn observe(&self, s: &mut Growth, now_ms: u64, needed: u8) -> Verdict {
        let idx = u32::try_from(now_ms / self.interval_ms.max(1)).unwrap_or(u32::MAX);
        if idx != s.interval {
            if idx == s.interval.wrapping_add(1) {
                s.streak = if self.grew(s.cur, s.prev) { s.streak.saturating_add(1) } else { 0 };
                s.prev = s.cur;
            } else {
                // A silent interval (or the first one): no growth to speak of.
                s.streak = 0;
                s.prev = 0;
            }
            s.cur = 0;
            s.interval = idx;
        }
        s.cur = s.cur.saturating_add(1);
        let until = s.quarantined_until();
        if now_ms < until {
            return Verdict::Quarantined { left_ms: until - now_ms, new: false };
        }
        if self.grew(s.cur, s.prev) && s.streak.saturating_add(1) >= needed.max(1) {
            let soon = self.relapse_window_ms();
            let relapse = until > 0 && now_ms < until + soon;
            s.strikes = if relapse { s.strikes.saturating_add(1).min(6) } else { 0 };
            let length = self.quarantine_ms << s.strikes;
            s.quarantine_until(now_ms + length);
            return Verdict::Quarantined { left_ms: length, new: true };
        }
        Verdict::Pass
    }
}

/// A whole route's growth: the same rule over the sum of its clients, kept
/// lock-free (a request adds one; the first request of a new interval rolls).
///
/// Every request of the route from every worker counts here, so the count is
/// striped: a request adds to the stripe its client's hash picks, each on a
/// cache line of its own (two workers serving two clients rarely meet), and
/// the roll sums them. One shared counter was a write per request to
/// one line that every worker took from the others; the fields read on each
/// request (the interval, the streak) are kept off the stripes' lines, so
/// reading them never misses because of a count.
#[derive(Debug, Default)]
pub struct RouteGrowth {
    interval: std::sync::atomic::AtomicU32,
    prev: std::sync::atomic::AtomicU32,
    streak: std::sync::atomic::AtomicU32,
    cur: [Stripe; STRIPES],
}

/// Stripes of a route's count: enough that the workers of a large machine
/// rarely share one.
const STRIPES: usize = 16;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(std::sync::atomic::AtomicU32);

impl RouteGrowth {
    /// Counts one request of the client whose hash is `client_hash`;
    /// returns the route's current growth streak.
    pub fn observe(&self, rules: &GrowthRules, now_ms: u64, client_hash: u64) -> u32 {
        use std::sync::atomic::Ordering::Relaxed;
        let idx = u32::try_from(now_ms / rules.interval_ms.max(1)).unwrap_or(u32::MAX);
        let seen = self.interval.load(Relaxed);
        if idx != seen && self.interval.compare_exchange(seen, idx, Relaxed, Relaxed).is_ok() {
            // A request counted meanwhile lands in one interval or the
            // other: the aggregate is a rate, not a ledger.
            let cur = self.cur.iter().fold(0u32, |sum, s| sum.saturating_add(s.0.swap(0, Relaxed)));
            let prev = self.prev.swap(cur, Relaxed);
            let streak = if idx == seen.wrapping_add(1) && rules.grew(cur, prev) {
                self.streak.load(Relaxed).saturating_add(1)
            } else {
                0
            };
            self.streak.store(streak, Relaxed);
        }
        self.cur[(client_hash >> 60) as usize % STRIPES].0.fetch_add(1, Relaxed);
        self.streak.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests counted from many threads at once all reach the route's
    /// count when the interval rolls: the stripes lose none.
    #[test]
    fn a_routes_count_from_many_threads_loses_nothing() {
        use std::sync::atomic::Ordering::Relaxed;
        let (r, route) = (rules(), RouteGrowth::default());
        let (threads, each) = (6u32, 10_000u32);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for k in 0..each {
                        route.observe(&r, 500, u64::from(k).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    }
                });
            }
        });
        route.observe(&r, 1500, 0);
        assert_eq!(route.prev.load(Relaxed), threads * each, "the first interval's count");
        let counted: u32 = route.cur.iter().map(|s| s.0.load(Relaxed)).sum();
        assert_eq!(counted, 1, "the second interval holds the request that rolled it");
    }

    fn rules() -> GrowthRules {
        GrowthRules { interval_ms: 1000, factor: 2.0, intervals: 3, min_count: 5, quarantine_ms: 60_000 }
    }

    /// Sends `n` requests evenly spread over second `sec`; returns the first verdict that is not Pass.
    fn second(r: &GrowthRules, s: &mut Growth, sec: u64, n: u64) -> Option<(u64, Verdict)> {
        for k in 0..n {
            let v = r.observe(s, sec * 1000 + k * 1000 / n.max(1), r.intervals);
            if v != Verdict::Pass {
                return Some((k, v));
            }
        }
        None
    }

    /// Sends `counts[i]` requests in second `from + i`, one second after the
    /// other, until a client is quarantined: (that second's count, the
    /// request that was shed, the verdict).
    fn first_caught(r: &GrowthRules, from: u64, counts: &[u64]) -> Option<(u64, u64, Verdict)> {
        let mut s = Growth::default();
        counts
            .iter()
            .enumerate()
            .find_map(|(i, &n)| second(r, &mut s, from + i as u64, n).map(|(k, v)| (n, k, v)))
    }

    #[test]
    fn a_client_doubling_from_2_per_second_is_caught_at_32_per_second() {
        let r = rules();
        let (rate, k, v) = first_caught(&r, 10, &[2, 4, 8, 16, 32, 64, 128]).expect("never caught");
        assert!(rate <= 32, "caught only at {rate}/s");
        assert_eq!(v, Verdict::Quarantined { left_ms: 60_000, new: true });
        assert!(k < 32, "request {k} of its {rate}/s second");
    }

    /// A doubling client is caught by 64/s though delays move a request
    /// across an interval's edge now and then.
    #[test]
    fn a_doubling_client_is_caught_though_delays_move_requests_across_intervals() {
        // A rate doubling each second from 2/s counts 2, 6, 12, 23, 46, 92,
        // 184; here one request moved from the fourth second into the fifth
        // and one from the sixth into the seventh. With one request of
        // slack, neither 22 after 12 nor 91 after 47 was a doubling, and the
        // client was never caught.
        let (n, _, v) = first_caught(&rules(), 20, &[2, 6, 12, 22, 47, 91, 185]).expect("never caught");
        assert!(n <= 64, "caught only at {n}/s");
        assert_eq!(v, Verdict::Quarantined { left_ms: 60_000, new: true });
    }

    #[test]
    fn steady_clients_and_one_off_bursts_are_not_bombs() {
        let r = rules();
        let mut steady = Growth::default();
        for sec in 0..30 {
            assert_eq!(second(&r, &mut steady, sec, 200), None);
        }
        let mut burst = Growth::default();
        for (sec, n) in [1u64, 1, 100, 1, 1, 1, 100, 0, 100].iter().enumerate() {
            assert_eq!(second(&r, &mut burst, sec as u64, *n), None);
        }
    }

    #[test]
    fn quarantine_expires_and_a_relapse_doubles_it() {
        let r = GrowthRules { quarantine_ms: 2000, ..rules() };
        let mut s = Growth::default();
        let mut sec = 0;
        let mut rate = 2;
        let first = loop {
            if let Some((_, v)) = second(&r, &mut s, sec, rate) {
                break v;
            }
            sec += 1;
            rate *= 2;
        };
        assert_eq!(first, Verdict::Quarantined { left_ms: 2000, new: true });
        // Silence until released, then an honest request passes.
        let released = s.quarantined_until();
        assert_eq!(r.observe(&mut s, released + 1, 3), Verdict::Pass);
        // It bombs again at once: the second quarantine is twice as long.
        let mut sec = released / 1000 + 1;
        let mut rate = 4;
        let again = loop {
            if let Some((_, v)) = second(&r, &mut s, sec, rate) {
                break v;
            }
            sec += 1;
            rate *= 2;
            assert!(rate < 1 << 12);
        };
        assert_eq!(again, Verdict::Quarantined { left_ms: 4000, new: true });
    }

    #[test]
    fn an_alarming_route_sheds_a_growing_client_after_one_growth() {
        let r = rules();
        let mut s = Growth::default();
        assert_eq!(second(&r, &mut s, 0, 10), None);
        assert!(matches!(r.observe(&mut s, 1000, 1), Verdict::Pass));
        let mut v = Verdict::Pass;
        for k in 1..20 {
            v = r.observe(&mut s, 1000 + k * 10, 1);
            if v != Verdict::Pass {
                break;
            }
        }
        assert!(matches!(v, Verdict::Quarantined { new: true, .. }));
    }
}
