//! Batch normalisation over (N, H, W) per channel, NCHW, parallel over channels, with an
//! optional fused LeakyReLU: y = act(gamma * (x - mean) / sqrt(var + eps) + beta).
//!
//! Fusing the activation saves a full read and write of the activation tensor in each direction;
//! the backward recomputes the activation's mask from x instead of storing it.

use crate::kernel_args::{BatchNormArgs, SyncPtr};
use crate::multiversion;
use rayon::prelude::*;

multiversion! {
    /// Shifted sums (sum of x - k, sum of (x - k)^2) of channels ch0 .. ch0 + ks.len() over
    /// the batch, shift `ks[j]` for channel ch0 + j, into `out` (overwritten).
    fn block_sums(x: &[f32], n: usize, c: usize, hw: usize, ch0: usize, ks: &[f32], out: &mut [(f64, f64)]) {
        out.fill((0.0, 0.0));
        for i in 0..n {
            for (j, (&k, o)) in ks.iter().zip(out.iter_mut()).enumerate() {
                let off = (i * c + ch0 + j) * hw;
                prefetch_next_image::<false>((x.as_ptr(), x.len()), off, hw, c * hw);
                let (a, b) = shifted_sums(&x[off..off + hw], k);
                o.0 += a;
                o.1 += b;
            }
        }
    }
}

multiversion! {
    /// dst = act(src * scale + shift) over one plane.
    fn normalize_plane(src: &[f32], dst: &mut [f32], scale: f32, shift: f32, slope: Option<f32>) {
        match slope {
            Some(a) => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = act(v * scale + shift, a)),
            None => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v * scale + shift),
        }
    }
}

