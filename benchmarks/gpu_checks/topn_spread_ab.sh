#!/usr/bin/env bash
# Top-n's spread by runs and its heads masked once (2026-12-07), against the kernels before it on the same
# machine (layer_ab.sh): the top-n GPU tests, then the layer profiled at each length, printing _topn_kernel's
# time. Needs base-kernels.tar in the root: `git archive <base> kernels > base-kernels.tar`.
#   COMMIT=<sha> BASE=<sha> bash benchmarks/gpu_checks/topn_spread_ab.sh 131072 65536
TESTS="tests/kernels/test_triton_block_selection.py" KERNELS="_topn_kernel|_topn_merge" NAME=topn-spread \
  TEST_LIMIT=200 PROFILE_LIMIT=150 bash "$(dirname "$0")/layer_ab.sh" "$@"
