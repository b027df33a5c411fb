"""The gated sum of NSA's branch outputs, Triton: each branch output times its gate, then the sum.

The two steps are separate autograd nodes on purpose. `kernels.nsa.compose_nsa` gates each branch's
output right after the branch runs, and autograd runs the most recently created ready node first, so
in the backward each branch's output gradient (g * dO, a [T, HQ, Dv] tensor) is made just before that
branch's own backward consumes and frees it: one such tensor exists at a time, where a single combine
node would make all three at once (6 GiB more at the peak at 128K tokens with 64 heads of 128). The sum
passes its upstream gradient to the three gated outputs as it is, without copies.

The forward reads each output once and writes it gated (products in fp32); the backward reads the
upstream gradient and the output once and writes the output's gradient and the gate's (a row sum in
fp32). Only the branch output, which its branch's backward keeps anyway, and the gate are saved.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_utils import launch_params, pow2

BLOCK_R = 32  # (token, head) rows per program
# Launch parameters set over the defaults (BLOCK_R, num_warps), per kernel: "gate_fwd", "gate_bwd",
# "sum"; empty in use, for experiments
LAUNCH: dict[str, dict] = {}


@triton.jit
def _rows(R, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    d = tl.arange(0, BLOCK_D)
    return rows, row_ok, rows[:, None] * DV + d[None, :], row_ok[:, None] & (d[None, :] < DV)


@triton.jit
def _gate_fwd(o, gate, out, R, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok, offs, mask = _rows(R, DV, BLOCK_R, BLOCK_D)
    g = tl.load(gate + rows, mask=row_ok, other=0.0).to(tl.float32)
    o_rows = tl.load(o + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, (g[:, None] * o_rows).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd(grad, o, gate, d_o, d_gate, R, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """d_o = g * grad and d_gate = the sum over Dv of grad * o."""
    rows, row_ok, offs, mask = _rows(R, DV, BLOCK_R, BLOCK_D)
    g_out = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(d_o + offs, (g[:, None] * g_out).to(d_o.dtype.element_ty), mask=mask)
    o_rows = tl.load(o + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(d_gate + rows, tl.sum(g_out * o_rows, 1).to(d_gate.dtype.element_ty), mask=row_ok)


@triton.jit
def _sum_fwd(a, b, c, out, R, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_C: tl.constexpr):
    _, _, offs, mask = _rows(R, DV, BLOCK_R, BLOCK_D)
    acc = tl.load(a + offs, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(b + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_C:
        acc += tl.load(c + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


def _grid(o: torch.Tensor, launch: dict) -> tuple[int]:
    return (triton.cdiv(o.numel() // o.shape[-1], launch["BLOCK_R"]),)


class GateBranch(torch.autograd.Function):
    """gate_branch_triton as an autograd function; saves only its inputs."""

    @staticmethod
    def forward(ctx, o, gate):
        out = torch.empty_like(o)
        launch = launch_params(LAUNCH, "gate_fwd", BLOCK_R=BLOCK_R)
        _gate_fwd[_grid(o, launch)](o, gate, out, o.numel() // o.shape[-1], DV=o.shape[-1], BLOCK_D=pow2(o.shape[-1]),
                                    **launch)
        ctx.save_for_backward(o, gate)
        return out

    @staticmethod
    def backward(ctx, grad):
        o, gate = ctx.saved_tensors
        grad = grad.contiguous()
        d_o, d_gate = torch.empty_like(o), torch.empty_like(gate)
        launch = launch_params(LAUNCH, "gate_bwd", BLOCK_R=BLOCK_R)
        _gate_bwd[_grid(o, launch)](grad, o, gate, d_o, d_gate, o.numel() // o.shape[-1], DV=o.shape[-1],
                                    BLOCK_D=pow2(o.shape[-1]), **launch)
        return d_o, d_gate


class SumBranches(torch.autograd.Function):
    """sum_branches_triton as an autograd function: the upstream gradient is every input's, uncopied."""

    @staticmethod
    def forward(ctx, a, b, c):
        out = torch.empty_like(a)
        launch = launch_params(LAUNCH, "sum", BLOCK_R=BLOCK_R)
        _sum_fwd[_grid(a, launch)](a, b, a if c is None else c, out, a.numel() // a.shape[-1], DV=a.shape[-1],
                                   BLOCK_D=pow2(a.shape[-1]), HAS_C=c is not None, **launch)
        ctx.has_c = c is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad if ctx.has_c else None


def gate_branch_triton(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """One branch's output times its gate (Triton; same meaning as gate_branch_ref).

    o: [B, T, HQ, Dv] in fp32/fp16/bf16; gate: [B, T, HQ] in (0, 1), any of those dtypes, any strides
    (e.g. one column of the [B, T, HQ, 3] gates). Returns [B, T, HQ, Dv] in o.dtype, the product taken in
    fp32. Differentiable in o and the gate."""
    if gate.shape != o.shape[:-1]:
        raise ValueError(f"gate_branch_triton: gate {tuple(gate.shape)} must be the output's shape "
                         f"{tuple(o.shape)} without its last dimension")
    return GateBranch.apply(o.contiguous(), gate.contiguous())


def sum_branches_triton(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor | None) -> torch.Tensor:
    """The sum of the gated branch outputs (Triton; same meaning as sum_branches_ref): [B, T, HQ, Dv], one
    shape and dtype (o_win None: the window branch is off), summed in fp32."""
    outs = [o for o in (o_cmp, o_slc, o_win) if o is not None]
    if any(o.shape != o_cmp.shape or o.dtype != o_cmp.dtype for o in outs):
        raise ValueError(f"sum_branches_triton: outputs {[tuple(o.shape) for o in outs]} "
                         f"({[str(o.dtype) for o in outs]}) must share one shape and dtype")
    return SumBranches.apply(*(o.contiguous() if o is not None else None for o in (o_cmp, o_slc, o_win)))
