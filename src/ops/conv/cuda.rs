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
use crate::cuda::device::{cudnn_present, device_err, guarded, Gpu};
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
use cudarc::driver::CudaSlice;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// Descriptors and chosen algorithms of one convolution shape.
struct Plan {
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
    conv: ConvDescriptor<f32>,
    fwd: FwdAlgo,
    bwd_data: DataAlgo,
    bwd_filter: FilterAlgo,
    /// Largest workspace of the three, bytes.
    workspace: usize,
}

/// One thread's cuDNN handle, plans by shape, and the shared workspace.
struct Dnn {
    handle: Arc<Cudnn>,
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
    if !cudnn_present() {
        return Err(Error::device(
            "cuDNN is not available: libcudnn.so was not found (convolution on the GPU needs it)",
        ));
    }
    let handle =
        guarded("cuDNN", || Cudnn::new(gpu.stream().clone()).map_err(|e| device_err("creating a cuDNN handle", e)))?;
    let d = Rc::new(Dnn { handle, plans: RefCell::new(HashMap::new()), workspace: RefCell::new(None) });
    DNN.with(|m| m.borrow_mut().insert(ordinal, d.clone()));
    Ok(d)
}

fn dim(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(format!("cuDNN convolution: {what} = {v} is beyond 32 bits")))
}

