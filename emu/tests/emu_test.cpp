// emu/test.sh's tests of the emulated device, through its C ABI only: real kernels on small shapes
// (partial warps, blocks and tiles) against reference loops, with the same output bits under every
// schedule; then the bugs it must report (emu/tests/bad_kernels.cu and misuses of real kernels),
// each message printed.

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "../runtime.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
    if (!ok) {
        ++failures;
        printf("FAIL %s\n", what.c_str());
    }
}

// An emulator call that must succeed; the program stops if it does not.
void must(const char* err) {
    if (err != nullptr) {
        printf("FAIL unexpected error: %s\n", err);
        exit(1);
    }
}

// A device buffer of n T, freed at the end of its scope.
template <class T>
struct Device {
    T* ptr = nullptr;
    size_t n;
    explicit Device(size_t count) : n(count) { must(cuda_emu_alloc(n * sizeof(T), (void**)&ptr)); }
    explicit Device(const std::vector<T>& host) : Device(host.size()) {
        must(cuda_emu_copy_htod(ptr, host.data(), n * sizeof(T)));
    }
    ~Device() { must(cuda_emu_free(ptr)); }
    Device(const Device&) = delete;
    Device& operator=(const Device&) = delete;
    std::vector<T> read() const {
        std::vector<T> host(n);
        must(cuda_emu_copy_dtoh(host.data(), ptr, n * sizeof(T)));
        return host;
    }
};

// Launches `name` with the given arguments, their sizes taken from their C++ types.
template <class... A>
const char* launch(const char* name, cuda_emu_dim3 grid, cuda_emu_dim3 block, const A&... a) {
    void* args[] = {(void*)&a...};
    size_t sizes[] = {sizeof(A)...};
    return cuda_emu_launch(name, grid, block, 0, args, sizes, sizeof...(A));
}

unsigned blocks(long long n, unsigned per_block) { return (unsigned)((n + per_block - 1) / per_block); }

std::vector<float> random_floats(size_t n, float lo, float hi, unsigned seed) {
    std::vector<float> v(n);
    for (float& x : v) {
        seed = seed * 1664525u + 1013904223u;
        x = lo + (hi - lo) * (float)(seed >> 8) * (1.0f / 16777216.0f);
    }
    return v;
}

void set_schedule(const char* schedule) { setenv("MUSCLE_CUDA_EMU_SCHEDULE", schedule, 1); }

const char* const kSchedules[] = {"forward", "reverse", "shuffle:1", "shuffle:2", "runahead"};

// run() under every schedule; its outputs must have the same bits each time. Returns forward's.
template <class T>
std::vector<T> every_schedule(const std::string& test, const std::function<std::vector<T>()>& run) {
    std::vector<T> first;
    for (const char* schedule : kSchedules) {
        set_schedule(schedule);
        std::vector<T> out = run();
        if (schedule == kSchedules[0]) first = out;
        else
            check(out.size() == first.size() && memcmp(out.data(), first.data(), out.size() * sizeof(T)) == 0,
                  test + ": output bits differ between forward and " + schedule);
    }
    set_schedule("forward");
    return first;
}

// got within a relative tolerance of want, element by element.
template <class T, class U>
void check_close(const std::string& test, const std::vector<T>& got, const std::vector<U>& want, double tolerance) {
    check(got.size() == want.size(), test + ": size");
    for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
        double g = (double)got[i], w = (double)want[i];
        if (!(fabs(g - w) <= tolerance * (1.0 + fabs(w)))) {
            check(false, test + ": element " + std::to_string(i) + " is " + std::to_string(g) + ", expected " +
                             std::to_string(w));
            return;
        }
    }
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Row softmax as the CPU twin computes it, in f64 (the tolerance absorbs the order of the sums).
std::vector<double> softmax_rows(const std::vector<float>& x, int n, int C) {
    std::vector<double> y(x.size());
    for (int r = 0; r < n; ++r) {
        double m = -INFINITY, s = 0.0;
        for (int c = 0; c < C; ++c) m = fmax(m, x[r * C + c]);
        for (int c = 0; c < C; ++c) s += exp(x[r * C + c] - m);
        for (int c = 0; c < C; ++c) y[r * C + c] = exp(x[r * C + c] - m) / s;
    }
    return y;
}

