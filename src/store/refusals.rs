//! Refusals Redis decided, remembered on the node until their retry time, so
//! that a client being refused costs Redis nothing (SPEC, "Several gateways,
//! one limit").
//!
//! Why this is exact: with GCRA a refusal changes no state, and another
//! node's traffic can only move a client's `tat` later, never earlier. So
//! until the retry time Redis gave, Redis would refuse again; the node answers
//! for it with the same decision (tightest limit, `Retry-After` and `RateLimit`
//! counted down from then). The one thing that moves a `tat` earlier is an
//! operator's reset, which drops the memory here and, through a Redis pub/sub
//! message, on every other replica ([`super::redis`]).
//!
//! The deadline is counted from the request's arrival, taken before the
//! round trip to Redis, so the node never refuses longer than Redis would.
//!
//! Two more rules keep a hot client's cost at about one script per token
//! even with many of its requests in flight at once:
//! - **The last token.** A request Redis admits with the tightest limit's
//!   last token is remembered as a refusal until that limit's next token
//!   (GCRA: `reset + T − b·T` after the decision), exactly as Redis would
//!   refuse until then.
//! - **One request asks.** When a remembered refusal runs out, the first
//!   request of that client on this node asks Redis; the node's other
//!   requests of that client are refused meanwhile (for at most the probe
//!   window, `store.timeout` capped at 100 ms), where Redis would have let at
//!   most the tokens freed during that round trip through. A refusal that ran
//!   out long ago (more than the window) is simply gone: every request asks.
//!
//! Bounded like all per-client state: a [`ClockMap`] whose cap is the
//! refusal memory's share of `store.max_clients` ([`super::Store::plan_budget`]),
//! evicting the least recently seen (a hot refused client is seen constantly
//! and stays; an evicted one only costs Redis one decision again), and swept
//! once the deadline has passed.

use std::time::Duration;

use tokio::time::Instant;

use super::clock::ClockMap;
use crate::context::ClientKey;

/// One remembered refusal; instants in nanoseconds since the memory's epoch.
#[derive(Debug, Clone, Copy, Default)]
struct Refusal {
    /// When the request would pass (Redis's retry time).
    until: u64,
    /// When the tightest bucket is full again.
    full_at: u64,
    /// The route's limits (their identities) when Redis refused: a reload that
    /// changes them makes the memory moot.
    limits: u32,
    /// The limit whose policy the headers describe.
    tightest: u32,
    /// A request of this client is asking Redis until then (0: none).
    probe_until: u64,
}

/// The longest a node waits on one request's answer from Redis before another
/// request of the same client asks again.
pub const MAX_PROBE: Duration = Duration::from_millis(100);

/// What a remembered refusal answers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remembered {
    pub retry_after: Duration,
    pub reset: Duration,
    pub tightest: usize,
}

pub struct Refusals {
    map: ClockMap<Refusal>,
    epoch: Instant,
    seed: foldhash::fast::RandomState,
    /// How long one request's question to Redis holds the others back.
    probe_ns: u64,
}

impl Refusals {
    /// `probe`: the store's timeout (capped at [`MAX_PROBE`]).
    pub fn new(max_entries: usize, probe: Duration) -> Self {
        Refusals {
            map: ClockMap::new(max_entries),
            epoch: Instant::now(),
            seed: foldhash::fast::RandomState::default(),
            probe_ns: u64::try_from(probe.min(MAX_PROBE).as_nanos()).unwrap_or(0),
        }
    }

    fn key(&self, route: &str, client: &ClientKey) -> u64 {
        super::memory::route_client_key(&self.seed, route, client)
    }

    fn ticks(&self, now: Instant) -> u64 {
        crate::nanos_since(self.epoch, now)
    }

