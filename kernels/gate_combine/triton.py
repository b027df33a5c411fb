"""The gated sum of NSA's branch outputs, Triton: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.

The forward is one kernel: it reads the three outputs and their gates once and writes the sum (products
and sum in fp32). Its backward hands the sum's gradient dO to the three outputs as it is, uncopied; each
branch's Triton kernels were given the branch's gate (their `gate` argument, kernels.nsa.compose_nsa passes
it) and apply it in their own backward: the pass that makes the attention backward's delta (
kernels.range_attention.attention_delta) also makes the branch output's gradient g * dO and the gate's, the
row sum of dO * o. Autograd runs the most recently created ready node first, so each branch's output
gradient (a [T, HQ, Dv] tensor) exists only inside its own branch's backward, one at a time, where a
single combine node would make all three at once (6 GiB more at the peak at 128K tokens with 64 heads of
128).

So the sum and the branches are a pair: gated_sum_triton differentiates only through outputs made by
the Triton branches with the same gates. Until 2026-12-04 each gate was its own forward kernel writing
g * o, then a sum read those (2.5x the forward's memory traffic: at 128K, 5.1 ms); until 2026-12-06 each
gate's backward was its own kernel, which wrote g * dO for the branch's delta pass to read again (at 64K
on an H100, 3.2 ms for the three gate kernels and 2.2 for the three delta passes).
"""

import torch
import triton
import triton.language as tl

from kernels.triton_utils import launch_params, pow2

BLOCK_R = 32  # (token, head) rows per program
# Launch parameters set over the defaults (BLOCK_R, num_warps) of the "sum" kernel; empty in use, for
# experiments
LAUNCH: dict[str, dict] = {}


@triton.jit
def _rows(R, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    d = tl.arange(0, BLOCK_D)
    return rows, row_ok, rows[:, None] * DV + d[None, :], row_ok[:, None] & (d[None, :] < DV)


@triton.jit
def _gated_sum_fwd(a, b, c, g_a, g_b, g_c, out, R, DV: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_C: tl.constexpr):
    rows, row_ok, offs, mask = _rows(R, DV, BLOCK_R, BLOCK_D)
    acc = _gated_rows(a, g_a, rows, row_ok, offs, mask) + _gated_rows(b, g_b, rows, row_ok, offs, mask)
    if HAS_C:
        acc += _gated_rows(c, g_c, rows, row_ok, offs, mask)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rows(o, gate, rows, row_ok, offs, mask):
    g = tl.load(gate + rows, mask=row_ok, other=0.0).to(tl.float32)
    return g[:, None] * tl.load(o + offs, mask=mask, other=0.0).to(tl.float32)


def _grid(o: torch.Tensor, launch: dict) -> tuple[int]:
    return (triton.cdiv(o.numel() // o.shape[-1], launch["BLOCK_R"]),)


class GatedSum(torch.autograd.Function):
    """gated_sum_triton as an autograd function: the upstream gradient is every output's, uncopied (their
    branches' backward applies the gates); the gates get theirs there too."""

    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win):
        out = torch.empty_like(o_cmp)
        launch = launch_params(LAUNCH, "sum", BLOCK_R=BLOCK_R)
        has_win = o_win is not None
        _gated_sum_fwd[_grid(o_cmp, launch)](
            o_cmp, o_slc, o_win if has_win else o_cmp, g_cmp, g_slc, g_win if has_win else g_cmp, out,
            o_cmp.numel() // o_cmp.shape[-1], DV=o_cmp.shape[-1], BLOCK_D=pow2(o_cmp.shape[-1]), HAS_C=has_win,
            **launch)
        ctx.has_win = has_win
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad if ctx.has_win else None, None, None, None


def gated_sum_triton(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor | None,
                     g_cmp: torch.Tensor, g_slc: torch.Tensor, g_win: torch.Tensor | None) -> torch.Tensor:
    """The gated sum (Triton; same meaning as gated_sum_ref): o_* [B, T, HQ, Dv], one shape and dtype, each
    from a Triton branch given the gate g_* [B, T, HQ] passed here (o_win and g_win None: the window branch
    is off). Products and sum in fp32, returned in the outputs' dtype."""
    outs = [o for o in (o_cmp, o_slc, o_win) if o is not None]
    if any(o.shape != o_cmp.shape or o.dtype != o_cmp.dtype for o in outs):
        raise ValueError(f"gated_sum_triton: outputs {[tuple(o.shape) for o in outs]} "
                         f"({[str(o.dtype) for o in outs]}) must share one shape and dtype")
    gates = [g for g in (g_cmp, g_slc, g_win) if g is not None]
    if len(gates) != len(outs) or any(g.shape != o_cmp.shape[:-1] for g in gates):
        raise ValueError(f"gated_sum_triton: gates {[tuple(g.shape) for g in gates]} must be one per output, "
                         f"each the outputs' shape {tuple(o_cmp.shape)} without its last dimension")
    # the gates' gradients come from the branches' backward: detached here, so none is counted twice
    return GatedSum.apply(*(o.contiguous() if o is not None else None for o in (o_cmp, o_slc, o_win)),
                          *(g.detach().contiguous() if g is not None else None for g in (g_cmp, g_slc, g_win)))
