"""The gated sum of NSA's branch outputs, reference: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win."""

import torch


def combine_branches_ref(
    o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor | None, gates: torch.Tensor
) -> torch.Tensor:
    """o_cmp, o_slc, o_win: [B, T, HQ, Dv], one dtype (o_win None: the window branch is off);
    gates: [B, T, HQ, 3] in (0, 1), order (cmp, slc, win). Returns [B, T, HQ, Dv] in o_cmp.dtype,
    summed in fp32 (float64 for float64 inputs)."""
    acc = torch.promote_types(o_cmp.dtype, torch.float32)
    g = gates.to(acc).unsqueeze(-1)
    output = g[..., 0, :] * o_cmp.to(acc) + g[..., 1, :] * o_slc.to(acc)
    if o_win is not None:
        output = output + g[..., 2, :] * o_win.to(acc)
    return output.to(o_cmp.dtype)
