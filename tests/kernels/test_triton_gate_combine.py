"""Gate combine: Triton kernel against the reference (output and gradients of outputs and gates)."""

import pytest
import torch

import kernels.gate_combine.triton as gate_combine
from kernels.gate_combine.naive import combine_branches_ref
from kernels.gate_combine.triton import combine_branches_triton
from triton_cases import DEVICE, DTYPES, INTERPRETER_WARNINGS, assert_close, randn, require_backend

pytestmark = INTERPRETER_WARNINGS


@pytest.mark.parametrize("with_window", [True, False], ids=["three-branches", "window-off"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, with_window):
    """Dv = 24 (not a power of two) and 3 * 5 * 7 rows (not a multiple of the row tile)."""
    check(dtype, with_window)


def test_launch_override(monkeypatch):
    """Other row tiles (as benchmarks/kernels-exp-sweep.py sets them) give the same results."""
    monkeypatch.setitem(gate_combine.LAUNCH, "fwd", {"BLOCK_R": 16, "num_warps": 2})
    monkeypatch.setitem(gate_combine.LAUNCH, "bwd", {"BLOCK_R": 64})
    check(torch.float32, True)


def check(dtype, with_window):
    require_backend()
    torch.manual_seed(0)
    shape = (3, 5, 7, 24)
    outs = [randn(*shape, dtype=dtype) for _ in range(3 if with_window else 2)]
    gates = torch.rand(*shape[:-1], 3, device=DEVICE).to(dtype).requires_grad_()
    leaves = [*outs, gates]
    upstream = randn(*shape, grad=False)
    results = []
    for fn in (combine_branches_triton, combine_branches_ref):
        out = fn(outs[0], outs[1], outs[2] if with_window else None, gates)
        results.append((out, torch.autograd.grad((out.float() * upstream).sum(), leaves)))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype == dtype
    assert_close("output", out, ref, dtype)
    for name, g, g_ref in zip(["o_cmp", "o_slc", "o_win"][: len(outs)] + ["gates"], grads, ref_grads):
        assert g.dtype == g_ref.dtype
        assert_close(f"d{name}", g, g_ref, dtype)
    if not with_window:
        assert torch.equal(grads[-1][..., 2], torch.zeros_like(grads[-1][..., 2]))


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="gates"):
        combine_branches_triton(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), None, torch.zeros(1, 2, 3, 2))
