#!/usr/bin/env bash
# One proof run on the GPU machine (device tool, carry .whl): wheels, corpus, the training job, and its
# run directory without weights copied to $OUT. Usage: bash benchmarks/proof/run.sh proof_100m
# (OVERLAP=1 also measures the selection overlap of the final checkpoint, NEEDLE=1 whether its block
# selection picks the NIAH needle; PRECHECK=1 runs the kernel tests first)
# The GPU machine has no internet: setup.sh (beside this script) says which wheels .whl/ must hold.
set -u
arg=${1:?"give the config name, e.g. proof_100m for configs/proof_100m.yaml, or a .yaml path"}
# a name means configs/<name>.yaml; a path (a probe beside this script) is used as given. Either way the
# config's run.dir must be runs/<its name>
if [[ $arg == *.yaml ]]; then config=$arg; cfg=$(basename $arg .yaml); else config=configs/$arg.yaml; cfg=$arg; fi
[ -f "$config" ] || { echo "$config does not exist: give a name under configs/ or a .yaml path"; exit 1; }
grep -q "^  dir: runs/$cfg\s*$" "$config" || { echo "run.dir in $config is not runs/$cfg: set it so"; exit 1; }
source benchmarks/proof/setup.sh
# PRECHECK=1: first the kernel tests on this GPU (bounded: gpu_checks/kernel_tests.sh); a failure stops here
if [ "${PRECHECK:-0}" = 1 ]; then
  source benchmarks/gpu_checks/kernel_tests.sh
  kernel_tests $cfg tests/kernels/test_triton_gate_combine.py tests/kernels/test_triton_nsa.py \
    tests/kernels/test_triton_selected_attention.py tests/kernels/test_triton_window_attention.py \
    tests/kernels/test_rope.py \
    || { echo "not starting $cfg"; exit 1; }
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$(date +%s); echo "$(date +%T) starting $cfg"  # the job's own lines carry the time too
timeout ${LIMIT:-520} $PYTHON -m launch.train --config $config > $OUT/$cfg.log 2>&1
echo "$cfg rc=$? wall $(( $(date +%s)-t0 )) s"
grep -v "━\|^\s*File\|^\s*\^\|warn\|return func" $OUT/$cfg.log | grep -v " step [0-9]*:" | tail -45
# this run's directory and every other proof run directory still on this machine, without weights
# (MLflow store, tracking.json, each checkpoint's eval/), one tar each: the device tool returns 8 files
# at most. Packed before the checkpoint probes below, so that a call that runs out of time during them
# still returns the runs. Unpack beside the others:
# tar -C benchmarks/proof -xf proof_100m.tar
for run in $(ls -d runs/proof_* runs/$cfg 2>/dev/null | sort -u); do
  name=$(basename $run)
  (cd runs && find $name -path '*/eval/*' -o -name mlflow.db -o -name tracking.json) | tar -C runs -cf $OUT/$name.tar -T -
done
ls -l $OUT
# OVERLAP=1: how much consecutive tokens' top-n picks overlap in the final checkpoint (NSA runs only),
# while the checkpoint is on this machine (benchmarks/kernels-notes.md: it decides the selected-attention
# kernel's tiling)
if [ "${OVERLAP:-0}" = 1 ] && grep -q "attention: nsa" $config; then
  newest=$(ls -d runs/$cfg/checkpoints/step_* | sort | tail -1)
  timeout 150 $PYTHON tools/selection_overlap.py --config $config --checkpoint $newest --seq-len 8192 \
    --sequences 2 --out $OUT/${cfg}_overlap.json 2>&1 | grep -v -i warn | tail -16
fi
# NEEDLE=1: does block selection pick the needle at the answer positions, layer by layer, in the final
# checkpoint, at each of NEEDLE_LENGTHS (default 32768), NEEDLE_SAMPLES samples a depth (default 4; NSA
# runs only; tools/needle_selection.py); NEEDLE_ORACLE=1 then answers the same samples with the needle's
# blocks put into every layer's picks (--oracle): how many misses top-n explains; NEEDLE_SWEEP=1 adds to
# the first pass one pass per layer with the oracle in that layer alone (--oracle-sweep). Budget: at 32K,
# 4 samples a depth, the first pass with the sweep of 12 layers took about 150 s after a 418 s training
# run, so the oracle pass after it did not fit a 600 s call (7560c77): give the probes a call of their own
# there, or lower LIMIT
if [ "${NEEDLE:-0}" = 1 ] && grep -q "attention: nsa" $config; then
  newest=$(ls -d runs/$cfg/checkpoints/step_* | sort | tail -1)
  sweep=$([ "${NEEDLE_SWEEP:-0}" = 1 ] && echo --oracle-sweep)
  for length in ${NEEDLE_LENGTHS:-32768}; do
    for oracle in "" $([ "${NEEDLE_ORACLE:-0}" = 1 ] && echo oracle); do
      timeout 240 $PYTHON tools/needle_selection.py --config $config --checkpoint $newest \
        --length $length --samples ${NEEDLE_SAMPLES:-4} ${oracle:+--oracle} $([ -z "$oracle" ] && echo $sweep) \
        --out $OUT/${cfg}_needle_$length${oracle:+_oracle}.json 2>&1 | grep -v -i warn | tail -26
    done
  done
fi