    /// The refusal remembered for `client` on `route` with these `limits`
    /// (a fingerprint of their identities), if it still holds at `now`.
    /// `None` means: ask Redis (and, when the refusal just ran out, this
    /// request is the one that asks for the node; see the module's doc).
    pub fn get(&self, route: &str, client: &ClientKey, limits: u32, now: Instant) -> Option<Remembered> {
        let key = self.key(route, client);
        let r = self.map.peek(key)?;
        let now = self.ticks(now);
        if r.limits != limits {
            return None;
        }
        let answer = |until: u64, r: &Refusal| Remembered {
            retry_after: Duration::from_nanos(until.saturating_sub(now)),
            reset: Duration::from_nanos(r.full_at.saturating_sub(now)),
            tightest: r.tightest as usize,
        };
        if r.until > now {
            // Seen: a hot refused client stays remembered ahead of one-off ones.
            self.map.with(key, |_| ());
            return Some(answer(r.until, &r));
        }
        if now.saturating_sub(r.until) > self.probe_ns {
            return None;
        }
        // Ran out just now: one request asks Redis, under the shard's lock.
        self.map.with(key, |r| {
            if r.probe_until > now {
                Some(answer(r.probe_until, r))
            } else {
                r.probe_until = now.saturating_add(self.probe_ns);
                None
            }
        })
    }

    /// Redis admitted a request of `client` with tokens to spare: whatever
    /// is remembered (a finished probe) no longer holds anyone back.
    /// Starts loading the client's slot into the cache ([`ClockMap::prefetch`]).
    pub fn prefetch(&self, route: &str, client: &ClientKey) {
        self.map.prefetch(self.key(route, client));
    }

    pub fn admitted(&self, route: &str, client: &ClientKey) {
        self.map.remove(self.key(route, client));
    }

    /// Remembers Redis's refusal of a request that arrived at `now`.
    pub fn remember(&self, route: &str, client: &ClientKey, limits: u32, now: Instant, refused: Remembered) {
        if refused.retry_after.is_zero() {
            return;
        }
        let now = self.ticks(now);
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let r = Refusal {
            until: now.saturating_add(nanos(refused.retry_after)),
            full_at: now.saturating_add(nanos(refused.reset)),
            limits,
            tightest: u32::try_from(refused.tightest).unwrap_or(0),
            probe_until: 0,
        };
        self.map.with(self.key(route, client), |v| *v = r);
    }

    /// Forgets `client` on `route` (an operator's reset); true when remembered.
    pub fn forget(&self, route: &str, client: &ClientKey) -> bool {
        self.map.remove(self.key(route, client))
    }

    /// Forgets everything: after a gap in the reset messages (the subscription
    /// was down), a reset may have been missed.
    pub fn clear(&self) {
        self.map.retain(|_| false);
    }

    /// Drops the refusals whose retry time has passed, a shard at a time.
    pub async fn sweep(&self, now: Instant) -> usize {
        let now = self.ticks(now);
        self.map.retain_yielding(|r| r.until.max(r.probe_until).saturating_add(self.probe_ns) > now).await
    }

    pub fn set_capacity(&self, max_entries: usize) {
        self.map.set_capacity(max_entries);
    }

