#!/usr/bin/env bash
# Issue 11: selected dK/dV with the keys as the dots' M (LAUNCH["dkv"] KEYS_M, BLOCK_N rows a step) on the GPU,
# one device call, carry [".whl"]:
#   COMMIT=<sha> bash benchmarks/gpu_checks/dkv_keys_m.sh
# 1. Its GPU tests (test_triton_selected_attention.py -k dkv_keys_m): the kernel compiles and matches the
#    reference there. Stops here if not.
# 2. The dK/dV sweep, today's config against KEYS_M at 16, 32 and 64 rows (keys_m_dkv_variants): G = 16 at 128K and
#    16K and G = 4 at 128K (4 KV heads, D = 128), then the proof model's heads (16 / 1, D = 64) at 32K.
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests keys-m-$tag tests/kernels/test_triton_selected_attention.py -k "dkv_keys_m" || exit 1
sweep() {  # name sweep-args...
  local name=$1
  shift
  PYTHONUNBUFFERED=1 timeout 200 ${PYTHON:-python3} benchmarks/kernels-exp-sweep.py --kernels selected \
    --selected-parts dkv --dkv-keys-m --budget-s 120 "$@" --out $OUT/sweep-$name-$tag.json \
    > $OUT/sweep-$name-$tag.log 2>&1
  echo "$(date +%T) sweep $name rc=$?"
  grep -B 2 -A 12 "^best passing config" $OUT/sweep-$name-$tag.log
}
sweep dkv-keys-m-g16 --seqs 131072 16384 --groups 16
sweep dkv-keys-m-g4 --seqs 131072 --groups 4
sweep dkv-keys-m-proof --seqs 32768 --groups 16 --kv-heads 1 --head-dim 64