// ---- Real kernels ----

// One warp per row, lanes striding twice over 45 columns, a partial last block of rows.
void softmax_fwd() {
    const int n = 37, C = 45;
    std::vector<float> x = random_floats(n * C, -4.0f, 4.0f, 1);
    Device<float> dx(x), dy(n * C);
    std::vector<float> y = every_schedule<float>("softmax_fwd_f32", [&] {
        must(launch("softmax_fwd_f32", {blocks(n, 8), 1, 1}, {256, 1, 1}, dx.ptr, dy.ptr, n, C));
        return dy.read();
    });
    check_close("softmax_fwd_f32", y, softmax_rows(x, n, C), 1e-6);
}

// Shuffles, then shared memory across a barrier: one block of 1024.
void reduce_mean() {
    const int n = 1000;
    std::vector<float> v = random_floats(n, -1.0f, 3.0f, 2);
    Device<float> dv(v), dout(1);
    std::vector<float> out = every_schedule<float>("reduce_mean_fwd_f32", [&] {
        must(launch("reduce_mean_fwd_f32", {1, 1, 1}, {1024, 1, 1}, dv.ptr, dout.ptr, n));
        return dout.read();
    });
    double sum = 0.0;
    for (float x : v) sum += x;
    check_close("reduce_mean_fwd_f32", out, std::vector<double>{sum / n}, 1e-7);
}

// C <= 32: softmax by shuffles, rows staged in shared memory, two parts of 256 rows (the second partial).
void mi_softmax_joint() {
    const int n = 300, C = 10, rows_per_part = 256, parts = 2;
    std::vector<float> a = random_floats(n * C, -3.0f, 3.0f, 3), b = random_floats(n * C, -3.0f, 3.0f, 4);
    Device<float> da(a), db(b), dz(n * C), dw(n * C), dp(parts * C * C);
    std::vector<float> all = every_schedule<float>("mi_softmax_joint_fwd_f32", [&] {
        must(launch("mi_softmax_joint_fwd_f32", {parts, 1, 1}, {256, 1, 1}, da.ptr, db.ptr, dz.ptr, dw.ptr, dp.ptr, n,
                    C, rows_per_part));
        std::vector<float> z = dz.read(), w = dw.read(), p = dp.read();
        z.insert(z.end(), w.begin(), w.end());
        z.insert(z.end(), p.begin(), p.end());
        return z;
    });
    std::vector<double> z = softmax_rows(a, n, C), w = softmax_rows(b, n, C), want = z;
    want.insert(want.end(), w.begin(), w.end());
    for (int p = 0; p < parts; ++p)
        for (int x = 0; x < C; ++x)
            for (int y = 0; y < C; ++y) {
                double s = 0.0;
                for (int r = p * rows_per_part; r < n && r < (p + 1) * rows_per_part; ++r) s += z[r * C + x] * w[r * C + y];
                want.push_back(s);
            }
    check_close("mi_softmax_joint_fwd_f32", all, want, 1e-5);
}

// C > 32: the register-tiled GEMM, two barriers per 16-row step, partial tiles (70 = 64 + 6).
void mi_joint() {
    const int n = 40, C = 70, rows_per_part = 24, parts = 2, tiles = 2;
    std::vector<float> z = random_floats(n * C, 0.0f, 1.0f, 5), w = random_floats(n * C, 0.0f, 1.0f, 6);
    Device<float> dz(z), dw(w), dp(parts * C * C);
    std::vector<float> got = every_schedule<float>("mi_joint_fwd_f32", [&] {
        must(launch("mi_joint_fwd_f32", {parts, tiles * tiles, 1}, {256, 1, 1}, dz.ptr, dw.ptr, dp.ptr, n, C,
                    rows_per_part));
        return dp.read();
    });
    std::vector<double> want;
    for (int p = 0; p < parts; ++p)
        for (int x = 0; x < C; ++x)
            for (int y = 0; y < C; ++y) {
                double s = 0.0;
                for (int r = p * rows_per_part; r < n && r < (p + 1) * rows_per_part; ++r)
                    s += (double)z[r * C + x] * w[r * C + y];
                want.push_back(s);
            }
    check_close("mi_joint_fwd_f32", got, want, 1e-5);
}

