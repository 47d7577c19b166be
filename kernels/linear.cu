// The dense layer's bias: broadcast over the rows before cuBLAS adds x W^T on top, and its
// gradient, the column sums of the output gradient. CPU twins: src/ops/linear/cpu.rs. The
// products themselves are cuBLAS SGEMMs (src/cuda/blas.rs).
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros.

#include "common.cuh"

// bias_rows_fwd_f32: y[r, j] = b[j] for every row r of an rows x cols matrix: the dense layer's
// bias, written before cuBLAS adds x W^T on top (beta = 1). Reads b; writes y.
extern "C" __global__ void bias_rows_fwd_f32(const float* __restrict__ b, float* __restrict__ y, long long rows,
                                             int cols) {
    GRID_STRIDE(i, rows * cols) { y[i] = b[i % cols]; }
}

// bias_grad_bwd_f32: db[j] = sum over rows of g[r, j], one thread per column summing in row order,
// which is the CPU's order (bit-identical). The reads are coalesced across the threads of a warp
// (adjacent columns); rows are the batch (hundreds), so one pass per column is cheap next to the
// GEMMs around it. Reads g; writes db.
extern "C" __global__ void bias_grad_bwd_f32(const float* __restrict__ g, float* __restrict__ db, int rows,
                                             int cols) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r < rows; ++r) acc += g[(long long)r * cols + j];
        db[j] = acc;
    }
}
