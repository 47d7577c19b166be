//! Convolution through cuDNN (feature `cudnn`): forward, backward-data and backward-filter of an
//! NCHW f32 convolution without bias, with the algorithm cuDNN's heuristics pick for the shape and
//! one workspace that grows to the largest request. CPU twin: `cpu.rs` beside this file.
//!
//! Math is plain FP32 (CUDNN_FMA_MATH: no TF32 on Ampere and later), so results match the CPU's
//! im2col + GEMM to f32 rounding; the parity tests hold them to that.
//!
//! The cuDNN handle is not `Send`, so each thread keeps its own (with its plans), as
//! `cuda::context` does for the kernels. Descriptors and algorithms are made once per shape, and
//! only deterministic backward algorithms are used. One GPU per thread: the handle is bound to
//! the stream of the first context that asked for it.

use crate::autograd::Tape;
use crate::cuda::device::{cudnn_present, device_err, guarded, Backend, Gpu};
use crate::cuda::{CudaSlice, F32Buf};
use crate::error::{Error, Result};
use crate::kernel_args::ConvShape;
use crate::ops::gpu::{alloc, buf, here, wrap, GpuRef};
use crate::tensor::Tensor;
use cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t as DataAlgo, cudnnConvolutionBwdFilterAlgo_t as FilterAlgo,
    cudnnConvolutionFwdAlgo_t as FwdAlgo, cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnError, FilterDescriptor,
    TensorDescriptor,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

const NCHW: cudnnTensorFormat_t = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
const MODE: cudnnConvolutionMode_t = cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION;

/// The values the descriptors of one shape are made of (NCHW input and output, KCRS filter,
/// symmetric padding and stride, no dilation): the project's mapping onto cuDNN, given to the
/// driver's descriptors and to the emulated stand-in alike.
struct Geometry {
    x: [i32; 4],
    w: [i32; 4],
    y: [i32; 4],
    pad: [i32; 2],
    stride: [i32; 2],
    dilation: [i32; 2],
}

fn dim(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(format!("cuDNN convolution: {what} = {v} is beyond 32 bits")))
}

impl Geometry {
    fn of(s: &ConvShape) -> Result<Geometry> {
        let (pad, stride) = (dim("pad", s.pad)?, dim("stride", s.stride)?);
        Ok(Geometry {
            x: [dim("n", s.n)?, dim("ci", s.ci)?, dim("h", s.h)?, dim("w", s.w)?],
            w: [dim("co", s.co)?, dim("ci", s.ci)?, dim("kh", s.kh)?, dim("kw", s.kw)?],
            y: [dim("n", s.n)?, dim("co", s.co)?, dim("ho", s.ho())?, dim("wo", s.wo())?],
            pad: [pad, pad],
            stride: [stride, stride],
            dilation: [1, 1],
        })
    }
}

// cuDNN's heuristic pick, except that the backward algorithms which accumulate with atomics
// (data ALGO_0, filter ALGO_0 and ALGO_3: non-deterministic in cuDNN's tables) are replaced by
// ALGO_1, so a seeded GPU run repeats bit for bit. Every forward algorithm is deterministic. A
// failed heuristic query falls back the same way.

fn deterministic_data(picked: Option<DataAlgo>) -> DataAlgo {
    match picked {
        Some(a) if a != DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0 => a,
        _ => DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
    }
}

fn deterministic_filter(picked: Option<FilterAlgo>) -> FilterAlgo {
    match picked {
        Some(a)
            if !matches!(
                a,
                FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0 | FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3
            ) =>
        {
            a
        }
        _ => FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
    }
}

/// The descriptors of one shape, on the backend that runs it.
enum Descriptors {
    Driver {
        x: TensorDescriptor<f32>,
        w: FilterDescriptor<f32>,
        y: TensorDescriptor<f32>,
        conv: ConvDescriptor<f32>,
    },
    #[cfg(muscle_cuda_emu)]
    Emulated {
        x: crate::cuda::emu::dnn::TensorDesc,
        w: crate::cuda::emu::dnn::FilterDesc,
        y: crate::cuda::emu::dnn::TensorDesc,
        conv: crate::cuda::emu::dnn::ConvDesc,
    },
}

/// Descriptors and chosen algorithms of one convolution shape.
struct Plan {
    descriptors: Descriptors,
    fwd: FwdAlgo,
    bwd_data: DataAlgo,
    bwd_filter: FilterAlgo,
    /// Largest workspace of the three, bytes.
    workspace: usize,
}

