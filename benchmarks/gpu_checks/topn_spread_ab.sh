#!/usr/bin/env bash
# Top-n's spread by runs and its heads masked once (2026-12-07), against the kernels before it on the same
# machine: the top-n GPU tests, then tools/profile_layer.py at each length given, base / new / base / new,
# printing _topn_kernel's time and the layer's. Needs base-kernels.tar in the root:
# `git archive <base> kernels > base-kernels.tar`.
#   COMMIT=<sha> BASE=<sha> bash benchmarks/gpu_checks/topn_spread_ab.sh 65536 131072
set -u
tag=${COMMIT:-unknown}
base=${BASE:-base}
mkdir -p /tmp/base && tar -xf base-kernels.tar -C /tmp/base
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton_block_selection.py \
  > $OUT/pytest-topn-spread-$tag.log 2>&1
echo "$(date +%T) GPU tests rc=$? ($(tail -1 $OUT/pytest-topn-spread-$tag.log))"
for seq in "$@"; do
  for round in 1 2; do
    for which in base new; do
      root=""; [ $which = base ] && root="--kernels-root /tmp/base"
      c=$tag; [ $which = base ] && c=$base
      # the second round's JSON comes back (a device call returns at most 8 files); every round prints
      name=profile-layer-$(date +%F)-$c-$seq
      dir=/tmp; [ $round = 2 ] && dir=$OUT
      timeout 150 python3 tools/profile_layer.py --seq $seq --commit $c $root --out $dir/$name.json > /tmp/$name.log 2>&1
      echo "$(date +%T) $which $seq round $round rc=$?"
      grep -E "_topn_kernel|_topn_merge|sum of kernel|wall time" /tmp/$name.log
    done
  done
done
