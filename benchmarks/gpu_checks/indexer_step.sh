#!/usr/bin/env bash
# Issue 13: the learned indexer (nsa.indexer_heads, kernels/block_selection/indexer.py; built and tested on
# CPU only in session 44) on the proof's 32k and 8k stage steps, one H200, carry [".whl"]; one device call
# of about 8 minutes, or two (the argument: 32k, then 8k; the tests and the layer lines run in both):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/indexer_step.sh [32k|8k]
# First the indexer's tests on the GPU (its picks through the exact score's kernels); it stops if they fail.
# Then one layer and top-n alone at the proof's stage shapes (tools/bench_selection_loss.py), then
# tools/bench_train.py on the proof model, medians of steps 2-10, each stage's own length, batch, base
# and mix: dense; NSA ranking by the exact score (v27's 8k and 32k stages); by the indexer with 4 heads
# (a quarter of the exact score's per-head passes) and its loss on every 128th row; the same with the loss
# off (nsa.indexer_loss=0: what the loss itself costs). BASELINE=path: an earlier copy of
# kernels/block_selection/indexer.py (in a folder carried with the call), whose loss alone is timed beside
# the current one's (bench_selection_loss.py --indexer-baseline), e.g. from the repository's root:
#   mkdir -p .baseline && git show f679137:kernels/block_selection/indexer.py > .baseline/indexer_f679137.py
#   (.baseline/ in .git/info/exclude; carry [".whl", ".baseline"]; BASELINE=.baseline/indexer_f679137.py)
set -u
tag=${COMMIT:-unknown}
which=${1:-all}  # all, 32k, 8k, or indexer (both stages' indexer lines, loss on and off, no exact or dense line)
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests indexer-$tag tests/kernels/test_indexer.py || exit 1
# the layer and top-n alone at the proof's three stage shapes: sum, exact, indexer (4 heads, loss every 128th row)
timeout 180 python3 tools/bench_selection_loss.py --strides --scores exact indexer --no-dense \
  ${BASELINE:+--indexer-baseline $BASELINE} --out $OUT/indexer_layer-$tag.json > $OUT/indexer_layer-$tag.log 2>&1
echo "$(date +%T) layer and top-n rc=$?"
grep -E "layer|top-n|indexer loss" $OUT/indexer_layer-$tag.log
step() {  # name seq_len batch base mix score [--set ...]
  local name=$1 seq=$2 batch=$3 base=$4 mix=$5 score=$6; shift 6
  local stage="stages=[{name: bench, seq_len: $seq, steps: 10, global_batch_size: $batch, micro_batch_size: $batch,"
  stage="$stage rotary_base: $base, selection_score: $score, mix: $mix}]"
  timeout 100 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len $seq --steps 10 \
    --set "$stage" --set training.recompute=false "$@" --out $OUT/indexer_$name-$tag.json \
    > $OUT/indexer_$name-$tag.log 2>&1
  echo "$(date +%T) $name rc=$?"
  grep -A 4 "NSA implementation" $OUT/indexer_$name-$tag.log | tail -3
}
mix32="{source: 0.3, passkey: 0.6, multikey_niah: 0.1, task_min_length: 1024}"
mix8="{source: 0.3, passkey: 0.6, multikey_niah: 0.1, task_min_length: 2048}"
idx=(--set nsa.indexer_heads=4 --set nsa.indexer_loss_stride=128)
if [ "$which" = indexer ]; then
  step 8k-indexer 8192 8 160000.0 "$mix8" indexer --attention nsa "${idx[@]}"
  step 8k-indexer-noloss 8192 8 160000.0 "$mix8" indexer --attention nsa "${idx[@]}" --set nsa.indexer_loss=0
  step 32k-indexer 32768 1 2560000.0 "$mix32" indexer --attention nsa "${idx[@]}"
  step 32k-indexer-noloss 32768 1 2560000.0 "$mix32" indexer --attention nsa "${idx[@]}" --set nsa.indexer_loss=0
  exit 0
fi
if [ "$which" != 8k ]; then
  step 32k-exact 32768 1 2560000.0 "$mix32" exact --attention dense,nsa
  step 32k-indexer 32768 1 2560000.0 "$mix32" indexer --attention nsa "${idx[@]}"
  step 32k-indexer-noloss 32768 1 2560000.0 "$mix32" indexer --attention nsa "${idx[@]}" --set nsa.indexer_loss=0
fi
if [ "$which" != 32k ]; then
  step 8k-exact 8192 8 160000.0 "$mix8" exact --attention dense,nsa
  step 8k-indexer 8192 8 160000.0 "$mix8" indexer --attention nsa "${idx[@]}"
  step 8k-indexer-noloss 8192 8 160000.0 "$mix8" indexer --attention nsa "${idx[@]}" --set nsa.indexer_loss=0
fi
