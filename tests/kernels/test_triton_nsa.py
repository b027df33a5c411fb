"""native_sparse_attention(impl="triton") against impl="reference": output, selections, gradients."""

from functools import partial

import pytest
import torch

from kernels.compression.naive import mean_compress
from kernels.nsa import branch_ops, native_sparse_attention
from triton_cases import DEVICE, INTERPRETER_WARNINGS, assert_close, assert_lse_close, randn, require_backend

pytestmark = INTERPRETER_WARNINGS

T = 131


@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
def test_triton_matches_reference(packed):
    require_backend()
    torch.manual_seed(0)
    group, kv_heads, dk, dv = 2, 1, 32, 16
    cu_seqlens = torch.tensor([0, 50, 51, T], dtype=torch.int32, device=DEVICE) if packed else None
    q = randn(1, T, group * kv_heads, dk)
    kv = [(randn(1, T, kv_heads, dk), randn(1, T, kv_heads, dv)) for _ in range(3)]
    gates = torch.rand(1, T, group * kv_heads, 3, device=DEVICE).requires_grad_()
    leaves = [q, *kv[0], *kv[1], *kv[2], gates]
    phi = partial(mean_compress, block_size=16, stride=8)
    sizes = dict(block_size=16, stride=8, selection_block=16, num_selected=4, window=24)
    upstream = randn(1, T, group * kv_heads, dv, grad=False)
    results = {}
    for impl in ("triton", "reference"):
        out = native_sparse_attention(q, *kv, gates, phi, phi, **sizes, impl=impl, cu_seqlens=cu_seqlens)
        grads = torch.autograd.grad((out.output * upstream).sum(), leaves)
        results[impl] = (out, grads)
    (out, grads), (ref, ref_grads) = results["triton"], results["reference"]
    assert torch.equal(out.block_idx, ref.block_idx)
    assert_close("output", out.output, ref.output, torch.float32)
    for name in ("lse_cmp", "lse_slc", "lse_win"):
        assert_lse_close(name, getattr(out, name), getattr(ref, name), torch.float32)
    for i, (g, g_ref) in enumerate(zip(grads, ref_grads)):
        assert_close(f"grad of leaf {i}", g, g_ref, torch.float32)


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="impl='cuda'"):
        branch_ops("cuda")
