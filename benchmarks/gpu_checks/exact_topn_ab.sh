#!/usr/bin/env bash
# Issue 13: top-n's exact score (nsa.selection_score: exact), this tree's kernels against BASE's, on one GPU
# in one call: the top-n kernel tests, then tools/bench_exact_score.py with BASE's kernels (saving their
# picks), with this tree's (against those picks, and a sweep of _topn_exact_kernel's launch parameters), and
# BASE's again. Each shape's first pass (the lse) is timed beside the whole, so top-n alone is the difference.
# base.tar (git archive BASE kernels) must be in the tree:
#   git archive 3402406 kernels > base.tar
#   COMMIT=$(git rev-parse --short HEAD) BASE=3402406 bash benchmarks/gpu_checks/exact_topn_ab.sh  # carry [".whl"]
set -u
tag=${COMMIT:-unknown}
base=${BASE:?"set BASE to the commit base.tar was made from"}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests exact-$tag tests/kernels/test_triton_block_selection.py || exit 1
rm -rf /tmp/base && mkdir -p /tmp/base && tar -xf base.tar -C /tmp/base
score() {  # score NAME [args]: one bench_exact_score run, its output in $OUT/NAME.log
  local name=$1; shift
  timeout 240 python3 tools/bench_exact_score.py "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1
  echo "== $name rc=$?"; grep -v "^ " $OUT/$name.log | tail -40
}
score exact-score-base1-$base --kernels-root /tmp/base --commit $base --picks /tmp/base_picks.pt
score exact-score-$tag --commit $tag --against /tmp/base_picks.pt --launches ${SWEEP:-}
score exact-score-base2-$base --kernels-root /tmp/base --commit $base