multiversion! {
    /// Sums of dz and dz * xhat of channels ch0 .. ch0 + p.len() into `out` (overwritten),
    /// with dz = dy * act'(g * xhat + b) and `p[j]` channel ch0 + j's parameters.
    fn backward_sums(x: &[f32], dy: DyPlanes, n: usize, c: usize, hw: usize, ch0: usize, p: &[Plane], out: &mut [(f64, f64)]) {
        out.fill((0.0, 0.0));
        for i in 0..n {
            for (j, (q, o)) in p.iter().zip(out.iter_mut()).enumerate() {
                let off = (i * c + ch0 + j) * hw;
                prefetch_next_image::<false>((x.as_ptr(), x.len()), off, hw, c * hw);
                prefetch_next_image::<false>((dy.ptr, dy.len), off, hw, c * hw);
                let (mut s1, mut s2) = ([0.0f32; LANES], [0.0f32; LANES]);
                let (gs, xs) = (dy.plane(off, hw), &x[off..off + hw]);
                let mut cg = gs.chunks_exact(LANES);
                let mut cx = xs.chunks_exact(LANES);
                for (gc, xc) in (&mut cg).zip(&mut cx) {
                    for l in 0..LANES {
                        let xh = (xc[l] - q.mean) * q.invstd;
                        let dz = gc[l] * act_grad(q.g * xh + q.b, q.a);
                        s1[l] += dz;
                        s2[l] += dz * xh;
                    }
                }
                for (&gv, &xv) in cg.remainder().iter().zip(cx.remainder()) {
                    let xh = (xv - q.mean) * q.invstd;
                    let dz = gv * act_grad(q.g * xh + q.b, q.a);
                    s1[0] += dz;
                    s2[0] += dz * xh;
                }
                o.0 += s1.iter().map(|&v| v as f64).sum::<f64>();
                o.1 += s2.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
    }
}

multiversion! {
    /// dx = k * (dz - ma - xhat * mb) over one plane.
    fn backward_plane(
        x: &[f32],
        dy: &[f32],
        dst: &mut [f32],
        mean: f32,
        invstd: f32,
        g: f32,
        b: f32,
        a: f32,
        k: f32,
        ma: f32,
        mb: f32,
    ) {
        for ((d, &gv), &xv) in dst.iter_mut().zip(dy).zip(x) {
            let xh = (xv - mean) * invstd;
            let dz = gv * act_grad(g * xh + b, a);
            *d = k * (dz - ma - xh * mb);
        }
    }
}

/// Prefetches the plane `image` floats on from the `hw` floats at `off` of a buffer of `len`
/// floats at `p` (the same plane of the next image), when there is one: the loops visit one
/// image's planes of a channel block, then jump an image ahead, onto pages the hardware
/// prefetcher would start cold.
#[inline(always)]
fn prefetch_next_image<const WRITE: bool>((p, len): (*const f32, usize), off: usize, hw: usize, image: usize) {
    if off + image + hw <= len {
        crate::cpu::simd::prefetch::<WRITE>(p.wrapping_add(off + image), hw);
    }
}

/// One channel's (mean, biased var, invstd, scale, shift) from its sums of (x - k) and (x - k)^2
/// over `m` values (the shift k keeps the one-pass variance accurate).
fn channel_stats((s, q, k): (f64, f64, f32), m: f64, eps: f32, gamma: f32, beta: f32) -> (f32, f32, f32, f32, f32) {
    let mean_k = s / m;
    let var = (q / m - mean_k * mean_k).max(0.0);
    let mean = mean_k + k as f64;
    let invstd = 1.0 / (var + eps as f64).sqrt();
    let scale = (gamma as f64 * invstd) as f32;
    let shift = (beta as f64 - mean * gamma as f64 * invstd) as f32;
    (mean as f32, var as f32, invstd as f32, scale, shift)
}

/// Per-channel batch statistics saved by the training forward for the backward.
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// Biased batch variance per channel (what normalises).
    pub var: Vec<f32>,
    /// 1 / sqrt(var + eps).
    pub invstd: Vec<f32>,
    /// gamma * invstd, as the forward applied it.
    pub scale: Vec<f32>,
    /// beta - mean * gamma * invstd, as the forward applied it.
    pub shift: Vec<f32>,
}

/// running = (1 - momentum) running + momentum batch factor, per channel: batch norm's running
/// estimate (PyTorch's momentum; `factor` n / (n - 1) unbiases the variance, 1 for the mean).
/// CUDA twin: `batchnorm_running_fwd_f32` (same rounding, bit for bit).
pub fn batchnorm_running_fwd(running: &mut [f32], batch: &[f32], momentum: f32, factor: f32) {
    for (r, &b) in running.iter_mut().zip(batch) {
        *r = (1.0 - momentum) * *r + momentum * b * factor;
    }
}

/// Lanes of the explicit accumulators: independent partial sums let the compiler vectorise
/// (a plain f32 `sum()` is sequential because float addition is not associative).
const LANES: usize = 16;

/// One channel's backward constants: batch mean, 1 / std, gamma, beta, activation slope.
#[derive(Clone, Copy, Debug, Default)]
struct Plane {
    mean: f32,
    invstd: f32,
    g: f32,
    b: f32,
    a: f32,
}

/// dy as the backward's tasks read it, plane by plane: a shared slice, or the buffer that the
/// in-place backward overwrites with dx (each task reads and then writes only the planes of its
/// own channels, so no plane is read through here while it is being written).
#[derive(Clone, Copy)]
struct DyPlanes<'a> {
    ptr: *const f32,
    len: usize,
    _life: std::marker::PhantomData<&'a [f32]>,
}

// SAFETY: a read-only view; `over_dx` states when writes to the same buffer may run alongside.
unsafe impl Send for DyPlanes<'_> {}
unsafe impl Sync for DyPlanes<'_> {}

impl<'a> DyPlanes<'a> {
    /// The planes of a slice nothing writes.
    fn of(dy: &'a [f32]) -> Self {
        DyPlanes { ptr: dy.as_ptr(), len: dy.len(), _life: std::marker::PhantomData }
    }

    /// The planes of `len` floats at `p`, which the caller overwrites with dx.
    ///
    /// # Safety
    /// The buffer outlives `'a`, and no plane is written while a slice of it from `plane` lives.
    unsafe fn over_dx(p: SyncPtr, len: usize) -> Self {
        DyPlanes { ptr: p.ptr(), len, _life: std::marker::PhantomData }
    }

    /// The `hw` floats at `off`.
    fn plane(self, off: usize, hw: usize) -> &'a [f32] {
        assert!(off + hw <= self.len, "batch norm backward: plane {off}+{hw} past dy's {} floats", self.len);
        // SAFETY: in bounds (checked); no writer while the slice lives (`of`: a shared borrow;
        // `over_dx`: its contract).
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), hw) }
    }
}

/// Where the training backward writes dx.
#[derive(Clone, Copy)]
enum DxOut {
    /// A buffer of its own.
    Separate(SyncPtr),
    /// Over dy's planes, each after its last read.
    OverDy(SyncPtr),
}

