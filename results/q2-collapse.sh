#!/usr/bin/env bash
# Reference study, question 2: layer collapse on a deep VGG with BatchNorm, before training.
# VGG-19 (width 0.25, 1.25 M prunable weights) on Fashion-MNIST, seed 0, 100 scoring samples per
# class in batches of 100; every data-dependent criterion and magnitude/random, without and with
# each cure. `fishprune analyze` scores once and reports per-layer densities and the exact
# critical sparsity (no training). SynFlow is iterative (100 rounds per probe) and left out here.
# Usage: bash results/q2-collapse.sh   (writes results/q2-collapse/<criterion>-<cure>/)
set -euo pipefail
cd "$(dirname "$0")/.."
FP=${FP:-.venv/bin/fishprune}
common=(--dataset fashion-mnist --model vgg19 --width 0.25 --score-samples 100
        --score-batch-size 100 --seed 0 --out sweeps/q2-collapse --quiet --no-plot
        --sparsities 0.8 0.9 0.95 0.98 0.99 0.995)
declare -A cures=([none]="" [bn-warmup]="--bn-warmup" [score-train]="--score-mode train"
                  [warmup-1]="--warmup-epochs 1")
run() {  # run <cure> <criteria...>
  local cure=$1; shift
  for crit in "$@"; do
    dir=results/q2-collapse/$crit-$cure
    [ -f "$dir/analysis.json" ] && continue
    # shellcheck disable=SC2086
    "$FP" analyze "${common[@]}" --criterion "$crit" ${cures[$cure]} --report-dir "$dir" \
      > /dev/null
    echo "$crit $cure done"
  done
}
# Which criteria collapse without a cure, then what each cure does for the main ones.
run none random magnitude gn snip grasp fd fp fts fbss
run warmup-1 snip fts
run none hd hp hts
for cure in warmup-1 bn-warmup score-train; do
  run "$cure" snip fts hts grasp magnitude
done
