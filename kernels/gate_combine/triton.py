"""The gated sum of NSA's branch outputs, Triton: one pass over the three outputs forward, one backward.

Autograd through the reference's fp32 expression keeps fp32 copies of every branch output and of the
broadcast gates for the backward (three [T, HQ, Dv] fp32 tensors: 12 GB at 128K tokens with 64 heads of
128) and passes over them several times. Here the forward reads each output once and writes the sum;
the backward reads the upstream gradient and the outputs once and writes their gradients and the
gates' (a row sum). Only the branch outputs, which the branches' own backward keeps anyway, and the
gates are saved.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_utils import launch_params, pow2

BLOCK_R = 32  # (token, head) rows per program
# Launch parameters set over the defaults (BLOCK_R, num_warps), per kernel: "fwd", "bwd"; empty in
# use, filled by benchmarks/kernels-exp-sweep.py
LAUNCH: dict[str, dict] = {}


@triton.jit
def _combine_fwd(o_cmp, o_slc, o_win, gates, out, R, DV: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_D: tl.constexpr, HAS_WIN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    d = tl.arange(0, BLOCK_D)
    offs = rows[:, None] * DV + d[None, :]
    mask = row_ok[:, None] & (d[None, :] < DV)
    g_cmp = tl.load(gates + rows * 3, mask=row_ok, other=0.0).to(tl.float32)
    g_slc = tl.load(gates + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    acc = g_cmp[:, None] * tl.load(o_cmp + offs, mask=mask, other=0.0).to(tl.float32)
    acc += g_slc[:, None] * tl.load(o_slc + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_WIN:
        g_win = tl.load(gates + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
        acc += g_win[:, None] * tl.load(o_win + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _branch_grads(grad, o, gates, d_o, d_gates, rows, row_ok, offs, mask, BRANCH: tl.constexpr):
    """d_o = g * grad and d_gate = sum over Dv of grad * o, for one branch."""
    g = tl.load(gates + rows * 3 + BRANCH, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(d_o + offs, (g[:, None] * grad).to(d_o.dtype.element_ty), mask=mask)
    o_rows = tl.load(o + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(d_gates + rows * 3 + BRANCH, tl.sum(grad * o_rows, 1).to(d_gates.dtype.element_ty), mask=row_ok)


@triton.jit
def _combine_bwd(grad, o_cmp, o_slc, o_win, gates, d_cmp, d_slc, d_win, d_gates, R, DV: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WIN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    d = tl.arange(0, BLOCK_D)
    offs = rows[:, None] * DV + d[None, :]
    mask = row_ok[:, None] & (d[None, :] < DV)
    g_out = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    _branch_grads(g_out, o_cmp, gates, d_cmp, d_gates, rows, row_ok, offs, mask, 0)
    _branch_grads(g_out, o_slc, gates, d_slc, d_gates, rows, row_ok, offs, mask, 1)
    if HAS_WIN:
        _branch_grads(g_out, o_win, gates, d_win, d_gates, rows, row_ok, offs, mask, 2)
    else:
        tl.store(d_gates + rows * 3 + 2, tl.zeros([BLOCK_R], tl.float32).to(d_gates.dtype.element_ty), mask=row_ok)


class CombineBranches(torch.autograd.Function):
    """combine_branches_triton as an autograd function; saves only its inputs."""

    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_win, gates):
        out = torch.empty_like(o_cmp)
        rows, dv = o_cmp.numel() // o_cmp.shape[-1], o_cmp.shape[-1]
        has_win = o_win is not None
        launch = launch_params(LAUNCH, "fwd", BLOCK_R=BLOCK_R)
        _combine_fwd[(triton.cdiv(rows, launch["BLOCK_R"]),)](
            o_cmp, o_slc, o_win if has_win else o_cmp, gates, out, rows,
            DV=dv, BLOCK_D=pow2(dv), HAS_WIN=has_win, **launch,
        )
        ctx.save_for_backward(o_cmp, o_slc, o_win, gates)
        return out

    @staticmethod
    def backward(ctx, grad):
        o_cmp, o_slc, o_win, gates = ctx.saved_tensors
        grad = grad.contiguous()
        rows, dv = o_cmp.numel() // o_cmp.shape[-1], o_cmp.shape[-1]
        has_win = o_win is not None
        d_cmp, d_slc = torch.empty_like(o_cmp), torch.empty_like(o_slc)
        d_win = torch.empty_like(o_win) if has_win else None
        d_gates = torch.empty_like(gates)
        launch = launch_params(LAUNCH, "bwd", BLOCK_R=BLOCK_R)
        _combine_bwd[(triton.cdiv(rows, launch["BLOCK_R"]),)](
            grad, o_cmp, o_slc, o_win if has_win else o_cmp, gates, d_cmp, d_slc, d_win if has_win else d_cmp,
            d_gates, rows, DV=dv, BLOCK_D=pow2(dv), HAS_WIN=has_win, **launch,
        )
        return d_cmp, d_slc, d_win, d_gates


def combine_branches_triton(
    o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor | None, gates: torch.Tensor
) -> torch.Tensor:
    """Gated sum of the branch outputs (Triton; same meaning as combine_branches_ref).

    o_cmp, o_slc, o_win: [B, T, HQ, Dv], one dtype among fp32/fp16/bf16 (o_win None: the window branch
    is off); gates: [B, T, HQ, 3] in (0, 1), order (cmp, slc, win), any of those dtypes. Returns
    [B, T, HQ, Dv] in o_cmp.dtype, summed in fp32. Differentiable in the outputs and the gates.
    """
    outs = [o for o in (o_cmp, o_slc, o_win) if o is not None]
    if any(o.shape != o_cmp.shape or o.dtype != o_cmp.dtype for o in outs) or gates.shape != (*o_cmp.shape[:-1], 3):
        raise ValueError(f"combine_branches_triton: outputs {[tuple(o.shape) for o in outs]} must share one shape "
                         f"and dtype, and gates {tuple(gates.shape)} must be their shape with 3 in place of Dv")
    o_win = o_win.contiguous() if o_win is not None else None
    return CombineBranches.apply(o_cmp.contiguous(), o_slc.contiguous(), o_win, gates.contiguous())
