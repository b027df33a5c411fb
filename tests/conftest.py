"""Without CUDA (CI) the Triton kernels run under Triton's interpreter. Triton reads TRITON_INTERPRET
when a kernel is defined, so it is set here, before any test module imports them."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
