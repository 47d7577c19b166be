//! The device half of a data-parallel run's sums (`muscle::dist::device`) in a world of one:
//! NCCL's all-gather on a real GPU (the one-rank smoke test of scripts/gpu-check.sh), its
//! stand-in on the emulated device, and the ordered-sum kernel's division, against the host's.

use super::*;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_world_of_one_gathers_and_divides_on_the_device_as_the_host_does() {
    let test = "a_world_of_one_gathers_and_divides_on_the_device_as_the_host_does";
    with_gpu(test, |gpu| {
        use muscle::cuda::collective::{comm, nccl_present, sum_f32, sum_f64};
        if !gpu.is_emulated() && !nccl_present() {
            return skip(test, "NCCL (libnccl.so.2) is not loadable");
        }
        let world = muscle::dist::world();
        let comm = comm(gpu, world).expect("the device communicator");
        // 1000 values: not a multiple of a block; awkward magnitudes.
        let v = randv(1000, 3.0, 5);
        let send = gpu.upload(&v).expect("upload");
        let mut recv = gpu.zeros::<f32>(v.len()).expect("zeros");
        comm.all_gather(gpu, &send, &mut recv).expect("all_gather");
        assert_eq!(bits(&gpu.download(&recv).expect("download")), bits(&v));
        // A receive buffer shorter than ranks x count is refused before the call, naming it.
        let mut short = gpu.zeros::<f32>(v.len() - 1).expect("zeros");
        let e = comm.all_gather(gpu, &send, &mut short).expect_err("a short receive buffer");
        assert!(e.to_string().contains("recv"), "{e}");
        // The trainer's mean: one IEEE division per element, the host's bits (3 rounds).
        let mut x = gpu.upload(&v).expect("upload");
        sum_f32(gpu, world, &mut x, 3.0).expect("sum");
        let host: Vec<f32> = v.iter().map(|a| a / 3.0).collect();
        assert_eq!(bits(&gpu.download(&x).expect("download")), bits(&host));
        // A world of one leaves an f64 sum (the MI joint) as it is.
        let j: Vec<f64> = v.iter().map(|&a| a as f64 * 1e-3).collect();
        let mut y = gpu.upload(&j).expect("upload");
        sum_f64(gpu, world, &mut y).expect("sum");
        assert_eq!(gpu.download(&y).expect("download"), j);
    });
}
