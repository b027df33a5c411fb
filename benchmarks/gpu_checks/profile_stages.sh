#!/usr/bin/env bash
# Issue 13: where the proof's NSA step goes against its dense twin, at each stage's shape (16 x 2K with
# 256-token passkey samples, 8 x 8K and 1 x 32K with the stages' mixes and the exact score), on one GPU:
# tools/bench_train.py --profile (torch.profiler over steps 2-3, device time by operator), dense then NSA
# in one process per shape. Device tool, carry [".whl"], about 5 minutes:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/profile_stages.sh [2k 8k 32k]
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
shapes=${*:-2k 8k 32k}
for shape in $shapes; do
  case $shape in
    2k) len=2048; batch=16; extra="mix: {source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}" ;;
    8k) len=8192; batch=8; extra="selection_score: exact, mix: {source: 0.3, passkey: 0.6, multikey_niah: 0.1, task_min_length: 2048}" ;;
    32k) len=32768; batch=1; extra="selection_score: exact, mix: {source: 0.3, passkey: 0.6, multikey_niah: 0.1, task_min_length: 1024}" ;;
    *) echo "unknown shape $shape: use 2k, 8k or 32k"; exit 2 ;;
  esac
  stage="stages=[{name: bench, seq_len: $len, steps: 5, global_batch_size: $batch, micro_batch_size: $batch, $extra}]"
  name=profile_stage_$shape-$tag
  timeout ${LIMIT:-200} python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len $len --steps 5 \
    --profile --set "$stage" --set training.recompute=false --out $OUT/$name.json > $OUT/$name.log 2>&1
  echo "$(date +%T) $shape rc=$?"
  grep -E "^(dense|nsa) step [2-5]" $OUT/$name.log | tr '\n' ' '; echo
done