impl Dnn {
    fn plan(&self, s: &ConvShape) -> Result<Rc<Plan>> {
        if let Some(p) = self.plans.borrow().get(s) {
            return Ok(p.clone());
        }
        let e = |what: &'static str| move |err: CudnnError| device_err(format!("cuDNN {what} for {s:?}"), err);
        let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let plan = guarded("cuDNN", || {
            let h = &self.handle;
            let x = h
                .create_4d_tensor::<f32>(nchw, [dim("n", s.n)?, dim("ci", s.ci)?, dim("h", s.h)?, dim("w", s.w)?])
                .map_err(e("input descriptor"))?;
            let w = h
                .create_4d_filter::<f32>(nchw, [dim("co", s.co)?, dim("ci", s.ci)?, dim("kh", s.kh)?, dim("kw", s.kw)?])
                .map_err(e("filter descriptor"))?;
            let y = h
                .create_4d_tensor::<f32>(
                    nchw,
                    [dim("n", s.n)?, dim("co", s.co)?, dim("ho", s.ho())?, dim("wo", s.wo())?],
                )
                .map_err(e("output descriptor"))?;
            let pad = dim("pad", s.pad)?;
            let stride = dim("stride", s.stride)?;
            let mut conv = h
                .create_conv2d::<f32>(
                    [pad, pad],
                    [stride, stride],
                    [1, 1],
                    cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                )
                .map_err(e("convolution descriptor"))?;
            conv.set_math_type(cudnnMathType_t::CUDNN_FMA_MATH).map_err(e("math type"))?;
            // cuDNN's heuristic pick, except that the backward algorithms which accumulate with
            // atomics (data ALGO_0, filter ALGO_0 and ALGO_3: non-deterministic in cuDNN's
            // tables) are replaced by ALGO_1, so a seeded GPU run repeats bit for bit. Every
            // forward algorithm is deterministic. A failed heuristic query falls back the same way.
            let f = ConvForward { conv: &conv, x: &x, w: &w, y: &y };
            let fwd = f.pick_algorithm().unwrap_or(FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM);
            let ws_f = f.get_workspace_size(fwd).map_err(e("forward workspace"))?;
            let bd = ConvBackwardData { conv: &conv, dx: &x, w: &w, dy: &y };
            let bwd_data = match bd.pick_algorithm() {
                Ok(a) if a != DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0 => a,
                _ => DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            };
            let ws_d = bd.get_workspace_size(bwd_data).map_err(e("backward-data workspace"))?;
            let bf = ConvBackwardFilter { conv: &conv, x: &x, dw: &w, dy: &y };
            let bwd_filter = match bf.pick_algorithm() {
                Ok(a)
                    if !matches!(
                        a,
                        FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0
                            | FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3
                    ) =>
                {
                    a
                }
                _ => FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            };
            let ws_w = bf.get_workspace_size(bwd_filter).map_err(e("backward-filter workspace"))?;
            Ok(Plan { x, w, y, conv, fwd, bwd_data, bwd_filter, workspace: ws_f.max(ws_d).max(ws_w) })
        })?;
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

/// The one path to a cuDNN call: checks each buffer's length (name, elements held, elements `s`
/// needs), then runs `f` with the shape's plan and the workspace it asks for; a cuDNN error is
/// reported as `what`.
fn checked_run(
    gpu: &Gpu,
    s: &ConvShape,
    what: &str,
    bufs: [(&str, usize, usize); 3],
    f: impl FnOnce(&Plan, Option<&mut CudaSlice<u8>>) -> std::result::Result<(), CudnnError>,
) -> Result<()> {
    for (name, len, want) in bufs {
        if len < want {
            return Err(Error::shape(format!("cuDNN convolution: {name} has {len} elements, needs {want}")));
        }
    }
    let d = dnn(gpu)?;
    let p = d.plan(s)?;
    d.with_workspace(gpu, p.workspace, |ws| f(&p, ws).map_err(|e| device_err(what, e)))
}

/// y = conv(x, w) for the geometry `s`. CPU twin: `cpu::forward`.
pub fn conv_forward(
    gpu: &Gpu,
    s: &ConvShape,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let bufs = [("x", x.len(), s.x_len()), ("w", w.len(), s.w_len()), ("y", y.len(), s.y_len())];
    checked_run(gpu, s, "cuDNN convolution forward", bufs, |p, ws| {
        let op = ConvForward { conv: &p.conv, x: &p.x, w: &p.w, y: &p.y };
        // SAFETY: the buffers hold at least the elements the descriptors describe (checked by
        // `checked_run`), all f32 NCHW / OIHW as described.
        unsafe { op.launch(p.fwd, ws, (1.0f32, 0.0f32), x, w, y) }
    })
}

/// dx = conv_transpose(dy, w). CPU twin: the dx half of `cpu::backward`.
pub fn conv_backward_data(
    gpu: &Gpu,
    s: &ConvShape,
    w: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    let bufs = [("w", w.len(), s.w_len()), ("dy", dy.len(), s.y_len()), ("dx", dx.len(), s.x_len())];
    checked_run(gpu, s, "cuDNN convolution backward-data", bufs, |p, ws| {
        let op = ConvBackwardData { conv: &p.conv, dx: &p.x, w: &p.w, dy: &p.y };
        // SAFETY: as in conv_forward.
        unsafe { op.launch(p.bwd_data, ws, (1.0f32, 0.0f32), dx, w, dy) }
    })
}

/// dw = correlation of x with dy. CPU twin: the dW half of `cpu::backward`.
pub fn conv_backward_filter(
    gpu: &Gpu,
    s: &ConvShape,
    x: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    let bufs = [("x", x.len(), s.x_len()), ("dy", dy.len(), s.y_len()), ("dw", dw.len(), s.w_len())];
    checked_run(gpu, s, "cuDNN convolution backward-filter", bufs, |p, ws| {
        let op = ConvBackwardFilter { conv: &p.conv, x: &p.x, dw: &p.w, dy: &p.y };
        // SAFETY: as in conv_forward.
        unsafe { op.launch(p.bwd_filter, ws, (1.0f32, 0.0f32), x, dw, dy) }
    })
}

/// Convolution through cuDNN (geometry checked by the caller).
#[cfg(feature = "cudnn")]
pub(crate) fn conv2d(gpu: GpuRef, tape: &Tape, x: &Tensor, w: &Tensor, s: ConvShape) -> Result<Tensor> {
    let mut y = alloc(&gpu, s.y_len())?;
    conv_forward(&gpu, &s, buf(x)?, buf(w)?, &mut y)?;
    let (xc, wc) = (x.clone(), w.clone());
    Ok(tape.record(wrap(y, &[s.n, s.co, s.ho(), s.wo()])?, &[x, w], move |g, grads| {
        let g = here(g, &gpu)?;
        if wc.requires_grad() {
            let mut dw = alloc(&gpu, wc.numel())?;
            conv_backward_filter(&gpu, &s, buf(&xc)?, buf(&g)?, &mut dw)?;
            grads.add_to(&wc, wrap(dw, wc.shape())?)?;
        }
        if xc.requires_grad() {
            let mut dx = alloc(&gpu, xc.numel())?;
            conv_backward_data(&gpu, &s, buf(&wc)?, buf(&g)?, &mut dx)?;
            grads.add_to(&xc, wrap(dx, xc.shape())?)?;
        }
        Ok(())
    }))
}