/// Channels per task: enough that one image's planes of a task form a run of at least 1024
/// floats (up to c / 8). One plane per channel and image (256 bytes at 8 x 8) is too short for
/// the hardware prefetcher to ramp up, and each is a jump of c planes; a block's planes are
/// adjacent. Each channel's sums keep their order (image by image), so the results do not
/// depend on it.
fn channel_block(c: usize, hw: usize) -> usize {
    // At most an eighth of the channels, so tiny planes (1 x 1) still make 8 tasks.
    1024usize.div_ceil(hw.max(1)).min(c / 8).max(1)
}

/// Sums of (v - k) and (v - k)^2 over a slice, in f32 lanes, returned in f64.
#[inline(always)]
fn shifted_sums(xs: &[f32], k: f32) -> (f64, f64) {
    let mut s = [0.0f32; LANES];
    let mut q = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let d = c[l] - k;
            s[l] += d;
            q[l] += d * d;
        }
    }
    let (mut s1, mut q1) = (0.0f64, 0.0f64);
    for &v in chunks.remainder() {
        let d = (v - k) as f64;
        s1 += d;
        q1 += d * d;
    }
    (s1 + s.iter().map(|&v| v as f64).sum::<f64>(), q1 + q.iter().map(|&v| v as f64).sum::<f64>())
}

/// The activation's derivative factor given the pre-activation z.
#[inline(always)]
fn act_grad(z: f32, slope: f32) -> f32 {
    if z > 0.0 {
        1.0
    } else {
        slope
    }
}

#[inline(always)]
fn act(z: f32, slope: f32) -> f32 {
    if z > 0.0 {
        z
    } else {
        slope * z
    }
}

/// Training forward: normalise with the batch statistics (then LeakyReLU with `slope` when
/// given); returns the statistics.
pub fn batchnorm_train_fwd(args: &BatchNormArgs, x: &[f32], gamma: &[f32], beta: &[f32], y: &mut [f32]) -> BatchStats {
    let BatchNormArgs { n, c, hw, eps, slope } = *args;
    let len = n * c * hw;
    assert!(x.len() >= len && y.len() >= len && gamma.len() >= c && beta.len() >= c, "batch norm: short buffers");
    let m = (n * hw) as f64;
    let yp = SyncPtr(y.as_mut_ptr());
    let cb = channel_block(c, hw);
    let stats: Vec<(f32, f32, f32, f32, f32)> = (0..c.div_ceil(cb))
        .into_par_iter()
        .flat_map_iter(|blk| {
            let chs = blk * cb..((blk + 1) * cb).min(c);
            // Shifting by one sample of the channel keeps the one-pass variance accurate even
            // when |mean| >> std.
            let ks: Vec<f32> = chs.clone().map(|ch| x[ch * hw]).collect();
            let mut sums = vec![(0.0, 0.0); chs.len()];
            block_sums(x, n, c, hw, chs.start, &ks, &mut sums);
            let per_ch: Vec<(f32, f32, f32, f32, f32)> = chs
                .clone()
                .zip(sums.iter().zip(&ks))
                .map(|(ch, (&(s, q), &k))| channel_stats((s, q, k), m, eps, gamma[ch], beta[ch]))
                .collect();
            for i in 0..n {
                for (ch, st) in chs.clone().zip(&per_ch) {
                    let off = (i * c + ch) * hw;
                    prefetch_next_image::<true>((yp.ptr(), len), off, hw, c * hw);
                    // SAFETY: each (image, channel) plane is written by one task only.
                    let dst = unsafe { yp.slice(off, hw) };
                    normalize_plane(&x[off..off + hw], dst, st.3, st.4, slope);
                }
            }
            per_ch.into_iter()
        })
        .collect();
    BatchStats {
        mean: stats.iter().map(|s| s.0).collect(),
        var: stats.iter().map(|s| s.1).collect(),
        invstd: stats.iter().map(|s| s.2).collect(),
        scale: stats.iter().map(|s| s.3).collect(),
        shift: stats.iter().map(|s| s.4).collect(),
    }
}