// C <= 32 backward: G^ staged in shared memory, w and z broadcast by __shfl_sync, warp sums.
void mi_bwd() {
    const int n = 37, C = 10;
    const float upstream = 1.5f;
    std::vector<float> z = random_floats(n * C, 0.0f, 1.0f, 7), w = random_floats(n * C, 0.0f, 1.0f, 8);
    std::vector<float> g = random_floats(C * C, -2.0f, 2.0f, 9);
    std::vector<double> stats = {0, 0, 0, 2.5, 0, 0, 0};
    Device<float> dz(z), dw(w), dg(g), dga(n * C), dgb(n * C), dup(std::vector<float>{upstream});
    Device<double> ds(stats);
    std::vector<float> got = every_schedule<float>("mi_bwd_f32", [&] {
        must(launch("mi_bwd_f32", {blocks(n, 8), 1, 1}, {256, 1, 1}, dz.ptr, dw.ptr, dg.ptr, ds.ptr, dup.ptr, dga.ptr,
                    dgb.ptr, n, C));
        std::vector<float> ga = dga.read(), gb = dgb.read();
        ga.insert(ga.end(), gb.begin(), gb.end());
        return ga;
    });
    std::vector<double> want(2 * n * C);
    const double scale = (float)(upstream / stats[3]);
    for (int r = 0; r < n; ++r) {
        std::vector<double> ua(C, 0.0), ub(C, 0.0);
        double da = 0.0, db = 0.0;
        for (int c = 0; c < C; ++c)
            for (int x = 0; x < C; ++x) {
                ua[c] += (double)w[r * C + x] * g[x * C + c];
                ub[c] += (double)z[r * C + x] * g[x * C + c];
            }
        for (int c = 0; c < C; ++c) {
            da += z[r * C + c] * ua[c];
            db += w[r * C + c] * ub[c];
        }
        for (int c = 0; c < C; ++c) {
            want[r * C + c] = scale * z[r * C + c] * (ua[c] - da);
            want[n * C + r * C + c] = scale * w[r * C + c] * (ub[c] - db);
        }
    }
    check_close("mi_bwd_f32", got, want, 1e-5);
}

// mi_finish_fwd_f32: one block of 1024 threads through eight block sums (barriers around shared
// scratch) of f64 entropies; no reference here (tests/gpu.rs has it), but any race would show as
// bits that differ between schedules, or as NaN.
void mi_finish() {
    const int C = 10;
    std::vector<float> counts = random_floats(C * C, 0.0f, 50.0f, 24);
    counts[3] = 0.0f;  // a clamped entry
    std::vector<double> j(counts.begin(), counts.end());
    Device<double> dj(C * C), dp(C * C), dvec(3 * C), dstats(7);
    Device<float> dg0(C * C), dghat(C * C), dloss(1);
    std::vector<double> got = every_schedule<double>("mi_finish_fwd_f32", [&] {
        must(cuda_emu_copy_htod(dj.ptr, j.data(), j.size() * sizeof(double)));
        must(launch("mi_finish_fwd_f32", {1, 1, 1}, {1024, 1, 1}, dj.ptr, dp.ptr, dvec.ptr, dg0.ptr, dghat.ptr,
                    dstats.ptr, dloss.ptr, C, 1.0f));
        std::vector<double> out = dstats.read(), p = dp.read();
        out.insert(out.end(), p.begin(), p.end());
        return out;
    });
    double sum = 0.0;
    for (double v : j) sum += v;
    check(std::all_of(got.begin(), got.end(), [](double v) { return std::isfinite(v); }), "mi_finish_fwd_f32: not finite");
    check_close("mi_finish_fwd_f32: s", std::vector<double>{got[3]}, std::vector<double>{sum}, 1e-12);
}

