//! `muscle info`: the build's features, the devices it sees and the default thread count.

use crate::error::Result;
use crate::ssl::Method;
use crate::train::TrainConfig;

/// `muscle info`: prints the version, features, threads, devices and methods.
pub fn command() -> Result<()> {
    println!("muscle {}", env!("CARGO_PKG_VERSION"));
    let f = crate::device::build_features();
    println!("features: {}", if f.is_empty() { "cpu-only".to_string() } else { f.join(",") });
    println!("threads: {} (default for --threads)", TrainConfig::DEFAULT.threads());
    println!("devices: cpu{}", if cfg!(feature = "cuda") { ", cuda (see below)" } else { "" });
    #[cfg(feature = "cuda")]
    match crate::cuda::device::probe() {
        Ok(g) => println!(
            "cuda:0: {} (compute {}.{}, driver {}.{}, {:.1} GiB)",
            g.name,
            g.compute_capability.0,
            g.compute_capability.1,
            g.driver_version / 1000,
            g.driver_version % 1000 / 10,
            g.total_memory as f64 / (1u64 << 30) as f64
        ),
        Err(e) => println!("cuda: {e}"),
    }
    #[cfg(feature = "cudnn")]
    match crate::cuda::device::cudnn_version() {
        Ok((major, minor, patch)) => println!("cudnn: {major}.{minor}.{patch}"),
        Err(e) => println!("cudnn: {e}"),
    }
    println!("methods: {}", Method::TRAIN.map(Method::name).join(", "));
    Ok(())
}
