#!/usr/bin/env bash
# Issue 11: selected attention's launch options added in session 25, on the GPU in one device call (about
# 7 minutes, so that two proof runs fit the same session), carry [".whl"]:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/selected_sweep.sh
# 1. The selected-attention kernel tests on the GPU: key parts (BLOCK_K) and token tiles (TOKENS) compile
#    and match the reference there (the interpreter accepts tile shapes a GPU rejects). Stops here if not.
# 2. The sweep at G = 16: the candidates at 8K (BLOCK_K 64/32/16 x warps x stages for the forward and dQ,
#    2 warps first; what the budget leaves out is reported as skipped), then today's and the 3 fastest at
#    128K. Offline, BLOCK_K 16 fits 2.5x the programs a multiprocessor
#    (benchmarks/selected-occupancy-offline.py); whether that is faster is this sweep's answer.
# 3. The sweep at G = 4, 128K: token tiles (TOKENS 4 and 8 against 1) with BLOCK_K 64/16.
# Each sweep prints its table; the JSONs and logs come back in $OUT.
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests selected-$tag tests/kernels/test_triton_selected_attention.py || exit 1
sweep() {  # name budget-s sweep-args...
  local name=$1 budget=$2
  shift 2
  PYTHONUNBUFFERED=1 timeout $((budget + 60)) ${PYTHON:-python3} benchmarks/kernels-exp-sweep.py --kernels selected \
    --budget-s $budget "$@" --out $OUT/sweep-$name-$tag.json > $OUT/sweep-$name-$tag.log 2>&1
  echo "$(date +%T) sweep $name rc=$?"
  grep -A 12 "^best passing config" $OUT/sweep-$name-$tag.log
}
sweep selected-g16 150 --seqs 8192 131072 --groups 16
sweep selected-g4 100 --seqs 131072 --groups 4
