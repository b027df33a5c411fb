#!/usr/bin/env bash
# The gates' backward in the branches' delta pass (2026-12-06), against the kernels before it on the same
# machine (layer_ab.sh): the GPU tests of the gate and the whole layer, then the layer profiled at each length.
# Needs base-kernels.tar in the root: `git archive <base> kernels > base-kernels.tar`.
#   COMMIT=<sha> BASE=<sha> bash benchmarks/gpu_checks/gate_delta_ab.sh 65536 131072
TESTS="tests/kernels/test_triton_gate_combine.py tests/kernels/test_triton_nsa.py" KERNELS="_gate_bwd|_delta_kernel" \
  NAME=gate-delta bash "$(dirname "$0")/layer_ab.sh" "$@"