/// One thread's cuDNN handle (none on the emulated device), plans by shape, and the shared
/// workspace.
struct Dnn {
    handle: Option<Arc<Cudnn>>,
    plans: RefCell<HashMap<ConvShape, Rc<Plan>>>,
    workspace: RefCell<Option<CudaSlice<u8>>>,
}

thread_local! {
    static DNN: RefCell<HashMap<usize, Rc<Dnn>>> = RefCell::new(HashMap::new());
}

fn dnn(gpu: &Gpu) -> Result<Rc<Dnn>> {
    let ordinal = gpu.info().ordinal;
    if let Some(d) = DNN.with(|m| m.borrow().get(&ordinal).cloned()) {
        return Ok(d);
    }
    let handle = match gpu.backend() {
        Backend::Driver(driver) => {
            if !cudnn_present() {
                return Err(Error::device(
                    "cuDNN is not available: libcudnn.so was not found (convolution on the GPU needs it)",
                ));
            }
            let stream = driver.stream.clone();
            Some(guarded("cuDNN", || Cudnn::new(stream).map_err(|e| device_err("creating a cuDNN handle", e)))?)
        }
        #[cfg(muscle_cuda_emu)]
        Backend::Emulated => None,
    };
    let d = Rc::new(Dnn { handle, plans: RefCell::new(HashMap::new()), workspace: RefCell::new(None) });
    DNN.with(|m| m.borrow_mut().insert(ordinal, d.clone()));
    Ok(d)
}

impl Dnn {
    fn plan(&self, s: &ConvShape) -> Result<Rc<Plan>> {
        if let Some(p) = self.plans.borrow().get(s) {
            return Ok(p.clone());
        }
        let g = Geometry::of(s)?;
        let plan = match &self.handle {
            Some(h) => driver_plan(h, s, &g)?,
            #[cfg(muscle_cuda_emu)]
            None => emulated_plan(&g)?,
            #[cfg(not(muscle_cuda_emu))]
            None => return Err(Error::device("cuDNN: no handle")),
        };
        let plan = Rc::new(plan);
        self.plans.borrow_mut().insert(*s, plan.clone());
        Ok(plan)
    }

    /// Runs `f` with a workspace of at least `bytes` (None when 0).
    fn with_workspace<T>(
        &self,
        gpu: &Gpu,
        bytes: usize,
        f: impl FnOnce(Option<&mut CudaSlice<u8>>) -> Result<T>,
    ) -> Result<T> {
        let mut ws = self.workspace.borrow_mut();
        if bytes == 0 {
            return f(None);
        }
        if ws.as_ref().is_none_or(|w| w.len() < bytes) {
            *ws = None;
            *ws = Some(gpu.zeros::<u8>(bytes)?);
        }
        f(ws.as_mut())
    }
}

fn driver_plan(h: &Arc<Cudnn>, s: &ConvShape, g: &Geometry) -> Result<Plan> {
    let e = |what: &'static str| move |err: CudnnError| device_err(format!("cuDNN {what} for {s:?}"), err);
    guarded("cuDNN", || {
        let x = h.create_4d_tensor::<f32>(NCHW, g.x).map_err(e("input descriptor"))?;
        let w = h.create_4d_filter::<f32>(NCHW, g.w).map_err(e("filter descriptor"))?;
        let y = h.create_4d_tensor::<f32>(NCHW, g.y).map_err(e("output descriptor"))?;
        let mut conv =
            h.create_conv2d::<f32>(g.pad, g.stride, g.dilation, MODE).map_err(e("convolution descriptor"))?;
        conv.set_math_type(cudnnMathType_t::CUDNN_FMA_MATH).map_err(e("math type"))?;
        let f = ConvForward { conv: &conv, x: &x, w: &w, y: &y };
        let fwd = f.pick_algorithm().unwrap_or(FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM);
        let ws_f = f.get_workspace_size(fwd).map_err(e("forward workspace"))?;
        let bd = ConvBackwardData { conv: &conv, dx: &x, w: &w, dy: &y };
        let bwd_data = deterministic_data(bd.pick_algorithm().ok());
        let ws_d = bd.get_workspace_size(bwd_data).map_err(e("backward-data workspace"))?;
        let bf = ConvBackwardFilter { conv: &conv, x: &x, dw: &w, dy: &y };
        let bwd_filter = deterministic_filter(bf.pick_algorithm().ok());
        let ws_w = bf.get_workspace_size(bwd_filter).map_err(e("backward-filter workspace"))?;
        let workspace = ws_f.max(ws_d).max(ws_w);
        Ok(Plan { descriptors: Descriptors::Driver { x, w, y, conv }, fwd, bwd_data, bwd_filter, workspace })
    })
}

