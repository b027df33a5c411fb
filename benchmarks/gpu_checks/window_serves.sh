#!/usr/bin/env bash
# Issue 13: the rows where the window branch answers for the selected one (kernels.nsa.window_covered_rows,
# session 42; built and tested on CPU only), timed on the proof's first-stage step, one H200, carry [".whl"];
# one device call of about 5 minutes:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/window_serves.sh
# First the Triton NSA tests on the GPU (the shared-K/V rows among them, bf16 where the tests take it); it
# stops if they fail. Then tools/bench_train.py on the proof model at 16 x 2K of 256-token passkey samples
# (recompute off, as in the proof), 12 steps a line, medians of steps 2-12: dense, NSA, NSA with the selected
# kernels on every row (nsa-every-row: what ran before), then the two NSA lines again in the other order (two
# runs of one setting have differed by 10% before: kernels-notes, session 21), each with --host-check (the
# forward+backward as queued by the host against as run by the device: is NSA's 2K step host-bound?). Then
# the device profile of both NSA lines, steps 2-3: where the GPU time a step went (top-n's and RoPE's share against
# profile_2k_*-b489880.*). Last, if time is left, top-n's tests on the GPU (session 42 leaves out the tiles
# whose queries have no choice).
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests nsa-$tag tests/kernels/test_triton_nsa.py || exit 1
mix="{source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}"
stage="stages=[{name: bench, seq_len: 2048, steps: 12, global_batch_size: 16, micro_batch_size: 16, mix: $mix}]"
for order in "dense,nsa,nsa-every-row" "nsa-every-row,nsa"; do
  name=window_serves_2k-$tag-${order//,/-}
  timeout 150 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 12 \
    --attention $order --set "$stage" --set training.recompute=false --host-check --out $OUT/$name.json \
    > $OUT/$name.log 2>&1
  echo "$(date +%T) $order rc=$?"
  grep -A 4 "NSA implementation" $OUT/$name.log
  grep "queued by the host" $OUT/$name.log
done
stage4="stages=[{name: bench, seq_len: 2048, steps: 4, global_batch_size: 16, micro_batch_size: 16, mix: $mix}]"
timeout 120 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 4 --profile \
  --attention nsa,nsa-every-row --set "$stage4" --set training.recompute=false \
  --out $OUT/window_serves_profile-$tag.json > $OUT/window_serves_profile-$tag.log 2>&1
echo "$(date +%T) profile rc=$?"
grep -A 14 "steps 2-3 by self time" $OUT/window_serves_profile-$tag.log | cut -c1-60,150-230
kernel_tests topn-$tag tests/kernels/test_triton_block_selection.py \
  -k "need_no_kernel or packed_documents or matches_reference or documents_and_offsets"
