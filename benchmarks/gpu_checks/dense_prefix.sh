#!/usr/bin/env bash
# The selected branch's dense prefix (kernels/nsa.py selected_branch: rows among the first n * l' tokens of
# their document on the window kernel) on the GPU, one device call (carry [".whl"], about 5 minutes):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/dense_prefix.sh
# 1. The Triton tests it touches (window, selected, NSA), in bf16-capable CUDA, not the interpreter.
# 2. The proof's first-stage training step (16 x 2K, 256-token passkey samples attended alone, bf16, as
#    profile_2k.sh) with the prefix off and on, alternated twice, each in its own process, then dense;
#    and the 8K stage's step (8 x 8K, samples of 2K-8K tokens) off and on once.
set -u
source benchmarks/proof/setup.sh
tag=${COMMIT:-unknown}
source benchmarks/gpu_checks/kernel_tests.sh
if [ "${KERNEL_TESTS:-1}" = 1 ]; then  # KERNEL_TESTS=0: timings only (a machine that has run them)
  kernel_tests $tag tests/kernels/test_triton_window_attention.py tests/kernels/test_triton_selected_attention.py \
    tests/kernels/test_triton_nsa.py || exit 1
fi
echo "$(date +%T) timings"
mix2k="{source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}"
stage2k="stages=[{name: bench, seq_len: 2048, steps: 12, global_batch_size: 16, micro_batch_size: 16, mix: $mix2k}]"
mix8k="{source: 0.3, passkey: 0.6, multikey_niah: 0.1, task_min_length: 2048}"
stage8k="stages=[{name: bench, seq_len: 8192, steps: 12, global_batch_size: 8, micro_batch_size: 8, mix: $mix8k}]"
run() {  # run NAME SEQ_LEN STAGE ATTENTION PREFIX
  NSA_DIST_DENSE_PREFIX=$5 timeout 150 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len $2 \
    --steps 12 --attention $4 --set "$3" --set training.recompute=false --out $OUT/dense_prefix_$1-$tag.json \
    > $OUT/dense_prefix_$1-$tag.log 2>&1
  echo "$1 (prefix $5) rc=$?: $(grep -A 2 'speed vs' $OUT/dense_prefix_$1-$tag.log | tail -1)"
}
run 2k_off_a 2048 "$stage2k" nsa 0
run 2k_on_a 2048 "$stage2k" nsa 1
run 2k_off_b 2048 "$stage2k" nsa 0
run 2k_on_b 2048 "$stage2k" nsa 1
run 2k_dense 2048 "$stage2k" dense 1
run 8k_off 8192 "$stage8k" nsa 0
run 8k_on 8192 "$stage8k" nsa 1
