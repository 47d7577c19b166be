// The shuffle variants no kernel of kernels/ uses yet, with segment widths, the four types and two
// half-warp groups at different shuffles: what emu/tests/emu_test.cpp checks against CUDA's rules.

#include "common.cuh"

// out[4 t + k] for thread t: the k-th shuffle's result, as an int.
extern "C" __global__ void shuffle_variants(int* __restrict__ out) {
    const int lane = threadIdx.x % WARP;
    int* o = out + 4 * threadIdx.x;
    o[0] = __shfl_down_sync(FULL_MASK, lane, 3);
    o[1] = (int)__shfl_sync(FULL_MASK, 10u * lane, 5, 16);
    o[2] = (int)__shfl_xor_sync(FULL_MASK, (double)lane, 9, 8);
    if (lane < 16) {
        o[3] = (int)__shfl_down_sync(0x0000ffffu, (float)lane, 1, 16);
    } else {
        o[3] = __shfl_xor_sync(0xffff0000u, lane, 1);
    }
}
