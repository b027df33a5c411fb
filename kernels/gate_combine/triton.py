"""The gated sum of NSA's branch outputs, Triton: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.

The forward is one kernel: it reads the three outputs and their gates once and writes the sum (products
and sum in fp32). The backward is split by branch on purpose. `kernels.nsa.compose_nsa` passes each
branch's output through `gate_branch_triton` right after the branch runs: in the forward that returns the
output itself, and its backward applies the gate (d_o = g * dO, d_g = the row sum of dO * o). Autograd runs
the most recently created ready node first, so each branch's output gradient (a [T, HQ, Dv] tensor) is
made just before that branch's own backward consumes and frees it: one such tensor exists at a time,
where a single combine node would make all three at once (6 GiB more at the peak at 128K tokens with 64
heads of 128). The sum passes its upstream gradient on to the three outputs as it is, without copies.

So the two are a pair: `gated_sum_triton` differentiates only through outputs that came from
`gate_branch_triton` (or concatenations of them) with the same gates. Until 2026-12-04 each gate was its own
forward kernel writing g * o, then a sum read those: 2.5x the forward's memory traffic (at 128K, 5.1 ms).

Only the branch output, which its branch's backward keeps anyway, and the gate are saved.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_utils import launch_params, pow2

BLOCK_R = 32  # (token, head) rows per program
# Launch parameters set over the defaults (BLOCK_R, num_warps), per kernel: "gate_bwd", "sum"; empty in
# use, for experiments
LAUNCH: dict[str, dict] = {}


@triton.jit
def _rows(R, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    d = tl.arange(0, BLOCK_D)
    return rows, row_ok, rows[:, None] * DV + d[None, :], row_ok[:, None] & (d[None, :] < DV)


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


class GateBranch(torch.autograd.Function):
    """gate_branch_triton as an autograd function: the output itself forward, the gate's backward; saves
    only its inputs."""

    @staticmethod
    def forward(ctx, o, gate):
        ctx.save_for_backward(o, gate)
        return o.view_as(o)

    @staticmethod
    def backward(ctx, grad):
        o, gate = ctx.saved_tensors
        grad = grad.contiguous()
        d_o, d_gate = torch.empty_like(o), torch.empty_like(gate)
        launch = launch_params(LAUNCH, "gate_bwd", BLOCK_R=BLOCK_R)
        _gate_bwd[_grid(o, launch)](grad, o, gate, d_o, d_gate, o.numel() // o.shape[-1], DV=o.shape[-1],
                                    BLOCK_D=pow2(o.shape[-1]), **launch)
        return d_o, d_gate


class GatedSum(torch.autograd.Function):
    """gated_sum_triton as an autograd function: the upstream gradient is every output's, uncopied (their
    gate_branch_triton nodes apply the gates); the gates get theirs there too."""

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


def gate_branch_triton(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """One branch's output as gated_sum_triton takes it (Triton; same meaning as gate_branch_ref): o itself,
    whose backward applies the gate (the module docstring says why).

    o: [B, T, HQ, Dv] in fp32/fp16/bf16; gate: [B, T, HQ] in (0, 1), any of those dtypes, any strides
    (e.g. one column of the [B, T, HQ, 3] gates). Differentiable in o and the gate."""
    if gate.shape != o.shape[:-1]:
        raise ValueError(f"gate_branch_triton: gate {tuple(gate.shape)} must be the output's shape "
                         f"{tuple(o.shape)} without its last dimension")
    return GateBranch.apply(o.contiguous(), gate.contiguous())


def gated_sum_triton(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor | None,
                     g_cmp: torch.Tensor, g_slc: torch.Tensor, g_win: torch.Tensor | None) -> torch.Tensor:
    """The gated sum (Triton; same meaning as gated_sum_ref): o_* [B, T, HQ, Dv], one shape and dtype, each
    from gate_branch_triton with the gate g_* [B, T, HQ] given here (o_win and g_win None: the window
    branch is off). Products and sum in fp32, returned in the outputs' dtype."""
    outs = [o for o in (o_cmp, o_slc, o_win) if o is not None]
    if any(o.shape != o_cmp.shape or o.dtype != o_cmp.dtype for o in outs):
        raise ValueError(f"gated_sum_triton: outputs {[tuple(o.shape) for o in outs]} "
                         f"({[str(o.dtype) for o in outs]}) must share one shape and dtype")
    gates = [g for g in (g_cmp, g_slc, g_win) if g is not None]
    if len(gates) != len(outs) or any(g.shape != o_cmp.shape[:-1] for g in gates):
        raise ValueError(f"gated_sum_triton: gates {[tuple(g.shape) for g in gates]} must be one per output, "
                         f"each the outputs' shape {tuple(o_cmp.shape)} without its last dimension")
    # the gates' gradients come from the gate_branch_triton nodes: detached here, so none is counted twice
    return GatedSum.apply(*(o.contiguous() if o is not None else None for o in (o_cmp, o_slc, o_win)),
                          *(g.detach().contiguous() if g is not None else None for g in (g_cmp, g_slc, g_win)))
