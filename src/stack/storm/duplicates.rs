//! Retry storms: the same request from the same client, again and again,
//! while the previous one is still in flight or just failed.
//!
//! A request's fingerprint is its method, path, query and a hash of its body
//! (when small; see `storm/mod.rs`). Sending a fingerprint again while an
//! earlier one is in flight, or within `duplicate_window` after one failed
//! (5xx, timeout, shed), is a retry; more than `max_duplicates` retries within
//! the window is a storm, answered 429 `retry_storm` with a `Retry-After` that
//! doubles with every further retry (from `duplicate_window`, at most
//! `quarantine`). Repeating a request that succeeded is polling, never a retry.

/// Per (client, fingerprint) state: 24 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dup {
    /// Start of the current retry window, ms (0: never seen).
    pub window_start: u64,
    /// The last time the fingerprint was sent, ms.
    pub last_seen: u64,
    pub retries: u32,
    pub in_flight: u16,
    pub failed: bool,
}

const _: () = assert!(std::mem::size_of::<Dup>() == 24);

#[derive(Debug, Clone, Copy)]
pub struct DupRules {
    pub window_ms: u64,
    pub max_duplicates: u32,
    pub max_backoff_ms: u64,
}

impl DupRules {
    /// A request with this fingerprint arrives at `now_ms`. `Some(ms)`: a
    /// storm, with the Retry-After to advertise. On `None` the request is in
    /// flight until [`DupRules::finish`].
    pub fn arrive(&self, d: &mut Dup, now_ms: u64) -> Option<u64> {
        let recent = d.window_start != 0 && now_ms.saturating_sub(d.last_seen) <= self.window_ms;
        let retry = recent && (d.in_flight > 0 || d.failed);
        d.last_seen = now_ms;
        if !retry {
            d.window_start = now_ms;
            d.retries = 0;
        } else {
            if now_ms.saturating_sub(d.window_start) > self.window_ms {
                d.window_start = now_ms;
                d.retries = 0;
            }
            d.retries = d.retries.saturating_add(1);
        }
        if d.retries > self.max_duplicates {
            // A shed attempt is a failed one: the storm goes on until it stops.
            d.failed = true;
            let excess = (d.retries - self.max_duplicates - 1).min(20);
            return Some((self.window_ms << excess).min(self.max_backoff_ms.max(self.window_ms)));
        }
        d.in_flight = d.in_flight.saturating_add(1);
        None
    }

    /// The request admitted by `arrive` finished; `failed` for 5xx, timeouts and sheds.
    pub fn finish(&self, d: &mut Dup, failed: bool) {
        d.in_flight = d.in_flight.saturating_sub(1);
        d.failed = failed;
        if !failed {
            d.retries = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Why `Storm::finish` may drop an entry with nothing in flight and no
        /// failure: the next arrival decides and leaves state exactly as a fresh one.
        #[test]
        fn an_idle_entry_decides_as_a_fresh_one(
            window_start in 0u64..1_000_000,
            last_seen in 0u64..1_000_000,
            retries in 0u32..100,
            dt in 0u64..10_000,
        ) {
            let rules = DupRules { window_ms: 2000, max_duplicates: 3, max_backoff_ms: 60_000 };
            let now = last_seen.max(window_start) + dt + 1;
            let mut idle = Dup { window_start, last_seen, retries, in_flight: 0, failed: false };
            let mut fresh = Dup::default();
            proptest::prop_assert_eq!(rules.arrive(&mut idle, now), rules.arrive(&mut fresh, now));
            proptest::prop_assert_eq!(idle, fresh);
        }
    }

    fn rules() -> DupRules {
        DupRules { window_ms: 2000, max_duplicates: 3, max_backoff_ms: 60_000 }
    }

    #[test]
    fn retries_of_a_failing_request_beyond_the_budget_are_a_storm() {
        let r = rules();
        let mut d = Dup::default();
        let mut verdicts = Vec::new();
        for k in 0..10u64 {
            let v = r.arrive(&mut d, 1000 + k * 100);
            if v.is_none() {
                r.finish(&mut d, true);
            }
            verdicts.push(v);
        }
        // The original and 3 retries pass; the 5th send onwards is a storm.
        assert!(verdicts[..4].iter().all(Option::is_none), "{verdicts:?}");
        assert_eq!(verdicts[4], Some(2000));
        assert_eq!(verdicts[5], Some(4000), "the back-off doubles");
    }

    #[test]
    fn concurrent_duplicates_in_flight_count_as_retries() {
        let r = rules();
        let mut d = Dup::default();
        let sent: Vec<_> = (0..6).map(|k| r.arrive(&mut d, 1000 + k)).collect();
        assert_eq!(sent.iter().filter(|v| v.is_some()).count(), 2);
    }

    #[test]
    fn polling_a_successful_request_is_never_a_storm() {
        let r = rules();
        let mut d = Dup::default();
        for k in 0..1000u64 {
            assert_eq!(r.arrive(&mut d, 1000 + k * 10), None);
            r.finish(&mut d, false);
        }
    }

    #[test]
    fn the_budget_renews_after_the_window() {
        let r = rules();
        let mut d = Dup::default();
        for k in 0..4u64 {
            assert_eq!(r.arrive(&mut d, 1000 + k), None);
            r.finish(&mut d, true);
        }
        // Within the window (of the last send) but past the start of the retry window.
        assert_eq!(r.arrive(&mut d, 1000 + 2500), None);
    }
}
