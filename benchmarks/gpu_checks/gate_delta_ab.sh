#!/usr/bin/env bash
# The gates' backward in the branches' delta pass (2026-12-06), against the kernels before it on the same
# machine: the GPU tests of the gate and the whole layer, then tools/profile_layer.py at each length given,
# base / new / base / new. Needs base-kernels.tar in the root: `git archive <base> kernels > base-kernels.tar`.
#   COMMIT=<sha> BASE=<sha> bash benchmarks/gpu_checks/gate_delta_ab.sh 65536 131072
set -u
tag=${COMMIT:-unknown}
base=${BASE:-base}
mkdir -p /tmp/base && tar -xf base-kernels.tar -C /tmp/base
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton_gate_combine.py \
  tests/kernels/test_triton_nsa.py > $OUT/pytest-gate-delta-$tag.log 2>&1
echo "$(date +%T) GPU tests rc=$? ($(tail -1 $OUT/pytest-gate-delta-$tag.log))"
for seq in "$@"; do
  for round in 1 2; do
    for which in base new; do
      root=""; [ $which = base ] && root="--kernels-root /tmp/base"
      c=$tag; [ $which = base ] && c=$base
      # the second round's JSON comes back (a device call returns at most 8 files); every round prints
      name=profile-layer-$(date +%F)-$c-$seq
      dir=/tmp; [ $round = 2 ] && dir=$OUT
      timeout 200 python3 tools/profile_layer.py --seq $seq --commit $c $root --out $dir/$name.json > /tmp/$name.log 2>&1
      echo "$(date +%T) $which $seq round $round rc=$?"
      grep -E "_gate_bwd|_delta_kernel|sum of kernel|wall time" /tmp/$name.log
    done
  done
done
