#!/usr/bin/env bash
# Issue 13, the cold start: training.compile_ahead (kernels/compile_ahead.py) against the first step compiling
# each kernel as it launches it. First the GPU test (a real NSA step after compiling ahead compiles nothing
# and matches the reference), then tools/bench_train.py on the proof's first-stage shape (16 x 2K, as
# first_step.sh), 4 steps, each run a new process with an empty Triton cache: off, on, REPEATS times (2).
# Device tool, carry [".whl"], about 4 minutes:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/compile_ahead.sh
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests compile-ahead-$tag tests/kernels/test_compile_ahead.py -s
grep -o "{'kernels'.*" $OUT/pytest-kernels-compile-ahead-$tag.log | head -1
mix="{source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}"
stage="stages=[{name: bench, seq_len: 2048, steps: 4, global_batch_size: 16, micro_batch_size: 16, mix: $mix}]"
run() {  # name compile_ahead
  local name=$1 ahead=$2
  TRITON_CACHE_DIR=$(mktemp -d) timeout 240 python3 tools/bench_train.py --config configs/proof_100m.yaml \
    --seq-len 2048 --steps 4 --attention nsa --set "$stage" --set training.recompute=false \
    --set training.compile_ahead=$ahead --compile-report --out $OUT/compile_ahead_$name-$tag.json \
    > $OUT/compile_ahead_$name-$tag.log 2>&1
  echo "$name rc=$? $(grep -E '^nsa step [0-9]:' $OUT/compile_ahead_$name-$tag.log | awk '{print $3, $4}' | tr '\n' ' ')"
  grep -o "compiled [0-9]* Triton kernels.*" $OUT/compile_ahead_$name-$tag.log
  grep -A3 "Triton compiles by step and kernel" $OUT/compile_ahead_$name-$tag.log | tail -2
}
for i in $(seq ${REPEATS:-2}); do
  run off$i false
  run on$i true
done
