#!/usr/bin/env bash
# Issue 11: tools/bench_kernels.py on the GPU machine, one slice of its grid a device call (carry [".whl"]).
# A cold machine autotunes every kernel on first use: at fc59b42 the per-branch breakdown at 128K and one
# shape's five lines (ours paper, cuDNN, flash, ours fla-config, fla) did not fit 300 s, so give each call one
# length and one group, e.g.
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/bench_kernels.sh 131072 16
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/bench_kernels.sh 131072 4 --breakdown-seqs
# Arguments: the length, the group, then anything more for bench_kernels.py (its defaults: lines ours, dense
# and fla, phi mean, the breakdown at 128K). fla-core comes from .whl (setup.sh with FLA=1).
set -u
seq=${1:?"say the length, e.g. 131072"}
group=${2:?"say the group size, e.g. 16"}
shift 2
tag=${COMMIT:-unknown}
FLA=1 source benchmarks/proof/setup.sh
name=kernels-$(date +%F)-$tag-${seq}-g${group}
PYTHONUNBUFFERED=1 timeout ${LIMIT:-540} python3 tools/bench_kernels.py --seqs $seq --groups $group \
  --lines ours dense fla --phis mean --commit $tag --out $OUT/$name.json "$@" > $OUT/$name.log 2>&1
echo "$(date +%T) bench_kernels $seq G=$group rc=$? (124: past ${LIMIT:-540} s)"
sed -n "/ratio = baseline/,\$p" $OUT/$name.log  # the tables and targets, not the per-shape lines
# what the branches' floors allow against the same run's cuDNN (no GPU work; skipped without cuDNN rows)
python3 tools/kernel_floors.py $OUT/$name.json --group $group 2>&1 | grep -E "^T=|floors sum|no cuDNN row" || true
