//! levee's benches: one entry, one module per concern, one `criterion_main!`.
//! Run with `cargo bench --bench levee_benches`.

mod upstream;

criterion::criterion_main!(upstream::benches);
