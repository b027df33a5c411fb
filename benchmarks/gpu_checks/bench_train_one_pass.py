"""tools/bench_train.py with the range attention's one-pass backward in both branches: the behaviour before
the window branch (9efe853) and the compressed branch on documents under 64K tokens (63cb639, c072d12) took
the split backward, so that a training step can be timed both ways on one machine. Same arguments as
tools/bench_train.py:

    python3 benchmarks/gpu_checks/bench_train_one_pass.py --config configs/proof_100m.yaml --attention nsa ...
"""

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import kernels.compressed_attention.triton as compressed_triton  # noqa: E402
import kernels.window_attention.triton as window_triton  # noqa: E402

window_triton.ONE_PASS_BACKWARD = True
compressed_triton.ONE_PASS_BACKWARD = True
compressed_triton.ONE_PASS_MIN_WORK = 0
sys.argv[0] = str(REPO / "tools/bench_train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
