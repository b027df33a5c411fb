#!/usr/bin/env bash
# Issue 13: a host-side change to NSA's step timed against a base commit on one GPU, in one call, at the
# proof's first-stage shape (16 x 2K, 256-token passkey samples attended alone, where NSA's step waits on
# its host): tools/bench_train.py, 16 steps of NSA, base / this tree / base / this tree, then dense once,
# then this tree's --host-check. base.tar (git archive BASE kernels nsa_dist tools) must be in the tree:
#   git archive 46d1d1d kernels nsa_dist tools > base.tar
#   COMMIT=$(git rev-parse --short HEAD) BASE=46d1d1d bash benchmarks/gpu_checks/host_ab.sh   # carry [".whl"]
# PROFILE=1 adds this tree's --host-profile (cProfile of steps 2-16). The logs, JSONs and profile come back
# as one file, $OUT/host_ab-COMMIT.tar (the device tool returns 8 files a call): tar -xf it where they go.
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
results=$OUT
OUT=$(mktemp -d)/host_ab-$tag && mkdir -p $OUT
rm -rf /tmp/base && mkdir -p /tmp/base && cp -r configs launch /tmp/base/ && ln -s $PWD/data /tmp/base/data && tar -xf base.tar -C /tmp/base
stage="stages=[{name: bench, seq_len: 2048, steps: 16, global_batch_size: 16, micro_batch_size: 16, mix: {source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}}]"
bench() {  # bench NAME ROOT ATTENTION [extra args]
  local name=$1 root=$2 attention=$3; shift 3
  (cd $root && PYTHONPATH=/tmp/site:$root timeout 200 python3 tools/bench_train.py --config configs/proof_100m.yaml \
    --seq-len 2048 --steps 16 --attention $attention --set "$stage" --set training.recompute=false "$@" \
    --out $OUT/$name.json > $OUT/$name.log 2>&1)
  echo "$name rc=$? steps: $(grep -E "^$attention step" $OUT/$name.log | awk '{printf "%s ", $4}')"
}
bench base1-${BASE:-base} /tmp/base nsa
bench new1-$tag $PWD nsa
bench base2-${BASE:-base} /tmp/base nsa
bench new2-$tag $PWD nsa
bench dense-$tag $PWD dense
bench check-$tag $PWD nsa --host-check
grep "queued by the host" $OUT/check-$tag.log
python3 - $OUT <<'PY'
import json, statistics, sys
from pathlib import Path
rows = {}
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    result = json.loads(path.read_text())["results"][0]
    rows[path.stem] = result["step_times_s"][1:]
for name, times in rows.items():
    print(f"{name:>24}  median step {statistics.median(times):.4f} s  mean {statistics.mean(times):.4f}  (steps 2-16)")
PY
if [ "${PROFILE:-0}" = 1 ]; then
  bench profile-$tag $PWD nsa --host-profile
  grep -A 25 "host time of steps" $OUT/profile-$tag.log | head -30
fi
tar -C $(dirname $OUT) -cf $results/host_ab-$tag.tar host_ab-$tag
