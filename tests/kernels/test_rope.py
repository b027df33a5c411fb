"""kernels/rope.py: RoPE in one Triton kernel gives what nsa_dist/attention.py's PyTorch rotation gives,
to the bit, forward and inverse, on strided inputs, with channels past the rotated ones copied."""

import pytest
import torch

from kernels.rope import rotate_triton
from nsa_dist.attention import _rotate, rotary_cos_sin, rotary_freqs
from triton_cases import DEVICE, LOW_PRECISION, require_backend


@pytest.mark.parametrize("width", [64, 67, 128], ids=["rotated-whole", "query-and-gate-logits", "doubled-keys"])
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
def test_kernel_is_the_pytorch_rotation_bitwise(width, dtype):
    require_backend()
    torch.manual_seed(0)
    angles = rotary_freqs(37, 1, 0, 64, 1e4, torch.device(DEVICE))  # [37, 1, 1, 64]
    cos, sin = rotary_cos_sin(angles, dtype)
    wide = torch.randn(37, 2, 5, width + 6).to(device=DEVICE, dtype=dtype)
    x = wide[:, :, 1:4, 3 : 3 + width]  # a strided view, as Megatron's split of the fused projection gives
    for inverse in (False, True):
        got = rotate_triton(x, cos, sin, inverse)
        want = _rotate(x.cpu(), cos.cpu(), sin.cpu(), inverse)  # the PyTorch path (the kernel's on CUDA)
        assert got.is_contiguous() and torch.equal(got.cpu(), want), (dtype, width, inverse)
        assert not torch.equal(got[..., :64], x[..., :64]) and torch.equal(got[..., 64:], x[..., 64:])


def test_kernel_checks_the_angles_shape():
    x = torch.randn(5, 1, 2, 8)
    with pytest.raises(ValueError, match=r"\[S, 1, 1, R\]"):
        rotate_triton(x, torch.ones(5, 8), torch.ones(5, 8), inverse=False)
