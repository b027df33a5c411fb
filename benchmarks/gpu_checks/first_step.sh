#!/usr/bin/env bash
# Where NSA's first training steps go on a fresh machine (issue 11/13: in the proof run at b489880 its first
# four 2K steps took 42 s, dense's first step 1.1 s): tools/bench_train.py on the proof's first-stage shape
# (16 x 2K, 256-token passkey samples attended alone, recompute off), 4 steps each, three times:
#   1. NSA with an empty Triton cache, TRITON_PRINT_AUTOTUNING=1 (each autotuned kernel and shape: the
#      seconds its search took, compiling every candidate included) and --compile-report (every compile:
#      its step, kernel, seconds, and what set it apart from the kernel's other compiles: are steps 3-4's
#      seconds new integer specializations, a size divisible by 16 in one batch and not the next?);
#   2. NSA again in a new process with the same cache (what a second run or a resume on this machine pays:
#      the compiled kernels and, since 9fcc98f, the range kernels' autotune results come from the cache);
#   3. dense with an empty cache.
# Device tool, carry [".whl"], about 2 minutes:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/first_step.sh
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
mix="{source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}"
stage="stages=[{name: bench, seq_len: 2048, steps: 4, global_batch_size: 16, micro_batch_size: 16, mix: $mix}]"
cache=$(mktemp -d)
run() {  # name attention cache-dir [env]
  local name=$1 attention=$2 dir=$3
  shift 3
  env TRITON_CACHE_DIR=$dir "$@" timeout 240 python3 tools/bench_train.py --config configs/proof_100m.yaml \
    --seq-len 2048 --steps 4 --attention $attention --set "$stage" --set training.recompute=false --compile-report \
    --out $OUT/first_step_$name-$tag.json > $OUT/first_step_$name-$tag.log 2>&1
  echo "$name rc=$? $(grep -E '^(nsa|dense) step [0-9]:' $OUT/first_step_$name-$tag.log | awk '{print $3, $4}' | tr '\n' ' ')"
}
run nsa_cold nsa $cache TRITON_PRINT_AUTOTUNING=1
grep -A2 "^Triton autotuning for function" $OUT/first_step_nsa_cold-$tag.log | grep -oE "function \w+|after [0-9.]+s" | paste - - \
  | awk '{s[$2]+=$4; n[$2]++} END {for (k in s) printf "  %-28s %2d searches %6.2f s\n", k, n[k], s[k]}'
grep -A 40 "Triton compiles by step and kernel" $OUT/first_step_nsa_cold-$tag.log | grep -v "^NVIDIA" | head -34
run nsa_warm nsa $cache
grep -A 6 "Triton compiles by step and kernel" $OUT/first_step_nsa_warm-$tag.log
run dense_cold dense $(mktemp -d)