/// The training forward's output again from its input and statistics: the same
/// `normalize_plane` over every plane, so the result equals the forward's bit for bit. What a
/// convolution's backward calls instead of keeping its batch-normalised input.
pub fn batchnorm_apply(args: &BatchNormArgs, x: &[f32], stats: &BatchStats, y: &mut [f32]) {
    let BatchNormArgs { n, c, hw, slope, .. } = *args;
    let len = n * c * hw;
    assert!(
        x.len() >= len && y.len() >= len && stats.scale.len() >= c && stats.shift.len() >= c,
        "batch norm apply: short buffers"
    );
    if hw == 0 {
        return;
    }
    // Planes in parallel, in runs long enough to pay for the fork.
    let min = (1usize << 14).div_ceil(hw);
    y[..len].par_chunks_mut(hw).zip(x[..len].par_chunks(hw)).enumerate().with_min_len(min).for_each(
        |(plane, (dst, src))| {
            let ch = plane % c;
            normalize_plane(src, dst, stats.scale[ch], stats.shift[ch], slope);
        },
    );
}

/// A sum over the processes of a data-parallel run (identity in a single process).
pub type Reduce<'a> = &'a dyn Fn(&mut [f64]) -> crate::error::Result<()>;

/// Synchronised batch norm's training forward (`--sync-bn`): the per-channel shifted sums of this
/// process's rows go through `reduce` (summed over the processes, each shifting channel ch by
/// the same `ks[ch]`), and the statistics are those of `rows` rows in all; then this process's
/// planes are normalised with them. With one process and the shift x[ch * hw] it computes
/// [`batchnorm_train_fwd`]'s statistics (the sums run channel by channel instead of in blocks).
pub fn batchnorm_train_fwd_synced(
    args: &BatchNormArgs,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    (ks, rows): (&[f32], usize),
    reduce: Reduce,
) -> crate::error::Result<BatchStats> {
    let BatchNormArgs { n, c, hw, eps, slope } = *args;
    let mut sums = vec![(0.0f64, 0.0f64); c];
    sums.par_iter_mut()
        .enumerate()
        .for_each(|(ch, o)| block_sums(x, n, c, hw, ch, &ks[ch..ch + 1], std::slice::from_mut(o)));
    let mut flat: Vec<f64> = sums.iter().flat_map(|&(a, b)| [a, b]).collect();
    reduce(&mut flat)?;
    let m = (rows * hw) as f64;
    let per_ch: Vec<(f32, f32, f32, f32, f32)> =
        (0..c).map(|ch| channel_stats((flat[2 * ch], flat[2 * ch + 1], ks[ch]), m, eps, gamma[ch], beta[ch])).collect();
    y[..n * c * hw].par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(plane, (dst, src))| {
        let st = per_ch[plane % c];
        normalize_plane(src, dst, st.3, st.4, slope);
    });
    Ok(BatchStats {
        mean: per_ch.iter().map(|s| s.0).collect(),
        var: per_ch.iter().map(|s| s.1).collect(),
        invstd: per_ch.iter().map(|s| s.2).collect(),
        scale: per_ch.iter().map(|s| s.3).collect(),
        shift: per_ch.iter().map(|s| s.4).collect(),
    })
}

/// Synchronised batch norm's training backward: the per-channel sums of dz and dz * xhat go
/// through `reduce` before dx (statistics of `rows` rows in all, as the forward's); dgamma and
/// dbeta stay this process's sums (the trainer averages the processes' gradients).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_bwd_synced(
    args: &BatchNormArgs,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &BatchStats,
    dx: Option<&mut [f32]>,
    (dgamma, dbeta): (&mut [f32], &mut [f32]),
    rows: usize,
    reduce: Reduce,
) -> crate::error::Result<()> {
    let BatchNormArgs { n, c, hw, slope, .. } = *args;
    let a = slope.unwrap_or(1.0);
    let p: Vec<Plane> = (0..c)
        .map(|ch| Plane { mean: stats.mean[ch], invstd: stats.invstd[ch], g: gamma[ch], b: beta[ch], a })
        .collect();
    let mut sums = vec![(0.0f64, 0.0f64); c];
    sums.par_iter_mut()
        .enumerate()
        .for_each(|(ch, o)| backward_sums(x, DyPlanes::of(dy), n, c, hw, ch, &p[ch..ch + 1], std::slice::from_mut(o)));
    for (ch, &(sdz, sdzx)) in sums.iter().enumerate() {
        dgamma[ch] = sdzx as f32;
        dbeta[ch] = sdz as f32;
    }
    let mut flat: Vec<f64> = sums.iter().flat_map(|&(a, b)| [a, b]).collect();
    reduce(&mut flat)?;
    if let Some(dx) = dx {
        let m = (rows * hw) as f64;
        dx[..n * c * hw].par_chunks_mut(hw).enumerate().for_each(|(plane, dst)| {
            let (ch, off) = (plane % c, plane * hw);
            let q = p[ch];
            let (k, ma, mb) = (q.g * q.invstd, (flat[2 * ch] / m) as f32, (flat[2 * ch + 1] / m) as f32);
            backward_plane(&x[off..off + hw], &dy[off..off + hw], dst, q.mean, q.invstd, q.g, q.b, q.a, k, ma, mb);
        });
    }
    Ok(())
}

