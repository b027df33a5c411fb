#!/usr/bin/env bash
# Issue 11: selected attention's forward and dQ with the keys as their dots' M (LAUNCH KEYS_M, session 50),
# on the GPU in one device call of about 5 minutes, carry [".whl"]:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/keys_m_sweep.sh
# At G = 16 a one-token program's dots have M = 16 (the group's rows), which Hopper's warpgroup MMA cannot
# take; with the key part first (scores [keys, rows]) M is the 64 keys and the head dim, and an sm_90a compile
# uses warpgroup MMA for every dot at whole blocks and 4 warps. Whether that is faster is this call's answer.
# 1. The selected-attention kernel tests on the GPU (the KEYS_M ones included). Stops here if they fail.
# 2. kernels-exp-sweep.py --keys-m at G = 16: the forward and dQ, the code path as used against the KEYS_M
#    candidates at 8K, then today's and the 3 fastest at 64K, outputs checked against the bf16 error bound.
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests selected-$tag tests/kernels/test_triton_selected_attention.py || exit 1
PYTHONUNBUFFERED=1 timeout ${LIMIT:-240} ${PYTHON:-python3} benchmarks/kernels-exp-sweep.py --kernels selected \
  --selected-parts fwd dq --keys-m --budget-s $((${LIMIT:-240} - 60)) --seqs 8192 65536 --groups 16 \
  --out $OUT/sweep-keys-m-$tag.json > $OUT/sweep-keys-m-$tag.log 2>&1
echo "$(date +%T) sweep rc=$?"
grep -B 2 -A 30 "^kernel  " $OUT/sweep-keys-m-$tag.log | tail -40
