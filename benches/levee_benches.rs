//! levee's criterion benches: one entry file, one module per concern.
//! Run: `cargo bench --bench levee_benches` (add `-- <filter>` for one group).
//! Figures and the machine they came from are in the README.

use criterion::{criterion_group, criterion_main};

mod alloc;
mod router;
mod stack;
mod store;
mod storm;
mod threads;
mod upstream;

criterion_group!(
    benches,
    router::bench,
    store::bench,
    storm::bench,
    storm::guard_threads,
    stack::bench,
    stack::per_client
);
criterion_main!(benches, upstream::benches);
