//! Work timed on two threads at once: what the benches use to ask what a
//! piece of shared state costs when two cores write it.

use std::time::Duration;

/// Runs `work(t, iters)` on threads `t` = 0 and 1 at once and returns the
/// wall time of both (criterion's `iter_custom` divides it by `iters`).
// criterion times custom loops with std::time::Instant.
#[allow(clippy::disallowed_types)]
pub fn two_threads(iters: u64, work: impl Fn(usize, u64) + Sync) -> Duration {
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..2 {
            let work = &work;
            s.spawn(move || work(t, iters));
        }
    });
    started.elapsed()
}
