#!/usr/bin/env bash
# Measured once, 2026-12-01 at 9fb9d67 (short_documents_*-9fb9d67.json): 0.162 / 0.161 s a step with the
# change, 0.162 / 0.18 s without, dense 0.094 s. Most batches of the proof's stage hold a 2K code sequence, so
# the path was rarely taken; the change was removed again (benchmarks/kernels-notes.md, Session 17).
# The selected branch as causal attention on short documents (kernels/nsa.py, compose_nsa), on one GPU:
# the Triton NSA tests (their "short documents" case takes that path), then the proof's first-stage step
# (16 x 2K, 256-token passkey samples attended alone, bf16) with the kernels before it and as they are,
# alternated, and dense attention once, each its own process (tools/bench_train.py, NSA step medians).
# Before the device call, on the dev machine (the copy has no .git):
#   rm -rf bench_old && mkdir bench_old && git archive a406e61 kernels | tar -x -C bench_old
# then run with carry [".whl"]:  bash benchmarks/gpu_checks/short_documents.sh   (about 5 minutes)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  .whl/mlflow/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
[ -d bench_old/kernels ] || { echo "bench_old/kernels is missing: see this script's header"; exit 1; }
python3 tools/build_code_corpus.py 2>&1 | tail -1
python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_nsa.py 2>&1 | tail -2
mix="{source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}"
stage="stages=[{name: bench, seq_len: 2048, steps: 12, global_batch_size: 16, micro_batch_size: 16, mix: $mix}]"
for run in new1 old1 new2 old2 dense; do
  attention=nsa; path=/tmp/site:$PWD
  [ ${run%?} = old ] && path=/tmp/site:$PWD/bench_old:$PWD
  [ $run = dense ] && attention=dense
  PYTHONPATH=$path timeout 150 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 \
    --attention $attention --set "$stage" --set training.recompute=false \
    --out $OUT/short_documents_$run.json > $OUT/short_documents_$run.log 2>&1
  echo "$run rc=$?: $(grep -v -i warn $OUT/short_documents_$run.log | tail -1)"
done
