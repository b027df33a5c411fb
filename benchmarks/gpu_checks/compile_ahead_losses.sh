#!/usr/bin/env bash
# Issue 13: does training.compile_ahead change training? Its dry pass runs the first micro-batch forward and
# backward with every Triton launch skipped, then throws the gradients and losses away. Two runs of the
# proof's first-stage step (16 x 2K), compile_ahead off then on, one process each on one GPU: the second
# takes the first's autotuned tiles from Triton's cache, so both launch the same kernels, and their losses
# must agree at every step (two such runs of the step gave the same loss at all 40 steps measured; docs/proof-results.md, Repeatability).
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/compile_ahead_losses.sh   # carry [".whl"]
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
stage="stages=[{name: bench, seq_len: 2048, steps: 8, global_batch_size: 16, micro_batch_size: 16, mix: {source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}}]"
for ahead in false true; do
  timeout 200 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 8 --attention nsa \
    --set "$stage" --set training.recompute=false --set training.compile_ahead=$ahead \
    --out $OUT/ahead-$ahead-$tag.json > $OUT/ahead-$ahead-$tag.log 2>&1
  echo "compile_ahead=$ahead rc=$?"
done
python3 - $OUT $tag <<'PY'
import json, sys
off, on = (json.load(open(f"{sys.argv[1]}/ahead-{a}-{sys.argv[2]}.json"))["results"][0]["losses"] for a in ("false", "true"))
for step, (a, b) in enumerate(zip(off, on), 1):
    print(f"step {step}: loss off {a:.6f}  on {b:.6f}  {'same' if a == b else f'differs by {b - a:+.2e}'}")
print("all the same" if off == on else "NOT all the same")
import statistics
for ahead in ("false", "true"):
    times = json.load(open(f"{sys.argv[1]}/ahead-{ahead}-{sys.argv[2]}.json"))["results"][0]["step_times_s"]
    print(f"compile_ahead={ahead}: first step {times[0]:.2f} s, steps 2-{len(times)} median {statistics.median(times[1:]):.4f} s")
PY
