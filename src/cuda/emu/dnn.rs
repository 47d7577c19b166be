//! The emulated device's cuDNN stand-in: 2-D convolution forward, backward-data and
//! backward-filter as reference loops behind cuDNN's own conventions: tensor, filter and
//! convolution descriptors (checked as cudnnSet*Descriptor would: NCHW layout, positive sizes,
//! channels that agree, an output descriptor equal to cudnnGetConvolution2dForwardOutputDim),
//! an algorithm chosen by a "heuristic", a workspace whose size the algorithm dictates (and that
//! the stand-in really writes, so an undersized one hits the guard page), alpha and beta (the
//! output not read when beta is 0). What it tests is the project's mapping onto cuDNN
//! (`ops::conv::cuda`), not cuDNN.
//!
//! Its heuristic answers the backward passes with the algorithms cuDNN documents as
//! non-deterministic (data ALGO_0, filter ALGO_0), and it refuses to run those: the project must
//! replace them (it does, for bit-repeatable runs), and the emulated suite fails if it stops.

use super::EmuBuffer;
use crate::error::{Error, Result};
pub use cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t as DataAlgo, cudnnConvolutionBwdFilterAlgo_t as FilterAlgo,
    cudnnConvolutionFwdAlgo_t as FwdAlgo, cudnnConvolutionMode_t as Mode, cudnnTensorFormat_t as Format,
};

fn bad(what: impl std::fmt::Display) -> Error {
    Error::device(format!("emulated cuDNN: CUDNN_STATUS_BAD_PARAM: {what}"))
}

fn positive(what: &str, dims: &[i32]) -> Result<()> {
    if dims.iter().any(|&d| d <= 0) {
        return Err(bad(format!("{what} dims {dims:?} must all be positive")));
    }
    Ok(())
}

/// What a 4-d descriptor describes: a tensor (n, c, h, w) or a filter (k, c, r, s).
pub trait DescKind {
    /// Its name in errors.
    const WHAT: &'static str;
}

/// Marks tensor descriptors (cudnnSetTensor4dDescriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfTensor;
/// Marks filter descriptors (cudnnSetFilter4dDescriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfFilter;

impl DescKind for OfTensor {
    const WHAT: &'static str = "tensor";
}
impl DescKind for OfFilter {
    const WHAT: &'static str = "filter";
}

/// A packed 4-d NCHW descriptor; the kind keeps a filter from standing where a tensor goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc4d<K> {
    /// n, c, h, w for a tensor; k, c, r, s for a filter.
    pub dims: [i32; 4],
    kind: std::marker::PhantomData<K>,
}

/// A tensor descriptor.
pub type TensorDesc = Desc4d<OfTensor>;
/// A filter descriptor (KCRS).
pub type FilterDesc = Desc4d<OfFilter>;

impl<K: DescKind> Desc4d<K> {
    /// A descriptor of `dims` in `format` (only NCHW, the project's layout).
    pub fn new(format: Format, dims: [i32; 4]) -> Result<Desc4d<K>> {
        if format != Format::CUDNN_TENSOR_NCHW {
            return Err(bad(format!("{} format {format:?}: the stand-in knows NCHW only", K::WHAT)));
        }
        positive(K::WHAT, &dims)?;
        Ok(Desc4d { dims, kind: std::marker::PhantomData })
    }

    fn len(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
}

/// A 2-d convolution descriptor (cudnnSetConvolution2dDescriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDesc {
    /// Zero padding, rows and columns.
    pub pad: [i32; 2],
    /// Stride, rows and columns.
    pub stride: [i32; 2],
    /// Dilation, rows and columns.
    pub dilation: [i32; 2],
    /// Cross-correlation (no filter flip) or convolution (flipped).
    pub mode: Mode,
}

impl ConvDesc {
    /// Checks the values as cuDNN does: padding >= 0, stride and dilation > 0.
    pub fn new(pad: [i32; 2], stride: [i32; 2], dilation: [i32; 2], mode: Mode) -> Result<ConvDesc> {
        if pad.iter().any(|&p| p < 0) {
            return Err(bad(format!("padding {pad:?} is negative")));
        }
        positive("stride", &stride)?;
        positive("dilation", &dilation)?;
        Ok(ConvDesc { pad, stride, dilation, mode })
    }

    /// cudnnGetConvolution2dForwardOutputDim: the output tensor's dims for input `x`, filter `w`.
    pub fn output_dim(&self, x: &TensorDesc, w: &FilterDesc) -> Result<[i32; 4]> {
        if x.dims[1] != w.dims[1] {
            return Err(bad(format!("input has {} channels, the filter {}", x.dims[1], w.dims[1])));
        }
        let out = |i: usize| {
            let span = 1 + (w.dims[2 + i] - 1) * self.dilation[i];
            1 + (x.dims[2 + i] + 2 * self.pad[i] - span).div_euclid(self.stride[i])
        };
        let dims = [x.dims[0], w.dims[0], out(0), out(1)];
        positive("output", &dims)?;
        Ok(dims)
    }
}

