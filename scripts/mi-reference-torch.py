#!/usr/bin/env python3
"""Writes tests/fixtures/mi/: random logit pairs and the IIC loss and gradients computed by
PyTorch autograd in float64, following IIC's official IID_losses.py (clamps done with torch.where
instead of in-place masked writes, which newer PyTorch rejects on expanded views; the semantics
are the same: clamped entries are constants, marginals come from the unclamped joint).

Usage: python3 scripts/mi-reference-torch.py   (needs torch and numpy; opt-in, not run in CI)
"""
import json
import os
import sys

import numpy as np
import torch

EPS = sys.float_info.epsilon
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "mi")


def iid_loss(za, zb, lamb):
    x = torch.softmax(za, dim=1)
    y = torch.softmax(zb, dim=1)
    k = x.shape[1]
    p = (x.unsqueeze(2) * y.unsqueeze(1)).sum(dim=0)
    p = (p + p.t()) / 2.0
    p = p / p.sum()
    p_i = p.sum(dim=1).view(k, 1).expand(k, k)
    p_j = p.sum(dim=0).view(1, k).expand(k, k)
    eps = torch.tensor(EPS, dtype=torch.float64)
    p = torch.where(p < EPS, eps, p)
    p_i = torch.where(p_i < EPS, eps, p_i)
    p_j = torch.where(p_j < EPS, eps, p_j)
    return (-p * (torch.log(p) - lamb * torch.log(p_j) - lamb * torch.log(p_i))).sum()


def case(name, n, c, lamb, scale, seed, confident=False):
    g = np.random.default_rng(seed)
    a = g.normal(0.0, scale, (n, c))
    b = g.normal(0.0, scale, (n, c))
    if confident:
        # Every row strongly on class (i mod (c - 2)): the last classes get P entries below EPS.
        for i in range(n):
            a[i, i % (c - 2)] += 40.0
            b[i, i % (c - 2)] += 40.0
    ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    loss = iid_loss(ta, tb, lamb)
    loss.backward()
    for suffix, arr in [("a", a), ("b", b), ("grad_a", ta.grad.numpy()), ("grad_b", tb.grad.numpy())]:
        np.save(os.path.join(OUT, f"{name}_{suffix}.npy"), np.ascontiguousarray(arr, dtype=np.float64))
    return {"name": name, "rows": n, "classes": c, "lambda": lamb, "loss": loss.item()}


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = [
        case("random", 64, 10, 1.0, 2.0, 1),
        case("lambda15", 37, 7, 1.5, 1.5, 2),
        case("clamped", 50, 10, 1.0, 1.0, 3, confident=True),
        case("one_row", 1, 3, 1.0, 1.0, 4),
    ]
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
