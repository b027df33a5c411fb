"""Compressed attention, reference: every query against the compressed blocks that have ended."""

import torch

from kernels.common import (
    acc_dtype, default_scale, document_pieces, group_queries, masked_softmax_lse, query_chunks, run_chunk,
)
from kernels.compression.naive import compressed_cu_seqlens


def compressed_visibility(
    query_pos: torch.Tensor, num_blocks: int, block_size: int, stride: int
) -> torch.Tensor:
    """[C] positions -> [C, N] bool: query t sees block i iff the block has ended, i*d + l - 1 <= t."""
    block_end = torch.arange(num_blocks, device=query_pos.device) * stride + block_size - 1
    return block_end[None, :] <= query_pos[:, None]


def compressed_attention_ref(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    chunk_size: int = 256,
    q_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of queries over compressed tokens.

    q: [B, T, HQ, Dk]; k_cmp: [B, N, HK, Dk]; v_cmp: [B, N, HK, Dv]; HQ a multiple of HK; any float dtype.
    Query j sits at position t = q_start + j (context parallelism passes its chunk's global offset) and
    sees compressed block i iff i*stride + block_size - 1 <= t.
    Returns o: [B, T, HQ, Dv] in q.dtype (0 for a query that sees no block) and
    lse: [B, T, HQ] float32 (float64 for float64 inputs), natural log-sum-exp of the scaled scores (-inf where no block is visible).
    Computed in fp32, chunked over queries so no [T, N] tensor exists at once.
    cu_seqlens: optional int32 [num_docs + 1] boundaries of packed documents (global positions, B = 1):
    each document is attended on its own, with positions restarting at its start, over its own
    compressed tokens (k_cmp holds them document after document, see compression.compress_documents).
    gate: this branch's gate in NSA's gated sum, for the shared signature: the Triton version's backward
    applies it; here gated_sum_ref applies every gate, and it is not used.
    """
    if cu_seqlens is not None:
        cmp_bounds = compressed_cu_seqlens(cu_seqlens, block_size, stride).tolist()
        starts = cu_seqlens.tolist()
        pieces = []
        for doc, lo, hi in document_pieces(cu_seqlens, q_start, q.shape[1]):
            rows = slice(cmp_bounds[doc], cmp_bounds[doc + 1])
            pieces.append(compressed_attention_ref(
                q[:, lo:hi], k_cmp[:, rows], v_cmp[:, rows], block_size, stride, scale, chunk_size,
                q_start + lo - starts[doc],
            ))
        return torch.cat([o for o, _ in pieces], dim=1), torch.cat([lse for _, lse in pieces], dim=1)
    batch, seq, num_q_heads, _ = q.shape
    num_kv_heads, num_blocks = k_cmp.shape[2], k_cmp.shape[1]
    scale = default_scale(q.shape[-1], scale)
    qg = group_queries(q, num_kv_heads)

    def chunk(q_chunk, k_all, v_all, start):
        positions = torch.arange(q_start + start, q_start + start + q_chunk.shape[1], device=q.device)
        acc = acc_dtype(q_chunk)
        scores = torch.einsum("bchgd,bnhd->bchgn", q_chunk.to(acc), k_all.to(acc)) * scale
        visible = compressed_visibility(positions, num_blocks, block_size, stride)[None, :, None, None, :]
        probs, lse = masked_softmax_lse(scores, visible)
        return torch.einsum("bchgn,bnhd->bchgd", probs, v_all.to(acc)), lse

    outs, lses = [], []
    for start, end in query_chunks(seq, chunk_size):
        o, lse = run_chunk(chunk, qg[:, start:end], k_cmp, v_cmp, start)
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs, dim=1).reshape(batch, seq, num_q_heads, v_cmp.shape[-1]).to(q.dtype)
    return o, torch.cat(lses, dim=1).reshape(batch, seq, num_q_heads)