/// Evaluation forward: normalise with running statistics (then LeakyReLU when given).
pub fn batchnorm_eval_fwd(
    args: &BatchNormArgs,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    y: &mut [f32],
) {
    let BatchNormArgs { c, hw, eps, slope, .. } = *args;
    y.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(plane, (dst, src))| {
        let ch = plane % c;
        let invstd = 1.0 / (var[ch] + eps).sqrt();
        let scale = gamma[ch] * invstd;
        let shift = beta[ch] - mean[ch] * scale;
        normalize_plane(src, dst, scale, shift, slope);
    });
}

/// Training backward: dx (overwritten, when given), and dgamma, dbeta (overwritten). With
/// `slope`, `dy` is the gradient of the activation's output.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_bwd(
    args: &BatchNormArgs,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &BatchStats,
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let len = args.n * args.c * args.hw;
    let dx_fits = dx.as_ref().is_none_or(|d| d.len() >= len);
    assert!(dy.len() >= len && dx_fits, "batch norm backward: short buffers");
    let out = dx.map(|d| DxOut::Separate(SyncPtr(d.as_mut_ptr())));
    train_bwd_blocks(args, x, DyPlanes::of(dy), out, (gamma, beta, stats), dgamma, dbeta, FUSED_BLOCK_BYTES);
}

/// [`batchnorm_train_bwd`] with dx written over dy (`grad` holds dy on entry and dx on return),
/// so that the backward needs no second activation-sized buffer: each plane's dy is copied aside
/// just before its dx overwrites it (after its channel's sums), so the bits are the same.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_bwd_in_place(
    args: &BatchNormArgs,
    x: &[f32],
    grad: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &BatchStats,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let len = args.n * args.c * args.hw;
    assert!(grad.len() >= len, "batch norm backward: short buffers");
    let p = SyncPtr(grad.as_mut_ptr());
    // SAFETY: `grad` is borrowed mutably for the whole call; `train_bwd_blocks` reads a plane
    // through `dy` only in its channel's task, before the same task writes it.
    let dy = unsafe { DyPlanes::over_dx(p, grad.len()) };
    train_bwd_blocks(args, x, dy, Some(DxOut::OverDy(p)), (gamma, beta, stats), dgamma, dbeta, FUSED_BLOCK_BYTES);
}

/// Bytes of x and dy per channel block up to which a block's dx follows its sums in the same
/// task, while the block is still in cache: measured on Zen 1 (512 KiB L2), wrn-28-2's 512 KiB
/// blocks gain a fifth of the backward's time, the convnet's 2.5 MiB ones (320 images) lose one
/// sixth against a separate pass over the planes in order.
const FUSED_BLOCK_BYTES: usize = 1 << 20;