/// The descriptors of one convolution after the checks cuDNN's convolution calls make.
struct Geometry {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
}

impl Geometry {
    fn new(x: &TensorDesc, w: &FilterDesc, y: &TensorDesc, conv: &ConvDesc) -> Result<Geometry> {
        let want = conv.output_dim(x, w)?;
        if y.dims != want {
            return Err(bad(format!("output descriptor {:?}, the convolution gives {want:?}", y.dims)));
        }
        Ok(Geometry { x: *x, w: *w, y: *y, conv: *conv })
    }

    /// The output columns q whose input column q * stride + off lies in the image.
    fn columns(&self, off: i32) -> std::ops::Range<usize> {
        let (stride, width, q) = (self.conv.stride[1], self.x.dims[3], self.y.dims[3]);
        let lo = if off >= 0 { 0 } else { (-off + stride - 1) / stride };
        let hi = if width <= off { 0 } else { ((width - off + stride - 1) / stride).min(q) };
        lo as usize..hi.max(lo) as usize
    }

    /// The input row of output row `p` at filter row `r`, if it lies inside the image.
    fn row(&self, p: usize, r: usize) -> Option<usize> {
        let h = p as i32 * self.conv.stride[0] - self.conv.pad[0] + r as i32 * self.conv.dilation[0];
        (0..self.x.dims[2]).contains(&h).then_some(h as usize)
    }

    /// Index into the filter of tap (r, s) of channels (k, c): flipped in convolution mode.
    fn filter_index(&self, k: usize, c: usize, r: usize, s: usize) -> usize {
        let [_, cc, rr, ss] = self.w.dims.map(|d| d as usize);
        let (r, s) = if self.conv.mode == Mode::CUDNN_CONVOLUTION { (rr - 1 - r, ss - 1 - s) } else { (r, s) };
        ((k * cc + c) * rr + r) * ss + s
    }

    /// Calls `f(x_at, y_at, len, stride)` for every run of multiplies between input channel `c`
    /// of image `n` and output channel `k`'s plane at filter tap (r, s): input elements x_at +
    /// i stride pair with output elements y_at + i, i < len. In a fixed order: output row p,
    /// then the run along q.
    fn runs(&self, n: usize, c: usize, k: usize, r: usize, s: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let [_, cc, h, w] = self.x.dims.map(|d| d as usize);
        let [_, kk, p, q] = self.y.dims.map(|d| d as usize);
        let off = s as i32 * self.conv.dilation[1] - self.conv.pad[1];
        let cols = self.columns(off);
        if cols.is_empty() {
            return;
        }
        let stride = self.conv.stride[1] as usize;
        for pi in 0..p {
            let Some(hi) = self.row(pi, r) else { continue };
            let x_row = ((n * cc + c) * h + hi) * w;
            let x_at = (x_row as i64 + (cols.start * stride) as i64 + off as i64) as usize;
            let y_at = ((n * kk + k) * p + pi) * q + cols.start;
            f(x_at, y_at, cols.len(), stride);
        }
    }

    /// n, c, k, r, s.
    fn loops(&self) -> [usize; 5] {
        let [n, c, _, _] = self.x.dims.map(|d| d as usize);
        let [k, _, r, s] = self.w.dims.map(|d| d as usize);
        [n, c, k, r, s]
    }

    /// y = conv(x, w): one output image per task; each output element sums over c, r, s.
    fn forward(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        use rayon::prelude::*;
        let [_, c, k, r, s] = self.loops();
        let per_image = self.y.len() / self.y.dims[0] as usize;
        let mut y = vec![0.0f32; self.y.len()];
        y.par_chunks_mut(per_image).enumerate().for_each(|(n, yn)| {
            let base = n * per_image;
            for ki in 0..k {
                for ci in 0..c {
                    for ri in 0..r {
                        for si in 0..s {
                            let wv = w[self.filter_index(ki, ci, ri, si)];
                            self.runs(n, ci, ki, ri, si, |xa, ya, len, st| {
                                let out = &mut yn[ya - base..ya - base + len];
                                if st == 1 {
                                    // Contiguous runs (stride 1) as slices, so the loop vectorises.
                                    out.iter_mut().zip(&x[xa..xa + len]).for_each(|(o, &v)| *o += v * wv);
                                } else {
                                    out.iter_mut().enumerate().for_each(|(i, o)| *o += x[xa + i * st] * wv);
                                }
                            });
                        }
                    }
                }
            }
        });
        y
    }