// __shfl_down_sync, widths below 32 and disjoint masks, by CUDA's definitions: a source lane past
// the end of the caller's segment gives the caller its own value.
void shuffle_variants() {
    const int threads = 64;
    Device<int> out(4 * threads);
    std::vector<int> got = every_schedule<int>("shuffle_variants", [&] {
        must(launch("shuffle_variants", {1, 1, 1}, {threads, 1, 1}, out.ptr));
        return out.read();
    });
    std::vector<int> want;
    for (int t = 0; t < threads; ++t) {
        int lane = t % 32;
        int x = lane ^ 9;
        want.push_back(lane + 3 < 32 ? lane + 3 : lane);
        want.push_back(10 * ((lane & ~15) + 5));
        want.push_back(x < (lane & ~7) + 8 ? x : lane);
        want.push_back(lane < 16 ? (lane + 1 < 16 ? lane + 1 : lane) : lane ^ 1);
    }
    check(got == want, "shuffle_variants: not CUDA's source lanes");
}

// Training forward: split sums over a block (shuffles, shared memory, a barrier), the per-channel
// finish, and the elementwise normalisation, which must equal the same f32 operations here.
void batchnorm() {
    const int N = 3, C = 5, hw = 49, splits = 2;
    const float eps = 1e-5f, slope = 0.1f;
    const long long total = (long long)N * C * hw;
    std::vector<float> x = random_floats(total, -2.0f, 5.0f, 10), gamma = random_floats(C, 0.5f, 1.5f, 11),
                       beta = random_floats(C, -1.0f, 1.0f, 12);
    Device<float> dx(x), dgamma(gamma), dbeta(beta), dy(total);
    Device<double> dpart(C * splits * 2);
    Device<float> stats(5 * C);  // mean, var, invstd, scale, shift
    float* s = stats.ptr;
    std::vector<float> got = every_schedule<float>("batchnorm", [&] {
        // No given shift (0): the kernels shift by each channel's first element.
        must(launch("batchnorm_stats_fwd_f32", {C, splits, 1}, {256, 1, 1}, dx.ptr, dx.ptr, dpart.ptr, N, C, hw, splits,
                    0));
        must(launch("batchnorm_finish_fwd_f32", {1, 1, 1}, {128, 1, 1}, dx.ptr, dx.ptr, dpart.ptr, dgamma.ptr,
                    dbeta.ptr, s, s + C, s + 2 * C, s + 3 * C, s + 4 * C, N, C, hw, splits, eps, 0));
        must(launch("batchnorm_norm_fwd_f32", {blocks(total, 256), 1, 1}, {256, 1, 1}, dx.ptr, s + 3 * C, s + 4 * C,
                    dy.ptr, total, C, hw, slope));
        std::vector<float> out = stats.read(), y = dy.read();
        out.insert(out.end(), y.begin(), y.end());
        return out;
    });
    std::vector<double> want(5 * C);
    for (int c = 0; c < C; ++c) {
        double sum = 0.0, sq = 0.0;
        for (int i = 0; i < N; ++i)
            for (int j = 0; j < hw; ++j) sum += x[(i * C + c) * hw + j];
        double mean = sum / (N * hw);
        for (int i = 0; i < N; ++i)
            for (int j = 0; j < hw; ++j) sq += (x[(i * C + c) * hw + j] - mean) * (x[(i * C + c) * hw + j] - mean);
        double var = sq / (N * hw), invstd = 1.0 / sqrt(var + eps);
        want[c] = mean;
        want[C + c] = var;
        want[2 * C + c] = invstd;
        want[3 * C + c] = gamma[c] * invstd;
        want[4 * C + c] = beta[c] - mean * gamma[c] * invstd;
    }
    check_close("batchnorm_finish_fwd_f32", std::vector<float>(got.begin(), got.begin() + 5 * C), want, 1e-5);
    std::vector<float> y(total);
    for (long long i = 0; i < total; ++i) {
        int c = (int)((i / hw) % C);
        float z = x[i] * got[3 * C + c] + got[4 * C + c];
        y[i] = z > 0.0f ? z : slope * z;
    }
    check(same_bits(std::vector<float>(got.begin() + 5 * C, got.end()), y),
          "batchnorm_norm_fwd_f32: not bit for bit the f32 operations");
}

