#!/usr/bin/env bash
# Issue 13: the exact score's top-n in one pass over the keys (block_selection.EXACT_ONE_PASS) against two, on
# one GPU, one device call (carry [".whl"]):
#   COMMIT=<sha> bash benchmarks/gpu_checks/exact_one_pass.sh
# 1. The exact score's GPU tests (both ways, several tilings and layouts). Stops here if they fail.
# 2. tools/bench_exact_score.py: top-n alone at 1 x 32K and 8 x 8K, both ways alternated, their picks compared.
# 3. The proof model's 8K and 32K steps (tools/bench_train.py, NSA, the stages' mixes and the exact score), two
#    passes then one, twice over; every run's bench_train JSON, with its command and commit, gathered into
#    $OUT/exact-steps-<commit>.json (one file: a device call brings back at most 8).
set -u
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
kernel_tests exact-$tag tests/kernels/test_triton_block_selection.py -k "exact or raw_key" || exit 1
timeout 150 python3 tools/bench_exact_score.py --commit $tag --out $OUT/exact-one-pass-$tag.json \
  > $OUT/exact-one-pass-$tag.log 2>&1
echo "$(date +%T) bench_exact_score rc=$?"
grep -E "^(1x|8x)" $OUT/exact-one-pass-$tag.log
step() {  # shape one_pass(True/False) round
  local len batch extra
  case $1 in
    8k) len=8192; batch=8; extra="mix: {source: 0.3, passkey: 0.6, multikey_niah: 0.1, task_min_length: 2048}" ;;
    32k) len=32768; batch=1; extra="mix: {source: 0.3, passkey: 0.6, multikey_niah: 0.1, task_min_length: 1024}" ;;
  esac
  local stage="stages=[{name: bench, seq_len: $len, steps: 8, global_batch_size: $batch, micro_batch_size: $batch, selection_score: exact, $extra}]"
  local log=/tmp/exact-step-$1-$2-$3.log json=/tmp/exact-step-$1-$2-$3.json
  timeout 150 python3 - > $log 2>&1 <<PY
import runpy, sys
import kernels.block_selection.triton as block_selection
block_selection.EXACT_ONE_PASS = $2
sys.argv = ["tools/bench_train.py", "--config", "configs/proof_100m.yaml", "--seq-len", "$len", "--steps", "8",
            "--attention", "nsa", "--set", """$stage""", "--set", "training.recompute=false", "--out", "$json"]
runpy.run_path("tools/bench_train.py", run_name="__main__")
PY
  local rc=$?
  echo "$(date +%T) $1 one_pass=$2 round $3 rc=$rc: $(python3 -c "import json; r = json.load(open('$json'))['results'][0]
print('median step %.4f s, steps' % r['step_time_s'], ' '.join('%.3f' % t for t in r['step_times_s']))" 2>&1 | tail -1)"
}
for round in 1 2; do
  for shape in 8k 32k; do
    step $shape False $round
    step $shape True $round
  done
done
python3 - <<PY
import glob, json
runs = {path.split("/")[-1][:-5]: json.load(open(path)) for path in sorted(glob.glob("/tmp/exact-step-*.json"))}
json.dump({"commit": "$tag", "runs": runs}, open("$OUT/exact-steps-$tag.json", "w"), indent=1)
PY
