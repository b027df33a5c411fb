#!/usr/bin/env bash
# One proof run on the GPU machine (device tool, carry .whl): wheels, corpus, the training job, and its
# run directory without weights copied to $OUT. Usage: bash benchmarks/proof/run.sh proof_100m
# (OVERLAP=1 also measures the selection overlap of the final checkpoint, NEEDLE=1 whether its block
# selection picks the NIAH needle; PRECHECK=1 runs the kernel tests first)
# The GPU machine has no internet: .whl/ must hold the megatron-core wheel and .whl/mlflow/ MLflow's
# (mlflow-skinny with its SQL store's dependencies), both for its Python 3.12, downloaded beforehand:
#   pip download -q --only-binary=:all: --python-version 3.12 --implementation cp -d .whl megatron-core==0.16.1 \
#     --no-deps --platform manylinux_2_28_x86_64
#   pip download -q --only-binary=:all: --python-version 3.12 --implementation cp -d .whl/mlflow \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
#     mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 sqlalchemy alembic psutil
set -u
arg=${1:?"give the config name, e.g. proof_100m for configs/proof_100m.yaml, or a .yaml path"}
# a name means configs/<name>.yaml; a path (a probe beside this script) is used as given. Either way the
# config's run.dir must be runs/<its name>
if [[ $arg == *.yaml ]]; then config=$arg; cfg=$(basename $arg .yaml); else config=configs/$arg.yaml; cfg=$arg; fi
[ -f "$config" ] || { echo "$config does not exist: give a name under configs/ or a .yaml path"; exit 1; }
grep -q "^  dir: runs/$cfg\s*$" "$config" || { echo "run.dir in $config is not runs/$cfg: set it so"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/megatron_core*.whl .whl/mlflow/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 tools/build_code_corpus.py 2>&1 | tail -1
# PRECHECK=1: first the kernel tests on this GPU (a minute); a failure stops here, before the job's minutes
if [ "${PRECHECK:-0}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_gate_combine.py tests/kernels/test_triton_nsa.py \
    tests/kernels/test_triton_selected_attention.py \
    2>&1 | tail -3
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "kernel tests failed on this GPU: not starting $cfg"; exit 1; }
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$(date +%s); echo "$(date +%T) starting $cfg"  # the job's own lines carry the time too
timeout ${LIMIT:-520} python3 -m launch.train --config $config > $OUT/$cfg.log 2>&1
echo "$cfg rc=$? wall $(( $(date +%s)-t0 )) s"
grep -v "━\|^\s*File\|^\s*\^\|warn\|return func" $OUT/$cfg.log | grep -v " step [0-9]*:" | tail -45
# OVERLAP=1: how much consecutive tokens' top-n picks overlap in the final checkpoint (NSA runs only),
# while the checkpoint is on this machine (benchmarks/kernels-notes.md: it decides the selected-attention
# kernel's tiling)
if [ "${OVERLAP:-0}" = 1 ] && grep -q "attention: nsa" $config; then
  newest=$(ls -d runs/$cfg/checkpoints/step_* | sort | tail -1)
  timeout 150 python3 tools/selection_overlap.py --config $config --checkpoint $newest --seq-len 8192 \
    --sequences 2 --out $OUT/${cfg}_overlap.json 2>&1 | grep -v -i warn | tail -16
fi
# NEEDLE=1: does block selection pick the needle at the answer positions, layer by layer, in the final
# checkpoint, at each of NEEDLE_LENGTHS (default 32768), NEEDLE_SAMPLES samples a depth (default 4; NSA
# runs only; tools/needle_selection.py)
if [ "${NEEDLE:-0}" = 1 ] && grep -q "attention: nsa" $config; then
  newest=$(ls -d runs/$cfg/checkpoints/step_* | sort | tail -1)
  for length in ${NEEDLE_LENGTHS:-32768}; do
    timeout 150 python3 tools/needle_selection.py --config $config --checkpoint $newest \
      --length $length --samples ${NEEDLE_SAMPLES:-4} --out $OUT/${cfg}_needle_$length.json 2>&1 \
      | grep -v -i warn | tail -17
  done
fi
# every proof run directory still on this machine, without weights (MLflow store, tracking.json, each
# checkpoint's eval/), one tar each: the device tool returns 8 files at most. Unpack beside the others:
# tar -C benchmarks/proof -xf proof_100m.tar
for run in runs/proof_*; do
  name=$(basename $run)
  (cd runs && find $name -path '*/eval/*' -o -name mlflow.db -o -name tracking.json) | tar -C runs -cf $OUT/$name.tar -T -
done
ls -l $OUT