// The __f*_rn kernels are bit for bit their CPU twin's operations (with -ffp-contract=off here too).
void adam_bits() {
    const long long n = 1000;
    const float param_scale = 0.999f, grad_decay = 0.0f, one_minus_beta1 = 0.1f, beta2 = 0.999f,
                one_minus_beta2 = 0.001f, step_size = 1e-3f, bias_correction2_sqrt = 0.03f, eps = 1e-8f;
    std::vector<float> p = random_floats(n, -1.0f, 1.0f, 13), g = random_floats(n, -1.0f, 1.0f, 14),
                       m = random_floats(n, -0.1f, 0.1f, 15), v = random_floats(n, 0.0f, 0.01f, 16);
    Device<float> dp(p), dg(g), dm(m), dv(v);
    must(launch("adam_step_fwd_f32", {blocks(n, 256), 1, 1}, {256, 1, 1}, dp.ptr, dg.ptr, dm.ptr, dv.ptr, n,
                param_scale, grad_decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt,
                eps));
    for (long long i = 0; i < n; ++i) {
        float pi = p[i] * param_scale, gi = g[i];
        float mi = m[i] + one_minus_beta1 * (gi - m[i]);
        float vi = v[i] * beta2 + (one_minus_beta2 * gi) * gi;
        float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
        p[i] = pi + (-step_size * mi) / denom;
        m[i] = mi;
        v[i] = vi;
    }
    check(same_bits(dp.read(), p) && same_bits(dm.read(), m) && same_bits(dv.read(), v),
          "adam_step_fwd_f32: not bit for bit the CPU's f32 operations");
}

// Launches from two OS threads at once run one at a time, each with its own result.
void two_threads() {
    const int n = 64, C = 20;
    std::vector<float> x = random_floats(n * C, -4.0f, 4.0f, 17);
    std::vector<double> want = softmax_rows(x, n, C);
    auto worker = [&] {
        Device<float> dx(x), dy(n * C);
        for (int i = 0; i < 20; ++i) {
            must(launch("softmax_fwd_f32", {blocks(n, 8), 1, 1}, {256, 1, 1}, dx.ptr, dy.ptr, n, C));
            check_close("softmax_fwd_f32 on two threads", dy.read(), want, 1e-6);
        }
    };
    std::thread other(worker);
    worker();
    other.join();
}

// ~1000 blocks x 256 threads with barriers and shuffles: well under a second with the x86-64
// context switch (glibc's swapcontext makes a system call at each switch: main's argument).
void speed(double limit_ms) {
    const int N = 10, C = 100, hw = 256, splits = 10;
    Device<float> x(random_floats((size_t)N * C * hw, -1.0f, 1.0f, 18));
    Device<double> part(C * splits * 2);
    auto t0 = std::chrono::steady_clock::now();
    must(launch("batchnorm_stats_fwd_f32", {C, splits, 1}, {256, 1, 1}, x.ptr, x.ptr, part.ptr, N, C, hw, splits, 0));
    auto t1 = std::chrono::steady_clock::now();
    const int n = 8000, classes = 100;
    Device<float> dx(random_floats((size_t)n * classes, -4.0f, 4.0f, 19)), dy((size_t)n * classes);
    must(launch("softmax_fwd_f32", {blocks(n, 8), 1, 1}, {256, 1, 1}, dx.ptr, dy.ptr, n, classes));
    auto t2 = std::chrono::steady_clock::now();
    double barrier_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    double shuffle_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
    printf("speed: batchnorm_stats_fwd_f32 1000 blocks x 256 threads %.0f ms; softmax_fwd_f32 1000 blocks x 256 "
           "threads %.0f ms\n", barrier_ms, shuffle_ms);
    check(barrier_ms < limit_ms && shuffle_ms < limit_ms,
          "speed: a launch of 1000 blocks x 256 threads took over " + std::to_string(limit_ms) + " ms");
}

