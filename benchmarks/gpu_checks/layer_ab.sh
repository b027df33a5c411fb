#!/usr/bin/env bash
# A kernel change against the kernels before it, on one machine: the GPU tests named in TESTS, then
# tools/profile_layer.py at each length given, base / new / base / new, printing the kernels whose names match
# the pattern KERNELS and the layer's sum and wall time. Needs base-kernels.tar in the root:
# `git archive <base> kernels > base-kernels.tar`.
#   COMMIT=<sha> BASE=<sha> TESTS="tests/kernels/test_x.py" KERNELS="_x_kernel" NAME=x \
#     bash benchmarks/gpu_checks/layer_ab.sh 65536 131072
# gate_delta_ab.sh and topn_spread_ab.sh are two such comparisons.
set -u
tag=${COMMIT:-unknown}
base=${BASE:-base}
name=${NAME:-layer-ab}
mkdir -p /tmp/base && tar -xf base-kernels.tar -C /tmp/base
timeout ${TEST_LIMIT:-240} python3 -m pytest -q -x -p no:cacheprovider $TESTS > $OUT/pytest-$name-$tag.log 2>&1
rc=$?  # before the echo's $(date), which would reset it
echo "$(date +%T) GPU tests rc=$rc ($(tail -1 $OUT/pytest-$name-$tag.log))"
for seq in "$@"; do
  for round in $(seq 1 ${ROUNDS:-2}); do
    for which in base new; do
      root=""; [ $which = base ] && root="--kernels-root /tmp/base"
      c=$tag; [ $which = base ] && c=$base
      # the last round's JSON comes back (a device call returns at most 8 files); every round prints
      json=profile-layer-$(date +%F)-$c-$seq
      dir=/tmp; [ $round = ${ROUNDS:-2} ] && dir=$OUT
      timeout ${PROFILE_LIMIT:-200} python3 tools/profile_layer.py --seq $seq --commit $c $root \
        --out $dir/$json.json > /tmp/$json.log 2>&1
      rc=$?
      echo "$(date +%T) $which $seq round $round rc=$rc"
      grep -E "$KERNELS|sum of kernel|wall time" /tmp/$json.log
    done
  done
done
