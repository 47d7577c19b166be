//! The processes of a data-parallel run: the MPI world `mpirun -np K muscle train ...` starts
//! (the `mpi` feature), or a world of one process.
//!
//! Collectives are sums over ranks *in rank order*: every rank gathers every rank's values and
//! adds them 0, 1, ..., K-1, so the result has the same bits on every rank and does not depend on
//! timing (MPI's own reductions promise neither). Only the main thread calls them (the worker
//! threads never do), so MPI runs in its default single-threaded mode.

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// Environment variables that a launcher sets in each process it starts (Open MPI, PMIx, MPICH).
const LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"];

/// This process's place in the run: rank and number of processes.
pub struct World {
    rank: usize,
    size: usize,
    /// The rank among the processes of this machine (MPI's shared-memory split): which GPU is
    /// this process's.
    local_rank: usize,
    #[cfg(feature = "mpi")]
    comm: Option<Comm>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "World {{ rank: {}, size: {}, local rank: {} }}", self.rank, self.size, self.local_rank)
    }
}

/// MPI's world communicator. MPI handles are plain pointers the bindings mark neither Send nor
/// Sync; only the main thread uses them (module docs), which makes sharing the handle sound.
#[cfg(feature = "mpi")]
struct Comm(mpi::topology::SimpleCommunicator);
#[cfg(feature = "mpi")]
// SAFETY: see the type's docs: one thread makes every MPI call.
unsafe impl Send for Comm {}
#[cfg(feature = "mpi")]
// SAFETY: as above.
unsafe impl Sync for Comm {}

static WORLD: OnceLock<World> = OnceLock::new();

/// Keeps MPI initialised while it lives; dropping it finalises MPI (main holds it to the end).
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Whether a launcher (mpirun, srun) started this process as one of several.
fn launched_by_mpi() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// Joins the MPI world when a launcher started this process (once, before any other call here);
/// otherwise the world is this process alone. Without the `mpi` feature, a process started by
/// `mpirun -np K` with K > 1 is an error rather than K independent runs writing one folder.
pub fn init() -> Result<Guard> {
    #[cfg(feature = "mpi")]
    if launched_by_mpi() {
        use mpi::traits::Communicator;
        let universe = mpi::initialize().ok_or_else(|| Error::usage("MPI was initialised twice"))?;
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        // Open MPI sets no LOCAL_RANK: the processes that share this machine's memory are those
        // of one node, ranked by their world rank.
        let local_rank = comm.split_shared(comm.rank()).rank() as usize;
        WORLD
            .set(World { rank, size, local_rank, comm: Some(Comm(comm)) })
            .map_err(|_| Error::usage("dist::init: the world was already set"))?;
        return Ok(Guard { _universe: Some(universe) });
    }
    if launched_by_mpi() {
        let size = std::env::var("OMPI_COMM_WORLD_SIZE").or_else(|_| std::env::var("PMI_SIZE"));
        if size.as_deref().is_ok_and(|s| s != "1") {
            return Err(Error::usage(
                "started by mpirun with several processes, but this muscle was built without the `mpi` feature \
                 (cargo build --release --features mpi): each would train alone",
            ));
        }
    }
    Ok(Guard {
        #[cfg(feature = "mpi")]
        _universe: None,
    })
}

/// The world of this process (a world of one until [`init`] joined an MPI world).
pub fn world() -> &'static World {
    WORLD.get_or_init(|| World {
        rank: 0,
        size: 1,
        local_rank: 0,
        #[cfg(feature = "mpi")]
        comm: None,
    })
}

