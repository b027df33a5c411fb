#!/usr/bin/env bash
# Several training runs at once on one GPU machine (device tool, carry .whl), to put a spread on a
# figure in one device call: the same config with other seeds, or a few variants, side by side. One
# proof run uses 19-37 GB of the H200's 139 and leaves its GPU idle for about a quarter of a 2K step, so
# three or four share it. Their losses and evaluations are what a run alone would give (up to the
# run-to-run spread this measures); their times are not: they share the GPU.
#
# Usage: bash benchmarks/proof/run_many.sh SPEC [NAME ...]
# SPEC has one run per line, `NAME CONFIG [KEY=VALUE ...]` (blank lines and `#` comments skipped; quote a
# value that holds spaces, as in a shell); NAMEs, when given, pick those lines only (a pair that would
# not fit one call together runs as two calls). Each line trains
#   python -m launch.train --config CONFIG --set run.dir=runs/NAME --set KEY=VALUE ...
# with its output in $OUT/NAME.log. All start together; LIMIT (seconds, default 540) bounds each. Each
# run directory comes back without weights (MLflow store, tracking.json, every checkpoint's eval/) as
# $OUT/NAME.tar: `tar -C benchmarks/proof -xf NAME.tar`, packed every 30 s while the runs train, so a
# call cut short still returns the stage ends evaluated before it. The device tool returns 8 files at
# most, so at most 4 runs a call. setup.sh (beside this script) installs the wheels; SETUP=0
# PYTHON=.venv/bin/python runs it on a machine that has them.
set -u
spec=${1:?"give a spec file: one run per line, NAME CONFIG [KEY=VALUE ...]"}
shift
picked=" $* "  # the NAMEs asked for; none: every line
[ -f "$spec" ] || { echo "spec $spec does not exist: give a file with one run per line,"\
  "NAME CONFIG [KEY=VALUE ...]"; exit 1; }
OUT=${OUT:?"set OUT to the folder the logs and tars go to (the device tool sets it)"}
names=()
while IFS= read -r line; do
  [[ -z ${line// /} || $line == \#* ]] && continue
  eval "fields=($line)"
  [[ $picked == "  " || $picked == *" ${fields[0]} "* ]] || continue
  [ ${#fields[@]} -ge 2 ] || { echo "spec line '$line': give NAME CONFIG [KEY=VALUE ...]"; exit 1; }
  [ -f "${fields[1]}" ] || { echo "spec line '$line': config ${fields[1]} does not exist"; exit 1; }
  [ -e "runs/${fields[0]}" ] && { echo "spec line '$line': runs/${fields[0]} exists (the run would resume"\
    "from it): pick another NAME"; exit 1; }
  names+=("${fields[0]}")
done < "$spec"
[ ${#names[@]} -ge 1 ] || { echo "spec $spec names no run${*:+ called $*}"; exit 1; }
for name in "$@"; do
  [[ " ${names[*]} " == *" $name "* ]] || { echo "spec $spec has no run called $name"; exit 1; }
done
[ ${#names[@]} -le 4 ] || { echo "spec $spec names ${#names[@]} runs: the device tool returns 8 files (a log"\
  "and a tar a run), so give at most 4"; exit 1; }
source benchmarks/proof/setup.sh
# PRECHECK=1: the selected-attention, NSA and RoPE kernel tests on this GPU first (as in run.sh), or the
# test files PRECHECK_TESTS names (e.g. tests/kernels/test_indexer.py for a run ranked by the indexer) and
# the RoPE kernel's, which dense runs take too; a failure starts no run
if [ "${PRECHECK:-0}" = 1 ]; then
  source benchmarks/gpu_checks/kernel_tests.sh
  kernel_tests "${names[0]}" ${PRECHECK_TESTS:-tests/kernels/test_triton_selected_attention.py tests/kernels/test_triton_nsa.py} \
    tests/kernels/test_rope.py \
    || { echo "starting none of ${names[*]}"; exit 1; }
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$(date +%s)
trainers=()
while IFS= read -r line; do
  [[ -z ${line// /} || $line == \#* ]] && continue
  eval "fields=($line)"
  name=${fields[0]}
  [[ " ${names[*]} " == *" $name "* ]] || continue
  args=(--config "${fields[1]}" --set "run.dir=runs/$name")
  for kv in "${fields[@]:2}"; do args+=(--set "$kv"); done
  echo "$(date +%T) starting $name: ${args[*]}"
  ( timeout ${LIMIT:-540} $PYTHON -m launch.train "${args[@]}" > "$OUT/$name.log" 2>&1
    echo "$(date +%T) $name rc=$? after $(( $(date +%s)-t0 )) s" ) &
  trainers+=($!)
done < "$spec"
# pack NAME: its run directory without weights into $OUT/NAME.tar, written whole and then renamed
pack() {
  [ -d "runs/$1" ] || return 0
  (cd runs && find "$1" -path '*/eval/*' -o -name mlflow.db -o -name tracking.json) \
    | tar -C runs -cf "$OUT/$1.tar.part" -T - && mv "$OUT/$1.tar.part" "$OUT/$1.tar"
}
# While they train, pack every 30 s: a call the device tool ends early (its limit is the session's device
# time left, which can be under LIMIT) still returns the stage ends evaluated so far and the MLflow store.
ticks=0
while kill -0 "${trainers[@]}" 2> /dev/null; do
  sleep 5
  ticks=$((ticks + 1))
  [ $((ticks % 6)) = 0 ] && for name in "${names[@]}"; do pack "$name"; done
done
wait
for name in "${names[@]}"; do
  echo "== $name"
  grep -E "evaluated|all [0-9]+ stages done|Error|error:" "$OUT/$name.log" | sed -E 's/; runs\/.*//' | tail -8
  pack "$name"
done
ls -l "$OUT"
