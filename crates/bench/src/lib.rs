//! Benchmarks live in `benches/`; run `cargo bench -p vireo-bench`.
