#!/usr/bin/env bash
# The Triton kernel tests on the GPU machine, bounded, for the device scripts that must not train or time
# on kernels that fail there (run.sh's PRECHECK=1). Sourced after setup.sh:
#   kernel_tests TAG TEST_FILE...     -> the verbose log in $OUT/pytest-kernels-TAG.log, its tail printed
# A test that runs past 90 s stops the run with every thread's stack in the log (pytest-timeout, thread
# method); the whole run stops at 300 s. At 18a7823 and fd26132 the window tests sat for minutes on the
# first fp32 one-pass backward case with no stack printed, so the timeout's thread never ran: the process
# held the GIL, as Triton's in-process compiler does. benchmarks/gpu_checks/onepass_stall.py (each config
# in its own process, 25 s each) found no hung kernel: every config it finished ran in milliseconds once
# compiled, and the 64 x 128 fp32 configs took 14 s or more to build and run once (two did not finish
# within 25 s).
# fp32 inputs now autotune over one small config only (kernels/range_attention.py): at 8c59bb8 the whole
# compressed-attention file (30 tests, one-pass backward included) passed alone in 210 s, the slowest case 17 s.
kernel_tests() {
  local tag=$1; shift
  echo "$(date +%T) kernel tests: $*"
  timeout 300 ${PYTHON:-python3} -m pytest -v -p no:cacheprovider --timeout 90 --timeout-method thread \
    --durations 10 "$@" > $OUT/pytest-kernels-$tag.log 2>&1
  local status=$?
  tail -15 $OUT/pytest-kernels-$tag.log
  [ $status = 0 ] || echo "kernel tests failed on this GPU (rc=$status; 124: the run passed 300 s)"
  return $status
}
