//! Compiles kernels/*.cu to PTX when the `cuda` feature is on (the CUDA backend issue fills this
//! in); without it the build does nothing.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
