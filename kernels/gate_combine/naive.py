"""The gated sum of NSA's branch outputs, reference: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win,
products and sum in fp32, rounded once to the outputs' dtype (as the kernels compute it)."""

import torch


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, float64 for float64 inputs


def gated_sum_ref(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor | None,
                  g_cmp: torch.Tensor, g_slc: torch.Tensor, g_win: torch.Tensor | None) -> torch.Tensor:
    """o_*: the branch outputs [B, T, HQ, Dv], one dtype; g_*: their gates [B, T, HQ] in (0, 1). o_win and g_win None: the window branch is off. Returns the gated sum in
    the outputs' dtype, computed in fp32."""
    acc = _accumulator(o_cmp.dtype)
    pairs = [(o, g) for o, g in ((o_cmp, g_cmp), (o_slc, g_slc), (o_win, g_win)) if o is not None]
    output = sum(g.to(acc).unsqueeze(-1) * o.to(acc) for o, g in pairs)
    return output.to(o_cmp.dtype)
