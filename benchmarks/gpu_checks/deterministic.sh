#!/usr/bin/env bash
# Issue 13: are two runs of one config the same on the GPU, with and without training.deterministic? In
# session 49 (H100, e9f72c3) v27's config at seed 3, twice side by side, gave other losses from step 50 on
# (benchmarks/proof/v29-e9f72c3), so one run of a variant against another says little. One device call of
# about 4 minutes, carry [".whl"]:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/deterministic.sh
# tools/bench_train.py on the proof model at the first stage's step (16 x 2K packed task samples), NSA then
# dense, 40 steps, twice with training.deterministic=true and twice without, each in its own process one
# after the other; then for each pair, the first step whose loss differs, and the deterministic step's
# time over the default's. A deterministic run that fails names the op without a deterministic algorithm.
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
mix="{source: 0.125, passkey: 0.875, task_min_length: 256, task_max_length: 256}"
stage="stages=[{name: det, seq_len: 2048, steps: 40, global_batch_size: 16, micro_batch_size: 16, mix: $mix}]"
for mode in true false; do
  for run in a b; do
    name=det-$mode-$run-$tag
    timeout 150 python3 tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 40 \
      --attention nsa,dense --set "$stage" --set training.deterministic=$mode --out $OUT/$name.json \
      > $OUT/$name.log 2>&1
    echo "$(date +%T) deterministic=$mode run $run rc=$?"
    grep -E "Error|error:" $OUT/$name.log | tail -3
  done
done
python3 - "$OUT" "$tag" <<'PY'
import json, sys
from pathlib import Path
out, tag = Path(sys.argv[1]), sys.argv[2]
def lines(mode, run):
    path = out / f"det-{mode}-{run}-{tag}.json"
    return {r["attention"]: r for r in json.loads(path.read_text())["results"]} if path.exists() else {}
runs = {(mode, run): lines(mode, run) for mode in ("true", "false") for run in "ab"}
print(f"{'attention':<10} {'deterministic':<14} {'first differing step':<22} {'step s (median)':<16}")
for attention in ("nsa", "dense"):
    for mode in ("true", "false"):
        a, b = runs[mode, "a"].get(attention), runs[mode, "b"].get(attention)
        if not (a and b):
            print(f"{attention:<10} {mode:<14} {'(a run failed)':<22}")
            continue
        differ = next((i + 1 for i, (x, y) in enumerate(zip(a["losses"], b["losses"])) if x != y), None)
        print(f"{attention:<10} {mode:<14} {str(differ or 'none of ' + str(len(a['losses']))):<22} "
              f"{a['step_time_s']:.3f} / {b['step_time_s']:.3f}")
PY
