"""muscle from Python: the fused IIC (mutual information) loss and softmax cross-entropy of the
muscle engine on NumPy arrays, its trainer, and its checkpoints.

    import numpy as np, muscle
    a, b = np.random.randn(4096, 10).astype(np.float32), np.random.randn(4096, 10).astype(np.float32)
    loss, grad_a, grad_b = muscle.iic_loss(a, b)          # float32: the fast kernels
    loss64, ga64, gb64 = muscle.iic_loss(a.astype(np.float64), b.astype(np.float64))  # exact reference
    summary = muscle.train(steps=100, out="runs/quick")   # the same options as `muscle train`

`muscle.torch.iic_loss` is the same loss as a torch.autograd.Function (imported on demand, so
torch is not needed for the rest).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from . import _muscle

__all__ = ["iic_loss", "cross_entropy", "train", "load_checkpoint", "set_threads", "__version__"]

__version__: str = _muscle.version()


def _matrix(name: str, x: Any) -> np.ndarray:
    """`x` as a C-contiguous float32/float64 (n, C) array (a copy only when it is not contiguous)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name}: dtype {x.dtype} is not float32 or float64")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected shape (n, C), got {x.shape}")
    return np.ascontiguousarray(x)


def _lam(lam: Any) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)):
        raise TypeError(f"lam: expected a number, got {type(lam).__name__}")
    lam = float(lam)
    if not (math.isfinite(lam) and lam > 0.0):
        raise ValueError(f"lam = {lam}: must be a finite value > 0")
    return lam


def iic_loss(logits_a: np.ndarray, logits_b: np.ndarray, lam: float = 1.0) -> Tuple[float, np.ndarray, np.ndarray]:
    """IIC loss -I(z; w) (with the entropy weight `lam`; 1.0 is plain mutual information) of two
    views' logits, each (n, C), and its gradients with respect to both.

    float32 runs muscle's fused kernels (softmax, joint, entropies and backward in one pass over
    the rows); float64 runs the exact reference that `muscle mi` uses. Both arrays must have the
    same shape and dtype; any memory layout is accepted (non-contiguous arrays are copied first).

    Returns (loss, grad_a, grad_b), the gradients with the logits' shape and dtype.
    Raises TypeError for other dtypes, ValueError for shapes, non-finite values and lam <= 0.
    """
    a = _matrix("logits_a", logits_a)
    b = _matrix("logits_b", logits_b)
    if a.dtype != b.dtype:
        raise TypeError(f"logits_a is {a.dtype} but logits_b is {b.dtype}: both must be float32 or both float64")
    if a.shape != b.shape:
        raise ValueError(f"logits_a {a.shape} and logits_b {b.shape} must have the same shape")
    lam = _lam(lam)
    ga, gb = np.empty_like(a), np.empty_like(b)
    kernel = _muscle.iic_f32 if a.dtype == np.float32 else _muscle.iic_f64
    n, c = a.shape
    loss = kernel(a.ctypes.data, b.ctypes.data, ga.ctypes.data, gb.ctypes.data, n, c, lam)
    return loss, ga, gb


def cross_entropy(
    logits: np.ndarray, labels: Optional[np.ndarray] = None, targets: Optional[np.ndarray] = None
) -> Tuple[float, np.ndarray]:
    """Mean softmax cross-entropy of (n, C) logits against class indices `labels` (n integers in
    [0, C)) or soft `targets` (n, C) of the logits' dtype: exactly one of them.

    float32 runs muscle's fused softmax + cross-entropy kernels, float64 a plain f64 reference.
    Returns (loss, grad) with grad = d loss / d logits.
    """
    x = _matrix("logits", logits)
    n, c = x.shape
    if (labels is None) == (targets is None):
        raise ValueError("cross_entropy: pass exactly one of labels= and targets=")
    grad = np.empty_like(x)
    kernel = _muscle.cross_entropy_f32 if x.dtype == np.float32 else _muscle.cross_entropy_f64_ref
    if labels is not None:
        if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels: expected an integer numpy.ndarray, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != (n,):
            raise ValueError(f"labels: expected shape ({n},) for logits {x.shape}, got {labels.shape}")
        lab = np.ascontiguousarray(labels, dtype=np.int64)
        loss = kernel(x.ctypes.data, lab.ctypes.data, 0, grad.ctypes.data, n, c)
    else:
        q = _matrix("targets", targets)
        if q.dtype != x.dtype:
            raise TypeError(f"targets are {q.dtype} but logits are {x.dtype}")
        if q.shape != x.shape:
            raise ValueError(f"targets {q.shape} and logits {x.shape} must have the same shape")
        loss = kernel(x.ctypes.data, 0, q.ctypes.data, grad.ctypes.data, n, c)
    return loss, grad


def _argv(options: Mapping[str, Any]) -> list:
    """Keyword options as `muscle train` flags: steps=100 -> --steps 100, mi_labeled=True ->
    --mi-labeled; False and None leave a flag out (its default applies)."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return argv


def train(progress: Optional[Callable[[Dict[str, Any]], None]] = None, **options: Any) -> Dict[str, Any]:
    """Runs the Rust trainer with `muscle train`'s options and defaults, as keywords
    (`steps=1400, method="muscle", labels=40, out="runs/x"`, `resume="runs/x"` to continue a run),
    and returns the run's summary (summary.json's contents) as a dict.

    The GIL is released while it trains; `progress`, when given, is called after every step with
    a dict (step, steps, loss, loss_supervised, loss_mi, images_per_second, and the test
    accuracies after an evaluation). Ctrl-C stops after the current step with KeyboardInterrupt;
    the run folder keeps its last checkpoint and `train(resume=folder)` continues it.
    Raises ValueError for bad options, OSError for unreadable data, MemoryError for a run that
    cannot fit in memory.
    """
    return json.loads(_muscle.train(_argv(options), progress))


def load_checkpoint(path: "os.PathLike[str] | str") -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """A .safetensors checkpoint written by muscle as (state_dict, metadata): the tensors as NumPy
    arrays under their PyTorch names, and the metadata (step, model, data set, normalisation...).
    Raises OSError for a missing file and ValueError for a corrupt one."""
    tensors, metadata = _muscle.load_checkpoint(os.fspath(path))
    state = {name: np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy() for name, shape, dtype, raw in tensors}
    return state, dict(metadata)


def set_threads(n: int) -> None:
    """Sets the number of worker threads of the kernels and the trainer (default: all cores)."""
    _muscle.set_threads(int(n))
