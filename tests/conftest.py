"""Without CUDA (CI) the Triton kernels run under Triton's interpreter. Triton reads TRITON_INTERPRET
when a kernel is defined, so it is set here, before any test module imports them. The kernels' output
buffers are pre-filled with NaN under the tests (kernels/triton_utils.py, poisoned), so that a position a
kernel forgets to write fails them; processes the tests spawn inherit both settings."""

import os

import torch

os.environ.setdefault("NSA_DIST_POISON_OUTPUTS", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