// ---- What it must report ----

// A launch must fail with a message containing every one of `parts`.
void expect_error(const std::string& test, const char* err, std::initializer_list<const char*> parts) {
    if (err == nullptr) {
        check(false, test + ": no error");
        return;
    }
    printf("  %s: %s\n", test.c_str(), err);
    for (const char* part : parts)
        check(strstr(err, part) != nullptr, test + ": the message lacks `" + part + "`");
    check(strchr(err, '\n') == nullptr, test + ": the message is not one line");
}

void missing_barrier() {
    Device<float> v(random_floats(1000, 0.0f, 1.0f, 20)), out(1);
    std::vector<float> results;
    for (const char* schedule : {"forward", "reverse"}) {
        set_schedule(schedule);
        must(launch("mean_without_barrier", {1, 1, 1}, {256, 1, 1}, v.ptr, out.ptr, 1000));
        results.push_back(out.read()[0]);
    }
    set_schedule("forward");
    printf("  missing __syncthreads: forward gives %g, reverse %g\n", results[0], results[1]);
    check(isnan(results[0]) || !same_bits(std::vector<float>{results[0]}, std::vector<float>{results[1]}),
          "missing __syncthreads: same result under forward and reverse");
}

void block_errors() {
    Device<float> x(random_floats(256, 0.0f, 1.0f, 21)), y(256);
    for (const char* schedule : kSchedules) {
        set_schedule(schedule);
        std::string s = std::string(" (") + schedule + ")";
        expect_error("lane returns before a full-mask shuffle" + s,
                     launch("lane_returns_before_shuffle", {1, 1, 1}, {64, 1, 1}, x.ptr, y.ptr),
                     {"kernels/common.cuh:", "lane_returns_before_shuffle block (0,0,0) warp ",
                      " lane 3: returned while its warp waits for it at this __shfl_xor_sync (mask 0xffffffff)"});
        expect_error("lane at a barrier during a shuffle" + s,
                     launch("lane_at_barrier_during_shuffle", {1, 1, 1}, {64, 1, 1}, y.ptr),
                     {"kernels/common.cuh:", " lane 0: waits at __syncthreads (/",
                      ") while its warp waits for it at this __shfl_xor_sync (mask 0xffffffff)"});
        expect_error("lanes at different shuffles" + s,
                     launch("lanes_at_different_shuffles", {1, 1, 1}, {32, 1, 1}, y.ptr),
                     {"emu/tests/bad_kernels.cu:", "block (0,0,0) warp 0 lane ",
                      ": waits at __shfl_xor_sync (/"});
        expect_error("threads at different barriers" + s, launch("different_barriers", {1, 1, 1}, {128, 1, 1}, y.ptr),
                     {"emu/tests/bad_kernels.cu:", "different_barriers block (0,0,0) warp ",
                      ": waits at this __syncthreads while warp ", " waits at another, /"});
        expect_error("barrier after part of the block returned" + s,
                     launch("barrier_after_return", {1, 1, 1}, {128, 1, 1}, y.ptr, 100),
                     {"emu/tests/bad_kernels.cu:", "barrier_after_return block (0,0,0) warp 3 lane ",
                      ": returned while 100 threads of its block wait at this __syncthreads"});
    }
    set_schedule("forward");
}

