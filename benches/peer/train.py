#!/usr/bin/env python3
"""PyTorch peer of `muscle train` on Fashion-MNIST (convnet): METHOD.md's default recipe written
independently in PyTorch, trained on the labeled split a muscle run wrote (its split.json), so that
the two engines' accuracies can be compared image for image of the same labeled set.

The recipe: one forward over [labeled B, view 1 U, view 2 U] (BN statistics over all of them; the
supervised method forwards the labeled images only); pad 2 with zeros + random crop + horizontal
flip, then (x - 0.2860) / 0.3530; batches drawn uniformly with replacement; AdamW (PyTorch's decoupled
weight decay) with a cosine schedule over all steps; the IIC loss between the two views' softmaxes,
weight ramped linearly over the first 20% of the steps; an EMA of the parameters with decay
min(0.999, (1 + t) / (10 + t)) and BN buffers copied from the trained model; test accuracy of the raw
and EMA models every --eval-every steps and after the last.

Random draws come from torch's generator, not muscle's counter-based one: the two engines see the
same labeled images but different batches, augmentations and initial weights, so compare them
over seeds, not run against run.

Usage (torch and numpy in the python; see run.sh):
  muscle train --data DIR --steps 1 --out /tmp/s          # writes /tmp/s/split.json
  python benches/peer/train.py --data DIR --split /tmp/s/split.json --method muscle --steps 1400
"""
import argparse
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import Augmenter, convnet, ema_update, iic_loss  # noqa: E402 (the peer's shared definitions)


def read_idx(path, images):
    """An IDX file, gzipped or raw, as uint8 (N, 1, H, W) images or (N,) labels."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if images:
        n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)
    return np.frombuffer(raw, np.uint8, offset=8).astype(np.int64)


def load(data, prefix):
    def find(stem):
        for name in (stem + ".gz", stem):
            if os.path.exists(os.path.join(data, name)):
                return os.path.join(data, name)
        sys.exit(f"{data}: no {stem}[.gz]")
    x = read_idx(find(f"{prefix}-images-idx3-ubyte"), True)
    y = read_idx(find(f"{prefix}-labels-idx1-ubyte"), False)
    return x, y


@torch.no_grad()
def accuracy(model, x, y, mean, std, batch=500):
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = (torch.from_numpy(np.array(x[i:i + batch], dtype=np.float32)) / 255.0 - mean) / std
        correct += (model(xb).argmax(1) == torch.from_numpy(y[i:i + batch])).sum().item()
    model.train()
    return correct / len(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with Fashion-MNIST's IDX files")
    ap.add_argument("--split", required=True, help="split.json of a muscle run (labeled and val indices)")
    ap.add_argument("--method", choices=["supervised", "muscle"], default="muscle")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--unlabeled-batch", type=int, default=256)
    ap.add_argument("--w-mi", type=float, default=1.0)
    ap.add_argument("--ramp", type=float, default=0.2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="metrics.jsonl to write (one line per evaluation)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    xtr, ytr = load(a.data, "train")
    xte, yte = load(a.data, "t10k")
    with open(a.split) as f:
        split = json.load(f)
    labeled = np.array(split["labeled"], dtype=np.int64)
    val = set(split["val"])
    unlabeled = np.array([i for i in range(len(xtr)) if i not in val], dtype=np.int64)
    mean, std = [0.2860], [0.3530]
    lab_aug = Augmenter(xtr[labeled], 2, False, mean, std, gen)
    unl_aug = Augmenter(xtr[unlabeled], 2, False, mean, std, gen)
    lab_y = torch.from_numpy(ytr[labeled])
    tmean, tstd = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    model = convnet()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-4)
    ema_model = convnet()
    ema_model.load_state_dict(model.state_dict())
    ramp_steps = round(a.ramp * a.steps)
    out = open(a.out, "w") if a.out else None
    t_start, b, u = time.time(), a.batch, a.unlabeled_batch
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = a.lr * (1.0 + math.cos(math.pi * step / a.steps)) / 2.0
        idx = torch.randint(0, len(labeled), (b,), generator=gen)
        xl, yl = lab_aug.images(idx), lab_y[idx]
        if a.method == "muscle":
            # Two independent augmentations of the same unlabeled images.
            iu = torch.randint(0, len(unlabeled), (u,), generator=gen)
            x = torch.cat([xl, unl_aug.images(iu), unl_aug.images(iu)])
        else:
            x = xl
        logits = model(x)
        sup = F.cross_entropy(logits[:b], yl)
        loss = sup
        mi = torch.zeros(())
        if a.method == "muscle":
            w = a.w_mi * (min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0)
            mi = iic_loss(logits[b:b + u], logits[b + u:])
            loss = sup + w * mi
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema_model, model, step)
        done = step + 1
        if done % a.eval_every == 0 or done == a.steps:
            raw = accuracy(model, xte, yte, tmean, tstd)
            avg = accuracy(ema_model, xte, yte, tmean, tstd)
            line = {"step": done, "loss": loss.item(), "sup": sup.item(), "mi": mi.item(),
                    "test_accuracy": raw, "test_accuracy_ema": avg, "seconds": time.time() - t_start}
            print(json.dumps(line), flush=True)
            if out:
                out.write(json.dumps(line) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
