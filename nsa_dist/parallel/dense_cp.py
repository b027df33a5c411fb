"""Dense causal attention under the same context parallelism: the baseline NSA is measured against.

K/V are all-gathered into sequence order (reduce-scattered in the backward) and each local chunk
attends causally by global position."""

import torch
import torch.nn.functional as F

from nsa_dist.parallel.comm import CommStats, gather_zigzag, group_size_rank
from nsa_dist.parallel.layout import ZigzagLayout


def dense_context_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, scale: float | None = None,
                           stats: CommStats | None = None) -> torch.Tensor:
    """q: [B, T_local, HQ, Dk], k: [B, T_local, HK, Dk], v: [B, T_local, HK, Dv] (this rank's zigzag shard,
    RoPE applied at global positions). Returns [B, T_local, HQ, Dv], equal to the matching rows of full
    causal attention over the whole sequence."""
    cp_size, cp_rank = group_size_rank(group)
    layout = ZigzagLayout(q.shape[1] * cp_size, cp_size, cp_rank)
    dk = k.shape[-1]
    k_all, v_all = gather_zigzag(torch.cat([k, v], dim=-1), group, stats, "dense_kv").split(
        [dk, v.shape[-1]], dim=-1)
    c = layout.chunk_len
    outs = []
    for i, start in enumerate(layout.chunk_starts):
        q_pos = torch.arange(start, start + c, device=q.device)
        keys = slice(0, start + c)  # causal: nothing after the chunk's last token
        mask = torch.arange(start + c, device=q.device)[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(
            q[:, i * c : (i + 1) * c].transpose(1, 2), k_all[:, keys].transpose(1, 2), v_all[:, keys].transpose(1, 2),
            attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1)
