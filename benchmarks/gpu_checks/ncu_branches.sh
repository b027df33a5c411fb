#!/usr/bin/env bash
# What each NSA kernel waits on (issue 11): Nsight Compute's full section set over one forward and backward
# of every branch (benchmarks/gpu_checks/ncu_branches.py), at the paper's 128K shape (64 / 4 heads of 128)
# and at the proof model's head shape (16 / 1 heads of 64) at 32K. Per shape: the report's details page
# (stall reasons, occupancy, throughput) and its raw metrics as CSV; benchmarks/gpu_checks/ncu_summary.py
# turns the CSV into one table. Clocks are left alone (--clock-control none, device METHOD.md).
# Device tool, carry [".whl"], about 3-4 minutes:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/ncu_branches.sh
# SHAPES picks among 128k, proof32k (the default pair) and 8k (the paper's heads at 8K, where selected
# attention is over half of the layer: session 50, benchmarks/gpu_checks/ncu/ncu-8k-79b11ce.*), e.g.
#   SHAPES=8k COMMIT=... bash benchmarks/gpu_checks/ncu_branches.sh
set -u
tag=${COMMIT:-unknown}
SETUP=1 source benchmarks/proof/setup.sh > $OUT/ncu-setup-$tag.log 2>&1
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)}
echo "ncu: $NCU ($($NCU --version | tail -1))"
for shape in "128k:--seq 131072 --q-heads 64 --kv-heads 4 --head-dim 128" \
             "proof32k:--seq 32768 --q-heads 16 --kv-heads 1 --head-dim 64" \
             "8k:--seq 8192 --q-heads 64 --kv-heads 4 --head-dim 128"; do
  name=${shape%%:*}
  [[ " ${SHAPES:-128k proof32k} " == *" $name "* ]] || continue
  args=${shape#*:}
  timeout ${LIMIT:-200} $NCU --clock-control none --profile-from-start off --set full --import-source no \
    -f -o $OUT/ncu-$name-$tag python3 benchmarks/gpu_checks/ncu_branches.py $args > $OUT/ncu-$name-$tag.log 2>&1
  echo "$name: ncu rc=$?"
  tail -3 $OUT/ncu-$name-$tag.log
  $NCU --import $OUT/ncu-$name-$tag.ncu-rep --page raw --csv > $OUT/ncu-$name-$tag.csv 2>&1
  $NCU --import $OUT/ncu-$name-$tag.ncu-rep --page details > $OUT/ncu-$name-$tag.txt 2>&1
  rm -f $OUT/ncu-$name-$tag.ncu-rep
  python3 benchmarks/gpu_checks/ncu_summary.py $OUT/ncu-$name-$tag.csv
done