#[cfg(muscle_cuda_emu)]
fn emulated_plan(g: &Geometry) -> Result<Plan> {
    use crate::cuda::emu::dnn;
    let x = dnn::TensorDesc::new(NCHW, g.x)?;
    let w = dnn::FilterDesc::new(NCHW, g.w)?;
    let y = dnn::TensorDesc::new(NCHW, g.y)?;
    let conv = dnn::ConvDesc::new(g.pad, g.stride, g.dilation, MODE)?;
    let fwd = dnn::pick_forward(&x, &w, &conv);
    let bwd_data = deterministic_data(Some(dnn::pick_backward_data(&x, &w, &conv)));
    let bwd_filter = deterministic_filter(Some(dnn::pick_backward_filter(&x, &w, &conv)));
    let workspace = dnn::forward_workspace(fwd, &x, &w)
        .max(dnn::backward_data_workspace(bwd_data))
        .max(dnn::backward_filter_workspace(bwd_filter, &w));
    Ok(Plan { descriptors: Descriptors::Emulated { x, w, y, conv }, fwd, bwd_data, bwd_filter, workspace })
}

/// The one path to a cuDNN call: checks each buffer's length (name, elements held, elements `s`
/// needs), then runs `f` with the shape's plan, the workspace it asks for and its size.
fn checked_run(
    gpu: &Gpu,
    s: &ConvShape,
    bufs: [(&str, usize, usize); 3],
    f: impl FnOnce(&Plan, Option<&mut CudaSlice<u8>>, usize) -> Result<()>,
) -> Result<()> {
    for (name, len, want) in bufs {
        if len < want {
            return Err(Error::shape(format!("cuDNN convolution: {name} has {len} elements, needs {want}")));
        }
    }
    let d = dnn(gpu)?;
    let p = d.plan(s)?;
    d.with_workspace(gpu, p.workspace, |ws| f(&p, ws, p.workspace))
}

/// The driver workspace of an optional buffer.
fn driver_ws(ws: Option<&mut CudaSlice<u8>>) -> Result<Option<&mut cudarc::driver::CudaSlice<u8>>> {
    ws.map(|w| w.driver_mut()).transpose()
}

/// The emulated workspace of an optional buffer.
#[cfg(muscle_cuda_emu)]
fn emulated_ws(ws: Option<&mut CudaSlice<u8>>) -> Result<Option<&mut crate::cuda::emu::EmuBuffer<u8>>> {
    ws.map(|w| w.emulated_mut()).transpose()
}

/// Which of the three convolution passes a call runs.
#[derive(Clone, Copy)]
enum Pass {
    Forward,
    BackwardData,
    BackwardFilter,
}

impl Pass {
    fn what(self) -> &'static str {
        match self {
            Pass::Forward => "cuDNN convolution forward",
            Pass::BackwardData => "cuDNN convolution backward-data",
            Pass::BackwardFilter => "cuDNN convolution backward-filter",
        }
    }

    /// The names of (a, b, out) and the elements each needs for `s`.
    fn buffers(self, s: &ConvShape) -> [(&'static str, usize); 3] {
        let (x, w, y) = (("x", s.x_len()), ("w", s.w_len()), ("y", s.y_len()));
        match self {
            Pass::Forward => [x, w, y],
            Pass::BackwardData => [w, ("dy", y.1), ("dx", x.1)],
            Pass::BackwardFilter => [x, ("dy", y.1), ("dw", w.1)],
        }
    }
}

