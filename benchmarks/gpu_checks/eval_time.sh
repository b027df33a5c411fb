#!/usr/bin/env bash
# Issue 13: where a stage-end evaluation's time goes. In the v31 pair NSA's evaluations took 22 s against
# dense's 12 (at 32K: NIAH 11.6 s against 6.2), although NSA's forward at 32K is the cheaper one. This
# trains the proof model briefly (2k for 8 steps, then 32k for 2 steps, no stage-end evaluation), then
# evaluates its final checkpoint at the 32k stage twice, each in a new process: the first compiles and
# autotunes whatever the evaluation's shapes need that training did not (Triton's disk cache holds
# training's), the second finds it all in the cache. The difference is the compile and autotune share.
# For ATTENTION=dense the same with the dense twin.
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/eval_time.sh   # carry [".whl"]
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
config=configs/proof_100m.yaml
[ "${ATTENTION:-nsa}" = dense ] && config=configs/proof_100m_dense.yaml
run=/tmp/runs/eval_time-${ATTENTION:-nsa}
stages="stages=[{name: 2k, seq_len: 2048, steps: 8, global_batch_size: 16, micro_batch_size: 16, mix: {source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}}, {name: 32k, seq_len: 32768, steps: 2, global_batch_size: 1, micro_batch_size: 1, selection_score: exact, rotary_base: 2560000.0, mix: {source: 0.3, passkey: 0.6, multikey_niah: 0.1, task_min_length: 1024}}]"
t0=$(date +%s)
timeout 300 python3 -m launch.train --config $config --set "$stages" --set training.warmup_steps=4 --set eval.at_stage_end=false \
  --set run.dir=$run > $OUT/train-${ATTENTION:-nsa}-$tag.log 2>&1
echo "train rc=$? $(( $(date +%s) - t0 )) s"
for pass in cold warm; do
  t0=$(date +%s)
  name=eval-$pass-${ATTENTION:-nsa}-$tag
  timeout 200 python3 -m launch.eval --config $config --set "$stages" --set training.warmup_steps=4 --set run.dir=$run --stage 32k \
    --out /tmp/$name > $OUT/$name.log 2>&1
  echo "eval $pass rc=$? $(( $(date +%s) - t0 )) s a process; the evaluation's own seconds:" \
    "$(python3 -c "import json; print(json.load(open('/tmp/$name/eval.json'))['seconds'])")"
done
