#!/usr/bin/env python3
"""The seed table of results/fashion-mnist-1400/seeds/README.md and RESULTS.md, from the runs.

Final EMA test accuracy of every 40-label run on seed 0's labeled split: muscle's run folders
(summary.json) and the PyTorch peer's .jsonl files (last line). Prints, per engine and method, the
seeds' accuracies, mean +- sample std, and per engine the gain (MUSCLE mean - supervised mean) with
its standard error sqrt(s1^2/n1 + s2^2/n2).

    python3 scripts/seed-table.py            # from the repository root
"""
import glob
import json
import math
import re
import os
import statistics
import sys

SEEDS = "results/fashion-mnist-1400/seeds"
GRID = "results/fashion-mnist-1400/grid"
PEER = "results/peer-torch-1400"
STEPS = 1400


def muscle_runs(method):
    """(seed, EMA test %) of muscle's runs: the grid's seed-0 cell and the seeds folder."""
    runs = {}
    for d in [f"{GRID}/{method}-n40-r1-s0"] + glob.glob(f"{SEEDS}/{method}-n40-split0-s*"):
        if not os.path.exists(f"{d}/summary.json"):
            print(f"{d}: no summary.json (unfinished), left out", file=sys.stderr)
            continue
        with open(f"{d}/summary.json") as f:
            s = json.load(f)
        runs[s["seed"]] = 100 * s["test_accuracy_ema"]
    return sorted(runs.items())


def peer_runs(method):
    """(torch seed, EMA test %) of the PyTorch peer's runs (no suffix: seed 0)."""
    runs = {}
    for p in glob.glob(f"{PEER}/{method}-n40-s0*.jsonl"):
        m = re.search(r"torchseed(\d+)\.jsonl$", p)
        with open(p) as f:
            last = [json.loads(line) for line in f if line.strip()][-1]
        if last["step"] != STEPS:
            print(f"{p}: at step {last['step']} of {STEPS} (unfinished), left out", file=sys.stderr)
            continue
        runs[int(m.group(1)) if m else 0] = 100 * last["test_accuracy_ema"]
    return sorted(runs.items())


def ema_at(path, step):
    """EMA test % at `step` from a metrics .jsonl (None when not evaluated there)."""
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                if d.get("step") == step and d.get("test_accuracy_ema") is not None:
                    return 100 * d["test_accuracy_ema"]
    return None


def mid_run(step=400):
    """The MUSCLE runs' EMA test % at `step` (the mid-run dip RESULTS.md discusses)."""
    rows = []
    for d in [f"{GRID}/muscle-n40-r1-s0"] + sorted(glob.glob(f"{SEEDS}/muscle-n40-split0-s*")):
        if os.path.exists(f"{d}/summary.json"):
            rows.append(("muscle", os.path.basename(d), ema_at(f"{d}/metrics.jsonl", step)))
    for p in sorted(glob.glob(f"{PEER}/muscle-n40-s0*.jsonl")):
        if ema_at(p, STEPS) is not None:
            rows.append(("PyTorch peer", os.path.basename(p), ema_at(p, step)))
    return rows


def summary(accs):
    mean = statistics.mean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    return mean, std, len(accs)


def main():
    print("| engine, method | seeds: EMA test % | mean +- std (n) | gain +- s.e. |")
    print("|---|---|---|---|")
    for engine, runs in [("muscle", muscle_runs), ("PyTorch peer", peer_runs)]:
        stats = {}
        for method in ["supervised", "muscle"]:
            r = runs(method)
            stats[method] = summary([a for _, a in r])
            seeds = " / ".join(f"{a:.2f} (s{s})" for s, a in r)
            mean, std, n = stats[method]
            gain = ""
            if method == "muscle":
                (m1, s1, n1), (m0, s0, n0) = stats["muscle"], stats["supervised"]
                gain = f"**{m1 - m0:+.2f}** +- {math.sqrt(s1 * s1 / n1 + s0 * s0 / n0):.2f}"
            label = "MUSCLE" if method == "muscle" else "supervised"
            print(f"| {engine}, {label} | {seeds} | {mean:.2f} +- {std:.2f} ({n}) | {gain} |")
    print()
    for engine in ["muscle", "PyTorch peer"]:
        accs = [a for e, _, a in mid_run() if e == engine and a is not None]
        vals = " / ".join(f"{a:.1f}" for a in accs)
        print(f"{engine}, MUSCLE, EMA test % at step 400: {vals} (mean {statistics.mean(accs):.2f})")


if __name__ == "__main__":
    main()