/// Runs one pass: `a`, `b` are its inputs (x, w / w, dy / x, dy) and `out` its output (y / dx /
/// dw), with alpha 1 and beta 0.
fn run(gpu: &Gpu, s: &ConvShape, pass: Pass, a: &F32Buf, b: &F32Buf, out: &mut F32Buf) -> Result<()> {
    let [na, nb, no] = pass.buffers(s);
    let bufs = [(na.0, a.len(), na.1), (nb.0, b.len(), nb.1), (no.0, out.len(), no.1)];
    checked_run(gpu, s, bufs, |p, ws, bytes| match &p.descriptors {
        Descriptors::Driver { x, w, y, conv } => {
            // cudarc hands cuDNN the workspace's own length, which covers the plan's request.
            debug_assert!(ws.as_ref().is_none_or(|w| w.len() >= bytes));
            let ws = driver_ws(ws)?;
            let (a, b, out) = (a.driver()?, b.driver()?, out.driver_mut()?);
            let ab = (1.0f32, 0.0f32);
            // SAFETY: the buffers hold at least the elements the descriptors describe (checked by
            // `checked_run`), all f32 NCHW / KCRS as described, passed in cuDNN's order per pass.
            unsafe {
                match pass {
                    Pass::Forward => ConvForward { conv, x, w, y }.launch(p.fwd, ws, ab, a, b, out),
                    Pass::BackwardData => {
                        ConvBackwardData { conv, dx: x, w, dy: y }.launch(p.bwd_data, ws, ab, out, a, b)
                    }
                    Pass::BackwardFilter => {
                        ConvBackwardFilter { conv, x, dw: w, dy: y }.launch(p.bwd_filter, ws, ab, a, out, b)
                    }
                }
            }
            .map_err(|e| device_err(pass.what(), e))
        }
        #[cfg(muscle_cuda_emu)]
        Descriptors::Emulated { x, w, y, conv } => {
            use crate::cuda::emu::dnn;
            let ws = emulated_ws(ws)?;
            let (a, b, out) = (a.emulated()?, b.emulated()?, out.emulated_mut()?);
            match pass {
                Pass::Forward => dnn::forward(1.0, x, a, w, b, conv, p.fwd, ws, bytes, 0.0, y, out),
                Pass::BackwardData => dnn::backward_data(1.0, w, a, y, b, conv, p.bwd_data, ws, bytes, 0.0, x, out),
                Pass::BackwardFilter => {
                    dnn::backward_filter(1.0, x, a, y, b, conv, p.bwd_filter, ws, bytes, 0.0, w, out)
                }
            }
            .map_err(|e| e.context(pass.what()))
        }
    })
}

/// y = conv(x, w) for the geometry `s`. CPU twin: `cpu::forward`.
pub fn conv_forward(gpu: &Gpu, s: &ConvShape, x: &F32Buf, w: &F32Buf, y: &mut F32Buf) -> Result<()> {
    run(gpu, s, Pass::Forward, x, w, y)
}

/// dx = conv_transpose(dy, w). CPU twin: the dx half of `cpu::backward`.
pub fn conv_backward_data(gpu: &Gpu, s: &ConvShape, w: &F32Buf, dy: &F32Buf, dx: &mut F32Buf) -> Result<()> {
    run(gpu, s, Pass::BackwardData, w, dy, dx)
}

/// dw = correlation of x with dy. CPU twin: the dW half of `cpu::backward`.
pub fn conv_backward_filter(gpu: &Gpu, s: &ConvShape, x: &F32Buf, dy: &F32Buf, dw: &mut F32Buf) -> Result<()> {
    run(gpu, s, Pass::BackwardFilter, x, dy, dw)
}

/// Convolution through cuDNN (geometry checked by the caller).
#[cfg(feature = "cudnn")]
pub(crate) fn conv2d(gpu: GpuRef, tape: &Tape, x: &Tensor, w: &Tensor, s: ConvShape) -> Result<Tensor> {
    let y_shape = [s.n, s.co, s.ho(), s.wo()];
    let mut y = alloc(&gpu, &y_shape)?;
    conv_forward(&gpu, &s, buf(x)?, buf(w)?, &mut y)?;
    // A batch-normalised input is kept as its recipe (autograd::Saved), recomputed for dW and
    // freed before dX is allocated.
    let (xs, wc) = (crate::autograd::Saved::of(x), w.clone());
    Ok(tape.record(wrap(y, &y_shape)?, &[x, w], move |g, grads| {
        let g = here(g, &gpu)?;
        if wc.requires_grad() {
            let xc = xs.tensor()?;
            let mut dw = alloc(&gpu, wc.shape())?;
            conv_backward_filter(&gpu, &s, buf(&xc)?, buf(&g)?, &mut dw)?;
            grads.add_to(&wc, wrap(dw, wc.shape())?)?;
        }
        let xr = xs.identity();
        if xr.requires_grad() {
            let mut dx = alloc(&gpu, xr.shape())?;
            conv_backward_data(&gpu, &s, buf(&wc)?, buf(&g)?, &mut dx)?;
            grads.add_to_ref(&xr, wrap(dx, xr.shape())?)?;
        }
        Ok(())
    }))
}
