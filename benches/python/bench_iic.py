"""IIC loss forward + backward: muscle.torch.iic_loss against the PyTorch formulations a user
would write, in one run, on the CPU with the same thread count.

    python benches/python/bench_iic.py [--threads 2] [--reps 5] [--cases 262144x10,65536x100,16384x1000]

Variants: `official` is IID_loss of the IIC repository (its n x C x C broadcast product; reported
as out of memory where that intermediate cannot fit), `matmul` the same loss with the joint as
softmax(a).T @ softmax(b), each eager and under torch.compile (inductor), and muscle (fused
kernels, float32). Prints a Markdown table: median ms per forward + backward, and muscle's ratio
to the fastest PyTorch variant.
"""

import argparse
import os
import statistics
import sys
import time

import torch

import muscle
import muscle.torch as mt

EPS = torch.finfo(torch.float32).eps


def iid_loss_official(a, b, lamb=1.0):
    x, y = a.softmax(dim=1), b.softmax(dim=1)
    k = x.size(1)
    p = (x.unsqueeze(2) * y.unsqueeze(1)).sum(dim=0)
    p = (p + p.t()) / 2.0
    p = p / p.sum()
    pi = p.sum(dim=1).view(k, 1).expand(k, k)
    pj = p.sum(dim=0).view(1, k).expand(k, k)
    p = torch.clamp(p, min=EPS)
    pi = torch.clamp(pi, min=EPS)
    pj = torch.clamp(pj, min=EPS)
    return -(p * (torch.log(p) - lamb * torch.log(pj) - lamb * torch.log(pi))).sum()


def iid_loss_matmul(a, b, lamb=1.0):
    p = a.softmax(dim=1).t() @ b.softmax(dim=1)
    p = (p + p.t()) / 2.0
    p = p / p.sum()
    pi = p.sum(dim=1, keepdim=True)
    pj = p.sum(dim=0, keepdim=True)
    p = torch.clamp(p, min=EPS)
    return -(p * (torch.log(p) - lamb * torch.log(torch.clamp(pj, min=EPS)) - lamb * torch.log(torch.clamp(pi, min=EPS)))).sum()


def available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def time_fwd_bwd(fn, a, b, reps):
    def once():
        a.grad = b.grad = None
        loss = fn(a, b)
        loss.backward()
        return loss.item()

    once()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", default="262144x10,65536x100,16384x1000")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    muscle.set_threads(args.threads)
    print(f"torch {torch.__version__}, muscle {muscle.__version__}, {args.threads} threads, "
          f"median of {args.reps} forward + backward, float32, {os.uname().machine}", file=sys.stderr)
    variants = [("official (eager)", iid_loss_official, True), ("matmul (eager)", iid_loss_matmul, False)]
    if not args.no_compile:
        variants += [("official (compiled)", torch.compile(iid_loss_official), True),
                     ("matmul (compiled)", torch.compile(iid_loss_matmul), False)]
    print("| n | C | " + " | ".join(v[0] for v in variants) + " | muscle | muscle / fastest |")
    print("|---|---|" + "---|" * (len(variants) + 2))
    for case in args.cases.split(","):
        n, c = (int(v) for v in case.split("x"))
        g = torch.Generator().manual_seed(0)
        a = (torch.randn(n, c, generator=g) * 2).requires_grad_()
        b = (torch.randn(n, c, generator=g) * 2).requires_grad_()
        cells, best = [], None
        for name, fn, cube in variants:
            need = 3 * n * c * c * 4  # the product, its gradient and a temporary
            avail = available_bytes()
            if cube and avail is not None and need > avail // 2:
                cells.append(f"out of memory ({need / 2**30:.0f} GiB n x C x C)")
                continue
            try:
                ms = time_fwd_bwd(fn, a, b, args.reps)
            except (RuntimeError, MemoryError) as e:
                cells.append(f"failed: {str(e).splitlines()[0][:60]}")
                continue
            cells.append(f"{ms:.1f}")
            best = ms if best is None else min(best, ms)
        ours = time_fwd_bwd(mt.iic_loss, a, b, args.reps)
        ratio = f"{ours / best:.3f}" if best else "n/a"
        print(f"| {n} | {c} | " + " | ".join(cells) + f" | {ours:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
