#!/usr/bin/env python3
"""Direct vs im2col + GEMM convolutions, alternated in one run: `muscle bench --op conv --json`
with and without MUSCLE_CONV=gemm, ROUNDS times, then the median per case and variant and the
per-step total (each case weighted by how often a step runs it).

Usage: MODEL=wrn-28-2|convnet python3 scripts/conv-ab.py ROUNDS LABEL=[VAR~VALUE]:BINARY ...
  e.g. MODEL=convnet python3 scripts/conv-ab.py 3 direct=:target/release/muscle \
           gemm=MUSCLE_CONV~gemm:target/release/muscle
"""
import json, subprocess, sys, statistics, os
rounds = int(sys.argv[1]); variants = sys.argv[2:]
MODEL = os.environ.get("MODEL", "wrn-28-2")
res = {}
for r in range(rounds):
    for v in variants:
        label, spec = v.split("=", 1)
        env, binp = spec.split(":", 1)
        e = dict(os.environ)
        if env: k, val = env.split("~"); e[k] = val
        out = subprocess.run([binp, "bench", "--op", "conv", "--model", MODEL, "--steps", "5", "--json"], env=e, capture_output=True, text=True).stdout
        for line in out.splitlines():
            j = json.loads(line)
            res.setdefault(j["case"], {}).setdefault(label, []).append(j["ms"])
labels = [v.split("=")[0] for v in variants]
tot = {l: 0.0 for l in labels}
for case, d in res.items():
    cnt = 1
    if "(x" in case: cnt = int(case.split("(x")[1].split(")")[0])
    meds = {l: statistics.median(d[l]) for l in labels}
    for l in labels: tot[l] += cnt * meds[l]
    print(f"{case[:60]:60s} " + " ".join(f"{l}={meds[l]:7.3f}" for l in labels) + f"  ratio={meds[labels[0]]/meds[labels[1]]:.2f}")
print("per-step total ms: " + " ".join(f"{l}={tot[l]:.1f}" for l in labels))