impl World {
    /// This process's rank, 0..size.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether this is rank 0 (the one that writes the run's files and prints).
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// This process's rank among the processes of its machine.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Rank 0's `bytes`, on every rank (NCCL's unique id, made on rank 0).
    pub fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mut all = self.gather_bytes(bytes)?;
        Ok(std::mem::take(&mut all[0]))
    }

    /// Every rank's `bytes`, in rank order (lengths may differ).
    pub fn gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        #[cfg(feature = "mpi")]
        if let Some(Comm(comm)) = &self.comm {
            use mpi::datatype::PartitionMut;
            use mpi::traits::CommunicatorCollectives;
            let n = i32::try_from(bytes.len()).map_err(|_| Error::usage("gather: more than 2^31 bytes"))?;
            let mut counts = vec![0i32; self.size];
            comm.all_gather_into(&n, &mut counts[..]);
            let displs: Vec<i32> = counts.iter().scan(0i32, |at, &c| Some(std::mem::replace(at, *at + c))).collect();
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            let mut all = vec![0u8; total];
            {
                let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                comm.all_gather_varcount_into(bytes, &mut part);
            }
            let mut out = Vec::with_capacity(self.size);
            for (&d, &c) in displs.iter().zip(&counts) {
                out.push(all[d as usize..(d + c) as usize].to_vec());
            }
            return Ok(out);
        }
        Ok(vec![bytes.to_vec()])
    }

    /// `v` summed over the ranks in rank order, on every rank (identical bits everywhere).
    pub fn sum_f32(&self, v: &mut [f32]) -> Result<()> {
        self.sum_ordered(v, 0.0f32)
    }

    /// `v` summed over the ranks in rank order, on every rank (identical bits everywhere).
    pub fn sum_f64(&self, v: &mut [f64]) -> Result<()> {
        self.sum_ordered(v, 0.0f64)
    }

    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    fn sum_ordered<T>(&self, v: &mut [T], zero: T) -> Result<()>
    where
        T: Copy + std::ops::Add<Output = T> + SumElem,
    {
        #[cfg(feature = "mpi")]
        if let Some(Comm(comm)) = &self.comm {
            let n = v.len();
            let mut all = Vec::new();
            all.try_reserve_exact(n * self.size).map_err(|_| {
                Error::new(
                    crate::error::ErrorKind::OutOfMemory,
                    format!("all-reduce: {n} values from {} ranks", self.size),
                )
            })?;
            all.resize(n * self.size, zero);
            T::all_gather(comm, v, &mut all);
            for (k, x) in v.iter_mut().enumerate() {
                let mut acc = all[k];
                for r in 1..self.size {
                    acc = acc + all[r * n + k];
                }
                *x = acc;
            }
        }
        Ok(())
    }
}

/// The element types the ordered sum gathers.
pub trait SumElem: Sized {
    /// Every rank's `v` into `all`, rank by rank.
    #[cfg(feature = "mpi")]
    fn all_gather(comm: &mpi::topology::SimpleCommunicator, v: &[Self], all: &mut [Self]);
}

impl SumElem for f32 {
    #[cfg(feature = "mpi")]
    fn all_gather(comm: &mpi::topology::SimpleCommunicator, v: &[f32], all: &mut [f32]) {
        use mpi::traits::CommunicatorCollectives;
        comm.all_gather_into(v, all);
    }
}

impl SumElem for f64 {
    #[cfg(feature = "mpi")]
    fn all_gather(comm: &mpi::topology::SimpleCommunicator, v: &[f64], all: &mut [f64]) {
        use mpi::traits::CommunicatorCollectives;
        comm.all_gather_into(v, all);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_of_one_sums_to_itself() {
        let w = World {
            rank: 0,
            size: 1,
            local_rank: 0,
            #[cfg(feature = "mpi")]
            comm: None,
        };
        let mut v = vec![1.5f32, -2.0];
        w.sum_f32(&mut v).expect("sum");
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(w.gather_bytes(b"abc").expect("gather"), vec![b"abc".to_vec()]);
        assert!(w.is_root());
        assert_eq!(w.broadcast_bytes(b"id").expect("broadcast"), b"id");
        assert_eq!(w.local_rank(), 0);
    }
}
