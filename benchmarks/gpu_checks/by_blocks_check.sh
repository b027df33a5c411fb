#!/usr/bin/env bash
# Issue 11: selected attention's forward and dQ by key blocks (session 41; LAUNCH["fwd"|"dq"]["BY_BLOCKS"],
# built and tested under the interpreter and compiled offline for sm_90a only), on the GPU, carry [".whl"];
# one device call of about 8 minutes:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/by_blocks_check.sh
# First the by-blocks kernel tests on the GPU (bf16 included); it stops if they fail. Then
# benchmarks/kernels-exp-sweep.py --by-blocks: today's one-token forward and dQ against the kernels by key
# blocks (BLOCK_M, warps, stages, chunk) at 128K with G = 4 (where the one-token kernels pad 4 rows to 16
# and read a block's K/V for every (token, pick)) and G = 16, then the fastest at 16K (dQ: the whole
# selected backward is timed). Where they win, make them the default for those groups (selected
# attention's forward and dQ dispatch) and rerun tools/bench_kernels.py --groups 16 4 (the G = 4 target:
# 1.5x G = 16's time a query head; 1.73x at e364bce).
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests by-blocks-$tag tests/kernels/test_triton_selected_attention.py -k "by_key_blocks or matches_reference" \
  || exit 1
PYTHONUNBUFFERED=1 timeout 400 ${PYTHON:-python3} benchmarks/kernels-exp-sweep.py --kernels selected \
  --selected-parts fwd dq --by-blocks --seqs 131072 16384 --groups 4 16 --budget-s 330 \
  --out $OUT/sweep-selected-by-blocks-$tag.json > $OUT/sweep-selected-by-blocks-$tag.log 2>&1
echo "$(date +%T) sweep selected by blocks rc=$?"
sed -n '/^NVIDIA\|^interpreter/,$p' $OUT/sweep-selected-by-blocks-$tag.log
