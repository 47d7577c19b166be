//! The one integration-test binary (each tests/*.rs file would be a separate link).

mod architecture;
mod bad_inputs;
mod cli;
mod common;
mod errors;
mod gpu;
mod gradients;
mod learning;
mod memory;
mod mi_reference;
mod models;
mod mpi;
mod old_runs;
mod randaugment;
mod reliability;
mod sweep;
mod training_reference;
