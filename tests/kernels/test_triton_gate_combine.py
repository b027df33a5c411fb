"""The gated sum of the branch outputs: Triton kernels against the reference (outputs and gradients),
and the gradients' path: the sum passes its own on uncopied, the gate nodes apply the gates."""

import pytest
import torch

import kernels.gate_combine.triton as gate_combine
from kernels.gate_combine.naive import gate_branch_ref, gated_sum_ref
from kernels.gate_combine.triton import gate_branch_triton, gated_sum_triton
from triton_cases import DEVICE, DTYPES, INTERPRETER_WARNINGS, assert_close, randn, require_backend

pytestmark = INTERPRETER_WARNINGS


@pytest.mark.parametrize("with_window", [True, False], ids=["three-branches", "window-off"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, with_window):
    """Dv = 24 (not a power of two) and 3 * 5 * 7 rows (not a multiple of the row tile); the gates are
    columns of one [..., 3] tensor, as compose_nsa passes them."""
    check(dtype, with_window)


def test_launch_override(monkeypatch):
    """Other row tiles give the same results."""
    monkeypatch.setitem(gate_combine.LAUNCH, "gate_bwd", {"BLOCK_R": 64})
    monkeypatch.setitem(gate_combine.LAUNCH, "sum", {"BLOCK_R": 8, "num_warps": 2})
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
    for gate, total in ((gate_branch_triton, gated_sum_triton), (gate_branch_ref, gated_sum_ref)):
        passed = [gate(o, gates[..., i]) for i, o in enumerate(outs)]
        g = [gates[..., i] for i in range(len(outs))]
        out = total(passed[0], passed[1], passed[2] if with_window else None,
                    g[0], g[1], g[2] if with_window else None)
        results.append((out, torch.autograd.grad((out.float() * upstream).sum(), leaves)))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype == dtype
    assert_close("output", out, ref, dtype)
    for name, g, g_ref in zip(["o_cmp", "o_slc", "o_win"][: len(outs)] + ["gates"], grads, ref_grads):
        assert g.dtype == g_ref.dtype
        assert_close(f"d{name}", g, g_ref, dtype)
    if not with_window:
        assert torch.equal(grads[-1][..., 2], torch.zeros_like(grads[-1][..., 2]))


def test_the_gradient_path():
    """The sum hands its upstream gradient to the three outputs as one uncopied tensor and gives the
    gates none; each gate node then makes g * dO and the gate's row sum."""
    require_backend()
    a, b, c = (randn(2, 3, 4, 8) for _ in range(3))
    g = [torch.rand(2, 3, 4, device=DEVICE).requires_grad_() for _ in range(3)]
    upstream = torch.ones(2, 3, 4, 8, device=DEVICE)
    grads = torch.autograd.grad(gated_sum_triton(a, b, c, *g), [a, b, c], upstream, allow_unused=True)
    assert grads[0].data_ptr() == grads[1].data_ptr() == grads[2].data_ptr()
    assert torch.equal(grads[0], upstream)
    total = gated_sum_triton(*(gate_branch_triton(o, gi) for o, gi in zip((a, b, c), g)), *g)
    d_a, d_g = torch.autograd.grad(total, [a, g[0]], upstream)
    assert torch.allclose(d_a, g[0].detach()[..., None] * upstream)
    assert torch.allclose(d_g, a.detach().sum(-1))


def test_the_gate_passes_the_output_on_uncopied():
    require_backend()
    o = randn(2, 3, 4, 8)
    assert gate_branch_triton(o, torch.rand(2, 3, 4, device=DEVICE)).data_ptr() == o.data_ptr()


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="gate"):
        gate_branch_triton(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="one shape and dtype"):
        gated_sum_triton(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5), None, torch.zeros(1, 2, 3),
                         torch.zeros(1, 2, 3), None)
    with pytest.raises(ValueError, match="one per output"):
        gated_sum_triton(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), None, torch.zeros(1, 2, 3),
                         torch.zeros(1, 2, 4), None)
