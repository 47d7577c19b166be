//! Where tensors live and kernels run.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host CPU (the reference backend).
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature and a driver at run time).
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(Error::usage(format!("--device: unknown device '{s}' (expected cpu, cuda or cuda:N)"))),
            },
        }
    }
}

impl Device {
    /// Checks that this device can be used in this build and on this machine.
    pub fn check_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let gpu = crate::cuda::device::probe_ordinal(i).map_err(|e| e.context(format!("--device cuda:{i}")))?;
                Err(Error::device(format!(
                    "--device cuda:{i}: found {} (compute {}.{}), but training on the GPU is not wired \
                     to the ops yet; the CUDA kernels are tested by tests/gpu.rs",
                    gpu.name, gpu.compute_capability.0, gpu.compute_capability.1
                )))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::device(
                "--device cuda: this binary was built without the `cuda` feature \
                 (rebuild with --features cuda,cudnn)",
            )),
        }
    }
}
