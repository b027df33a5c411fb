"""NSA composed from its branches: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (DESIGN §2)."""

from typing import Callable, NamedTuple

import torch

from kernels.block_selection.naive import select_blocks_ref
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.selected_attention.naive import selected_attention_ref
from kernels.window_attention.naive import window_attention_ref

Compress = Callable[[torch.Tensor], torch.Tensor]


class NSAResult(NamedTuple):
    output: torch.Tensor  # [B, T, HQ, Dv], q.dtype
    block_idx: torch.Tensor  # [B, T, HK, n] int32 selection block ids, -1 padded
    lse_cmp: torch.Tensor  # [B, T, HQ] float32, per branch
    lse_slc: torch.Tensor
    lse_win: torch.Tensor


def native_sparse_attention(
    q: torch.Tensor,
    kv_cmp: tuple[torch.Tensor, torch.Tensor],
    kv_slc: tuple[torch.Tensor, torch.Tensor],
    kv_win: tuple[torch.Tensor, torch.Tensor],
    gates: torch.Tensor,
    compress_k: Compress,
    compress_v: Compress,
    *,
    block_size: int,
    stride: int,
    selection_block: int,
    num_selected: int,
    window: int,
    scale: float | None = None,
) -> NSAResult:
    """Native Sparse Attention over one full causal sequence (pure PyTorch reference).

    q: [B, T, HQ, Dk] (RoPE already applied; positions are 0..T-1).
    kv_cmp, kv_slc, kv_win: per branch (k [B, T, HK, Dk], v [B, T, HK, Dv]); pass the same pair three
    times for shared K/V. gates: [B, T, HQ, 3] in (0, 1), order (cmp, slc, win).
    compress_k, compress_v: phi, [B, T, HK, D] -> [B, N, HK, D] with N = (T - l) // d + 1 blocks.
    Sizes: compression block l = block_size, stride d, selection block l', n selected blocks, window w.
    """
    k_cmp, v_cmp = compress_k(kv_cmp[0]), compress_v(kv_cmp[1])
    o_cmp, lse_cmp = compressed_attention_ref(q, k_cmp, v_cmp, block_size, stride, scale)
    block_idx = select_blocks_ref(
        q.detach(), k_cmp.detach(), lse_cmp.detach(), block_size, stride, selection_block, num_selected, scale
    )
    o_slc, lse_slc = selected_attention_ref(q, kv_slc[0], kv_slc[1], block_idx, selection_block, scale)
    o_win, lse_win = window_attention_ref(q, kv_win[0], kv_win[1], window, scale)
    g = gates.to(torch.float32).unsqueeze(-1)
    output = g[..., 0, :] * o_cmp.float() + g[..., 1, :] * o_slc.float() + g[..., 2, :] * o_win.float()
    return NSAResult(output.to(q.dtype), block_idx, lse_cmp, lse_slc, lse_win)
