#!/usr/bin/env bash
# Selected attention's dK/dV by token chunks on the GPU: its kernel tests, then benchmarks/selected-dkv-chunks.py.
#   COMMIT=<sha> bash benchmarks/gpu_checks/dkv_chunks.sh [its arguments]
set -u
tag=${COMMIT:-unknown}
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton_selected_attention.py \
  -k "chunk or inverted or matches_reference or low_precision" > $OUT/pytest-dkv-chunks-$tag.log 2>&1
echo "$(date +%T) GPU tests rc=$? ($(tail -1 $OUT/pytest-dkv-chunks-$tag.log))"
PYTHONUNBUFFERED=1 timeout ${LIMIT:-330} python3 benchmarks/selected-dkv-chunks.py --commit $tag \
  --out $OUT/selected-dkv-chunks-$tag.json "$@" 2>&1 | tail -30