    /// dx = conv_transpose(dy, w): one input image per task.
    fn backward_data(&self, dy: &[f32], w: &[f32]) -> Vec<f32> {
        use rayon::prelude::*;
        let [_, c, k, r, s] = self.loops();
        let per_image = self.x.len() / self.x.dims[0] as usize;
        let mut dx = vec![0.0f32; self.x.len()];
        dx.par_chunks_mut(per_image).enumerate().for_each(|(n, dxn)| {
            let base = n * per_image;
            for ci in 0..c {
                for ki in 0..k {
                    for ri in 0..r {
                        for si in 0..s {
                            let wv = w[self.filter_index(ki, ci, ri, si)];
                            self.runs(n, ci, ki, ri, si, |xa, ya, len, st| {
                                let dyr = &dy[ya..ya + len];
                                if st == 1 {
                                    let out = &mut dxn[xa - base..xa - base + len];
                                    out.iter_mut().zip(dyr).for_each(|(o, &v)| *o += v * wv);
                                } else {
                                    dyr.iter().enumerate().for_each(|(i, &v)| dxn[xa - base + i * st] += v * wv);
                                }
                            });
                        }
                    }
                }
            }
        });
        dx
    }

    /// dw = corr(x, dy): one filter tap per task, summed over images, rows and columns.
    fn backward_filter(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        use rayon::prelude::*;
        let [n, c, _, r, s] = self.loops();
        let mut dw = vec![0.0f32; self.w.len()];
        // The task of stored index (k, c, r, s) is its own tap; in convolution mode the flip maps
        // taps one to one, so each task still writes one element.
        dw.par_iter_mut().enumerate().for_each(|(idx, out)| {
            let (si, rest) = (idx % s, idx / s);
            let (ri, rest) = (rest % r, rest / r);
            let (ci, ki) = (rest % c, rest / c);
            // The tap whose filter_index is idx (its own inverse).
            let fi = self.filter_index(ki, ci, ri, si);
            let (tr, ts) = ((fi / s) % r, fi % s);
            let mut acc = 0.0f32;
            for ni in 0..n {
                self.runs(ni, ci, ki, tr, ts, |xa, ya, len, st| {
                    for i in 0..len {
                        acc += x[xa + i * st] * dy[ya + i];
                    }
                });
            }
            *out = acc;
        });
        dw
    }
}

fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::device(format!(
            "emulated cuDNN: {what} holds {have} elements, its descriptor describes {need}"
        )));
    }
    Ok(())
}

/// Checks the workspace the caller passed against what `required` bytes the algorithm needs,
/// then writes all of it (a buffer shorter than the size claimed hits the guard page).
fn use_workspace(workspace: Option<&mut EmuBuffer<u8>>, bytes: usize, required: usize) -> Result<()> {
    if bytes < required {
        return Err(Error::device(format!(
            "emulated cuDNN: CUDNN_STATUS_BAD_PARAM: workspace of {bytes} bytes, the algorithm needs {required}"
        )));
    }
    match workspace {
        None if bytes > 0 => Err(bad(format!("a null workspace of {bytes} bytes"))),
        None => Ok(()),
        Some(ws) => {
            check_len("workspace", ws.len(), bytes)?;
            ws.write_host(&vec![0xA5u8; bytes])
        }
    }
}

/// out = alpha * acc + beta * out (out not read when beta is 0), written back to `dst`.
fn blend(dst: &mut EmuBuffer<f32>, len: usize, acc: &[f32], alpha: f32, beta: f32) -> Result<()> {
    let mut out = if beta == 0.0 { vec![0.0; len] } else { dst.to_host()?[..len].to_vec() };
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = if beta == 0.0 { alpha * a } else { alpha * a + beta * *o };
    }
    dst.write_host(&out)
}

/// The forward algorithm the stand-in's heuristic returns (cudnnGetConvolutionForwardAlgorithm_v7).
pub fn pick_forward(_x: &TensorDesc, _w: &FilterDesc, _conv: &ConvDesc) -> FwdAlgo {
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM
}

/// The backward-data algorithm of the heuristic: ALGO_0, which cuDNN documents as
/// non-deterministic (the project must not use it).
pub fn pick_backward_data(_x: &TensorDesc, _w: &FilterDesc, _conv: &ConvDesc) -> DataAlgo {
    DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0
}

/// The backward-filter algorithm of the heuristic: ALGO_0 (non-deterministic, likewise).
pub fn pick_backward_filter(_x: &TensorDesc, _w: &FilterDesc, _conv: &ConvDesc) -> FilterAlgo {
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0
}