/// The training backward: sums of dz and dz * xhat over blocks of adjacent channels
/// (`channel_block`), one task each, then each plane's dx, in the block's task when the block
/// fits `FUSED_BLOCK_BYTES`, else in a pass over the planes in memory order. Either order gives
/// the same bits: a plane's dx reads only its channel's sums.
#[allow(clippy::too_many_arguments)]
fn train_bwd_blocks(
    args: &BatchNormArgs,
    x: &[f32],
    dy: DyPlanes,
    dx: Option<DxOut>,
    (gamma, beta, stats): (&[f32], &[f32], &BatchStats),
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    fuse_up_to: usize,
) {
    let BatchNormArgs { n, c, hw, slope, .. } = *args;
    assert!(x.len() >= n * c * hw && gamma.len() >= c, "batch norm backward: short buffers");
    let m = (n * hw) as f64;
    let a = slope.unwrap_or(1.0);
    let p: Vec<Plane> = (0..c)
        .map(|ch| Plane { mean: stats.mean[ch], invstd: stats.invstd[ch], g: gamma[ch], b: beta[ch], a })
        .collect();
    // dx of the plane at `off` (channel `ch`, its sums `sdz`, `sdzx`); `aside` holds hw floats.
    let plane_dx = |out: DxOut, off: usize, ch: usize, (sdz, sdzx): (f64, f64), aside: &mut [f32]| {
        let q = p[ch];
        let (k, ma, mb) = (q.g * q.invstd, (sdz / m) as f32, (sdzx / m) as f32);
        let xs = &x[off..off + hw];
        match out {
            DxOut::Separate(d) => {
                // SAFETY: each (image, channel) plane is written by one task only.
                let dst = unsafe { d.slice(off, hw) };
                backward_plane(xs, dy.plane(off, hw), dst, q.mean, q.invstd, q.g, q.b, q.a, k, ma, mb);
            }
            DxOut::OverDy(d) => {
                aside.copy_from_slice(dy.plane(off, hw));
                // SAFETY: this task's plane, whose last read through `dy` was the copy.
                let dst = unsafe { d.slice(off, hw) };
                backward_plane(xs, aside, dst, q.mean, q.invstd, q.g, q.b, q.a, k, ma, mb);
            }
        }
    };
    let cb = channel_block(c, hw);
    let fused = n * cb * hw * 8 <= fuse_up_to;
    // dz = dy * act'(z), z = g * xhat + b; sums of dz and dz * xhat in f32 lanes.
    let sums: Vec<(f64, f64)> = (0..c.div_ceil(cb))
        .into_par_iter()
        .flat_map_iter(|blk| {
            let chs = blk * cb..((blk + 1) * cb).min(c);
            let mut sums = vec![(0.0, 0.0); chs.len()];
            backward_sums(x, dy, n, c, hw, chs.start, &p[chs.clone()], &mut sums);
            if let Some(out) = dx.filter(|_| fused) {
                let mut aside = vec![0.0f32; hw];
                for i in 0..n {
                    for (ch, &s) in chs.clone().zip(&sums) {
                        plane_dx(out, (i * c + ch) * hw, ch, s, &mut aside);
                    }
                }
            }
            sums
        })
        .collect();
    if let Some(out) = dx.filter(|_| !fused) {
        let min = (1usize << 14).div_ceil(hw.max(1));
        (0..n * c).into_par_iter().with_min_len(min).for_each_init(
            || vec![0.0f32; hw],
            |aside, plane| plane_dx(out, plane * hw, plane % c, sums[plane % c], aside),
        );
    }
    for (ch, (sdz, sdzx)) in sums.into_iter().enumerate() {
        dgamma[ch] = sdzx as f32;
        dbeta[ch] = sdz as f32;
    }
}

