"""Sliding-window attention, reference: query t over tokens (t - w, t]."""

import torch

from kernels.common import (
    acc_dtype, default_scale, document_pieces, group_queries, masked_softmax_lse, query_chunks, run_chunk,
)


def window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    chunk_size: int = 128,
    q_start: int = 0,
    k_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention.

    q: [B, Tq, HQ, Dk]; k: [B, Tk, HK, Dk]; v: [B, Tk, HK, Dv]. Query j sits at position q_start + j and
    key s at k_start + s (context parallelism passes a chunk with its left halo); query t sees keys at
    positions p with t - window < p <= t.
    Returns o: [B, Tq, HQ, Dv] in q.dtype and lse: [B, Tq, HQ] float32 or wider. Each chunk of C
    queries reads only its C + window - 1 keys, so memory is O(C * (C + w)).
    cu_seqlens: optional int32 [num_docs + 1] boundaries of packed documents (global positions, B = 1):
    a query sees only the keys of its own document.
    gate: this branch's gate in NSA's gated sum, for the shared signature: the Triton version's backward
    applies it; here gated_sum_ref applies every gate, and it is not used.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = []
        for doc, lo, hi in document_pieces(cu_seqlens, q_start, q.shape[1]):
            k_lo = max(bounds[doc], k_start)
            k_hi = min(bounds[doc + 1], k_start + k.shape[1])
            keys = slice(k_lo - k_start, k_hi - k_start)
            pieces.append(window_attention_ref(
                q[:, lo:hi], k[:, keys], v[:, keys], window, scale, chunk_size,
                q_start + lo - bounds[doc], k_lo - bounds[doc],
            ))
        return torch.cat([o for o, _ in pieces], dim=1), torch.cat([lse for _, lse in pieces], dim=1)
    batch, seq, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[2]
    scale = default_scale(q.shape[-1], scale)
    qg = group_queries(q, num_kv_heads)

    def chunk(q_chunk, k_span, v_span, q_pos0, k_pos0):
        q_pos = torch.arange(q_pos0, q_pos0 + q_chunk.shape[1], device=q.device)
        k_pos = torch.arange(k_pos0, k_pos0 + k_span.shape[1], device=q.device)
        acc = acc_dtype(q_chunk)
        scores = torch.einsum("bchgd,bshd->bchgs", q_chunk.to(acc), k_span.to(acc)) * scale
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
        probs, lse = masked_softmax_lse(scores, visible[None, :, None, None, :])
        return torch.einsum("bchgs,bshd->bchgd", probs, v_span.to(acc)), lse

    outs, lses = [], []
    for start, end in query_chunks(seq, chunk_size):
        # keys at global positions [q_start + start - window + 1, q_start + end), as local indices
        lo = max(0, q_start + start - window + 1 - k_start)
        hi = max(lo, min(k.shape[1], q_start + end - k_start))
        o, lse = run_chunk(chunk, qg[:, start:end], k[:, lo:hi], v[:, lo:hi], q_start + start, k_start + lo)
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs, dim=1).reshape(batch, seq, num_q_heads, v.shape[-1]).to(q.dtype)
    return o, torch.cat(lses, dim=1).reshape(batch, seq, num_q_heads)
