//! The circuit breaker of one upstream: `Closed` → `Open` → `HalfOpen` → …
//!
//! Closed, it counts outcomes over a sliding [`window`](super::window) and opens
//! once at least `min_requests` were seen and `failures / requests >=
//! failure_rate`. Open, it refuses everything without touching the upstream for
//! `open_for`. Then it lets `half_open_requests` probes through: when all of
//! them succeed it closes with an empty window; when any fails it opens again for
//! another `open_for`. A probe whose caller goes away before an outcome frees
//! its slot for another probe.
//!
//! Why a failure *rate* over a window, not consecutive failures: behind a
//! balancer one dead endpoint of several makes failures interleave with
//! successes; a rate sees it, a streak does not. Per-endpoint streaks are
//! outlier detection's job ([`super::outlier`]).
//!
//! Cost: the closed state is one atomic load to admit and one compare-and-swap
//! to record a success; a failure adds one CAS and a sum over ten buckets.
//! Every transition takes a short lock, and is logged, counted
//! (`levee_circuit_transitions_total`) and exported (`levee_circuit_state`).
//! The rate is evaluated when a failure is recorded, so a window that reaches
//! `min_requests` through successes opens at its next failure.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use metrics::{Gauge, SharedString};
use tokio::time::Instant;

use super::window::{Clock, Ring};
use crate::config::BreakerConfig;
use crate::metrics as m;
use crate::nanos_since;

/// The breaker's state; the gauge values are the SPEC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Closed,
            1 => State::HalfOpen,
            _ => State::Open,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }
}

/// What [`CircuitBreaker::admit`] let through; hand it back with the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    /// An ordinary request of the closed state.
    Closed,
    /// A half-open probe of one open → half-open cycle.
    Probe { generation: u64 },
}

/// The breaker refused: open, or half-open with every probe slot taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Until the breaker half-opens; zero when it is half-open already.
    pub remaining: Duration,
}

/// Probe bookkeeping; changes only under the lock, and with it every state change.
#[derive(Debug, Default)]
struct Probes {
    /// Bumped by every transition, so a late outcome of an older cycle is ignored.
    generation: u64,
    issued: u32,
    succeeded: u32,
}

