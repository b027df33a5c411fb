#!/usr/bin/env bash
# Issue 13: does the learned indexer lose the needle, or did the model never learn the lookup? In session
# 48 (H100, e69864a) v28_idx4 ended its 8k and 32k stages at 4% NIAH, but its 2k-reach stage had ended at
# 24%, as the two runs that learned the 256-token lookup late had (docs/proof-findings.md, Next). One
# device call (carry [".whl"]; about 8.5 minutes on an H100, the run's 433 s and two evaluations):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/v28_ab.sh [NAME]
# trains NAME (default v28_idx4) from benchmarks/proof/probes/v28_indexer.spec with run_many.sh (no
# precheck: its kernel tests passed on the GPU at e69864a), then evaluates its 8k and 32k checkpoints
# again, the same weights, with the exact attention mass ranking top-n in place of the indexer
# (launch.eval --set stages.N.selection_score=exact; MLflow off, so the run's own evaluations stay as
# they were). The exact score found the needle at every depth at 32K in three of four v27 runs: if it
# finds them here, the indexer's picks are what loses them; if it does not, the run's 2K stages are.
set -u
tag=${COMMIT:-unknown}
name=${1:-v28_idx4}
spec=benchmarks/proof/probes/v28_indexer.spec
LIMIT=${LIMIT:-480} bash benchmarks/proof/run_many.sh $spec $name
source benchmarks/proof/setup.sh > /dev/null
# the run's overrides, from its spec line (NAME CONFIG KEY=VALUE ...), so the evaluation builds its model
read -r _ config overrides <<< "$(grep "^$name " $spec)"
sets=()
for pair in $overrides; do sets+=(--set "$pair"); done
# stage index in the config's stages list, its name, its last step (configs/proof_100m.yaml)
for stage in "2 8k 1150" "3 32k 1450"; do
  read -r index stage_name step <<< "$stage"
  checkpoint=runs/$name/checkpoints/step_$(printf %08d $step)
  [ -d "$checkpoint" ] || { echo "$checkpoint is missing: the run did not reach the end of stage $stage_name"; continue; }
  timeout 90 $PYTHON -m launch.eval --config $config "${sets[@]}" --set run.dir=runs/$name \
    --set stages.$index.selection_score=exact --set tracking.enabled=false --checkpoint $checkpoint \
    --out $OUT/${name}_${stage_name}_exact > $OUT/${name}_${stage_name}_exact.log 2>&1
  echo "$(date +%T) $name $stage_name by the exact score rc=$? (the run's own, by the indexer:" \
    "$(grep -o "passkey exact match [0-9]*%" $OUT/$name.log | sed -n "$((index + 1))p"))"
  grep -E "passkey|validation loss" $OUT/${name}_${stage_name}_exact.log | head -4
done
# eval.json and niah.png of each: 4 files, with run_many's log and tar 6 of the 8 that come back
ls $OUT
