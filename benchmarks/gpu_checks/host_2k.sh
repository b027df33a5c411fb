#!/usr/bin/env bash
# Issue 13: what NSA's 16 x 2K step spends on the host. Session 47 measured it host-bound on an H100: the
# host had queued a step's forward+backward after 117.9 ms against dense's 52.6, and NSA's device finished
# 8 ms later (gpu_checks/h100_host_check_2k-2305ef1.json). One device call of about 4 minutes, carry [".whl"]:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/host_2k.sh
# First the RoPE kernel's tests (kernels/rope.py, on both models' path since 32a5334); it stops if they
# fail. Then tools/bench_train.py on the proof model at the first stage's step (16 x 2K of 256-token passkey
# samples, recompute off), dense and NSA in one process with --host-check: against session 47's figures,
# did the RoPE kernel shorten the host's queueing? Last, NSA alone with --host-profile (cProfile of steps
# 2-6): how much of the host's time is Triton's launch path, how much PyTorch's operators and the wrappers'
# own Python.
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests rope-$tag tests/kernels/test_rope.py || exit 1
mix="{source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}"
stage() {  # steps
  echo "stages=[{name: bench, seq_len: 2048, steps: $1, global_batch_size: 16, micro_batch_size: 16, mix: $mix}]"
}
timeout 200 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 12 \
  --attention dense,nsa --set "$(stage 12)" --set training.recompute=false --host-check \
  --out $OUT/host_2k_check-$tag.json > $OUT/host_2k_check-$tag.log 2>&1
echo "$(date +%T) host check rc=$?"
grep -A 4 "NSA implementation" $OUT/host_2k_check-$tag.log
grep "queued by the host" $OUT/host_2k_check-$tag.log
timeout 150 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 6 \
  --attention nsa --set "$(stage 6)" --set training.recompute=false --host-profile \
  --out $OUT/host_2k_profile-$tag.json > $OUT/host_2k_profile-$tag.log 2>&1
echo "$(date +%T) host profile rc=$?"
grep -A 45 "host time of steps" $OUT/host_2k_profile-$tag.log | cut -c1-150