pub struct CircuitBreaker {
    config: BreakerConfig,
    clock: Clock,
    origin: Instant,
    requests: Ring,
    failures: Ring,
    /// A [`State`] as `u8`: the lock-free read of the closed fast path.
    state: AtomicU8,
    /// While open: when it half-opens, in nanoseconds since `origin`.
    open_until: AtomicU64,
    probes: Mutex<Probes>,
    upstream: SharedString,
    gauge: Gauge,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig, upstream: SharedString, origin: Instant) -> Self {
        let gauge = metrics::gauge!(m::CIRCUIT_STATE, "upstream" => upstream.clone());
        gauge.set(0.0);
        CircuitBreaker {
            clock: Clock::new(origin, config.window),
            origin,
            config,
            requests: Ring::default(),
            failures: Ring::default(),
            state: AtomicU8::new(State::Closed as u8),
            open_until: AtomicU64::new(0),
            probes: Mutex::new(Probes::default()),
            upstream,
            gauge,
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Decides whether a request may go to the upstream at `now`.
    pub fn admit(&self, now: Instant) -> Result<Ticket, Refused> {
        let state = self.state();
        if state == State::Closed {
            return Ok(Ticket::Closed);
        }
        if state == State::Open {
            let left = self.open_until.load(Ordering::Acquire).saturating_sub(nanos_since(self.origin, now));
            if left > 0 {
                return Err(Refused { remaining: Duration::from_nanos(left) });
            }
        }
        let mut probes = self.lock();
        // Re-read under the lock: another request may have moved the state on.
        match self.state() {
            State::Closed => Ok(Ticket::Closed),
            State::Open => {
                let left =
                    self.open_until.load(Ordering::Acquire).saturating_sub(nanos_since(self.origin, now));
                if left > 0 {
                    return Err(Refused { remaining: Duration::from_nanos(left) });
                }
                self.transition(&mut probes, State::HalfOpen, now);
                probes.issued = 1;
                Ok(Ticket::Probe { generation: probes.generation })
            }
            State::HalfOpen if probes.issued < self.config.half_open_requests => {
                probes.issued += 1;
                Ok(Ticket::Probe { generation: probes.generation })
            }
            State::HalfOpen => Err(Refused { remaining: Duration::ZERO }),
        }
    }

    /// Records the outcome of a request that `admit` let through.
    pub fn record(&self, ticket: Ticket, failed: bool, now: Instant) {
        match ticket {
            Ticket::Closed => {
                // Admitted before the circuit opened: its outcome belongs to a closed past.
                if self.state() != State::Closed {
                    return;
                }
                let tick = self.clock.tick(now);
                self.requests.add(tick, 1);
                if !failed {
                    return;
                }
                self.failures.add(tick, 1);
                if should_open(&self.config, self.requests.sum(tick), self.failures.sum(tick)) {
                    let mut probes = self.lock();
                    if self.state() == State::Closed {
                        self.transition(&mut probes, State::Open, now);
                    }
                }
            }
            Ticket::Probe { generation } => {
                let mut probes = self.lock();
                if probes.generation != generation || self.state() != State::HalfOpen {
                    return;
                }
                if failed {
                    self.transition(&mut probes, State::Open, now);
                } else {
                    probes.succeeded += 1;
                    if probes.succeeded >= self.config.half_open_requests {
                        self.transition(&mut probes, State::Closed, now);
                    }
                }
            }
        }
    }

    /// A request `admit` let through ended without an outcome that says
    /// anything about the upstream (the client went away, the request was
    /// bad): a probe's slot goes to the next request.
    pub fn cancel(&self, ticket: Ticket) {
        if let Ticket::Probe { generation } = ticket {
            let mut probes = self.lock();
            if probes.generation == generation && self.state() == State::HalfOpen {
                probes.issued = probes.issued.saturating_sub(1);
            }
        }
    }

    fn transition(&self, probes: &mut Probes, to: State, now: Instant) {
        let from = self.state();
        probes.generation += 1;
        probes.issued = 0;
        probes.succeeded = 0;
        match to {
            State::Open => {
                let open_for = u64::try_from(self.config.open_for.as_nanos()).unwrap_or(u64::MAX);
                let until = nanos_since(self.origin, now).saturating_add(open_for);
                self.open_until.store(until, Ordering::Release);
                tracing::warn!(upstream = %self.upstream, from = from.as_str(), open_for = ?self.config.open_for,
                    "circuit opened: requests to this upstream are refused with 503 circuit_open");
            }
            State::HalfOpen => {
                tracing::info!(upstream = %self.upstream, probes = self.config.half_open_requests,
                    "circuit half-open: probing the upstream");
            }
            State::Closed => {
                self.requests.clear();
                self.failures.clear();
                tracing::info!(upstream = %self.upstream, "circuit closed: the upstream answers again");
            }
        }
        self.state.store(to as u8, Ordering::Release);
        self.gauge.set(f64::from(to as u8));
        metrics::counter!(m::CIRCUIT_TRANSITIONS_TOTAL, "upstream" => self.upstream.clone(), "state" => to.as_str())
            .increment(1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Probes> {
        // The bookkeeping is a few integers, valid after any panic: a poisoned lock is still usable.
        self.probes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The closed state's decision: enough requests in the window, and too many failed.
pub fn should_open(config: &BreakerConfig, requests: u64, failures: u64) -> bool {
    requests >= u64::from(config.min_requests) && failures as f64 >= config.failure_rate * requests as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 4,
            failure_rate: 0.5,
            open_for: Duration::from_secs(5),
            half_open_requests: 2,
        }
    }

    fn breaker(start: Instant) -> CircuitBreaker {
        CircuitBreaker::new(config(), SharedString::const_str("b"), start)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Opens the breaker at `at` with `min_requests` failures.
    fn open(b: &CircuitBreaker, at: Instant) {
        for _ in 0..4 {
            let t = b.admit(at).unwrap();
            b.record(t, true, at);
        }
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn no_decision_below_min_requests() {
        let start = Instant::now();
        let b = breaker(start);
        for _ in 0..3 {
            b.record(b.admit(start).unwrap(), true, start);
        }
        assert_eq!(b.state(), State::Closed);
        b.record(b.admit(start).unwrap(), true, start);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn opens_at_the_failure_rate_not_below() {
        let c = config();
        assert!(!should_open(&c, 10, 4));
        assert!(should_open(&c, 10, 5));
        assert!(!should_open(&c, 3, 3));
        let start = Instant::now();
        let b = breaker(start);
        for failed in [false, false, true, false, true] {
            b.record(b.admit(start).unwrap(), failed, start);
        }
        assert_eq!(b.state(), State::Closed, "2 of 5 failed");
        b.record(b.admit(start).unwrap(), true, start);
        assert_eq!(b.state(), State::Open, "3 of 6 failed");
    }

    #[test]
    fn old_failures_leave_the_window() {
        let start = Instant::now();
        let b = breaker(start);
        for _ in 0..3 {
            b.record(b.admit(start).unwrap(), true, start);
        }
        // 10s later the three failures are out of the window: one more is not enough.
        let later = start + Duration::from_secs(10);
        b.record(b.admit(later).unwrap(), true, later);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn open_refuses_until_open_for_then_probes() {
        let start = Instant::now();
        let b = breaker(start);
        open(&b, start);
        assert_eq!(b.admit(start + ms(1000)), Err(Refused { remaining: ms(4000) }));
        assert!(b.admit(start + ms(4999)).is_err());
        let t = start + ms(5000);
        let p1 = b.admit(t).unwrap();
        assert!(matches!(p1, Ticket::Probe { .. }));
        assert_eq!(b.state(), State::HalfOpen);
        let p2 = b.admit(t).unwrap();
        assert_eq!(b.admit(t), Err(Refused { remaining: Duration::ZERO }), "out of probes");
        b.record(p1, false, t);
        assert_eq!(b.state(), State::HalfOpen, "one probe of two succeeded");
        b.record(p2, false, t);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(t), Ok(Ticket::Closed));
    }

    #[test]
    fn a_failed_probe_reopens_for_another_open_for() {
        let start = Instant::now();
        let b = breaker(start);
        open(&b, start);
        let t = start + ms(5000);
        let p1 = b.admit(t).unwrap();
        let p2 = b.admit(t).unwrap();
        b.record(p1, true, t + ms(10));
        assert_eq!(b.state(), State::Open);
        // The other probe's success is of an older cycle and changes nothing.
        b.record(p2, false, t + ms(20));
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t + ms(10)), Err(Refused { remaining: ms(5000) }));
        assert!(b.admit(t + ms(5010)).is_ok());
    }

    #[test]
    fn a_cancelled_probe_frees_its_slot() {
        let start = Instant::now();
        let b = breaker(start);
        open(&b, start);
        let t = start + ms(5000);
        let p1 = b.admit(t).unwrap();
        let _p2 = b.admit(t).unwrap();
        assert!(b.admit(t).is_err());
        b.cancel(p1);
        assert!(matches!(b.admit(t), Ok(Ticket::Probe { .. })));
    }

    #[test]
    fn closing_starts_from_an_empty_window() {
        let start = Instant::now();
        let b = breaker(start);
        open(&b, start);
        let t = start + ms(5000);
        let (p1, p2) = (b.admit(t).unwrap(), b.admit(t).unwrap());
        b.record(p1, false, t);
        b.record(p2, false, t);
        // The failures that opened it are forgotten: one new failure does not reopen.
        b.record(b.admit(t).unwrap(), true, t);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn late_outcomes_of_the_closed_state_are_ignored_while_open() {
        let start = Instant::now();
        let b = breaker(start);
        let late = b.admit(start).unwrap();
        open(&b, start);
        b.record(late, false, start + ms(1));
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn huge_open_for_does_not_overflow() {
        let start = Instant::now();
        let mut c = config();
        c.open_for = Duration::MAX;
        let b = CircuitBreaker::new(c, SharedString::const_str("b"), start);
        open(&b, start);
        assert!(b.admit(start + Duration::from_secs(1 << 30)).is_err());
    }
}
