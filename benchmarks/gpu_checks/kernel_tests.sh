#!/usr/bin/env bash
# The Triton kernel tests on the GPU machine, bounded, for the device scripts that must not train or time
# on kernels that fail there (run.sh's PRECHECK=1, dense_prefix.sh). Sourced after setup.sh:
#   kernel_tests TAG TEST_FILE...     -> the verbose log in $OUT/pytest-kernels-TAG.log, its tail printed
# A test that runs past 90 s stops the run with every thread's stack in the log (pytest-timeout, thread
# method: a stall inside a CUDA call does not return to Python, so the signal method could not end it);
# the whole run stops at 300 s. On an H200 at 18a7823 the window tests stalled at the first one-pass
# backward case (fp32, G=1) for over 3 minutes with no stack printed (pytest-kernels-18a7823.log).
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
