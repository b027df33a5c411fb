#!/usr/bin/env bash
# One proof run on the GPU machine (device tool, carry .whl): wheels, corpus, the training job, and its
# run directory without weights copied to $OUT. Usage: bash benchmarks/proof/run.sh proof_100m
set -u
cfg=${1:?"give the config name, e.g. proof_100m for configs/proof_100m.yaml"}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/megatron_core*.whl .whl/mlflow/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 tools/build_code_corpus.py 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$(date +%s)
timeout ${LIMIT:-520} python3 -m launch.train --config configs/$cfg.yaml > $OUT/$cfg.log 2>&1
echo "$cfg rc=$? wall $(( $(date +%s)-t0 )) s"
grep -v "━\|^\s*File\|^\s*\^\|warn\|return func" $OUT/$cfg.log | grep -v " step [0-9]*:" | tail -45
# every proof run directory still on this machine, without weights; the device tool returns files at most
# two folders deep, so each stage's evaluation is flattened
for run in runs/proof_*; do
  name=$(basename $run); mkdir -p $OUT/$name
  cp $run/mlflow.db $run/tracking.json $OUT/$name/
  for d in $run/checkpoints/*/eval; do
    step=$(basename $(dirname $d)); for f in $d/*; do cp $f $OUT/$name/${step}_$(basename $f); done
  done
done
du -sh $OUT/*
