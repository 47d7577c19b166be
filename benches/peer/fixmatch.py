#!/usr/bin/env python3
"""PyTorch peer of `muscle train --method fixmatch` / `fixmatch-muscle` on Fashion-MNIST (convnet):
FixMatch as docs/METHOD.md states it, written independently in PyTorch with the strong views drawn
by Pillow (the FixMatch "RA" table of METHOD.md: 2 of 14 operations with uniform magnitudes, then
Cutout), trained on the labeled split a muscle run wrote (its split.json), so that muscle's FixMatch
accuracy can be held against an independent implementation on the same labeled images.

The recipe: one forward over [labeled B, weak U, strong U] (BN statistics over all of them); the
weak view is pad 2 with zeros + random crop + horizontal flip; the strong view is the same kind of
weak draw, then RandAugment and Cutout on the uint8 image; both then (x / 255 - 0.2860) / 0.3530.
Pseudo-labels: argmax of softmax(weak logits) without gradient, kept where its probability reaches
tau; L_U = mean over all U images of mask * CE(strong logits, pseudo-label). Loss L_X + w_u L_U
(+ w_mi(t) IIC(weak, strong) for fixmatch-muscle, ramped over the first 20% of the steps). SGD with
Nesterov momentum 0.9 and L2 weight decay 5e-4 on every parameter (as muscle's --weight-decay with
SGD), lr 0.03 cos(7 pi k / 16 K); EMA of the parameters with decay min(0.999, (1 + t) / (10 + t)),
BN buffers copied. Random draws come from numpy/torch generators, not muscle's: compare over seeds.

Usage (torch, numpy and Pillow in the python):
  muscle train --data DIR --labels 40 --steps 1 --out /tmp/s     # writes /tmp/s/split.json
  python benches/peer/fixmatch.py --data DIR --split /tmp/s/split.json --steps 1400 --seed 0
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import convnet, ema_update, iic_loss  # noqa: E402 (the peer's shared definitions)
from train import accuracy, load  # noqa: E402

GREY = 127
MEAN, STD = 0.2860, 0.3530


def _affine(img, coeffs):
    fill = (GREY,) * len(img.getbands())
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.NEAREST,
                         fillcolor=fill if len(fill) > 1 else GREY)


# (name, magnitude range or None, Pillow call): the RA table of METHOD.md.
OPS = [
    ("Identity", None, lambda img, v: img),
    ("AutoContrast", None, lambda img, v: ImageOps.autocontrast(img)),
    ("Equalize", None, lambda img, v: ImageOps.equalize(img)),
    ("Rotate", (-30.0, 30.0), lambda img, v: img.rotate(v, resample=Image.NEAREST, fillcolor=GREY)),
    ("Solarize", (0.0, 1.0), lambda img, v: ImageOps.solarize(img, int(256 * v))),
    ("Color", (0.05, 0.95), lambda img, v: ImageEnhance.Color(img).enhance(v)),
    ("Posterize", (4, 8), lambda img, v: ImageOps.posterize(img, int(v))),
    ("Contrast", (0.05, 0.95), lambda img, v: ImageEnhance.Contrast(img).enhance(v)),
    ("Brightness", (0.05, 0.95), lambda img, v: ImageEnhance.Brightness(img).enhance(v)),
    ("Sharpness", (0.05, 0.95), lambda img, v: ImageEnhance.Sharpness(img).enhance(v)),
    ("ShearX", (-0.3, 0.3), lambda img, v: _affine(img, (1, v, 0, 0, 1, 0))),
    ("ShearY", (-0.3, 0.3), lambda img, v: _affine(img, (1, 0, 0, v, 1, 0))),
    ("TranslateX", (-0.3, 0.3), lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0))),
    ("TranslateY", (-0.3, 0.3), lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1]))),
]


def rand_augment(img, rng, n=2):
    """n operations drawn uniformly with replacement, magnitudes uniform in their ranges (Posterize's
    bits uniform over the integers 4..8), then Cutout: a grey square of side round(u min(W, H) / 2),
    u uniform in [0, 1), from (centre - side // 2) at a uniform pixel centre, clipped to the image
    (muscle's src/data/randaugment.rs definition)."""
    for k in rng.integers(0, len(OPS), n):
        _, rng_range, f = OPS[k]
        if rng_range is None:
            v = None
        elif isinstance(rng_range[0], int):
            v = int(rng.integers(rng_range[0], rng_range[1] + 1))
        else:
            v = float(rng.uniform(*rng_range))
        img = f(img, v)
    w, h = img.size
    side = int(round(rng.uniform(0.0, 0.5) * min(w, h)))
    cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
    x0, y0 = cx - side // 2, cy - side // 2
    x1, y1 = min(w, x0 + side), min(h, y0 + side)
    x0, y0 = max(0, x0), max(0, y0)
    if x1 > x0 and y1 > y0:
        img = img.copy()
        ImageDraw.Draw(img).rectangle((x0, y0, x1 - 1, y1 - 1), fill=GREY)
    return img


def weak_u8(images, rng, pad=2):
    """Pad with zeros, random crop back to size, horizontal flip with probability 1/2 (uint8)."""
    n, c, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty_like(images)
    dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, :, ::-1] if flip[i] else crop
    return out


def normalise(u8):
    return (torch.from_numpy(u8.astype(np.float32)) / 255.0 - MEAN) / STD


def strong_u8(images, rng):
    """The weak draw, then RandAugment + Cutout through Pillow, one grey image at a time."""
    weak = weak_u8(images, rng)
    out = np.empty_like(weak)
    for i in range(len(weak)):
        out[i, 0] = np.asarray(rand_augment(Image.fromarray(weak[i, 0]), rng))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with Fashion-MNIST's IDX files")
    ap.add_argument("--split", required=True, help="split.json of a muscle run (labeled and val indices)")
    ap.add_argument("--method", choices=["fixmatch", "fixmatch-muscle"], default="fixmatch")
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--unlabeled-batch", type=int, default=448)
    ap.add_argument("--tau", type=float, default=0.95)
    ap.add_argument("--w-u", type=float, default=1.0)
    ap.add_argument("--w-mi", type=float, default=1.0)
    ap.add_argument("--ramp", type=float, default=0.2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="metrics.jsonl to write (one line per evaluation)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    xtr, ytr = load(a.data, "train")
    xte, yte = load(a.data, "t10k")
    with open(a.split) as f:
        split = json.load(f)
    labeled = np.array(split["labeled"], dtype=np.int64)
    val = set(split["val"])
    unlabeled = np.array([i for i in range(len(xtr)) if i not in val], dtype=np.int64)
    tmean, tstd = torch.tensor([MEAN]).view(1, -1, 1, 1), torch.tensor([STD]).view(1, -1, 1, 1)

    model = convnet()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ema_model = convnet()
    ema_model.load_state_dict(model.state_dict())
    ramp_steps = round(a.ramp * a.steps)
    out = open(a.out, "w") if a.out else None
    t_start, b, u = time.time(), a.batch, a.unlabeled_batch
    kept_sum, right_sum, since = 0.0, 0.0, 0
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = a.lr * math.cos(7.0 * math.pi * step / (16.0 * a.steps))
        il = labeled[rng.integers(0, len(labeled), b)]
        iu = unlabeled[rng.integers(0, len(unlabeled), u)]
        xl = normalise(weak_u8(xtr[il], rng))
        xw = normalise(weak_u8(xtr[iu], rng))
        xs = normalise(strong_u8(xtr[iu], rng))
        logits = model(torch.cat([xl, xw, xs]))
        zl, zw, zs = logits[:b], logits[b:b + u], logits[b + u:]
        sup = F.cross_entropy(zl, torch.from_numpy(ytr[il]))
        with torch.no_grad():
            conf, pseudo = torch.softmax(zw, 1).max(1)
            mask = (conf >= a.tau).float()
        lu = (F.cross_entropy(zs, pseudo, reduction="none") * mask).mean()
        loss = sup + a.w_u * lu
        mi = torch.zeros(())
        if a.method == "fixmatch-muscle":
            w = a.w_mi * (min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0)
            mi = iic_loss(zw, zs)
            loss = loss + w * mi
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema_model, model, step)
        kept_sum += mask.mean().item()
        right_sum += (mask * (pseudo == torch.from_numpy(ytr[iu])).float()).mean().item()
        since += 1
        done = step + 1
        if done % a.eval_every == 0 or done == a.steps:
            raw = accuracy(model, xte, yte, tmean, tstd)
            avg = accuracy(ema_model, xte, yte, tmean, tstd)
            line = {"step": done, "loss": loss.item(), "sup": sup.item(), "host": lu.item(), "mi": mi.item(),
                    "mask_rate": kept_sum / since,
                    "pseudo_label_accuracy": right_sum / kept_sum if kept_sum > 0 else None,
                    "test_accuracy": raw, "test_accuracy_ema": avg, "seconds": time.time() - t_start}
            kept_sum, right_sum, since = 0.0, 0.0, 0
            print(json.dumps(line), flush=True)
            if out:
                out.write(json.dumps(line) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