    pub fn capacity(&self) -> usize {
        self.map.capacity()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes the table holds (slots used or not).
    pub fn bytes(&self) -> usize {
        self.map.bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A fingerprint of a route's limit ids (their identities), never 0.
pub fn fingerprint(ids: &[u32]) -> u32 {
    ids.iter().fold(0x811c_9dc5u32, |h, &id| (h ^ id).wrapping_mul(0x0100_0193).rotate_left(5)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ms: u64) -> Remembered {
        Remembered {
            retry_after: Duration::from_millis(ms),
            reset: Duration::from_millis(2 * ms),
            tightest: 1,
        }
    }

    #[tokio::test]
    async fn a_refusal_holds_until_its_retry_time_and_counts_down() {
        let r = Refusals::new(100, Duration::from_millis(50));
        let t0 = Instant::now();
        r.remember("api", &ClientKey::from_text("dev"), 7, t0, refused(1000));
        let got = r.get("api", &ClientKey::from_text("dev"), 7, t0 + Duration::from_millis(400)).unwrap();
        assert_eq!(got.retry_after, Duration::from_millis(600));
        assert_eq!(got.reset, Duration::from_millis(1600));
        assert_eq!(got.tightest, 1);
        assert_eq!(
            r.get("api", &ClientKey::from_text("dev"), 7, t0 + Duration::from_millis(1000)),
            None,
            "due: ask Redis"
        );
        assert_eq!(r.get("api", &ClientKey::from_text("other"), 7, t0), None);
        assert_eq!(r.get("web", &ClientKey::from_text("dev"), 7, t0), None);
        assert_eq!(r.get("api", &ClientKey::from_text("dev"), 8, t0), None, "changed limits: ask Redis");
        // Kept through the probe's window (the request that asked at 1000 ms
        // holds the others until 1050 ms), then swept.
        assert_eq!(r.sweep(t0 + Duration::from_millis(1099)).await, 0);
        assert_eq!(r.sweep(t0 + Duration::from_millis(1101)).await, 1);
        assert!(r.is_empty());
    }

    #[test]
    fn when_a_refusal_runs_out_one_request_asks_and_the_others_wait_on_it() {
        let r = Refusals::new(100, Duration::from_millis(50));
        let t0 = Instant::now();
        r.remember("api", &ClientKey::from_text("dev"), 7, t0, refused(1000));
        let due = t0 + Duration::from_millis(1000);
        assert_eq!(r.get("api", &ClientKey::from_text("dev"), 7, due), None, "the first request asks Redis");
        let waiting = r
            .get("api", &ClientKey::from_text("dev"), 7, due + Duration::from_millis(10))
            .expect("the others wait");
        assert_eq!(waiting.retry_after, Duration::from_millis(40), "until the probe's window ends");
        assert_eq!(
            r.get("api", &ClientKey::from_text("dev"), 7, due + Duration::from_millis(50)),
            None,
            "no answer: ask again"
        );
        // Redis admitted it with tokens to spare: nobody is held back any more.
        r.admitted("api", &ClientKey::from_text("dev"));
        assert_eq!(r.get("api", &ClientKey::from_text("dev"), 7, due + Duration::from_millis(51)), None);
        assert!(r.is_empty());
        // A refusal that ran out long ago holds nobody: every request asks.
        r.remember("api", &ClientKey::from_text("old"), 7, t0, refused(10));
        let later = t0 + Duration::from_secs(5);
        assert_eq!(r.get("api", &ClientKey::from_text("old"), 7, later), None);
        assert_eq!(r.get("api", &ClientKey::from_text("old"), 7, later), None);
    }

    #[test]
    fn forget_and_clear() {
        let r = Refusals::new(100, Duration::from_millis(50));
        let t0 = Instant::now();
        r.remember("api", &ClientKey::from_text("a"), 1, t0, refused(1000));
        r.remember("api", &ClientKey::from_text("b"), 1, t0, refused(1000));
        assert!(r.forget("api", &ClientKey::from_text("a")));
        assert!(!r.forget("api", &ClientKey::from_text("a")));
        assert_eq!(r.get("api", &ClientKey::from_text("a"), 1, t0), None);
        assert!(r.get("api", &ClientKey::from_text("b"), 1, t0).is_some());
        r.clear();
        assert!(r.is_empty());
    }

    #[test]
    fn bounded_by_its_share_and_a_hot_client_stays() {
        let r = Refusals::new(1000, Duration::from_millis(50));
        let t0 = Instant::now();
        r.remember("api", &ClientKey::from_text("hot"), 1, t0, refused(60_000));
        for i in 0..20_000 {
            r.remember("api", &ClientKey::from_text(&format!("c{i}")), 1, t0, refused(60_000));
            if i % 100 == 0 {
                assert!(
                    r.get("api", &ClientKey::from_text("hot"), 1, t0).is_some(),
                    "the hot client was evicted at {i}"
                );
            }
        }
        assert!(r.len() <= r.capacity() && r.capacity() <= 1000, "{} of {}", r.len(), r.capacity());
        r.set_capacity(10);
        assert!(r.len() <= 10);
    }

    #[test]
    fn fingerprints_differ_by_limits() {
        assert_ne!(fingerprint(&[1, 2]), fingerprint(&[1, 3]));
        assert_ne!(fingerprint(&[1]), fingerprint(&[1, 1]));
        assert_ne!(fingerprint(&[]), 0);
    }
}