/// Workspace bytes of a forward algorithm (IMPLICIT_GEMM needs none, the others a column
/// buffer of the input patches).
pub fn forward_workspace(algo: FwdAlgo, x: &TensorDesc, w: &FilterDesc) -> usize {
    match algo {
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM => 0,
        _ => 4 * x.len() * (w.dims[2] * w.dims[3]) as usize,
    }
}

/// Workspace bytes of a backward-data algorithm (none).
pub fn backward_data_workspace(_algo: DataAlgo) -> usize {
    0
}

/// Workspace bytes of a backward-filter algorithm: ALGO_1 stages partial filter sums (one filter
/// of f32), so the project's workspace path is exercised.
pub fn backward_filter_workspace(algo: FilterAlgo, w: &FilterDesc) -> usize {
    match algo {
        FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1 => 4 * w.len(),
        _ => 0,
    }
}

/// cudnnConvolutionForward: y = alpha conv(x, w) + beta y.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    alpha: f32,
    x_desc: &TensorDesc,
    x: &EmuBuffer<f32>,
    w_desc: &FilterDesc,
    w: &EmuBuffer<f32>,
    conv: &ConvDesc,
    algo: FwdAlgo,
    workspace: Option<&mut EmuBuffer<u8>>,
    workspace_bytes: usize,
    beta: f32,
    y_desc: &TensorDesc,
    y: &mut EmuBuffer<f32>,
) -> Result<()> {
    let g = Geometry::new(x_desc, w_desc, y_desc, conv)?;
    check_len("x", x.len(), g.x.len())?;
    check_len("w", w.len(), g.w.len())?;
    check_len("y", y.len(), g.y.len())?;
    use_workspace(workspace, workspace_bytes, forward_workspace(algo, x_desc, w_desc))?;
    let (xv, wv) = (x.to_host()?, w.to_host()?);
    let acc = g.forward(&xv, &wv);
    blend(y, g.y.len(), &acc, alpha, beta)
}

/// cudnnConvolutionBackwardData: dx = alpha conv_transpose(dy, w) + beta dx.
#[allow(clippy::too_many_arguments)]
pub fn backward_data(
    alpha: f32,
    w_desc: &FilterDesc,
    w: &EmuBuffer<f32>,
    dy_desc: &TensorDesc,
    dy: &EmuBuffer<f32>,
    conv: &ConvDesc,
    algo: DataAlgo,
    workspace: Option<&mut EmuBuffer<u8>>,
    workspace_bytes: usize,
    beta: f32,
    dx_desc: &TensorDesc,
    dx: &mut EmuBuffer<f32>,
) -> Result<()> {
    if algo == DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0 {
        return Err(Error::device(
            "emulated cuDNN: backward-data ALGO_0 accumulates with atomics (non-deterministic); the project must not pick it",
        ));
    }
    let g = Geometry::new(dx_desc, w_desc, dy_desc, conv)?;
    check_len("w", w.len(), g.w.len())?;
    check_len("dy", dy.len(), g.y.len())?;
    check_len("dx", dx.len(), g.x.len())?;
    use_workspace(workspace, workspace_bytes, backward_data_workspace(algo))?;
    let (wv, dyv) = (w.to_host()?, dy.to_host()?);
    let acc = g.backward_data(&dyv, &wv);
    blend(dx, g.x.len(), &acc, alpha, beta)
}

/// cudnnConvolutionBackwardFilter: dw = alpha corr(x, dy) + beta dw.
#[allow(clippy::too_many_arguments)]
pub fn backward_filter(
    alpha: f32,
    x_desc: &TensorDesc,
    x: &EmuBuffer<f32>,
    dy_desc: &TensorDesc,
    dy: &EmuBuffer<f32>,
    conv: &ConvDesc,
    algo: FilterAlgo,
    workspace: Option<&mut EmuBuffer<u8>>,
    workspace_bytes: usize,
    beta: f32,
    dw_desc: &FilterDesc,
    dw: &mut EmuBuffer<f32>,
) -> Result<()> {
    if matches!(algo, FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0 | FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3)
    {
        return Err(Error::device(format!(
            "emulated cuDNN: backward-filter {algo:?} accumulates with atomics (non-deterministic); the project must not pick it"
        )));
    }
    let g = Geometry::new(x_desc, dw_desc, dy_desc, conv)?;
    check_len("x", x.len(), g.x.len())?;
    check_len("dy", dy.len(), g.y.len())?;
    check_len("dw", dw.len(), g.w.len())?;
    use_workspace(workspace, workspace_bytes, backward_filter_workspace(algo, dw_desc))?;
    let (xv, dyv) = (x.to_host()?, dy.to_host()?);
    let acc = g.backward_filter(&xv, &dyv);
    blend(dw, g.w.len(), &acc, alpha, beta)
}
