//! The sums of a data-parallel run on GPUs (`--device cuda` under `mpirun`): every rank's device
//! buffer gathered by NCCL (its unique id made on rank 0 and broadcast over MPI, as llm.c does),
//! then added in rank order by `kernels/collective.cu`, so the result has the bits of the host's
//! ordered sum ([`World::sum_f32`]) on every rank and does not depend on NCCL's ring order.
//!
//! On the emulated device (`MUSCLE_CUDA_EMU=1`, where there is no NCCL) the gather goes through a
//! stand-in with NCCL's conventions (a send buffer of `count` elements, a receive buffer of
//! `ranks x count`, rank r's elements at `r x count`) carried over MPI through the host, so the
//! whole device path (flattening, gather, ordered-sum kernel, scatter) runs in CI.
//!
//! Only the main thread calls these (as with [`World`]'s own collectives).

use super::launch::{flat_cfg, flat_checks, int, launch, need};
use super::{CudaSlice, DeviceElem, F32Buf, Gpu};
use crate::dist::World;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The element types gathered: what NCCL and the host's byte gather both carry.
pub trait GatherElem: DeviceElem + cudarc::nccl::safe::NcclType {
    /// Little-endian bytes of `v` (the stand-in's MPI message).
    fn to_bytes(v: &[Self]) -> Vec<u8>;
    /// The values of little-endian `bytes`.
    fn from_bytes(bytes: &[u8]) -> Vec<Self>;
}

