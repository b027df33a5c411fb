"""The gated sum of the branch outputs and the gates' backward: the Triton sum against the reference, the
sum handing its gradient on uncopied, and each Triton branch applying its gate in its own backward (the
pair kernels/gate_combine/triton.py describes), against the reference's gated sum."""

import pytest
import torch

import kernels.compressed_attention.triton as compressed_triton
import kernels.gate_combine.triton as gate_combine
import kernels.window_attention.triton as window_triton
from kernels.block_selection.naive import topn_from_scores
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.compressed_attention.triton import compressed_attention_triton
from kernels.compression.naive import num_compressed_blocks
from kernels.gate_combine.naive import gated_sum_ref
from kernels.gate_combine.triton import gated_sum_triton
from kernels.selected_attention.naive import selected_attention_ref
from kernels.selected_attention.triton import selected_attention_triton
from kernels.window_attention.naive import window_attention_ref
from kernels.window_attention.triton import window_attention_triton
from triton_cases import (DEVICE, DTYPES, INTERPRETER_WARNINGS, LOW_PRECISION, assert_close, compare_attention,
                          compare_to_fp32, randn, require_backend)

pytestmark = INTERPRETER_WARNINGS


@pytest.mark.parametrize("with_window", [True, False], ids=["three-branches", "window-off"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, with_window):
    """Dv = 24 (not a power of two) and 3 * 5 * 7 rows (not a multiple of the row tile); the gates are
    columns of one [..., 3] tensor, as compose_nsa passes them."""
    check(dtype, with_window)


def test_launch_override(monkeypatch):
    """Other row tiles give the same result."""
    monkeypatch.setitem(gate_combine.LAUNCH, "sum", {"BLOCK_R": 8, "num_warps": 2})
    check(torch.float32, True)


def check(dtype, with_window):
    require_backend()
    torch.manual_seed(0)
    shape = (3, 5, 7, 24)
    outs = [randn(*shape, dtype=dtype, grad=False) for _ in range(3 if with_window else 2)]
    gates = torch.rand(*shape[:-1], 3, device=DEVICE).to(dtype)
    g = [gates[..., i] for i in range(len(outs))]
    args = (outs[0], outs[1], outs[2] if with_window else None, g[0], g[1], g[2] if with_window else None)
    out, ref = gated_sum_triton(*args), gated_sum_ref(*args)
    assert out.dtype == ref.dtype == dtype
    assert_close("output", out, ref, dtype)


def test_the_sum_hands_its_gradient_on_uncopied():
    """The sum gives its upstream gradient to the three outputs as one uncopied tensor and the gates none:
    the branches' backward applies the gates."""
    require_backend()
    a, b, c = (randn(2, 3, 4, 8) for _ in range(3))
    g = [torch.rand(2, 3, 4, device=DEVICE).requires_grad_() for _ in range(3)]
    upstream = torch.ones(2, 3, 4, 8, device=DEVICE)
    grads = torch.autograd.grad(gated_sum_triton(a, b, c, *g), [a, b, c, *g], upstream, allow_unused=True)
    assert grads[0].data_ptr() == grads[1].data_ptr() == grads[2].data_ptr()
    assert torch.equal(grads[0], upstream)
    assert grads[3:] == (None, None, None)


T, G, HK, DK, DV = 67, 4, 2, 32, 16
L, STRIDE, SEL, WINDOW = 16, 8, 16, 24


def picks(seq):
    """Valid top-n picks (block 0, the local blocks, random others; -1 padded) for every query."""
    scores = torch.rand(1, seq, HK, -(-seq // SEL))
    return topn_from_scores(scores, torch.arange(seq), SEL, 3).to(DEVICE)


def gated(branch, sum_fn):
    """branch as compose_nsa runs it: given its gate, its output passed through the gated sum (with a
    second, constant output of zeros). -> (the sum, lse), so that compare_attention checks the sum and
    every leaf's gradient, the gate's among them."""
    def run(gate, **inputs):
        o, lse = branch(**inputs, gate=gate)
        zeros = torch.zeros_like(o)
        return sum_fn(o, zeros, None, gate, torch.zeros_like(gate), None), lse
    return run


BRANCHES = {
    "compressed": (compressed_attention_triton, compressed_attention_ref,
                   lambda: dict(k_cmp=randn(1, num_compressed_blocks(T, L, STRIDE), HK, DK),
                                v_cmp=randn(1, num_compressed_blocks(T, L, STRIDE), HK, DV)),
                   dict(block_size=L, stride=STRIDE)),
    "window": (window_attention_triton, window_attention_ref,
               lambda: dict(k=randn(1, T, HK, DK), v=randn(1, T, HK, DV)), dict(window=WINDOW)),
    "selected": (selected_attention_triton, selected_attention_ref,
                 lambda: dict(k=randn(1, T, HK, DK), v=randn(1, T, HK, DV)),
                 dict(selection_block=SEL)),
}


# (branch, the range kernels' backward path: one pass or split; None for the selected branch)
CASES = [("compressed", True), ("compressed", False), ("window", True), ("window", False), ("selected", None)]


@pytest.mark.parametrize("name, one_pass", CASES,
                         ids=["compressed-onepass", "compressed-split", "window-onepass", "window-split", "selected"])
def test_each_branch_applies_its_gate_in_its_backward(monkeypatch, name, one_pass):
    """Every leaf's gradient, the gate's included, under one upstream gradient on the gated sum and one on
    the branch's lse (the delta pass takes both), against the reference's gated sum; the selected branch
    also through its row list (rows without picks not launched, their gate's gradient 0)."""
    if one_pass is not None:
        for branch in (compressed_triton, window_triton):
            monkeypatch.setattr(branch, "ONE_PASS_BACKWARD", one_pass)
        monkeypatch.setattr(compressed_triton, "ONE_PASS_MIN_WORK", 0)
    torch.manual_seed(3)
    triton_branch, reference, _, sizes = BRANCHES[name]
    leaves = branch_leaves(name)
    if name == "selected":
        blocks = picks(T)
        blocks[:, :9] = -1  # rows without picks, as compose_nsa leaves the window-covered ones
        sizes = dict(sizes, block_idx=blocks)
        rows = torch.arange(9, T, dtype=torch.int32, device=DEVICE)
        compare_attention(gated(triton_branch, gated_sum_triton), gated(reference, gated_sum_ref), leaves,
                          torch.float32, rows=rows, **sizes)
    compare_attention(gated(triton_branch, gated_sum_triton), gated(reference, gated_sum_ref), leaves,
                      torch.float32, **sizes)


def branch_leaves(name):
    """The gate, q and the branch's own K/V (fp32, requiring grad)."""
    return dict(gate=torch.rand(1, T, G * HK, device=DEVICE).requires_grad_(), q=randn(1, T, G * HK, DK),
                **BRANCHES[name][2]())


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", list(BRANCHES))
def test_gated_branch_low_precision_error_is_at_most_twice_the_references(name, dtype):
    """In fp16 (and bf16 on a GPU) the gated sum and every gradient, the gate's included, at most twice as
    far from the fp32 reference as the reference at that dtype is (compare_to_fp32)."""
    torch.manual_seed(5)
    triton_branch, reference, _, sizes = BRANCHES[name]
    if name == "selected":
        sizes = dict(sizes, block_idx=picks(T))
    compare_to_fp32(gated(triton_branch, gated_sum_triton), gated(reference, gated_sum_ref), branch_leaves(name),
                    dtype, **sizes)


def test_mismatched_shapes_are_a_clear_error():
    q, k, v = randn(1, 8, 2, 16), randn(1, 8, 1, 16), randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="gate"):
        window_attention_triton(q, k, v, 4, gate=torch.rand(1, 8, 3, device=DEVICE))
    with pytest.raises(ValueError, match="one shape and dtype"):
        gated_sum_triton(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5), None, torch.zeros(1, 2, 3),
                         torch.zeros(1, 2, 3), None)
    with pytest.raises(ValueError, match="one per output"):
        gated_sum_triton(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), None, torch.zeros(1, 2, 3),
                         torch.zeros(1, 2, 4), None)
