"""muscle's IIC loss as a torch.autograd.Function on CPU tensors.

    import torch, muscle.torch
    loss = muscle.torch.iic_loss(logits_a, logits_b, lam=1.0)   # (n, C) each, float32 or float64
    loss.backward()

The forward pass computes the loss and both gradients in one fused call (float32: muscle's
kernels; float64: the exact reference), reading the tensors' memory in place when they are
contiguous (no copy); the backward only scales the saved gradients. Either view may be detached
(e.g. a stop-gradient target) or both may require grad. Tensors on a GPU raise TypeError: the
GPU path is not bound to Python yet.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch

from . import _muscle

__all__ = ["iic_loss", "cross_entropy"]

_DTYPES = (torch.float32, torch.float64)


def _logits(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise TypeError(f"{name}: tensor on {x.device}; muscle.torch takes CPU tensors (the GPU path is not bound yet)")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not torch.float32 or torch.float64")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape (n, C), got {tuple(x.shape)}")
    return x


class _IicLoss(torch.autograd.Function):
    """Loss and both gradients in the forward (one fused pass); backward scales them."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        # Contiguous views share memory with the inputs (no copy) when they already are.
        a, b = a.detach().contiguous(), b.detach().contiguous()
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        kernel = _muscle.iic_f32 if a.dtype == torch.float32 else _muscle.iic_f64
        n, c = a.shape
        loss = kernel(a.data_ptr(), b.data_ptr(), ga.data_ptr(), gb.data_ptr(), n, c, lam)
        ctx.save_for_backward(ga, gb)
        return torch.tensor(loss, dtype=a.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, Any, None]:  # type: ignore[override]
        ga, gb = ctx.saved_tensors
        # loss.backward() seeds 1: the saved gradients are the answer (two n x C passes spared).
        if grad.item() != 1.0:
            ga, gb = ga * grad, gb * grad
        return (ga if ctx.needs_input_grad[0] else None), (gb if ctx.needs_input_grad[1] else None), None


def iic_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """IIC loss -I(z; w) (entropy weight `lam`) of two views' logits, (n, C) CPU tensors of the
    same shape and dtype (float32: fused kernels; float64: exact reference), as a 0-dim tensor
    with an autograd graph to both inputs that require grad.

    Raises TypeError for other dtypes or devices, ValueError for shapes, non-finite values and
    lam <= 0."""
    a, b = _logits("logits_a", logits_a), _logits("logits_b", logits_b)
    if a.dtype != b.dtype:
        raise TypeError(f"logits_a is {a.dtype} but logits_b is {b.dtype}: both must be float32 or both float64")
    if a.shape != b.shape:
        raise ValueError(f"logits_a {tuple(a.shape)} and logits_b {tuple(b.shape)} must have the same shape")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam: expected a number, got {type(lam).__name__}")
    lam = float(lam)
    if not (math.isfinite(lam) and lam > 0.0):
        raise ValueError(f"lam = {lam}: must be a finite value > 0")
    return _IicLoss.apply(a, b, lam)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, labels: Any, targets: Any) -> torch.Tensor:  # type: ignore[override]
        x = x.detach().contiguous()
        grad = torch.empty_like(x)
        kernel = _muscle.cross_entropy_f32 if x.dtype == torch.float32 else _muscle.cross_entropy_f64_ref
        n, c = x.shape
        if labels is not None:
            lab = labels.detach().to(torch.int64).contiguous()
            loss = kernel(x.data_ptr(), lab.data_ptr(), 0, grad.data_ptr(), n, c)
        else:
            q = targets.detach().contiguous()
            loss = kernel(x.data_ptr(), 0, q.data_ptr(), grad.data_ptr(), n, c)
        ctx.save_for_backward(grad)
        return torch.tensor(loss, dtype=x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> Tuple[Any, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad if g.item() == 1.0 else grad * g), None, None


def cross_entropy(logits: torch.Tensor, labels: Any = None, targets: Any = None) -> torch.Tensor:
    """Mean softmax cross-entropy of (n, C) CPU logits against int labels (n,) or soft targets
    (n, C, no gradient through them): exactly one. float32 runs the fused kernels."""
    x = _logits("logits", logits)
    n, c = x.shape
    if (labels is None) == (targets is None):
        raise ValueError("cross_entropy: pass exactly one of labels= and targets=")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels: expected an integer torch.Tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.device.type != "cpu":
            raise TypeError(f"labels: tensor on {labels.device}; muscle.torch takes CPU tensors")
        if tuple(labels.shape) != (n,):
            raise ValueError(f"labels: expected shape ({n},) for logits {tuple(x.shape)}, got {tuple(labels.shape)}")
    else:
        t = _logits("targets", targets)
        if t.dtype != x.dtype or t.shape != x.shape:
            raise ValueError(f"targets {tuple(t.shape)} {t.dtype} must match logits {tuple(x.shape)} {x.dtype}")
    return _CrossEntropy.apply(x, labels, targets)