macro_rules! gather_elem {
    ($t:ty) => {
        impl GatherElem for $t {
            fn to_bytes(v: &[$t]) -> Vec<u8> {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            fn from_bytes(bytes: &[u8]) -> Vec<$t> {
                bytes
                    .chunks_exact(size_of::<$t>())
                    .map(|b| <$t>::from_le_bytes(b.try_into().unwrap_or_default()))
                    .collect()
            }
        }
    };
}
gather_elem!(f32);
gather_elem!(f64);

/// How the ranks' device buffers meet.
enum Transport {
    /// NCCL, bound to the [`Gpu`]'s stream (so the gather is ordered with the kernels around it).
    Nccl(cudarc::nccl::safe::Comm),
    /// The emulated device's stand-in: MPI through the host.
    Host(&'static World),
}

/// One process's end of the device collectives: its transport, rank and number of ranks.
pub struct DeviceComm {
    transport: Transport,
    rank: usize,
    ranks: usize,
}

thread_local! {
    static COMMS: RefCell<HashMap<usize, Rc<DeviceComm>>> = RefCell::new(HashMap::new());
}

/// The communicator of `gpu` over `world` (made on first use; every rank must ask at the same
/// point, as every collective).
pub fn comm(gpu: &Gpu, world: &'static World) -> Result<Rc<DeviceComm>> {
    let ordinal = gpu.info().ordinal;
    if let Some(c) = COMMS.with(|m| m.borrow().get(&ordinal).cloned()) {
        return Ok(c);
    }
    let c = Rc::new(DeviceComm::new(gpu, world)?);
    COMMS.with(|m| m.borrow_mut().insert(ordinal, c.clone()));
    Ok(c)
}

impl DeviceComm {
    fn new(gpu: &Gpu, world: &'static World) -> Result<DeviceComm> {
        let (rank, ranks) = (world.rank(), world.size());
        if gpu.is_emulated() {
            return Ok(DeviceComm { transport: Transport::Host(world), rank, ranks });
        }
        // Rank 0 makes the id; the others take its bytes over MPI (every rank calls the
        // broadcast; in a world of one it is rank 0's own).
        let mine = if world.is_root() { nccl_id_bytes()? } else { Vec::new() };
        let id = world.broadcast_bytes(&mine)?;
        let comm = nccl_comm(gpu, rank, ranks, &id)?;
        Ok(DeviceComm { transport: Transport::Nccl(comm), rank, ranks })
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// NCCL's all-gather: every rank's `send` (`count` elements, the same count everywhere) into
    /// `recv`, rank r's at `r x count`.
    pub fn all_gather<T: GatherElem>(&self, gpu: &Gpu, send: &CudaSlice<T>, recv: &mut CudaSlice<T>) -> Result<()> {
        let count = send.len();
        let want = count
            .checked_mul(self.ranks)
            .ok_or_else(|| Error::shape(format!("all_gather: {count} x {} elements overflow", self.ranks)))?;
        need("all_gather", "recv", recv.len(), want)?;
        match &self.transport {
            Transport::Nccl(comm) => {
                comm.all_gather(send.driver()?, recv.driver_mut()?).map_err(|e| nccl_err("ncclAllGather", e))?;
                Ok(())
            }
            Transport::Host(world) => {
                let mine = T::to_bytes(&gpu.download(send)?);
                let all = world.gather_bytes(&mine)?;
                for (r, bytes) in all.iter().enumerate() {
                    let part = T::from_bytes(bytes);
                    if part.len() != count {
                        return Err(Error::shape(format!(
                            "all_gather: rank {r} sent {} elements, rank {} {count}",
                            part.len(),
                            self.rank
                        )));
                    }
                    gpu.copy_range(&gpu.upload(&part)?, 0..count, recv, r * count)?;
                }
                Ok(())
            }
        }
    }
}

/// `v` summed over the ranks in rank order and divided by `divisor`, on every rank: the bits of
/// [`World::sum_f32`] followed by a division, computed on the device.
pub fn sum_f32(gpu: &Gpu, world: &'static World, v: &mut F32Buf, divisor: f32) -> Result<()> {
    if world.size() == 1 && divisor == 1.0 {
        return Ok(());
    }
    let k = "sum_ranks_fwd_f32";
    let (parts, n, ranks) = gathered(gpu, world, v, k)?;
    let cfg = flat_cfg(v.len());
    launch!(gpu, k, cfg, &parts, v, &n, &ranks, &divisor)
}

/// `v` summed over the ranks in rank order, on every rank: the bits of [`World::sum_f64`],
/// computed on the device (the MI joint).
pub fn sum_f64(gpu: &Gpu, world: &'static World, v: &mut CudaSlice<f64>) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    let k = "sum_ranks_double_fwd_f32";
    let (parts, n, ranks) = gathered(gpu, world, v, k)?;
    let cfg = flat_cfg(v.len());
    launch!(gpu, k, cfg, &parts, v, &n, &ranks)
}

/// Every rank's `v` gathered (ranks x len), with the checked sizes of the ordered-sum kernel `k`
/// (elements, ranks).
fn gathered<T: GatherElem>(
    gpu: &Gpu,
    world: &'static World,
    v: &CudaSlice<T>,
    k: &str,
) -> Result<(CudaSlice<T>, i64, i32)> {
    let comm = comm(gpu, world)?;
    let n = v.len();
    let total = n
        .checked_mul(comm.ranks())
        .ok_or_else(|| Error::shape(format!("{k}: {n} x {} elements overflow", comm.ranks())))?;
    let mut parts = gpu.zeros::<T>(total)?;
    comm.all_gather(gpu, v, &mut parts)?;
    let nl = flat_checks(k, n, &[("out", n), ("parts / ranks", parts.len() / comm.ranks())])?;
    Ok((parts, nl, int(k, "ranks", comm.ranks())?))
}

/// NCCL's unique id as bytes (rank 0's; NCCL must be loadable).
fn nccl_id_bytes() -> Result<Vec<u8>> {
    nccl_available()?;
    let id = cudarc::nccl::safe::Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// A communicator of `ranks` over the id's bytes, on `gpu`'s stream.
fn nccl_comm(gpu: &Gpu, rank: usize, ranks: usize, id: &[u8]) -> Result<cudarc::nccl::safe::Comm> {
    nccl_available()?;
    let internal: [std::ffi::c_char; 128] =
        std::array::from_fn(|i| id.get(i).copied().unwrap_or(0) as std::ffi::c_char);
    if id.len() != internal.len() {
        return Err(Error::device(format!("NCCL: rank 0 sent a {}-byte unique id, not 128", id.len())));
    }
    let stream = match gpu.backend() {
        super::device::Backend::Driver(d) => d.stream.clone(),
        #[cfg(muscle_cuda_emu)]
        super::device::Backend::Emulated => return Err(Error::device("NCCL on the emulated device")),
    };
    cudarc::nccl::safe::Comm::from_rank(stream, rank, ranks, cudarc::nccl::safe::Id::uninit(internal))
        .map_err(|e| nccl_err("ncclCommInitRank", e))
}

/// Whether NCCL (libnccl) is loadable (a dlopen attempt only).
pub fn nccl_present() -> bool {
    // SAFETY: is_culib_present only attempts to open the library and drops it.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// NCCL is loaded at run time: without it, one line instead of cudarc's panic at the first call.
fn nccl_available() -> Result<()> {
    if nccl_present() {
        Ok(())
    } else {
        Err(Error::device(
            "NCCL (libnccl.so.2) was not found: GPU ranks all-reduce through it (pip install nvidia-nccl-cu13, \
             then put its lib/ on LD_LIBRARY_PATH)",
        ))
    }
}

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::device(format!("{what}: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_cross_as_their_little_endian_bytes() {
        let v = [1.5f32, -0.0, f32::MIN_POSITIVE, 3e38];
        assert_eq!(
            f32::from_bytes(&f32::to_bytes(&v)).iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let w = [std::f64::consts::PI, -1e-300];
        assert_eq!(f64::from_bytes(&f64::to_bytes(&w)), w);
        assert_eq!(f32::to_bytes(&[1.0]), 1.0f32.to_le_bytes());
    }
}
