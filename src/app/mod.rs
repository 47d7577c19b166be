//! The commands of the `muscle` binary, each with its options: training runs and sweeps,
//! evaluation, augmentation previews, benchmarks, the reference MI loss, charts and build
//! information. The binary parses the command line and dispatches here; everything a command
//! prints is printed here.

pub mod augment;
pub mod bench;
pub mod bench_op;
#[cfg(feature = "cuda")]
pub mod bench_op_gpu;
pub mod eval;
pub mod info;
pub mod mi;
pub mod plot;
pub mod progress;
pub mod sweep;
pub mod train;
