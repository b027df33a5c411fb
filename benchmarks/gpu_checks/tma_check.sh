#!/usr/bin/env bash
# Issue 11: tiles copied through TMA tensor descriptors (session 40, built and tested under the interpreter
# and compiled offline for sm_90a only), on the GPU, carry [".whl"]; two device calls of about 8 minutes:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/tma_check.sh range
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_checks/tma_check.sh selected
# Each first runs the TMA kernel tests on the GPU (bf16 included; the interpreter accepts descriptor shapes
# a GPU may reject) and stops if they fail. Then:
# range:    benchmarks/kernels-exp-range-tma.py, pointer loads / TMA in the forward and dQ / TMA in every
#           kernel, timed in turn: both branches at 16K and 128K with the paper's heads (64 / 4 of 128),
#           then the proof model's (16 / 1 of 64) at 32K in documents of 8K.
# selected: benchmarks/kernels-exp-sweep.py --tma-only: today's forward and dQ launches against their TMA
#           variants at 128K, then the fastest at 16K.
# Where TMA wins, turn it on: the winning kernels in range_attention.TMA_LOADS, "TMA": True in selected
# attention's default launches (_forward_launch, _dq_launch); then rerun tools/bench_kernels.py.
set -u
part=${1:?"say which: range or selected"}
tag=${COMMIT:-unknown}
source benchmarks/proof/setup.sh
source benchmarks/gpu_checks/kernel_tests.sh
if [ "$part" = range ]; then
  kernel_tests tma-range-$tag tests/kernels/test_triton_range_tma.py || exit 1
  range_tma() {  # name limit-s args...
    local name=$1 limit=$2
    shift 2
    PYTHONUNBUFFERED=1 timeout $limit ${PYTHON:-python3} benchmarks/kernels-exp-range-tma.py "$@" \
      --out $OUT/range-tma-$name-$tag.json > $OUT/range-tma-$name-$tag.log 2>&1
    echo "$(date +%T) range tma $name rc=$?"
    sed -n '/^range attention, TMA copies/,$p' $OUT/range-tma-$name-$tag.log
  }
  range_tma paper 300 --seqs 16384 131072
  range_tma proof 120 --seqs 32768 --q-heads 16 --kv-heads 1 --head-dim 64 --doc-len 8192
elif [ "$part" = selected ]; then
  kernel_tests tma-selected-$tag tests/kernels/test_triton_selected_attention.py -k tma || exit 1
  PYTHONUNBUFFERED=1 timeout 300 ${PYTHON:-python3} benchmarks/kernels-exp-sweep.py --kernels selected \
    --selected-parts fwd dq --tma-only --seqs 131072 16384 --groups 16 --budget-s 220 \
    --out $OUT/sweep-selected-tma-$tag.json > $OUT/sweep-selected-tma-$tag.log 2>&1
  echo "$(date +%T) sweep selected tma rc=$?"
  sed -n '/^NVIDIA\|^interpreter/,$p' $OUT/sweep-selected-tma-$tag.log
else
  echo "tma_check.sh: unknown part '$part': say range or selected"
  exit 1
fi
