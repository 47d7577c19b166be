//! Matrix products through the `gemm` crate (AVX-512/AVX2 micro-kernels, rayon threads).

use gemm::Parallelism;

/// How a row-major matrix operand is stored.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Stored transposed: the logical r x c matrix is stored c x r row-major.
    pub trans: bool,
}

impl<'a> Mat<'a> {
    /// A matrix stored as it is used.
    pub fn n(data: &'a [f32]) -> Mat<'a> {
        Mat { data, trans: false }
    }
    /// A matrix used as the transpose of how it is stored.
    pub fn t(data: &'a [f32]) -> Mat<'a> {
        Mat { data, trans: true }
    }
    /// (row stride, column stride) of the logical rows x cols matrix.
    fn strides(&self, rows: usize, cols: usize) -> (isize, isize) {
        if self.trans {
            (1, rows as isize)
        } else {
            (cols as isize, 1)
        }
    }
}

/// C[m x n] = A[m x k] B[k x n] (+ C when `accumulate`); `threads` > 1 splits the product.
pub fn sgemm(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], accumulate: bool, threads: usize) {
    assert!(a.data.len() >= m * k && b.data.len() >= k * n && c.len() >= m * n, "sgemm operand sizes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (a_rs, a_cs) = a.strides(m, k);
    let (b_rs, b_cs) = b.strides(k, n);
    let flops = 2 * m * n * k;
    if threads > 1 && flops >= PAR_MIN_FLOPS && n >= 64 * threads {
        // Split the columns of C into one block per thread, each a single-threaded product:
        // this scales better on two cores than the crate's own threading, and each element's
        // sum is computed exactly as in the one-thread product.
        let cols = n.div_ceil(threads);
        let c_ptr = crate::kernel_args::SyncPtr(c.as_mut_ptr());
        rayon::scope(|sc| {
            for t in 0..threads {
                let j0 = t * cols;
                if j0 >= n {
                    break;
                }
                let nj = cols.min(n - j0);
                sc.spawn(move |_| {
                    // SAFETY: the blocks [j0, j0 + nj) of C's columns are disjoint; the operand
                    // offsets stay inside the slices checked above.
                    unsafe {
                        raw_gemm(
                            m,
                            nj,
                            k,
                            c_ptr.ptr().add(j0),
                            n as isize,
                            accumulate,
                            a.data.as_ptr(),
                            a_rs,
                            a_cs,
                            b.data.as_ptr().offset(j0 as isize * b_cs),
                            b_rs,
                            b_cs,
                            Parallelism::None,
                        );
                    }
                });
            }
        });
        return;
    }
    // SAFETY: the asserts above bound every index the strides reach inside the three slices,
    // and `c` is borrowed mutably so it aliases neither operand.
    unsafe {
        raw_gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_rs,
            a_cs,
            b.data.as_ptr(),
            b_rs,
            b_cs,
            Parallelism::None,
        );
    }
}

/// Products smaller than this run on one thread (splitting costs more than it saves).
const PAR_MIN_FLOPS: usize = 1 << 22;

/// The crate's product with row-major C of row stride `c_rs`.
#[allow(clippy::too_many_arguments)]
unsafe fn raw_gemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: isize,
    accumulate: bool,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    par: Parallelism,
) {
    gemm::gemm(m, n, k, c, 1, c_rs, accumulate, a, a_cs, a_rs, b, b_cs, b_rs, 1.0, 1.0, false, false, false, par);
}

/// The same product by plain loops in f64: the reference the tests hold `sgemm` to.
pub fn sgemm_naive(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    let (a_rs, a_cs) = a.strides(m, k);
    let (b_rs, b_cs) = b.strides(k, n);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += a.data[i * a_rs as usize + p * a_cs as usize] as f64
                    * b.data[p * b_rs as usize + j * b_cs as usize] as f64;
            }
            let dst = &mut c[i * n + j];
            *dst = if accumulate { *dst + s as f32 } else { s as f32 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::normal_vec;

    #[test]
    fn matches_naive_for_every_transpose_and_accumulate() {
        // The second size is large enough to take the split-by-columns path on 2 threads.
        for &(m, n, k) in &[(37, 29, 53), (64, 300, 200)] {
            let a = normal_vec(m * k, 1.0, 1);
            let b = normal_vec(k * n, 1.0, 2);
            for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
                for &acc in &[false, true] {
                    for &threads in &[1, 2] {
                        let am = Mat { data: &a, trans: ta };
                        let bm = Mat { data: &b, trans: tb };
                        let mut c1 = normal_vec(m * n, 1.0, 3);
                        let mut c2 = c1.clone();
                        sgemm(m, n, k, am, bm, &mut c1, acc, threads);
                        sgemm_naive(m, n, k, am, bm, &mut c2, acc);
                        for (x, y) in c1.iter().zip(&c2) {
                            assert!((x - y).abs() < 1e-3, "{m}x{n}x{k} {ta} {tb} {acc} {threads}: {x} vs {y}");
                        }
                    }
                }
            }
        }
    }
}
