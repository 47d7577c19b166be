//! `muscle info`: the build's features, the devices it sees, the CPU's instruction sets and the
//! default thread count.

use crate::error::Result;
use crate::ssl::Method;
use crate::train::TrainConfig;

/// `muscle info`: prints the version, features, threads, devices, CPU kernels and methods.
pub fn command() -> Result<()> {
    println!("muscle {}", env!("CARGO_PKG_VERSION"));
    let f = crate::device::build_features();
    println!("features: {}", if f.is_empty() { "cpu-only".to_string() } else { f.join(",") });
    println!("threads: {} (default for --threads)", TrainConfig::DEFAULT.threads());
    println!("devices: cpu{}", if cfg!(feature = "cuda") { ", cuda (see below)" } else { "" });
    let simd = match crate::cpu::simd::level() {
        crate::cpu::simd::Level::Avx512 => "AVX-512",
        crate::cpu::simd::Level::Avx2 => "AVX2 + FMA",
        crate::cpu::simd::Level::Baseline => "baseline (no AVX2)",
    };
    let bf16 = if crate::ops::conv::bf16_available() {
        "available"
    } else {
        "not here (no AVX512-BF16, or MUSCLE_SIMD / MUSCLE_CONV turned it off)"
    };
    println!("cpu kernels: {simd}; --precision bf16: {bf16}");
    #[cfg(feature = "cuda")]
    match crate::cuda::device::probe() {
        Ok(g) => println!("cuda: {g}"),
        Err(e) => println!("cuda: {e}"),
    }
    #[cfg(feature = "cudnn")]
    if crate::cuda::emulation_requested() {
        println!("cudnn: the emulated device's stand-in (reference loops behind cuDNN's conventions)");
    } else {
        match crate::cuda::device::cudnn_version() {
            Ok((major, minor, patch)) => println!("cudnn: {major}.{minor}.{patch}"),
            Err(e) => println!("cudnn: {e}"),
        }
    }
    println!("methods: {}", Method::TRAIN.map(Method::name).join(", "));
    Ok(())
}
