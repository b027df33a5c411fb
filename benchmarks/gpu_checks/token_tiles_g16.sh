#!/usr/bin/env bash
# Issue 11: selected attention's token tiles at G = 16 (session 50). Nsight Compute found the one-token
# forward and dQ bound by L2 (87% and 84% of its throughput at 8K, 98% L2 hits, 14.6 and 15.3 GB through it:
# benchmarks/gpu_checks/ncu-layer-8192-79b11ce.txt): each token re-reads the K/V of the blocks it picked.
# A tile of TOKENS consecutive tokens reads each distinct block of their picks once (LAUNCH TOKENS). One
# device call of about 3 minutes, carry [".whl"]:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/token_tiles_g16.sh
# kernels-exp-sweep.py --tokens at G = 16, forward and dQ: the code path as used against token tiles of 2,
# 4 and 8 at 8K, then today's and the 3 fastest at 64K, outputs checked against the bf16 error bound. The
# benchmark's picks come from top-n on random q and k, which overlap less between neighbouring tokens than
# a trained model's (union of 4 tokens' picks: 2.34x one token's, against 1.52x in the proof model).
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
PYTHONUNBUFFERED=1 timeout ${LIMIT:-240} ${PYTHON:-python3} benchmarks/kernels-exp-sweep.py --kernels selected \
  --selected-parts fwd dq --tokens --budget-s $((${LIMIT:-240} - 60)) --seqs 8192 65536 --groups 16 \
  --out $OUT/sweep-tokens-g16-$tag.json > $OUT/sweep-tokens-g16-$tag.log 2>&1
echo "$(date +%T) sweep rc=$?"
grep -A 30 "^kernel  " $OUT/sweep-tokens-g16-$tag.log | tail -32
