#!/usr/bin/env python3
"""PyTorch peer of `muscle bench`: the same architecture and training step (forward, backward,
AdamW, EMA), timed the same way (warm-up, then the median of fresh augmented batches), on the
same thread count, alternated with `muscle bench` in one run so that both see the same machine.

Cases: the convnet MUSCLE step (64 labeled + 2 x 256 unlabeled views, 28x28x1, embedded
Fashion-MNIST) and the wrn-28-2 supervised step (batch 64, 32x32x3, generated images).

PyTorch runs as the variants a user would try (`--variants`): eager with default settings;
channels_last; oneDNN (mkldnn) turned off; torch.compile of the model (inductor on the CPU); and
the whole step compiled (forward + losses, the AdamW step and the EMA update, each a compiled
function: backward stays autograd's). Prints every variant's ms/step, ours, and the ratio muscle /
fastest variant (below 1: muscle is faster).

With `--precision bf16`, muscle runs `--precision bf16` (its 3x3 layers' products in bf16, f32
sums and master weights) and PyTorch the bf16 variants: the forward under
torch.autocast("cpu", torch.bfloat16) (oneDNN's bf16 convolutions and matmuls, f32 weights), the
losses on f32 logits; eager, channels_last, and the model compiled.

Usage: benches/peer/run.sh [--threads 2] [--steps 20] [--rounds 2] [--case convnet|wrn|all]
                           [--variants eager,channels_last,...] [--precision f32|bf16]
"""
import argparse
import contextlib
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
EPS = sys.float_info.epsilon


class SeqNet(nn.Module):
    """A Sequential `features` (indices count every layer) then `fc`: muscle's convnet and cnn13
    (src/nn/sequential.rs) with their PyTorch names. `plan` entries: (out, kernel, pad) for
    conv-BN-LeakyReLU(0.1), "M" for max-pool 2, "D" for dropout 0.5."""

    def __init__(self, plan, cin, classes, momentum):
        super().__init__()
        layers, c = [], cin
        for b in plan:
            if b == "M":
                layers.append(nn.MaxPool2d(2))
            elif b == "D":
                layers.append(nn.Dropout(0.5))
            else:
                out, k, pad = b
                layers += [nn.Conv2d(c, out, k, padding=pad, bias=False), nn.BatchNorm2d(out, momentum=momentum),
                           nn.LeakyReLU(0.1)]
                c = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.features(x))


def convnet(w=32, cin=1, classes=10):
    """METHOD.md's convnet exactly as muscle builds it."""
    return SeqNet([(w, 3, 1), (w, 3, 1), "M", (2 * w, 3, 1), (2 * w, 3, 1), "M", (4 * w, 3, 1)], cin, classes, 0.1)


class Block(nn.Module):
    """WRN pre-activation block as muscle builds it (src/nn/wrn.rs)."""

    def __init__(self, cin, cout, stride, activate_before_residual):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None
        self.abr = activate_before_residual

    def forward(self, x):
        if self.short is None:
            a = F.leaky_relu(self.bn1(x), 0.1)
            res, inp = x, a
        elif self.abr:
            a = F.leaky_relu(self.bn1(x), 0.1)
            res, inp = a, a
        else:
            res, inp = x, x
        h = self.conv2(F.leaky_relu(self.bn2(self.conv1(inp)), 0.1))
        return (self.short(res) if self.short is not None else res) + h


class WideResNet(nn.Module):
    def __init__(self, depth=28, widen=2, cin=3, classes=10):
        super().__init__()
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(cin, w[0], 3, 1, 1, bias=False)
        stages = []
        for s in range(3):
            stages.append(nn.Sequential(*[
                Block(w[s] if i == 0 else w[s + 1], w[s + 1], 2 if (i == 0 and s > 0) else 1, s == 0) for i in range(n)
            ]))
        self.stages = nn.Sequential(*stages)
        self.bn1 = nn.BatchNorm2d(w[3], momentum=0.001)
        self.fc = nn.Linear(w[3], classes)

    def forward(self, x):
        h = F.leaky_relu(self.bn1(self.stages(self.conv1(x))), 0.1)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@torch.no_grad()
