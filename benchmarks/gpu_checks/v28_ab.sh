#!/usr/bin/env bash
# Issue 13: does the learned indexer lose the needle, or did the model never learn the lookup? In session
# 48 (H100, e69864a) v28_idx4 ended its 8k and 32k stages at 4% NIAH, but its first stage never brought
# the answers' loss under 0.1 and its 2k-reach stage ended at 24% (docs/proof-findings.md, Next, item 3).
# One device call (carry [".whl"]; about 9 minutes on an H100 for one run: its ~433 s and two evaluations):
#   bash benchmarks/gpu_checks/v28_ab.sh [NAME ...]
# trains the NAMEs (default v28_idx4_s3, v27_nsa_s3's seed, whose exact-score run found every needle at
# 32K) from benchmarks/proof/probes/v28_indexer.spec with run_many.sh, together on the GPU when several
# (no precheck: the kernel tests passed on the GPU at e69864a). Then it evaluates each run's 8k and 32k
# checkpoints again, the same weights, with the exact attention mass ranking top-n in place of the indexer
# (launch.eval --set stages.N.selection_score=exact; MLflow off, so the run's own evaluations stay as they
# were). If the exact score finds the needles the indexer missed, the indexer's picks lose them; if it
# does not, the run's 2K stages did. Back come each run's log and tar (run_many.sh) and one tar of the
# evaluations: `tar -C benchmarks/proof/<dir> -xf v28_ab_evals.tar`.
set -u
names=("${@:-v28_idx4_s3}")
spec=benchmarks/proof/probes/v28_indexer.spec
for name in "${names[@]}"; do
  grep -q "^$name " $spec || { echo "$spec has no run called $name: give one of" \
    "$(grep -o '^v28[a-z0-9_]*' $spec | tr '\n' ' ')"; exit 1; }
done
LIMIT=${LIMIT:-480} bash benchmarks/proof/run_many.sh $spec "${names[@]}"
source benchmarks/proof/setup.sh > /dev/null
evals=/tmp/v28_ab_evals
mkdir -p $evals
for name in "${names[@]}"; do
  # the run's overrides, from its spec line (NAME CONFIG KEY=VALUE ...), so the evaluation builds its model
  read -r _ config overrides <<< "$(grep "^$name " $spec)"
  sets=()
  for pair in $overrides; do sets+=(--set "$pair"); done
  # stage index in the config's stages list, its name, its last step (configs/proof_100m.yaml)
  for stage in "2 8k 1150" "3 32k 1450"; do
    read -r index stage_name step <<< "$stage"
    checkpoint=runs/$name/checkpoints/step_$(printf %08d $step)
    if [ ! -d "$checkpoint" ]; then
      echo "$checkpoint is missing: $name did not reach the end of stage $stage_name"
      continue
    fi
    out=$evals/${name}_${stage_name}_exact
    timeout 120 $PYTHON -m launch.eval --config $config "${sets[@]}" --set run.dir=runs/$name \
      --set stages.$index.selection_score=exact --set tracking.enabled=false --checkpoint $checkpoint \
      --out $out > $out.log 2>&1
    echo "$(date +%T) $name $stage_name, top-n by the exact score: rc=$?; by the indexer, in the run:" \
      "$(grep -o "passkey exact match [0-9]*%" $OUT/$name.log | sed -n "$((index + 1))p")"
    # NIAH over the grid, and at the stage's own length by depth (accuracy is [depth][length])
    $PYTHON -c "import json; d = json.load(open('$out/eval.json')); n = d['niah']
print(f\"  NIAH mean {n['mean_accuracy']:.0%}, at {n['lengths'][-1]} by depth\",
      ' '.join(f'{row[-1]:.0%}' for row in n['accuracy']), f\"validation loss {d['validation']['loss']:.4f}\")" \
      || tail -5 $out.log
  done
done
tar -C $evals -cf $OUT/v28_ab_evals.tar .
ls $OUT
