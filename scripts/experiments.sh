#!/bin/sh
# The paper's four claims on full Fashion-MNIST (RESULTS.md): every cell of the grid, resumably.
#
#   scripts/experiments.sh [DATA_DIR] [OUT_DIR]
#
# STEPS (default 500) sets every run's step budget; EVAL_EVERY (default 100) its evaluation
# period; LR (default 2e-3) the learning rate. Finished cells (a summary.json) are kept and
# skipped, so the grid can be run in several
# sittings, and rerun with a longer budget into another OUT_DIR. Runs one training at a time on
# all cores: let nothing else heavy run beside it if its wall times are to be reported.
set -eu
cd "$(dirname "$0")/.."
DATA=${1:-/usr/share/datasets/fashion-mnist}
STEPS=${STEPS:-500}
EVAL_EVERY=${EVAL_EVERY:-100}
OUT=${2:-results/fashion-mnist-$STEPS}
BIN=${BIN:-target/release/muscle}
[ -x "$BIN" ] || cargo build --release
mkdir -p "$OUT"
# The grid's recipe keeps lr 2e-3 (METHOD.md's), whatever `muscle train`'s default is now.
LR=${LR:-2e-3}
common="--data $DATA --steps $STEPS --eval-every $EVAL_EVERY --lr $LR"
methods=supervised,muscle,mixmatch,mixmatch-muscle
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

# Claims 1 and 2 (MUSCLE helps, alone and added to MixMatch; more so with fewer labels), seed 0
# first so that a partial grid already covers every label count.
for labels in 40 250 1000; do
    log "sweep: $labels labels, seed 0"
    $BIN sweep $common --methods $methods --label-counts $labels --seeds 0 --out "$OUT/grid"
done
log "sweep: 40 labels, seed 1"
$BIN sweep $common --methods $methods --label-counts 40 --seeds 1 --out "$OUT/grid"
# Claim 3: a biased labeled set (R = 10) at 250 labels.
log "sweep: 250 labels, imbalance 10"
$BIN sweep $common --methods $methods --label-counts 250 --seeds 0 --label-imbalances 10 --out "$OUT/grid"
# Claim 4: IIC pre-training on the unlabeled images, then 40 labels with supervised and MUSCLE
# fine-tuning (the scratch runs are the grid's 40-label cells).
if [ ! -f "$OUT/pretrain/summary.json" ]; then
    log "pretrain"
    rm -rf "$OUT/pretrain"
    $BIN pretrain $common --out "$OUT/pretrain"
fi
for method in supervised muscle; do
    if [ ! -f "$OUT/finetune-$method/summary.json" ]; then
        log "fine-tune: $method"
        rm -rf "$OUT/finetune-$method"
        $BIN train $common --method $method --labels 40 --init "$OUT/pretrain/checkpoint.safetensors" \
            --out "$OUT/finetune-$method"
    fi
done
log "done: $OUT"
