"""Selected attention, reference: each query over the raw tokens of its group's selected blocks."""

import torch

from kernels.common import (
    acc_dtype, default_scale, document_pieces, group_queries, masked_softmax_lse, query_chunks, run_chunk,
)


def selected_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    selection_block: int,
    scale: float | None = None,
    chunk_size: int = 64,
    q_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    slot_lse: bool = False,
    rows: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Attention of query t over tokens <= t of the selection blocks its GQA group picked.

    q: [B, T, HQ, Dk]; k: [B, T, HK, Dk]; v: [B, T, HK, Dv]; block_idx: [B, T, HK, n] int, distinct ids
    (any order), -1 for unused slots; block j covers tokens [j*l', (j+1)*l'). Keys are indexed by global
    position; query j sits at position q_start + j.
    Returns o: [B, T, HQ, Dv] in q.dtype and lse: [B, T, HQ] float32 or wider (-inf for no
    visible token), and with slot_lse the slots' log-sum-exps.
    Memory per chunk: [B, chunk, HK, n*l', D] gathered keys and values.
    cu_seqlens: optional int32 [num_docs + 1] boundaries of packed documents (B = 1); block ids are then
    per document: block j of document D covers cu_seqlens[D] + [j*l', (j+1)*l').
    slot_lse: also return each slot's log-sum-exp, [B, T, HQ, n] float32 or wider, over the visible keys
    of that slot's block alone (-inf for a -1 slot or a block with no visible key), without gradient: the
    share of a query's attention in a block is exp(slot_lse - lse) (the selection alignment loss's target).
    rows: the rows that hold picks, a launch hint for the Triton version (selected_attention_triton); here
    every row is computed, and one without picks gives 0 and -inf as the hint says.
    gate: this branch's gate in NSA's gated sum, for the shared signature: the Triton version's backward
    applies it; here gated_sum_ref applies every gate, and it is not used.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = [
            selected_attention_ref(
                q[:, lo:hi], k[:, bounds[doc] : bounds[doc + 1]], v[:, bounds[doc] : bounds[doc + 1]],
                block_idx[:, lo:hi], selection_block, scale, chunk_size, q_start + lo - bounds[doc],
                slot_lse=slot_lse,
            )
            for doc, lo, hi in document_pieces(cu_seqlens, q_start, q.shape[1])
        ]
        return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))
    batch, seq, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[2]
    scale = default_scale(q.shape[-1], scale)
    qg = group_queries(q, num_kv_heads)
    offsets = torch.arange(selection_block, device=q.device)
    k_heads, v_heads = k.transpose(1, 2), v.transpose(1, 2)

    def gather(x, tokens):
        # x: [B, HK, T, D]; tokens: [B, C, HK, K] -> [B, C, HK, K, D]
        b, c, h, kk = tokens.shape
        idx = tokens.permute(0, 2, 1, 3).reshape(b, h, c * kk, 1).expand(-1, -1, -1, x.shape[-1])
        return torch.gather(x, 2, idx).reshape(b, h, c, kk, -1).permute(0, 2, 1, 3, 4)

    def chunk(q_chunk, k_all, v_all, blocks, start):
        positions = torch.arange(q_start + start, q_start + start + q_chunk.shape[1], device=q.device)
        tokens = (blocks.long()[..., None] * selection_block + offsets).flatten(-2)
        visible = (blocks[..., None] >= 0).expand(*blocks.shape, selection_block).flatten(-2)
        visible = visible & (tokens <= positions[None, :, None, None])
        tokens = torch.where(visible, tokens, torch.zeros_like(tokens))
        acc = acc_dtype(q_chunk)
        keys, values = gather(k_all.to(acc), tokens), gather(v_all.to(acc), tokens)
        scores = torch.einsum("bchgd,bchkd->bchgk", q_chunk.to(acc), keys) * scale
        probs, lse = masked_softmax_lse(scores, visible[:, :, :, None, :])
        out = torch.einsum("bchgk,bchkd->bchgd", probs, values)
        if not slot_lse:
            return out, lse
        with torch.no_grad():  # [B, C, HK, G, n]: each slot's keys alone
            slot_keys = (blocks.shape[-1], selection_block)
            slot_visible = visible.unflatten(-1, slot_keys)[:, :, :, None]
            slots = masked_softmax_lse(scores.detach().unflatten(-1, slot_keys), slot_visible)[1]
        return out, lse, slots

    outs, lses, slot_lses = [], [], []
    for start, end in query_chunks(seq, chunk_size):
        parts = run_chunk(chunk, qg[:, start:end], k_heads, v_heads, block_idx[:, start:end], start)
        outs.append(parts[0])
        lses.append(parts[1])
        slot_lses += parts[2:]
    o = torch.cat(outs, dim=1).reshape(batch, seq, num_q_heads, v.shape[-1]).to(q.dtype)
    lse = torch.cat(lses, dim=1).reshape(batch, seq, num_q_heads)
    if not slot_lse:
        return o, lse
    return o, lse, torch.cat(slot_lses, dim=1).reshape(batch, seq, num_q_heads, block_idx.shape[-1])
