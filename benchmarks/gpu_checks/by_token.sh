#!/usr/bin/env bash
# Issue 11: selected dK/dV one token a step (LAUNCH["dkv"]["BY_TOKEN"], 10e0368) on the GPU, one device call,
# carry [".whl"]:
#   COMMIT=<sha> bash benchmarks/gpu_checks/by_token.sh
# 1. Its GPU tests (test_triton_selected_attention.py -k dkv_by_token): the kernel compiles and matches the
#    reference there. Stops here if not.
# 2. The dK/dV sweep, today's config against BY_TOKEN at 4 and 8 warps, 2 and 3 stages: G = 16 at 128K and
#    16K (64 query / 4 KV heads, D = 128), then the proof model's heads (16 / 1, D = 64) at 32K.
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests by-token-$tag tests/kernels/test_triton_selected_attention.py -k "dkv_by_token" || exit 1
sweep() {  # name sweep-args...
  local name=$1
  shift
  PYTHONUNBUFFERED=1 timeout 200 ${PYTHON:-python3} benchmarks/kernels-exp-sweep.py --kernels selected \
    --selected-parts dkv --by-token --budget-s 120 "$@" --out $OUT/sweep-$name-$tag.json > $OUT/sweep-$name-$tag.log 2>&1
  echo "$(date +%T) sweep $name rc=$?"
  grep -B 2 -A 12 "^best passing config" $OUT/sweep-$name-$tag.log
}
sweep dkv-by-token-g16 --seqs 131072 16384 --groups 16
sweep dkv-by-token-proof --seqs 32768 --groups 16 --kv-heads 1 --head-dim 64