def ema_update(ema, model, step):
    """METHOD.md's EMA after optimizer step `step` (0-based): parameters averaged with decay
    min(0.999, (1 + t) / (10 + t)), BN buffers copied from the trained model."""
    d = min(0.999, (1.0 + step) / (10.0 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - d)
    for be, bt in zip(ema.buffers(), model.buffers()):
        be.copy_(bt)


def iic_loss(za, zb, lamb=1.0):
    """IIC's IID_loss (clamps as constants), the MI term of METHOD.md."""
    x, y = torch.softmax(za, 1), torch.softmax(zb, 1)
    k = x.shape[1]
    p = x.t() @ y
    p = (p + p.t()) / 2.0
    p = p / p.sum()
    pi = p.sum(1).view(k, 1).expand(k, k)
    pj = p.sum(0).view(1, k).expand(k, k)
    eps = torch.tensor(EPS, dtype=p.dtype)
    p, pi, pj = (torch.where(t < EPS, eps, t) for t in (p, pi, pj))
    return -(p * (torch.log(p) - lamb * torch.log(pj) - lamb * torch.log(pi))).sum()


def read_idx_images(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)


class Augmenter:
    """Pad + random crop + horizontal flip + normalisation, fresh every step (as muscle's loader)."""

    def __init__(self, images, pad, reflect, mean, std, gen):
        x = torch.from_numpy(np.array(images, dtype=np.float32))
        mode = "reflect" if reflect else "constant"
        self.padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
        self.pad, self.h, self.w = pad, images.shape[2], images.shape[3]
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.gen = gen

    def batch(self, n):
        return self.images(torch.randint(0, self.padded.shape[0], (n,), generator=self.gen))

    def images(self, idx):
        """The augmented images `idx` (a LongTensor of indices into the augmenter's images)."""
        n = len(idx)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=self.gen)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=self.gen)
        rows = (dy[:, None] + torch.arange(self.h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(self.w))[:, None, None, :]
        ch = torch.arange(self.padded.shape[1])[None, :, None, None]
        x = self.padded[idx[:, None, None, None], ch, rows, cols]
        flip = torch.rand(n, generator=self.gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return (x / 255.0 - self.mean) / self.std


def resident(field):
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


VARIANTS = ["eager", "channels_last", "no-mkldnn", "compile-model", "compile-step"]
BF16_VARIANTS = ["bf16", "bf16-channels_last", "bf16-compile-model"]
# torch.backends.mkldnn.flags() warns about Intel GPUs' TF32 on every use.
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")


def torch_times(case, threads, warmup, steps, memory=None, variant="eager"):
    """Median ms per step and parameter count of one of VARIANTS; with `memory` (a dict), also the
    resident memory once model, optimizer and EMA are built and the peak over the steps (VmHWM
    restarted there). Compilation happens in the warm-up steps, which are not timed."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if case == "convnet":
        images = read_idx_images(os.path.join(ROOT, "data", "fashion-mnist-10k", "train-images-idx3-ubyte.gz"))
        aug = Augmenter(images, 2, False, [0.2860], [0.3530], gen)
        model, b, u = convnet(), 64, 256
    else:
        images = np.random.default_rng(0).integers(0, 256, (2048, 3, 32, 32), dtype=np.uint8)
        aug = Augmenter(images, 4, True, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], gen)
        model, b, u = WideResNet(), 64, 0
    model.train()
    layout = torch.channels_last if variant in ("channels_last", "bf16-channels_last") else torch.contiguous_format
    model = model.to(memory_format=layout)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    # The floating-point parameters and buffers, listed once (state_dict's tensors share storage).
    cur = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
    ema = [t.detach().clone() for t in cur]
    net = torch.compile(model) if variant in ("compile-model", "bf16-compile-model") else model
    autocast = variant in BF16_VARIANTS

    def losses(x, yl):
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net(x)
            logits = logits.float()
        else:
            logits = net(x)
        loss = F.cross_entropy(logits[:b], yl)
        if u:
            loss = loss + iic_loss(logits[b:b + u], logits[b + u:])
        return loss

    def opt_step():
        opt.step()

    @torch.no_grad()
    def ema_step():
        torch._foreach_lerp_(ema, cur, 1.0 - 0.999)

    if variant == "compile-step":
        losses, opt_step, ema_step = torch.compile(losses), torch.compile(opt_step), torch.compile(ema_step)
    settings = torch.backends.mkldnn.flags(enabled=False) if variant == "no-mkldnn" else contextlib.nullcontext()
    if memory is not None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        memory["built"] = resident("VmRSS")
    times = []
    with settings:
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            one_step(aug, gen, b, u, layout, losses, opt, opt_step, ema_step)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    if memory is not None:
        memory["peak"] = resident("VmHWM")
    return statistics.median(times) * 1e3, params


def one_step(aug, gen, b, u, layout, losses, opt, opt_step, ema_step):
    """Fresh augmented batches, forward, losses, backward, AdamW, EMA."""
    xl = aug.batch(b)
    yl = torch.randint(0, 10, (b,), generator=gen)
    if u:
        # Two augmentations of the same unlabeled images, as muscle's step.
        iu = torch.randint(0, aug.padded.shape[0], (u,), generator=gen)
        x = torch.cat([xl, aug.images(iu), aug.images(iu)])
    else:
        x = xl
    loss = losses(x.contiguous(memory_format=layout), yl)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt_step()
    ema_step()


def muscle_times(binary, case, threads, warmup, steps, precision="f32"):
    model, method = ("convnet", "muscle") if case == "convnet" else ("wrn-28-2", "supervised")
    out = subprocess.run(
        [binary, "bench", "--model", model, "--method", method, "--threads", str(threads), "--steps", str(steps),
         "--warmup", str(warmup), "--precision", precision, "--json"],
        check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["ms_per_step"], r["parameters"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--muscle", default=os.path.join(ROOT, "target", "release", "muscle"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the engines (every variant and muscle); medians over rounds")
    ap.add_argument("--case", choices=["convnet", "wrn", "all"], default="all")
    ap.add_argument("--variants", default=None,
                    help=f"PyTorch variants to time, comma-separated, of {','.join(VARIANTS + BF16_VARIANTS)} "
                         "[default: those of --precision]")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                    help="f32: muscle in f32 against the f32 variants; bf16: muscle --precision bf16 against the "
                         "autocast variants")
    ap.add_argument("--memory", action="store_true",
                    help="peak resident memory of each engine's steps, each in a fresh process, instead of times")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        mem = {}
        torch_times(a.memory_child, a.threads, a.warmup, a.steps, mem)
        print(json.dumps(mem))
        return
    if a.memory:
        print(f"torch {torch.__version__}, {a.threads} threads, {a.warmup} + {a.steps} steps; MiB")
        print(f"{'case':<26} {'engine':<8} {'built':>8} {'peak':>8} {'increment':>10}")
        for case in (["convnet", "wrn"] if a.case == "all" else [a.case]):
            child = subprocess.run([sys.executable, __file__, "--memory-child", case, "--threads", str(a.threads),
                                    "--steps", str(a.steps), "--warmup", str(a.warmup)],
                                   check=True, capture_output=True, text=True).stdout
            t = json.loads(child.strip().splitlines()[-1])
            model, method = ("convnet", "muscle") if case == "convnet" else ("wrn-28-2", "supervised")
            out = subprocess.run([a.muscle, "bench", "--model", model, "--method", method, "--threads", str(a.threads),
                                  "--steps", str(a.steps), "--warmup", str(a.warmup), "--json"],
                                 check=True, capture_output=True, text=True).stdout
            m = json.loads(out.strip().splitlines()[-1])
            mib = 1 << 20
            for engine, built, peak in [("PyTorch", t["built"], t["peak"]),
                                        ("muscle", m["resident_after_build_bytes"], m["peak_resident_bytes"])]:
                print(f"{case:<26} {engine:<8} {built / mib:>8.0f} {peak / mib:>8.0f} {(peak - built) / mib:>10.0f}")
        return
    default = BF16_VARIANTS if a.precision == "bf16" else VARIANTS
    variants = a.variants.split(",") if a.variants else default
    unknown = [v for v in variants if v not in VARIANTS + BF16_VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; choose from {VARIANTS + BF16_VARIANTS}")
    print(f"torch {torch.__version__}, {a.threads} threads, {a.steps} timed steps after {a.warmup}, {a.rounds} rounds, "
          f"muscle --precision {a.precision}")
    for case in (["convnet", "wrn"] if a.case == "all" else [a.case]):
        pytorch = [f"PyTorch {v}" for v in variants]
        engines = pytorch + ["muscle"]
        times = {e: [] for e in engines}
        counts = set()
        for r in range(a.rounds):
            # Alternate the order, so drift in the machine's speed hits every engine alike.
            for e in (engines if r % 2 == 0 else engines[::-1]):
                if e == "muscle":
                    ms, p = muscle_times(a.muscle, case, a.threads, a.warmup, a.steps, a.precision)
                else:
                    ms, p = torch_times(case, a.threads, a.warmup, a.steps, variant=e.split(" ", 1)[1])
                times[e].append(ms)
                counts.add(p)
        if len(counts) != 1:
            sys.exit(f"{case}: parameter counts differ between the engines: {sorted(counts)}")
        name = "convnet MUSCLE 64+2x256" if case == "convnet" else "wrn-28-2 supervised 64"
        med = {e: statistics.median(t) for e, t in times.items()}
        fastest = min(pytorch, key=med.get)
        print(f"{name} ({counts.pop()} parameters), median ms/step (per round):")
        for e in engines:
            rounds = ", ".join(f"{t:.1f}" for t in times[e])
            mark = "  <- fastest PyTorch" if e == fastest else ""
            print(f"  {e:<24} {med[e]:>9.1f}   ({rounds}){mark}")
        per_round = ", ".join(f"{m / min(times[e][r] for e in pytorch):.2f}"
                              for r, m in enumerate(times["muscle"]))
        print(f"  muscle / fastest PyTorch: {med['muscle'] / med[fastest]:.2f}   (per round against that round's "
              f"fastest: {per_round})")


if __name__ == "__main__":
    main()
