#!/usr/bin/env bash
# nsa.selection_score "max" on one GPU, before a proof run uses it: the Triton top-n tests (the "max" cases
# included) and whole-NSA tests on the GPU, then top-n alone with the sum and with the max score at the
# proof's 32K and at 128K (tools/bench_kernels.py breakdown: the paper's l=32 d=16 l'=64 n=16, G=16, 4 KV
# heads, head dim 128, bf16; medians of do_bench, >= 3 runs). Device tool, carry [".whl"], about 3 minutes:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/selection_score.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_block_selection.py tests/kernels/test_triton_nsa.py \
  2>&1 | tail -2
timeout 300 python3 tools/bench_kernels.py --seqs --breakdown-seqs 32768 131072 --groups 16 --kv-heads 4 \
  --lines ours --commit ${COMMIT:-unknown} --out $OUT/selection_score-${COMMIT:-unknown}.json 2>&1 \
  | grep -i "top-n\|error\|Traceback" | tail -8
