#!/usr/bin/env bash
# The one-pass backward's dQ through TMA bulk reductions (range_attention.TMA_DQ_REDUCE) and TMA in the range
# forward, on one GPU: the range TMA tests (every way, the bulk reduction included), then
# benchmarks/kernels-exp-range-tma.py on the branches and lengths given.
#   COMMIT=<sha> BRANCHES="compressed" SEQS="131072" WAYS="tma-kv dq-reduce tma-fwd+dq-reduce" \
#     bash benchmarks/gpu_checks/dq_reduce_check.sh
set -u
tag=${COMMIT:-unknown}
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_LIMIT:-240} python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton_range_tma.py \
    > $OUT/pytest-range-tma-$tag.log 2>&1
  rc=$?  # before the echo's $(date), which would reset it
  echo "$(date +%T) GPU tests rc=$rc ($(tail -1 $OUT/pytest-range-tma-$tag.log))"
fi
name=range-tma-$(echo $BRANCHES | tr ' ' '-')-$(echo $SEQS | tr ' ' '-')-$tag
PYTHONUNBUFFERED=1 timeout ${LIMIT:-420} python3 benchmarks/kernels-exp-range-tma.py --branches $BRANCHES \
  --seqs $SEQS --ways $WAYS --out $OUT/$name.json > $OUT/$name.log 2>&1
rc=$?
echo "$(date +%T) experiment rc=$rc"
grep -v "^  ABAB" $OUT/$name.log | tail -25
