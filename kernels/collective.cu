// The device half of a data-parallel run's sums (src/dist/device.rs): every rank's values,
// gathered rank after rank into one buffer (NCCL's all-gather, or its stand-in on the emulated
// device), added in rank order. The CPU twin is the host's ordered sum
// (`dist::World::sum_f32` / `sum_f64`, then the trainer's division by the number of ranks):
// the same adds in the same order and one IEEE division, so a data-parallel run gives the same
// bits on GPUs as on CPUs, and every rank the same bits (NCCL's own all-reduce promises neither:
// its ring order depends on the topology).
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros.

#include "common.cuh"

// sum_ranks_fwd_f32: out[i] = (parts[i] + parts[n + i] + ... + parts[(ranks - 1) n + i]) / divisor,
// added left to right. Reads parts (ranks x n); writes out (n). Launch: grid-stride, block 256.
extern "C" __global__ void sum_ranks_fwd_f32(const float* __restrict__ parts, float* __restrict__ out, long long n,
                                             int ranks, float divisor) {
    GRID_STRIDE(i, n) {
        float acc = parts[i];
        for (int r = 1; r < ranks; ++r) acc = __fadd_rn(acc, parts[(long long)r * n + i]);
        out[i] = __fdiv_rn(acc, divisor);
    }
}

// sum_ranks_double_fwd_f32: out[i] = parts[i] + parts[n + i] + ... + parts[(ranks - 1) n + i], left
// to right, on doubles (the MI joint's and batch norm's f64 sums; no division). The _f32 suffix is
// the models' precision, as for every kernel here. Reads parts (ranks x n); writes out (n).
// Launch: grid-stride, block 256.
extern "C" __global__ void sum_ranks_double_fwd_f32(const double* __restrict__ parts, double* __restrict__ out,
                                                    long long n, int ranks) {
    GRID_STRIDE(i, n) {
        double acc = parts[i];
        for (int r = 1; r < ranks; ++r) acc += parts[(long long)r * n + i];  // a lone add: nothing to contract
        out[i] = acc;
    }
}
