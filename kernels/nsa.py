"""NSA composed from its branches: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (DESIGN §2)."""

from typing import Callable, NamedTuple

import torch

from kernels.block_selection.naive import select_blocks_ref
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.compression.naive import compress_documents
from kernels.gate_combine.naive import combine_branches_ref
from kernels.selected_attention.naive import selected_attention_ref
from kernels.window_attention.naive import window_attention_ref

Compress = Callable[[torch.Tensor], torch.Tensor]


class BranchOps(NamedTuple):
    """One implementation of the four branch functions; both share the reference signatures."""

    compressed: Callable  # (q, k_cmp, v_cmp, l, d, scale, *, q_start, cu_seqlens) -> (o, lse)
    select: Callable  # (q, k_cmp, lse_cmp, l, d, l', n, scale, *, q_start, cu_seqlens) -> block ids
    selected: Callable  # (q, k, v, block_idx, l', scale, *, q_start, cu_seqlens) -> (o, lse)
    window: Callable  # (q, k, v, w, scale, *, q_start, k_start, cu_seqlens) -> (o, lse)
    combine: Callable  # (o_cmp, o_slc, o_win or None, gates) -> gated sum of the outputs


def branch_ops(impl: str) -> BranchOps:
    """The branch functions of `impl`: "reference" (pure PyTorch, any device) or "triton" (the kernels;
    CUDA, or CPU under TRITON_INTERPRET=1). Choosing for "auto" is the caller's business."""
    if impl == "reference":
        return BranchOps(compressed_attention_ref, select_blocks_ref, selected_attention_ref, window_attention_ref,
                         combine_branches_ref)
    if impl == "triton":
        # Imported on first use: Triton decides between compiling and interpreting (TRITON_INTERPRET) when
        # a kernel is defined, so importing this module must not define them.
        from kernels.block_selection.triton import select_blocks_triton
        from kernels.compressed_attention.triton import compressed_attention_triton
        from kernels.gate_combine.triton import combine_branches_triton
        from kernels.selected_attention.triton import selected_attention_triton
        from kernels.window_attention.triton import window_attention_triton

        return BranchOps(
            compressed_attention_triton, select_blocks_triton, selected_attention_triton, window_attention_triton,
            combine_branches_triton,
        )
    raise ValueError(f"impl={impl!r}: expected 'reference' or 'triton' ('auto' is resolved by the caller)")


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto" is the Triton kernels on CUDA and the reference elsewhere; other values pass through."""
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return impl


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
    impl: str = "reference",
    cu_seqlens: torch.Tensor | None = None,
) -> NSAResult:
    """Native Sparse Attention over one full causal sequence.

    q: [B, T, HQ, Dk] (RoPE already applied; positions are 0..T-1).
    kv_cmp, kv_slc, kv_win: per branch (k [B, T, HK, Dk], v [B, T, HK, Dv]); pass the same pair three
    times for shared K/V. gates: [B, T, HQ, 3] in (0, 1), order (cmp, slc, win).
    compress_k, compress_v: phi, [B, T, HK, D] -> [B, N, HK, D] with N = (T - l) // d + 1 blocks.
    Sizes: compression block l = block_size, stride d, selection block l', n selected blocks, window w
    (w = 0 turns the window branch off: o_win = 0, lse_win = -inf; fla's configuration, for comparisons).
    impl: "reference" or "triton" (branch_ops). cu_seqlens: optional int32 [num_docs + 1] boundaries of
    packed documents (B = 1): phi runs on each document on its own, and no branch attends across them.
    """
    ops = branch_ops(impl)
    k_cmp = compress_documents(compress_k, kv_cmp[0], cu_seqlens)
    v_cmp = compress_documents(compress_v, kv_cmp[1], cu_seqlens)
    o_cmp, lse_cmp = ops.compressed(q, k_cmp, v_cmp, block_size, stride, scale, cu_seqlens=cu_seqlens)
    block_idx = ops.select(
        q.detach(), k_cmp.detach(), lse_cmp.detach(), block_size, stride, selection_block, num_selected, scale,
        cu_seqlens=cu_seqlens,
    )
    o_slc, lse_slc = ops.selected(q, kv_slc[0], kv_slc[1], block_idx, selection_block, scale, cu_seqlens=cu_seqlens)
    if window > 0:
        o_win, lse_win = ops.window(q, kv_win[0], kv_win[1], window, scale, cu_seqlens=cu_seqlens)
    else:
        o_win, lse_win = None, torch.full_like(lse_slc, float("-inf"))
    return NSAResult(ops.combine(o_cmp, o_slc, o_win, gates), block_idx, lse_cmp, lse_slc, lse_win)
