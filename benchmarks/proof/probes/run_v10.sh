#!/usr/bin/env bash
# issue 13 probes (2026-12-01), on one H200 through the device tool (carry .whl): the three v10_*.yaml
# probes at once (the 2K stages of the proof), then tools/needle_selection.py at 2048 tokens on each.
# Logs, needle JSONs and eval/ directories land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/megatron_core*.whl .whl/mlflow/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 tools/build_code_corpus.py 2>&1 | tail -1
names=${NAMES:-"v10_mean v10_mean_w64 v10_mlp_w64"}  # or NAMES="one two"
for name in $names; do
  timeout ${LIMIT:-420} python3 -m launch.train --config benchmarks/proof/probes/$name.yaml > $OUT/$name.log 2>&1 &
done
wait
for name in $names; do
  echo "== $name"; grep "evaluated\|stage .* steps in\|│" $OUT/$name.log | tail -6
  newest=$(ls -d runs/$name/checkpoints/step_* | sort | tail -1)
  timeout 60 python3 tools/needle_selection.py --config benchmarks/proof/probes/$name.yaml --checkpoint $newest \
    --length 2048 --samples 8 --out $OUT/${name}_needle_2048.json 2>&1 | grep -v -i warn | tail -8
done
(cd runs && find v10_* -path '*/eval/*' -o -name mlflow.db) | tar -C runs -cf $OUT/v10_probes.tar -T -