void fault_errors() {
    const long long n = 1000;
    Device<float> a(random_floats(n, 0.0f, 1.0f, 22)), b(random_floats(n, 0.0f, 1.0f, 23)), y(n);
    // Element n is read by thread 1000: block 3, thread 232.
    expect_error("one past the end of a global buffer",
                 launch("add_fwd_f32", {blocks(n + 1, 256), 1, 1}, {256, 1, 1}, a.ptr, b.ptr, y.ptr, n + 1),
                 {"kernels/elementwise.cu:", "add_fwd_f32 block (3,0,0) warp 7 lane 8: SIGSEGV reading 0x",
                  ": 0 bytes past the end of argument ", "a 4000-byte buffer"});
    Device<int> out(32);
    expect_error("stack overflow", launch("stack_overflow", {1, 1, 1}, {32, 1, 1}, out.ptr, 1000),
                 {"emu/tests/bad_kernels.cu:", "stack_overflow block (0,0,0) warp 0 lane 0: SIGSEGV",
                  "overflowed its 128 KiB stack"});
    expect_error("integer division by zero", launch("divide_by_zero", {2, 1, 1}, {32, 1, 1}, out.ptr, 0),
                 {"emu/tests/bad_kernels.cu:", "divide_by_zero block (0,0,0) warp 0 lane 0: integer division by zero"});
}

void argument_errors() {
    const int n = 8, C = 4;
    Device<float> x(n * C), y(n * C);
    expect_error("8 bytes for an int", launch("softmax_fwd_f32", {1, 1, 1}, {256, 1, 1}, x.ptr, y.ptr, (long long)n, C),
                 {"kernels/softmax.cu:", ": softmax_fwd_f32: argument 2 (int n) takes 4 bytes, given 8"});
    expect_error("an argument missing", launch("softmax_fwd_f32", {1, 1, 1}, {256, 1, 1}, x.ptr, y.ptr, n),
                 {"softmax_fwd_f32: given 3 arguments, takes 4 (const float* x, float* y, int n, int C)"});
    float host[4] = {};
    expect_error("a host pointer", launch("softmax_fwd_f32", {1, 1, 1}, {256, 1, 1}, (const float*)host, y.ptr, n, C),
                 {"softmax_fwd_f32: argument 0 (const float* x) = 0x", " is not in a device buffer"});
    expect_error("too many threads", launch("reduce_mean_fwd_f32", {1, 1, 1}, {2048, 1, 1}, x.ptr, y.ptr, n),
                 {"reduce_mean_fwd_f32: grid (1,1,1), block (2048,1,1): more threads per block than the kernel's 1024"});
    expect_error("an unknown kernel", launch("softmax_fwd_f64", {1, 1, 1}, {256, 1, 1}, x.ptr),
                 {"no emulated kernel named `softmax_fwd_f64`"});
    set_schedule("sideways");
    expect_error("an unknown schedule", launch("softmax_fwd_f32", {1, 1, 1}, {256, 1, 1}, x.ptr, y.ptr, n, C),
                 {"MUSCLE_CUDA_EMU_SCHEDULE=sideways: expected forward, reverse, shuffle:SEED"});
    set_schedule("forward");
    std::vector<float> big(n * C + 1);
    expect_error("a copy past the end", cuda_emu_copy_htod(x.ptr, big.data(), big.size() * sizeof(float)),
                 {"cuda_emu_copy_htod: destination: 132 bytes at offset 0 of a 128-byte device buffer run past its end"});
    expect_error("freeing what is not a buffer", cuda_emu_free(x.ptr + 1), {"cuda_emu_free: 0x", "is not a buffer"});
    check(cuda_emu_has_kernel("softmax_fwd_f32") == 1 && cuda_emu_has_kernel("softmax_fwd_f64") == 0, "has_kernel");
}

}  // namespace

// emu_test [SPEED_LIMIT_MS]: the most one speed() launch may take, 1000 by default.
int main(int argc, char** argv) {
    softmax_fwd();
    reduce_mean();
    mi_softmax_joint();
    mi_joint();
    mi_bwd();
    mi_finish();
    shuffle_variants();
    batchnorm();
    adam_bits();
    two_threads();
    speed(argc > 1 ? atof(argv[1]) : 1000.0);
    printf("reported errors:\n");
    missing_barrier();
    block_errors();
    fault_errors();
    argument_errors();
    // After every kind of failure the emulator still runs kernels right.
    softmax_fwd();
    batchnorm();
    if (failures != 0) {
        printf("emu_test: %d failures\n", failures);
        return 1;
    }
    printf("emu_test: all passed\n");
    return 0;
}
