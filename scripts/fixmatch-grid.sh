#!/bin/sh
# FixMatch against MUSCLE on full Fashion-MNIST (RESULTS.md, "FixMatch"): 1,400 steps per run,
# one labeled split per label count (--split-seed 0), seeds 0-2, resumably.
#
#   scripts/fixmatch-grid.sh [DATA_DIR] [OUT_DIR]
#
# fixmatch and fixmatch-muscle run at their defaults (SGD + Nesterov, lr 0.03, FixMatch's cosine,
# 64 + 2 x 448 images per step); supervised and muscle at the grid recipe of scripts/experiments.sh
# (AdamW, lr 2e-3, 64 + 2 x 256). Their 40-label cells on split 0 are already in
# results/fashion-mnist-1400/grid and seeds/. Finished cells (a summary.json) are skipped, so the
# grid runs over several sittings; nothing is tuned on the test set (no --val sweep here).
set -eu
cd "$(dirname "$0")/.."
DATA=${1:-/usr/share/datasets/fashion-mnist}
OUT=${2:-results/fashion-mnist-1400/fixmatch}
BIN=${BIN:-target/release/muscle}
[ -x "$BIN" ] || cargo build --release
mkdir -p "$OUT"
common="--data $DATA --steps 1400 --eval-every 200 --split-seed 0"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

for seed in 0 1 2; do
    log "fixmatch, fixmatch-muscle: 40 labels, seed $seed"
    $BIN sweep $common --methods fixmatch,fixmatch-muscle --label-counts 40 --seeds $seed --out "$OUT/fixmatch"
done
for imbalance in 1 10; do
    for seed in 0 1 2; do
        log "250 labels, imbalance $imbalance, seed $seed"
        $BIN sweep $common --methods fixmatch,fixmatch-muscle --label-counts 250 --seeds $seed \
            --label-imbalances $imbalance --out "$OUT/fixmatch"
        $BIN sweep $common --lr 2e-3 --methods supervised,muscle --label-counts 250 --seeds $seed \
            --label-imbalances $imbalance --out "$OUT/adamw"
    done
done
log "done: $OUT"
