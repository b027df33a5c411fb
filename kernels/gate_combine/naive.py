"""The gated sum of NSA's branch outputs, reference: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win,
as the kernels compute it: each output times its gate (rounded to the output's dtype), then the sum."""

import torch


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, float64 for float64 inputs


def gate_branch_ref(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """o: [B, T, HQ, Dv]; gate: [B, T, HQ] in (0, 1). Returns gate * o in o.dtype, multiplied in fp32."""
    acc = _accumulator(o.dtype)
    return (gate.to(acc).unsqueeze(-1) * o.to(acc)).to(o.dtype)


def sum_branches_ref(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor | None) -> torch.Tensor:
    """The gated outputs [B, T, HQ, Dv], one dtype (o_win None: the window branch is off), summed in fp32."""
    acc = _accumulator(o_cmp.dtype)
    output = o_cmp.to(acc) + o_slc.to(acc)
    if o_win is not None:
        output = output + o_win.to(acc)
    return output.to(o_cmp.dtype)