/// Evaluation backward (running statistics are constants): dx, dgamma, dbeta.
pub fn batchnorm_eval_bwd(
    args: &BatchNormArgs,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let BatchNormArgs { c, hw, eps, slope, .. } = *args;
    let a = slope.unwrap_or(1.0);
    dgamma.fill(0.0);
    dbeta.fill(0.0);
    let mut dx = dx;
    for (plane, (gs, xs)) in dy.chunks(hw).zip(x.chunks(hw)).enumerate() {
        let ch = plane % c;
        let invstd = 1.0 / (var[ch] + eps).sqrt();
        let (mut sg, mut sb) = (0.0f64, 0.0f64);
        for (j, (&gv, &xv)) in gs.iter().zip(xs).enumerate() {
            let xh = (xv - mean[ch]) * invstd;
            let dz = gv * act_grad(gamma[ch] * xh + beta[ch], a);
            sg += (dz * xh) as f64;
            sb += dz as f64;
            if let Some(d) = dx.as_deref_mut() {
                d[plane * hw + j] = dz * gamma[ch] * invstd;
            }
        }
        dgamma[ch] += sg as f32;
        dbeta[ch] += sb as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64, offset: f32) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed, 0);
        (0..n).map(|_| r.uniform() * 2.0 - 1.0 + offset).collect()
    }

    /// Training forward and backward against f64 loops, on shapes whose channels split into
    /// blocks of several, the last one partial (21 channels of 300: blocks of 2; 17 of 16),
    /// blocks of 5 (40 of 64), and one channel per block (planes past 1024 floats, or fewer
    /// than 16 channels).
    #[test]
    fn training_forward_and_backward_match_f64_loops() {
        assert_eq!((channel_block(21, 300), channel_block(17, 16), channel_block(40, 64)), (2, 2, 5));
        for &(n, c, hw) in &[(3, 21, 300), (2, 17, 16), (4, 40, 64), (2, 3, 1100), (5, 5, 9)] {
            let x = rand(n * c * hw, 1, 2.0);
            let dy = rand(n * c * hw, 2, 0.0);
            let gamma = rand(c, 3, 0.5);
            let beta = rand(c, 4, 0.0);
            let (eps, slope) = (1e-5f32, 0.1f32);
            let mut y = vec![0.0; x.len()];
            let args = BatchNormArgs { n, c, hw, eps, slope: Some(slope) };
            let stats = batchnorm_train_fwd(&args, &x, &gamma, &beta, &mut y);
            let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
            batchnorm_train_bwd(&args, &x, &dy, &gamma, &beta, &stats, Some(&mut dx), &mut dg, &mut db);
            let m = (n * hw) as f64;
            let at = |i: usize, ch: usize, p: usize| (i * c + ch) * hw + p;
            for ch in 0..c {
                let vals: Vec<(usize, f64)> =
                    (0..n).flat_map(|i| (0..hw).map(move |p| at(i, ch, p))).map(|k| (k, x[k] as f64)).collect();
                let mean = vals.iter().map(|v| v.1).sum::<f64>() / m;
                let var = vals.iter().map(|v| (v.1 - mean).powi(2)).sum::<f64>() / m;
                let invstd = 1.0 / (var + eps as f64).sqrt();
                assert!((stats.mean[ch] as f64 - mean).abs() < 1e-5, "{n}x{c}x{hw} mean {ch}");
                assert!((stats.var[ch] as f64 - var).abs() < 1e-5 * var.max(1.0), "{n}x{c}x{hw} var {ch}");
                let (g, b) = (gamma[ch] as f64, beta[ch] as f64);
                let (mut sdz, mut sdzx) = (0.0, 0.0);
                let mut dzs = Vec::new();
                for &(k, v) in &vals {
                    let xh = (v - mean) * invstd;
                    let z = g * xh + b;
                    let want = if z > 0.0 { z } else { slope as f64 * z };
                    assert!((y[k] as f64 - want).abs() < 1e-4, "{n}x{c}x{hw} y[{k}]: {} vs {want}", y[k]);
                    let dz = dy[k] as f64 * if z > 0.0 { 1.0 } else { slope as f64 };
                    sdz += dz;
                    sdzx += dz * xh;
                    dzs.push((k, dz, xh));
                }
                assert!((dg[ch] as f64 - sdzx).abs() < 1e-3, "{n}x{c}x{hw} dgamma {ch}: {} vs {sdzx}", dg[ch]);
                assert!((db[ch] as f64 - sdz).abs() < 1e-3, "{n}x{c}x{hw} dbeta {ch}: {} vs {sdz}", db[ch]);
                for (k, dz, xh) in dzs {
                    let want = g * invstd * (dz - sdz / m - xh * sdzx / m);
                    assert!((dx[k] as f64 - want).abs() < 1e-4, "{n}x{c}x{hw} dx[{k}]: {} vs {want}", dx[k]);
                }
            }
        }
    }

    /// The recompute a convolution's backward asks for, and the backward that writes dx over dy,
    /// are the forward's and the backward's own arithmetic: equal bit for bit, with and without
    /// the fused activation, on the block shapes of the f64 test.
    #[test]
    fn recompute_and_in_place_backward_are_bitwise_the_forward_and_backward() {
        for &(n, c, hw) in &[(3, 21, 300), (2, 17, 16), (4, 40, 64), (2, 3, 1100), (5, 5, 9)] {
            for slope in [Some(0.1f32), None] {
                let x = rand(n * c * hw, 11, 1.5);
                let dy = rand(n * c * hw, 12, 0.0);
                let (gamma, beta) = (rand(c, 13, 0.5), rand(c, 14, 0.0));
                let args = BatchNormArgs { n, c, hw, eps: 1e-5, slope };
                let (mut y, mut again) = (vec![0.0; x.len()], vec![f32::NAN; x.len()]);
                let stats = batchnorm_train_fwd(&args, &x, &gamma, &beta, &mut y);
                batchnorm_apply(&args, &x, &stats, &mut again);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&again), "{n}x{c}x{hw} {slope:?}: recomputed output");
                let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
                batchnorm_train_bwd(&args, &x, &dy, &gamma, &beta, &stats, Some(&mut dx), &mut dg, &mut db);
                let (mut grad, mut dg2, mut db2) = (dy.clone(), vec![0.0; c], vec![0.0; c]);
                batchnorm_train_bwd_in_place(&args, &x, &mut grad, &gamma, &beta, &stats, &mut dg2, &mut db2);
                assert_eq!(bits(&dx), bits(&grad), "{n}x{c}x{hw} {slope:?}: dx");
                assert_eq!((bits(&dg), bits(&db)), (bits(&dg2), bits(&db2)), "{n}x{c}x{hw} {slope:?}: dgamma, dbeta");
                // Both orders of the dx pass (in each block's task, or over the planes after all
                // the sums), into dy's buffer and into one of its own: the same bits.
                for fuse_up_to in [0, usize::MAX] {
                    for over_dy in [false, true] {
                        let (mut g, mut d, mut dg3, mut db3) =
                            (dy.clone(), vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
                        let (dyp, out) = if over_dy {
                            let p = SyncPtr(g.as_mut_ptr());
                            // SAFETY: `g` outlives the call and is written only through `out`.
                            (unsafe { DyPlanes::over_dx(p, g.len()) }, DxOut::OverDy(p))
                        } else {
                            (DyPlanes::of(&dy), DxOut::Separate(SyncPtr(d.as_mut_ptr())))
                        };
                        let prm = (&gamma[..], &beta[..], &stats);
                        train_bwd_blocks(&args, &x, dyp, Some(out), prm, &mut dg3, &mut db3, fuse_up_to);
                        let got = if over_dy { &g } else { &d };
                        let what = format!("{n}x{c}x{hw} {slope:?} fused up to {fuse_up_to} over dy {over_dy}");
                        assert_eq!(bits(&dx), bits(got), "{what}: dx");
                        assert_eq!((bits(&dg), bits(&db)), (bits(&dg3), bits(&db3)), "{what}: dgamma, dbeta");
                    }
                }
            }
        }
    }

    /// Synchronised batch norm with a stand-in for a second process that holds the same rows (the
    /// reduce doubles every sum, over 2n rows): the statistics, outputs and gradients are those of
    /// one process, so the sums, the shift and the row count meet as the true all-reduce needs.
    #[test]
    fn synced_batch_norm_over_a_duplicated_batch_is_the_single_process_one() {
        let (n, c, hw) = (3, 6, 50);
        let x = rand(n * c * hw, 5, 3.0);
        let dy = rand(n * c * hw, 6, 0.0);
        let (gamma, beta) = (rand(c, 7, 0.5), rand(c, 8, 0.0));
        let args = BatchNormArgs { n, c, hw, eps: 1e-5, slope: Some(0.1) };
        let (mut y, mut y2) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let stats = batchnorm_train_fwd(&args, &x, &gamma, &beta, &mut y);
        let double = |v: &mut [f64]| -> crate::error::Result<()> {
            v.iter_mut().for_each(|t| *t *= 2.0);
            Ok(())
        };
        let ks: Vec<f32> = (0..c).map(|ch| x[ch * hw]).collect();
        let synced = batchnorm_train_fwd_synced(&args, &x, &gamma, &beta, &mut y2, (&ks, 2 * n), &double).expect("fwd");
        for ch in 0..c {
            assert!((synced.mean[ch] - stats.mean[ch]).abs() < 1e-6 && (synced.var[ch] - stats.var[ch]).abs() < 1e-5);
        }
        assert!(y.iter().zip(&y2).all(|(a, b)| (a - b).abs() < 1e-5));
        let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
        batchnorm_train_bwd(&args, &x, &dy, &gamma, &beta, &stats, Some(&mut dx), &mut dg, &mut db);
        let (mut dx2, mut dg2, mut db2) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
        let grads = (&mut dg2[..], &mut db2[..]);
        batchnorm_train_bwd_synced(&args, &x, &dy, &gamma, &beta, &synced, Some(&mut dx2), grads, 2 * n, &double)
            .expect("bwd");
        assert!(dx.iter().zip(&dx2).all(|(a, b)| (a - b).abs() < 1e-5), "dx");
        assert!(dg.iter().zip(&dg2).chain(db.iter().zip(&db2)).all(|(a, b)| (a - b).abs() < 1e-4), "dgamma, dbeta");
    }
}
