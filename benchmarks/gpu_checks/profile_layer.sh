#!/usr/bin/env bash
# Issue 11: tools/profile_layer.py on the GPU machine (no wheels needed): the paper-config layer's kernels,
# one length per argument, e.g.
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/profile_layer.sh 16384 65536 131072
set -u
tag=${COMMIT:-unknown}
for seq in "$@"; do
  name=profile-layer-$(date +%F)-$tag-$seq
  PYTHONUNBUFFERED=1 timeout ${LIMIT:-300} python3 tools/profile_layer.py --seq $seq --commit $tag \
    --out $OUT/$name.json > $OUT/$name.log 2>&1
  echo "$(date +%T) profile_layer $seq rc=$?"
  tail -32 $OUT/$name.log
done
