# Issue 13: the proof model's first training steps, per layer (tools/layer_stats.py), for several variants
# side by side on one GPU (each ~18 GB): every NSA proof run has had a loss spike in its warmup (seed 0 at
# step 17: 9.83; seed 1 at steps 19-20: 11.40 and 10.01, over ln 256 = 5.55), its dense twin none.
# One device call with .whl carried:
#   export COMMIT=<sha>; source benchmarks/proof/setup.sh > $OUT/setup.log 2>&1
#   STEPS=30 bash benchmarks/gpu_checks/layer_stats.sh NAME:CONFIG[:KEY=VALUE,...] ...
# writes each run's JSON and log, packed into $OUT/layer-stats-$TAG.tar (TAG default: $COMMIT; the device
# tool returns 8 files a call).
set -u
OUT=${OUT:?"set OUT (the device tool does)"}
PYTHON=${PYTHON:-python3}
TAG=${TAG:-${COMMIT:-local}}
work=$(mktemp -d)/layer-stats-$TAG
mkdir -p "$work"
pids=()
port=29600
for spec in "$@"; do
  IFS=: read -r name config sets <<< "$spec"
  args=(--config "$config" --steps "${STEPS:-30}" --out "$work/$name.json")
  IFS=, read -ra pairs <<< "${sets:-}"
  for kv in "${pairs[@]}"; do args+=(--set "$kv"); done
  echo "$(date +%T) $name: ${args[*]}"
  MASTER_PORT=$port timeout ${LIMIT:-300} $PYTHON tools/layer_stats.py "${args[@]}" \
    > "$work/$name.log" 2>&1 &
  pids+=($!)
  port=$((port + 1))
done
for pid in "${pids[@]}"; do wait "$pid"; echo "$(date +%T) pid $pid rc=$?"; done
for spec in "$@"; do
  name=${spec%%:*}
  echo "== $name"
  grep -E "^ +[0-9]+ |largest loss rise|Error|error" "$work/$name.log" | tail -12
done
tar -C "$(dirname "$work")" -cf "$OUT/layer-stats-$TAG.tar" "$(basename "$work")"
