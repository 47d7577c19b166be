//! Where tensors live and kernels run.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// The cargo features this binary was built with (they decide which devices it can use).
pub fn build_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    if cfg!(feature = "cudnn") {
        f.push("cudnn");
    }
    f
}

/// A compute device (config.json spells it as the CLI does: cpu, cuda:N).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
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

crate::error::string_conversions!(Device);

impl Device {
    /// The device of the process of node-local rank `local_rank` in a run that asked for `self`:
    /// on GPUs each process of a machine takes its own, `cuda:N` being the first of them
    /// (`cuda:N + local rank`, as DDP does with LOCAL_RANK); the host is shared, and so is the
    /// emulated device's name (each process has an emulated cuda:0 of its own).
    pub fn for_local_rank(self, local_rank: usize) -> Device {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) if crate::cuda::emulation_requested() => self,
            Device::Cuda(i) => Device::Cuda(i + local_rank),
            Device::Cpu => self,
        }
    }

    /// The device as reports and summary.json record it: `cpu`, `cuda:N`, or `cuda:0 (emulated)`
    /// when `MUSCLE_CUDA_EMU=1` puts the emulated device in the GPU's place.
    pub fn label(self) -> String {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(i) if crate::cuda::emulation_requested() => format!("cuda:{i} (emulated)"),
            _ => self.to_string(),
        }
    }

    /// Waits until all work queued on this device has finished (nothing to wait for on the CPU).
    pub fn synchronize(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::cuda::context::gpu(i)?.synchronize(),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => self.check_available(),
        }
    }

    /// Checks that this device can be used in this build and on this machine.
    pub fn check_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let what = format!("--device cuda:{i}");
                crate::cuda::device::probe_ordinal(i).map_err(|e| e.context(&what))?;
                // Loads every kernel now, so a broken PTX or driver fails here, not mid-run.
                let gpu = crate::cuda::context::gpu(i).map_err(|e| e.context(&what))?;
                // The emulated device convolves with its cuDNN stand-in.
                #[cfg(feature = "cudnn")]
                if !gpu.is_emulated() {
                    crate::cuda::device::cudnn_version().map_err(|e| e.context(&what))?;
                }
                #[cfg(not(feature = "cudnn"))]
                return Err(Error::device(format!(
                    "{what}: this binary was built without the `cudnn` feature, and every model \
                     convolves (rebuild with --features cuda,cudnn)"
                )));
                #[cfg(feature = "cudnn")]
                Ok(())
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::device(
                "--device cuda: this binary was built without the `cuda` feature \
                 (rebuild with --features cuda,cudnn)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_of_a_machine_takes_its_own_gpu() {
        assert_eq!(Device::Cpu.for_local_rank(3), Device::Cpu);
        #[cfg(feature = "cuda")]
        if crate::cuda::emulation_requested() {
            // One emulated device per process, always cuda:0.
            assert_eq!(Device::Cuda(0).for_local_rank(1), Device::Cuda(0));
            return;
        }
        assert_eq!(Device::Cuda(0).for_local_rank(0), Device::Cuda(0));
        assert_eq!(Device::Cuda(2).for_local_rank(1), Device::Cuda(3));
    }
}
