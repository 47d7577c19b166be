/* The emulated CUDA device's C ABI (emu/runtime.cpp), for the Rust side (issue 22).
 *
 * Every function that can fail returns NULL on success or a one-line message: it stays valid
 * until the next call into the emulator from the same OS thread, so copy it at once. No
 * function aborts the process for a kernel's bug: a fault, a barrier or shuffle that cannot
 * complete, or a wrong argument is that message.
 *
 * Device memory is host memory mapped so that each buffer ends at an inaccessible page (and
 * starts after one): a kernel's read one element past the end faults at once. New buffers are
 * filled with 0xFF bytes (NaN as f32 and f64), as uninitialised device memory would hold
 * garbage. */
#ifndef CUDA_EMU_RUNTIME_H
#define CUDA_EMU_RUNTIME_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    unsigned int x, y, z;
} cuda_emu_dim3;

/* A new buffer of `bytes` bytes (0 is allowed) at *out. */
const char* cuda_emu_alloc(size_t bytes, void** out);
/* Frees a pointer cuda_emu_alloc returned. */
const char* cuda_emu_free(void* device);
/* Copies `bytes` bytes; each device range must lie inside one buffer. */
const char* cuda_emu_copy_htod(void* device_dst, const void* host_src, size_t bytes);
const char* cuda_emu_copy_dtoh(void* host_dst, const void* device_src, size_t bytes);
const char* cuda_emu_copy_dtod(void* device_dst, const void* device_src, size_t bytes);
/* Sets `bytes` bytes to `value` (its low byte). */
const char* cuda_emu_memset(void* device_dst, int value, size_t bytes);

/* 1 if a kernel of that name was built into the emulator, else 0. */
int cuda_emu_has_kernel(const char* name);

/* Runs kernel `name` on a grid of blocks and returns when it has finished. args[i] points to the
 * value of parameter i, arg_sizes[i] is its size in bytes (cuLaunchKernel's convention plus the
 * sizes); both are checked against the kernel's signature, pointer parameters must be null or
 * point into a device buffer, and the block must respect the kernel's __launch_bounds__.
 * shared_bytes (dynamic shared memory) must be 0: no kernel uses it. The schedule is read from
 * MUSCLE_CUDA_EMU_SCHEDULE at each launch: forward (the default), reverse, shuffle:SEED or
 * runahead. Launches from several OS threads run one at a time. */
const char* cuda_emu_launch(const char* name, cuda_emu_dim3 grid, cuda_emu_dim3 block, unsigned int shared_bytes,
                            void* const* args, const size_t* arg_sizes, size_t arg_count);

#ifdef __cplusplus
}
#endif

#endif
