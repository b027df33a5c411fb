#!/usr/bin/env bash
# A job's first checkpoint save, with and without the checkpoint writer starting Megatron's results queue
# ahead of it (nsa_dist/checkpoint.py, _start_results_queue): the proof model's first stage for 12 steps
# with a checkpoint every 6 (two saves), no evaluation, one job each on one GPU: BASE's tree (without the
# warm start; base.tar = git archive BASE kernels nsa_dist tools, the config and launcher from this tree)
# then this tree. Prints each checkpoint's save_seconds from its marker and the job's wall time.
#   git archive 187e335 kernels nsa_dist tools > base.tar
#   COMMIT=$(git rev-parse --short HEAD) BASE=187e335 bash benchmarks/gpu_checks/first_save.sh   # carry [".whl"]
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
rm -rf /tmp/base && mkdir -p /tmp/base && cp -r configs launch /tmp/base/ && ln -s $PWD/data /tmp/base/data && tar -xf base.tar -C /tmp/base
stage="stages=[{name: 2k, seq_len: 2048, steps: 12, global_batch_size: 16, micro_batch_size: 16, mix: {source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}}]"
job() {  # job NAME ROOT
  local name=$1 root=$2 t0=$(date +%s)
  (cd $root && PYTHONPATH=/tmp/site:$root timeout 240 python3 -m launch.train --config configs/proof_100m.yaml \
    --set "$stage" --set checkpoint.interval=6 --set training.warmup_steps=4 --set eval.at_stage_end=false --set run.dir=/tmp/runs/$name \
    > $OUT/$name.log 2>&1)
  echo "$name rc=$? wall $(( $(date +%s) - t0 )) s; saves (step: s): $(python3 -c "
import json, pathlib
for m in sorted(pathlib.Path('/tmp/runs/$name/checkpoints').glob('step_*/*.json')):
    d = json.loads(m.read_text())
    if 'save_seconds' in d: print(f\"{d['state']['step']}: {d['save_seconds']}\", end='  ')
")"
}
job base-${BASE:-base} /tmp/base
job new-$tag $PWD
