#!/usr/bin/env python3
"""The seed table of results/fashion-mnist-1400/seeds/README.md and RESULTS.md, from the runs.

Final EMA test accuracy of every 40-label run on seed 0's labeled split: muscle's run folders
and the PyTorch peer's (the evaluation at step 1400 of each metrics .jsonl). Prints, per engine and method, the
seeds' accuracies, mean +- sample std, and per engine the gain (MUSCLE mean - supervised mean) with
its standard error sqrt(s1^2/n1 + s2^2/n2).

    python3 scripts/seed-table.py            # from the repository root
"""
import glob
import json
import math
import os
import re
import statistics
import sys

SEEDS = "results/fashion-mnist-1400/seeds"
GRID = "results/fashion-mnist-1400/grid"
PEER = "results/peer-torch-1400"
STEPS = 1400


def finished_runs(engine, method):
    """(seed, metrics .jsonl) of the finished runs of one engine and method: muscle's run folders
    with a summary.json (the grid's seed-0 cell and the seeds folder), the peer's .jsonl files whose
    last evaluation is at STEPS (no torchseed suffix: seed 0)."""
    runs = []
    if engine == "muscle":
        for d in [f"{GRID}/{method}-n40-r1-s0"] + glob.glob(f"{SEEDS}/{method}-n40-split0-s*"):
            if not os.path.exists(f"{d}/summary.json"):
                print(f"{d}: no summary.json (unfinished), left out", file=sys.stderr)
                continue
            with open(f"{d}/summary.json") as f:
                runs.append((json.load(f)["seed"], f"{d}/metrics.jsonl"))
    else:
        for p in glob.glob(f"{PEER}/{method}-n40-s0*.jsonl"):
            if ema_at(p, STEPS) is None:
                print(f"{p}: no evaluation at step {STEPS} (unfinished), left out", file=sys.stderr)
                continue
            m = re.search(r"torchseed(\d+)\.jsonl$", p)
            runs.append((int(m.group(1)) if m else 0, p))
    return sorted(runs)


def ema_at(path, step):
    """EMA test % at `step` from a metrics .jsonl (None when not evaluated there)."""
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                if d.get("step") == step and d.get("test_accuracy_ema") is not None:
                    return 100 * d["test_accuracy_ema"]
    return None


def summary(accs):
    mean = statistics.mean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    return mean, std, len(accs)


def main():
    print("| engine, method | seeds: EMA test % | mean +- std (n) | gain +- s.e. |")
    print("|---|---|---|---|")
    engines = ["muscle", "PyTorch peer"]
    for engine in engines:
        stats = {}
        for method in ["supervised", "muscle"]:
            r = [(seed, ema_at(p, STEPS)) for seed, p in finished_runs(engine, method)]
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
    # The mid-run dip RESULTS.md discusses.
    mid = 400
    for engine in engines:
        accs = [ema_at(p, mid) for _, p in finished_runs(engine, "muscle")]
        accs = [a for a in accs if a is not None]
        vals = " / ".join(f"{a:.1f}" for a in accs)
        print(f"{engine}, MUSCLE, EMA test % at step {mid}: {vals} (mean {statistics.mean(accs):.2f})")


if __name__ == "__main__":
    main()
