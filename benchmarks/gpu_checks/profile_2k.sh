#!/usr/bin/env bash
# Where the proof's first-stage step goes (issue 13: NSA's 2K step is 1.6x dense's, and the curriculum spends
# 66% of its steps at 2K), on one GPU: tools/bench_train.py on the proof model's stage shape (16 x 2K,
# 256-token passkey samples attended alone, bf16, recompute off as in the proof), dense then NSA in one
# process, with torch.profiler over steps 2-3 (device time by operator), then NSA again with Python's
# cProfile over steps 2-8 (the host's share), then where the host waits for the GPU (--sync-check).
# Device tool, carry [".whl"], about 4 minutes:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/profile_2k.sh
# PRECHECK=1 first runs the selected-attention kernel tests on the GPU (kernel_tests.sh) and stops if they
# fail: for a kernel on the training path that has not yet run on a GPU (the inverted index, 5cbbb44).
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
if [ "${PRECHECK:-0}" = 1 ]; then
  source benchmarks/gpu_checks/kernel_tests.sh
  kernel_tests selected-$tag tests/kernels/test_triton_selected_attention.py || exit 1
fi
mix="{source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}"
stage="stages=[{name: bench, seq_len: 2048, steps: 8, global_batch_size: 16, micro_batch_size: 16, mix: $mix}]"
timeout 200 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 8 --profile \
  --set "$stage" --set training.recompute=false --out $OUT/profile_2k_device-$tag.json > $OUT/profile_2k_device-$tag.log 2>&1
echo "device profile rc=$?"
grep -A 14 "steps 2-3 by self time" $OUT/profile_2k_device-$tag.log | cut -c1-60,150-230
grep -A 4 "NSA implementation" $OUT/profile_2k_device-$tag.log
timeout 150 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 8 --host-profile \
  --attention nsa --set "$stage" --set training.recompute=false --out $OUT/profile_2k_host-$tag.json \
  > $OUT/profile_2k_host-$tag.log 2>&1
echo "host profile rc=$?"
grep -A 3 "host time of steps" $OUT/profile_2k_host-$tag.log
grep -A 3 "NSA implementation" $OUT/profile_2k_host-$tag.log
# where the host waits for the GPU (torch.cuda's sync debug mode, steps 2-6): what keeps it from running ahead
timeout 120 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 6 --sync-check \
  --attention nsa --set "$stage" --set training.recompute=false --out $OUT/profile_2k_syncs-$tag.json \
  > $OUT/profile_2k_syncs-$tag.log 2>&1
echo "sync check rc=$?"
grep -A 12 "host-device synchronizations" $OUT/profile_2k_syncs-$tag.log
