//! The retry budget of one upstream (Finagle's `RetryBudget`): every request
//! deposits, every retry withdraws, and a retry is allowed only while
//!
//! ```text
//! retries in the last TTL  <=  budget × requests in the last TTL  +  min_per_s × TTL
//! ```
//!
//! Why a budget and not just `attempts`: with a fixed number of tries, a failing
//! upstream receives `attempts` × the traffic exactly when it can least take it,
//! and a retry wave holds it down. A budget bounds retries to a share of the
//! traffic whatever the failure rate, so retries add at most `budget` (plus the
//! small `min_per_s` floor that keeps a quiet upstream retryable) to the load.
//!
//! The TTL is [`TTL`], in ten buckets of [`super::window`]: bounded memory, no
//! lock, one CAS to deposit. A refused withdrawal is taken back, so concurrent
//! retries can be refused spuriously in a race but never over-admitted. The
//! config validator bounds `budget` (0..=10); nothing here can panic on a value.

use std::time::Duration;

use tokio::time::Instant;

use super::window::{Clock, Ring};
use crate::config::RetryConfig;

/// The window over which requests and retries are compared.
pub const TTL: Duration = Duration::from_secs(1);

pub struct RetryBudget {
    clock: Clock,
    deposits: Ring,
    withdrawals: Ring,
    ratio: f64,
    /// Retries always allowed per TTL: `min_per_s` × TTL.
    reserve: u64,
}

impl RetryBudget {
    pub fn new(config: &RetryConfig, origin: Instant) -> Self {
        RetryBudget {
            clock: Clock::new(origin, TTL),
            deposits: Ring::default(),
            withdrawals: Ring::default(),
            ratio: config.budget,
            reserve: u64::from(config.min_per_s).saturating_mul(TTL.as_secs().max(1)),
        }
    }

    /// A request arrived (retries do not deposit).
    pub fn deposit(&self, now: Instant) {
        self.deposits.add(self.clock.tick(now), 1);
    }

    /// Asks for one retry at `now`; `false` when the budget is spent.
    pub fn withdraw(&self, now: Instant) -> bool {
        let tick = self.clock.tick(now);
        self.withdrawals.add(tick, 1);
        let allowed = self.reserve.saturating_add((self.ratio * self.deposits.sum(tick) as f64) as u64);
        if self.withdrawals.sum(tick) > allowed {
            self.withdrawals.undo(tick);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_s: u32, start: Instant) -> RetryBudget {
        let config = RetryConfig {
            attempts: 3,
            budget: ratio,
            backoff: Duration::ZERO,
            min_per_s,
            on_connect: true,
            on_timeout: false,
            on_status: vec![503],
        };
        RetryBudget::new(&config, start)
    }

    #[test]
    fn retries_are_a_share_of_requests() {
        let start = Instant::now();
        let b = budget(0.2, 0, start);
        for _ in 0..100 {
            b.deposit(start);
        }
        let allowed = (0..100).filter(|_| b.withdraw(start)).count();
        assert_eq!(allowed, 20);
    }

    #[test]
    fn the_floor_allows_retries_without_traffic() {
        let start = Instant::now();
        let b = budget(0.0, 5, start);
        assert_eq!((0..10).filter(|_| b.withdraw(start)).count(), 5);
    }

    #[test]
    fn the_budget_refills_as_the_window_slides() {
        let start = Instant::now();
        let b = budget(0.5, 0, start);
        for _ in 0..10 {
            b.deposit(start);
        }
        assert_eq!((0..10).filter(|_| b.withdraw(start)).count(), 5);
        // A TTL later the old requests and retries are forgotten alike.
        let later = start + TTL;
        assert!(!b.withdraw(later));
        for _ in 0..4 {
            b.deposit(later);
        }
        assert_eq!((0..10).filter(|_| b.withdraw(later)).count(), 2);
    }

    #[test]
    fn zero_budget_and_floor_refuse_every_retry() {
        let start = Instant::now();
        let b = budget(0.0, 0, start);
        b.deposit(start);
        assert!(!b.withdraw(start));
    }
}
