#!/usr/bin/env python3
"""Writes tests/fixtures/training/reference.json: a few MUSCLE training steps of METHOD.md's recipe
in PyTorch (the peer of benches/peer/train.py: its convnet and IIC loss), on batches that muscle's
test can rebuild exactly, so that `tests/training_reference.rs` checks muscle's whole training step
(objective composition, backward, AdamW, cosine schedule, ramp, EMA, batch-norm buffers) against it.

Nothing random: the initial weights follow PyTorch's default distributions through an integer hash (`init`),
the images are real ones from the embedded Fashion-MNIST subset (data/fashion-mnist-10k), picked by
index formulas, and each image's crop offsets and flip are a formula of (step, position, view). Real
images make the two views' predictions differ, so the MI term has a gradient worth checking.

Recorded: the gradients of L_sup + L_mi and of L_mi alone at the initial weights (dense kernel scaled up) on
step 0's batch; per step the
loss, L_sup, L_mi, lr and w_mi; after the last step the parameter and buffer summaries of the
trained model and of the EMA, and the eval-mode logits of both on the first test images.

Usage: python scripts/training-reference-torch.py   (torch and numpy; run from the repository root)
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benches", "peer"))
from step import convnet, ema_update, iic_loss  # noqa: E402 (the PyTorch peer's definitions)
from train import read_idx  # noqa: E402

MASK = (1 << 64) - 1

OUT = os.path.join("tests", "fixtures", "training", "reference.json")
DATA = os.path.join("data", "fashion-mnist-10k")
STEPS, B, U = 8, 32, 128          # steps, labeled batch, unlabeled batch (per view)
LR, WD, W_MI, RAMP = 2e-3, 0.5, 1.0, 2    # RAMP = round(0.2 * STEPS)
MEAN, STD, PAD, EVAL, FC_SCALE = 0.2860, 0.3530, 2, 8, 8.0


# Index and augmentation formulas (mirrored in tests/training_reference.rs).
def labeled_index(k, j):
    return (7919 * (k * B + j) + 11) % 10000


def unlabeled_index(k, i):
    return (104729 * (k * U + i) + 5) % 10000


def draw(k, i, v):
    """Crop offsets (each in 0..=2 PAD) and flip of image i of step k, view v (0 labeled, 1, 2)."""
    return (k + 3 * i + 2 * v) % 5, (2 * k + i + 3 * v + 1) % 5, (i + k + v) % 2 == 1


def render(images, idx, k, v):
    x = torch.from_numpy(np.array(images[idx], dtype=np.float32))
    x = F.pad(x, (PAD, PAD, PAD, PAD))
    out = []
    for i in range(len(idx)):
        dy, dx, flip = draw(k, i, v)
        crop = x[i, :, dy:dy + 28, dx:dx + 28]
        out.append(crop.flip(-1) if flip else crop)
    return (torch.stack(out) / 255.0 - MEAN) / STD


def batch(images, labels, k):
    li = [labeled_index(k, j) for j in range(B)]
    ui = [unlabeled_index(k, i) for i in range(U)]
    x = torch.cat([render(images, li, k, 0), render(images, ui, k, 1), render(images, ui, k, 2)])
    return x, torch.from_numpy(labels[li])


def loss_terms(model, x, y, w):
    logits = model(x)
    sup = F.cross_entropy(logits[:B], y)
    mi = iic_loss(logits[B:B + U], logits[B + U:])
    return sup + w * mi, sup, mi


def summary(t):
    """Sum, sum of squares and first entries (the summary tests/models.rs also reads)."""
    v = t.detach().double().flatten()
    return {"sum": v.sum().item(), "sumsq": (v * v).sum().item(), "first": v[:6].tolist()}


def hashed_uniform(rank, n):
    """n numbers in [-1, 1) from a splitmix64-style hash of (rank, index): exact integer arithmetic,
    so the Rust test computes the same values bit for bit."""
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        x = ((i + 1) * 0x9E3779B97F4A7C15 + (rank + 1) * 0xBF58476D1CE4E5B9) & MASK
        x ^= x >> 31
        x = (x * 0x94D049BB133111EB) & MASK
        x ^= x >> 29
        out[i] = 2.0 * (x >> 11) / float(1 << 53) - 1.0
    return out


def init(model):
    """PyTorch's default initial distributions (kernels and the dense bias U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), BN weight 1 and bias 0) drawn from `hashed_uniform` of the tensor's rank among
    the sorted state_dict names."""
    sd = model.state_dict()
    with torch.no_grad():
        for rank, name in enumerate(sorted(sd)):
            t = sd[name]
            if name.startswith("fc.") or t.dim() > 1:
                fan_in = model.fc.weight.shape[1] if name.startswith("fc.") else t[0].numel()
                v = hashed_uniform(rank, t.numel()) / math.sqrt(fan_in)
                t.copy_(torch.from_numpy(v.astype(np.float32)).view(t.shape))


def clone(model):
    """A separate convnet with `model`'s state, in training mode."""
    other = convnet()
    other.load_state_dict(model.state_dict())
    other.train()
    return other


def main():
    torch.set_num_threads(2)
    images = read_idx(os.path.join(DATA, "train-images-idx3-ubyte.gz"), True)
    labels = read_idx(os.path.join(DATA, "train-labels-idx1-ubyte.gz"), False)
    test = read_idx(os.path.join(DATA, "t10k-images-idx3-ubyte.gz"), True)[:EVAL]
    x_test = (torch.from_numpy(np.array(test, dtype=np.float32)) / 255.0 - MEAN) / STD

    model = convnet()
    init(model)
    model.train()

    # The gradients of L_sup + L_mi and of L_mi at the initial weights with the dense layer's kernel scaled
    # by FC_SCALE (so that the predictions are far from uniform and L_mi has a gradient as large as
    # L_sup's), on a copy: the forward moves the BN running statistics.
    probe = clone(model)
    with torch.no_grad():
        probe.fc.weight.mul_(FC_SCALE)
    x, y = batch(images, labels, 0)
    first = {"fc_scale": FC_SCALE}
    for term in ("total", "mi"):
        probe.zero_grad(set_to_none=True)
        total, sup, mi = loss_terms(probe, x, y, 1.0)
        value = total if term == "total" else mi
        value.backward()
        first[term] = value.item()
        first["grads_" + term] = {n: summary(p.grad) for n, p in probe.named_parameters() if p.grad is not None}

    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    ema = clone(model)
    steps = []
    for k in range(STEPS):
        lr = LR * (1.0 + math.cos(math.pi * k / STEPS)) / 2.0
        for g in opt.param_groups:
            g["lr"] = lr
        w = W_MI * min(1.0, k / RAMP)
        x, y = batch(images, labels, k)
        total, sup, mi = loss_terms(model, x, y, w)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        ema_update(ema, model, k)
        steps.append({"loss": total.item(), "sup": sup.item(), "mi": mi.item(), "lr": lr, "w_mi": w})

    def state(m):
        m.eval()
        with torch.no_grad():
            logits = m(x_test).double().flatten().tolist()
        return {"tensors": {n: summary(t) for n, t in m.state_dict().items() if t.dtype.is_floating_point},
                "logits_eval": logits}

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"generator": "scripts/training-reference-torch.py", "torch": torch.__version__,
                   "steps": STEPS, "batch": B, "unlabeled_batch": U, "lr": LR, "weight_decay": WD,
                   "w_mi": W_MI, "ramp_steps": RAMP, "eval_images": EVAL, "first_gradient": first,
                   "trajectory": steps, "trained": state(model), "ema": state(ema)}, f, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
