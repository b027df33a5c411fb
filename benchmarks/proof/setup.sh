# Sourced by run.sh and run_many.sh on the GPU machine: installs the wheels carried in .whl/ (the machine
# has no internet), sets the environment, builds the code corpus once. On a machine whose python already
# has them (this repository's .venv), SETUP=0 skips the install: PYTHON names that python.
# The GPU machine's wheels, for its Python 3.12, downloaded beforehand:
#   pip download -q --only-binary=:all: --python-version 3.12 --implementation cp -d .whl megatron-core==0.16.1 \
#     --no-deps --platform manylinux_2_28_x86_64
#   pip download -q --only-binary=:all: --python-version 3.12 --implementation cp -d .whl/mlflow \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
#     mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 sqlalchemy alembic psutil
PYTHON=${PYTHON:-python3}
if [ "${SETUP:-1}" = 1 ]; then
  if [ "${FLA:-0}" = 1 ] && ! ls .whl/fla_core*.whl > /dev/null 2>&1; then
    echo "FLA=1 asks for fla-core, and .whl/ holds no fla_core wheel: run ../shared/tools/device-wheels here" \
      "(it downloads fla-core==0.6.0) and carry .whl, or leave FLA unset"
    exit 1
  fi
  # FLA=1 adds fla-core (tools/bench_kernels.py's fla line; its einops is on the machine already). It must
  # go to /tmp/site as the rest: a plain `pip install` reaches another Python than python3's
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/megatron_core*.whl .whl/mlflow/*.whl $([ "${FLA:-0}" = 1 ] && echo .whl/fla_core*.whl) || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
$PYTHON tools/build_code_corpus.py 2>&1 | tail -1
