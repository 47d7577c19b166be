//! The commands of the `muscle` binary beyond training itself: benchmarks, sweeps and charts.

pub mod bench;
pub mod bench_op;
#[cfg(feature = "cuda")]
pub mod bench_op_gpu;
pub mod plot;
pub mod sweep;
