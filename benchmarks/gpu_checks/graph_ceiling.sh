#!/usr/bin/env bash
# Issue 13: how much of NSA's first-stage step a CUDA graph could take away, before the work that makes
# one possible for every micro-batch (benchmarks/graph-readiness.py: 137 of a layer's 343 calls change
# with the documents). Session 48 measured the 16 x 2K step host-bound on an H100: the host queued
# NSA's forward+backward in 130.8 ms and the device finished 0.1 ms later; dense's 45.2 / 74.6 ms.
# One device call of about 3 minutes, carry [".whl"]:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/graph_ceiling.sh
# tools/bench_train.py --graph-ceiling on the proof model at the first stage's step (as host_2k.sh),
# NSA, then dense, each in its own process (a failed capture may leave its process unable to run more): after the
# last step, the same micro-batch run eagerly and as a replayed CUDA graph. A capture that fails prints
# its error and the line it came from: the first thing to fix.
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
mix="{source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}"
stage="stages=[{name: bench, seq_len: 2048, steps: 6, global_batch_size: 16, micro_batch_size: 16, mix: $mix}]"
# one process per attention: a capture that fails can leave CUDA unusable for the rest of its process
for attention in nsa dense; do
  log=$OUT/graph_ceiling_2k-$attention-$tag.log
  timeout 200 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 6 \
    --attention $attention --set "$stage" --set training.recompute=false --graph-ceiling \
    --out $OUT/graph_ceiling_2k-$attention-$tag.json > $log 2>&1
  echo "$(date +%T) $attention graph ceiling rc=$?"
  grep -E "fixed step|capture failed|NSA implementation|^ +(dense|nsa) " $log || tail -5 $log
done
