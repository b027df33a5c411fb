#!/usr/bin/env bash
# Issue 11: K and V in registers in the range dK/dV and one-pass kernels (KV_REGS, kernels/range_attention.py
# _dkv_tile) on the GPU, one device call, carry [".whl"]:
#   COMMIT=<sha> bash benchmarks/gpu_checks/kv_regs.sh
# Result at e897e0a (one H100): no config beat the pick (benchmarks/gpu_checks/kv_regs/).
# 1. The GPU test (test_triton_compressed_attention.py -k kv_in_registers). Stops here if it fails.
# 2. benchmarks/kernels-exp-range-configs.py, each config against the autotuner's pick, alternated:
#    - the compressed one pass at 128K and 64K (64 query / 4 KV heads, D = 128);
#    - the window's split dK/dV at 16K and 128K;
#    - the window's split dK/dV at the proof model's heads (16 / 1, D = 64) at 32K.
#    The configs that an offline sm_90a compile shows without spills with KV_REGS (32 x 64 and 16 x 64 at 4 warps),
#    and 32 x 64 without KV_REGS, to tell the tile's effect from the registers'.
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests kv-regs-$tag tests/kernels/test_triton_compressed_attention.py -k "kv_in_registers" || exit 1
configs() {  # name args...
  local name=$1
  shift
  PYTHONUNBUFFERED=1 timeout ${LIMIT:-150} ${PYTHON:-python3} benchmarks/kernels-exp-range-configs.py "$@" \
    --out $OUT/kv-regs-$name-$tag.json > /tmp/kv-regs-$name.log 2>&1
  echo "$(date +%T) $name rc=$?"
  sed -n '/configs against the autotuner/,$p' /tmp/kv-regs-$name.log | grep -v "^wrote"
}
configs onepass-compressed --branch compressed --kernel onepass --seqs 131072 65536 \
  --configs 32,64,4,2,r 32,64,4,3,r 16,64,4,2,r 32,64,4,2
configs dkv-window --branch window --kernel dkv --seqs 16384 131072 --configs 32,64,4,2,r 32,64,4,3,r 32,64,4,2
configs dkv-window-proof --branch window --kernel dkv --q-heads 16 --kv-heads 1 --head-dim 64 --seqs 32768 \
  --configs 32,64,4,2,r 64,64,4,2,r 64,128,8,2,r 32,64,4,2
