#!/usr/bin/env python3
"""Writes tests/fixtures/models/reference.json: PyTorch's outputs for muscle's three models
(METHOD.md's definitions, written here independently with PyTorch's state_dict names), so that
`tests/models.rs` can check muscle's forward, backward and batch-norm bookkeeping against them.

Weights and inputs are not stored: every tensor is a formula of its state_dict name's rank in
sorted order and of the element index (`value` below; the Rust test computes the same numbers),
so the fixture stays a few kB for the 1.5M-parameter WRN. Recorded per model:
- convnet (w = 8) and wrn-28-2: the train-mode forward of 4 images (batch statistics), the mean
  cross-entropy against labels i % 10, per-parameter gradient summaries (sum, sum of squares, first
  entries), the running statistics that forward left, then the eval-mode forward.
- cnn13: the eval-mode forward only (its train mode draws dropout masks, which differ by engine).

Usage: python scripts/model-reference-torch.py   (torch and numpy; run from the repository root)
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benches", "peer"))
from step import SeqNet, convnet  # noqa: E402 (the PyTorch peer's definitions)

OUT = os.path.join("tests", "fixtures", "models", "reference.json")
BATCH = 4
FIRST = 6  # gradient entries recorded verbatim per parameter


def cnn13():
    plan = [(128, 3, 1)] * 3 + ["M", "D"] + [(256, 3, 1)] * 3 + ["M", "D"] + [(512, 3, 0), (256, 1, 0), (128, 1, 0)]
    return SeqNet(plan, 3, 10, 0.1)


class BasicBlock(nn.Module):
    """The MixMatch PyTorch ports' block, line for line (including the unused bn1 output)."""

    def __init__(self, cin, cout, stride, activate_before_residual):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.abr = activate_before_residual

    def forward(self, x):
        if not self.equal and self.abr:
            x = F.leaky_relu(self.bn1(x), 0.1)
        else:
            out = F.leaky_relu(self.bn1(x), 0.1)
        out = F.leaky_relu(self.bn2(self.conv1(out if self.equal else x)), 0.1)
        out = self.conv2(out)
        return (x if self.equal else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride, abr):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, abr)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, classes=10, depth=28, widen=2):
        super().__init__()
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, True)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, False)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, False)
        self.bn1 = nn.BatchNorm2d(ch[3], momentum=0.001)
        self.fc = nn.Linear(ch[3], classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.leaky_relu(self.bn1(out), 0.1)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


MASK = (1 << 64) - 1


def uniform(rank, n):
    """n numbers in [-1, 1) from a 64-bit mix of (rank, index) (splitmix64's finaliser): exactly
    reproducible in Rust, and unstructured. A smooth sin pattern was used before; its weights made
    the WRN's gradients ill-conditioned (PyTorch's own float32 gradients differed from float64 by
    up to 0.9%, and a 1e-6 change in any convolution's rounding moved some by 5%)."""
    i = np.arange(n, dtype=np.uint64)
    h = i * np.uint64(0x9E3779B97F4A7C15) + np.uint64(((rank + 1) * 0xBF58476D1CE4E5B9) & MASK)
    h ^= h >> np.uint64(31)
    h = h * np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) * 2.0 - 1.0


def value(name, rank, shape):
    """The fixture's formula (mirrored in tests/models.rs): a signed pseudo-random pattern per tensor."""
    n = int(np.prod(shape)) if shape else 1
    with np.errstate(over="ignore"):
        s = uniform(rank, n)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        v = 1.0 + 0.5 * np.abs(s)
    elif leaf == "running_mean":
        v = 0.1 * s
    elif leaf == "num_batches_tracked":
        v = np.zeros(n)
    elif leaf == "bias":
        v = 0.1 * s
    elif len(shape) == 1:  # BN weight
        v = 1.0 + 0.2 * s
    else:  # conv / dense kernel: uniform(-1, 1) / sqrt(fan_in), PyTorch's default conv init scale
        v = s / math.sqrt(n / shape[0])
    return v.astype(np.float32).reshape(shape)


def inputs(c, hw):
    n = BATCH * c * hw * hw
    x = (1.5 * np.sin(0.013 * np.arange(n, dtype=np.float64) + 0.5)).astype(np.float32)
    return torch.from_numpy(x.reshape(BATCH, c, hw, hw)), torch.arange(BATCH) % 10


def fill(model):
    sd = model.state_dict()
    names = sorted(sd)
    with torch.no_grad():
        for rank, name in enumerate(names):
            t = sd[name]
            v = torch.from_numpy(value(name, rank, list(t.shape)))
            t.copy_(v.to(t.dtype))


def summary(t):
    v = t.detach().double().flatten()
    return {"sum": v.sum().item(), "sumsq": (v * v).sum().item(), "first": v[:FIRST].tolist()}


def record(name, model, c, hw, train):
    torch.manual_seed(0)
    fill(model)
    x, y = inputs(c, hw)
    case = {"model": name, "in_channels": c, "side": hw}
    if train:
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        case["logits_train"] = logits.detach().double().flatten().tolist()
        case["loss"] = loss.item()
        case["grads"] = {n: summary(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        case["buffers_after"] = {n: summary(b) for n, b in model.named_buffers()}
    model.eval()
    with torch.no_grad():
        case["logits_eval"] = model(x).double().flatten().tolist()
    return case


def main():
    torch.set_num_threads(2)
    cases = [
        record("convnet-8", convnet(8), 1, 28, True),
        record("wrn-28-2", WideResNet(), 3, 32, True),
        record("cnn13", cnn13(), 3, 32, False),
    ]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"generator": "scripts/model-reference-torch.py", "torch": torch.__version__, "batch": BATCH,
                   "cases": cases}, f, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
