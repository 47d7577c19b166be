#!/usr/bin/env bash
# Prints the hashes a refactor must not change: three short runs of BIN (2 threads), each run's
# checkpoint.safetensors bytes and metrics.jsonl without its timing fields. Run it with the old and
# the new binary on the same CPU and compare the output (the bits depend on the CPU family).
#   bash scripts/bitwise-baseline.sh target/release/muscle [WORKDIR]
set -euo pipefail
bin="$(realpath "$1")"
work="${2:-$(mktemp -d)}"
mkdir -p "$work"
run() {
    local name="$1"; shift
    rm -rf "$work/$name"
    "$bin" train --threads 2 --out "$work/$name" "$@" >/dev/null 2>"$work/$name.log" || { cat "$work/$name.log" >&2; exit 1; }
    local ck metrics
    ck="$(sha256sum "$work/$name/checkpoint.safetensors" | cut -c1-16)"
    metrics="$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    for k in ("images_per_second", "train_seconds", "wall_seconds", "eval_seconds"):
        m.pop(k, None)
    print(json.dumps(m, sort_keys=True))' "$work/$name/metrics.jsonl" | sha256sum | cut -c1-16)"
    echo "$name checkpoint $ck metrics $metrics"
}
run muscle-100 --steps 100 --eval-every 50
run mixmatch-muscle-5 --method mixmatch-muscle --steps 5
run wrn-supervised-5 --model wrn-28-2 --method supervised --steps 5
