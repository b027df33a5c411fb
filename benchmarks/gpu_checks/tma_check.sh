#!/usr/bin/env bash
# Issue 11: K/V through TMA tensor descriptors (session 40, built and tested under the interpreter only),
# on the GPU in one device call (about 6-8 minutes), carry [".whl"]:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/tma_check.sh
# 1. The TMA kernel tests on the GPU (bf16 included): the range attention's forward and dQ
#    (tests/kernels/test_triton_range_tma.py) and selected attention's (-k tma). Stops here if they fail:
#    the interpreter accepts descriptor shapes a GPU may reject.
# 2. Range attention, pointer loads against TMA, ABAB (benchmarks/kernels-exp-range-tma.py): both branches
#    at 16K and 128K with the paper's heads (64 / 4 of 128), then the proof model's (16 / 1 of 64) at 32K in
#    documents of 8K.
# 3. Selected attention's forward and dQ, today's launch against its TMA variants
#    (benchmarks/kernels-exp-sweep.py --tma-only) at 128K, then the fastest at 16K.
# If TMA wins, turn it on: range_attention.TMA_LOADS, and "TMA": True in selected attention's default
# launches (_forward_launch, _dq_launch).
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests tma-$tag tests/kernels/test_triton_range_tma.py tests/kernels/test_triton_selected_attention.py \
  -k tma || exit 1
range_tma() {  # name args...
  local name=$1
  shift
  PYTHONUNBUFFERED=1 timeout 200 ${PYTHON:-python3} benchmarks/kernels-exp-range-tma.py "$@" \
    --out $OUT/range-tma-$name-$tag.json > $OUT/range-tma-$name-$tag.log 2>&1
  echo "$(date +%T) range tma $name rc=$?"
  sed -n '/^range attention, K\/V/,$p' $OUT/range-tma-$name-$tag.log
}
range_tma paper --seqs 16384 131072
range_tma proof --seqs 32768 --q-heads 16 --kv-heads 1 --head-dim 64 --doc-len 8192
PYTHONUNBUFFERED=1 timeout 200 ${PYTHON:-python3} benchmarks/kernels-exp-sweep.py --kernels selected \
  --selected-parts fwd dq --tma-only --seqs 131072 16384 --groups 16 --budget-s 140 \
  --out $OUT/sweep-selected-tma-$tag.json > $OUT/sweep-selected-tma-$tag.log 2>&1
echo "$(date +%T) sweep selected tma rc=$?"
grep -A 8 "^best passing config" $OUT/sweep-selected-tma-$tag.log
