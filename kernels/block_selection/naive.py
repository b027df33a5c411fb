"""Top-n block selection, reference: compressed-attention probabilities (or, with the "exact" score, the
selection branch's own attention over its raw keys; with "bound", a bound of it per block) -> selection
block ids."""

import torch

from kernels.block_selection.indexer import indexer_inputs
from kernels.common import default_scale, document_pieces, group_queries, query_chunks
from kernels.compressed_attention.naive import compressed_attention_ref, compressed_visibility
from kernels.compression.naive import _blocks, compress_documents, compressed_cu_seqlens


def num_selection_blocks(seq_len: int, selection_block: int) -> int:
    return -(-seq_len // selection_block)


def overlap_weights(
    num_blocks: int, num_sel_blocks: int, block_size: int, stride: int, selection_block: int
) -> torch.Tensor:
    """[N, S] float32: |tokens(compressed block i) & tokens(selection block j)| / stride.

    For l=32, d=16, l'=64 each selection block j gets weights (1, 2, 2, 2, 1) from i = 4j-1 .. 4j+3.
    """
    cmp_start = torch.arange(num_blocks) * stride
    sel_start = torch.arange(num_sel_blocks) * selection_block
    lo = torch.maximum(cmp_start[:, None], sel_start[None, :])
    hi = torch.minimum(cmp_start[:, None] + block_size, sel_start[None, :] + selection_block)
    return (hi - lo).clamp_min(0).float() / stride


def topn_from_scores(
    scores: torch.Tensor, query_pos: torch.Tensor, selection_block: int, num_selected: int
) -> torch.Tensor:
    """Deterministic top-n over selection blocks.

    scores: [B, C, HK, S] float32; query_pos: [C]. Candidates are blocks j with j*l' <= t; block 0 and
    the two local blocks (t // l' and the one before) are always taken and count toward n; ties go to the
    lower block id. Returns [B, C, HK, n] int32 in ascending order, -1 after the valid ids.
    """
    num_sel_blocks = scores.shape[-1]
    block = torch.arange(num_sel_blocks, device=scores.device)
    current = (query_pos // selection_block)[:, None]
    valid = (block[None, :] <= current)[None, :, None, :]
    forced = ((block[None, :] == 0) | (block[None, :] == current) | (block[None, :] == current - 1))
    ranked = scores.masked_fill(forced[None, :, None, :], float("inf")).masked_fill(~valid, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    take = min(num_selected, num_sel_blocks)
    chosen = order[..., :take]
    chosen = torch.where(torch.gather(ranked, -1, chosen) == float("-inf"), num_sel_blocks, chosen)
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == num_sel_blocks, -1, chosen).to(torch.int32)
    if take < num_selected:
        pad = chosen.new_full((*chosen.shape[:-1], num_selected - take), -1)
        chosen = torch.cat([chosen, pad], dim=-1)
    return chosen


@torch.no_grad()
def select_blocks_ref(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    selection_block: int,
    num_selected: int,
    scale: float | None = None,
    chunk_size: int = 256,
    q_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    score: str = "sum",
    keys: torch.Tensor | None = None,
    indexer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selection blocks each GQA group's queries attend to.

    q: [B, T, HQ, Dk]; k_cmp: [B, N, HK, Dk]; lse_cmp: [B, T, HQ] float32 from compressed attention.
    p_cmp = exp(scale * q.k_cmp - lse_cmp) over visible blocks, spread onto selection blocks by
    overlap_weights, combined over the group's query heads by `score` (SELECTION_SCORES: "sum", the
    paper's, or "max", the largest head's), then topn_from_scores.
    Query j sits at position q_start + j; block ids are global (block j covers [j*l', (j+1)*l')).
    Returns block ids [B, T, HK, n] int32, ascending, -1 where fewer than n blocks are valid.
    Not differentiable (top-n is discrete); chunked over queries.
    cu_seqlens: optional int32 [num_docs + 1] boundaries of packed documents (B = 1): each document is
    scored on its own compressed tokens, with positions and block ids counted from its start.
    keys: with score "exact" or "bound" only (then k_cmp and lse_cmp are not read), the selection branch's
    raw keys [B, S, HK, Dk] from global position 0 through the queries' last one: with "exact" each block
    is scored by the group's exact attention mass on it (head_block_mass), with "bound" by the softmax of
    its largest possible q.k (head_block_bounds; computed as the "sum" score over bound_inputs).
    indexer: with score "indexer" only, the learned indexer's weight W [2, H, G, Dk / 2]: "exact" over its H
    queries a group (indexer_queries, in q's dtype) instead of the G query heads'.
    """
    if score == "indexer":
        q, score = indexer_inputs("select_blocks_ref", q, keys, indexer), "exact"
    if score == "exact":
        return _select_blocks_exact(q, keys, selection_block, num_selected, scale, chunk_size, q_start, cu_seqlens)
    if score == "bound":
        if keys is None:
            raise ValueError("select_blocks_ref: the 'bound' selection score needs the raw keys (keys=)")
        q_bound, k_bound, v_zero = bound_inputs(q, keys, selection_block, cu_seqlens)
        scale = default_scale(q.shape[-1], scale)  # q.k's scale: the bound's inputs are twice as wide
        _, lse = compressed_attention_ref(q_bound, k_bound, v_zero, selection_block, selection_block, scale,
                                          chunk_size, q_start, cu_seqlens)
        return select_blocks_ref(q_bound, k_bound, lse, selection_block, selection_block, selection_block,
                                 num_selected, scale, chunk_size, q_start, cu_seqlens)
    combine = group_score(score)
    if cu_seqlens is not None:
        cmp_bounds = compressed_cu_seqlens(cu_seqlens, block_size, stride).tolist()
        starts = cu_seqlens.tolist()
        return torch.cat([
            select_blocks_ref(
                q[:, lo:hi], k_cmp[:, cmp_bounds[doc] : cmp_bounds[doc + 1]], lse_cmp[:, lo:hi], block_size, stride,
                selection_block, num_selected, scale, chunk_size, q_start + lo - starts[doc], score=score,
            )
            for doc, lo, hi in document_pieces(cu_seqlens, q_start, q.shape[1])
        ], dim=1)
    weights = overlap_weights(k_cmp.shape[1], num_selection_blocks(q_start + q.shape[1], selection_block),
                              block_size, stride, selection_block).to(q.device)
    out = []
    for start, end in query_chunks(q.shape[1], chunk_size):
        per_head = head_block_scores(q[:, start:end], k_cmp, lse_cmp[:, start:end], block_size, stride, weights,
                                     scale, q_start + start)
        positions = torch.arange(q_start + start, q_start + end, device=q.device)
        out.append(topn_from_scores(combine(per_head), positions, selection_block, num_selected))
    return torch.cat(out, dim=1)


# How top-n scores a block for a GQA group (nsa.selection_score): "sum", the paper's (the group's total
# compressed-attention probability on it), "max", the largest single head's, so that a block one head finds
# is not outvoted by the others' spread-out probability, "exact", the group's total attention
# probability on the block's raw keys (head_block_mass): what the compressed probabilities estimate, at the
# cost of two causal QK^T passes over the raw keys in the kernel (not in the paper; top-n then reads no
# compressed token), or "bound", the group's total softmax over blocks of each block's largest possible
# q.k (head_block_bounds, after Quest's page scores; not in the paper): a score that no key of the block
# can beat, from two vectors a block, so one key that matches is not averaged away as in a mean
# "indexer" is "exact" over the learned indexer's queries (kernels/block_selection/indexer.py: a few learned
# query heads a group instead of its G heads), made from q and the indexer's weight (indexer=)
SELECTION_SCORES = ("sum", "max", "exact", "bound", "indexer")
RAW_KEY_SCORES = ("exact", "bound", "indexer")  # the scores that read the selection branch's raw keys (keys=)


def group_score(score: str):
    """The function that combines per-head block scores [..., G, S] over the group's heads (dim 3):
    head_block_scores' for "sum" and "max", head_block_mass's for "exact" and head_block_bounds' for
    "bound" (summed, as "sum" does)."""
    if score in ("sum", "exact", "bound", "indexer"):
        return lambda per_head: per_head.sum(dim=3)
    if score == "max":
        return lambda per_head: per_head.amax(dim=3)
    raise ValueError(f"selection score {score!r} is not one of {SELECTION_SCORES}")


def _select_blocks_exact(q, keys, selection_block, num_selected, scale, chunk_size, q_start, cu_seqlens):
    """select_blocks_ref with the "exact" score: the group's summed head_block_mass ranks the blocks."""
    if keys is None:
        raise ValueError("select_blocks_ref: the 'exact' selection score needs the raw keys (keys=)")
    if cu_seqlens is not None:
        starts = cu_seqlens.tolist()
        return torch.cat([
            _select_blocks_exact(q[:, lo:hi], keys[:, starts[doc] : starts[doc + 1]], selection_block, num_selected,
                                 scale, chunk_size, q_start + lo - starts[doc], None)
            for doc, lo, hi in document_pieces(cu_seqlens, q_start, q.shape[1])
        ], dim=1)
    out = []
    for start, end in query_chunks(q.shape[1], chunk_size):
        per_head = head_block_mass(q[:, start:end], keys, selection_block, scale, q_start + start)
        positions = torch.arange(q_start + start, q_start + end, device=q.device)
        out.append(topn_from_scores(group_score("exact")(per_head), positions, selection_block, num_selected))
    return torch.cat(out, dim=1)


def head_block_mass(
    q: torch.Tensor, keys: torch.Tensor, selection_block: int, scale: float | None = None, q_start: int = 0,
) -> torch.Tensor:
    """Each query head's exact attention probability on each selection block, [B, C, HK, G, S] float32:
    softmax(scale * q.k) over the raw keys at positions <= the query's, summed over each block's tokens.
    q [B, C, HQ, Dk] at positions q_start .. q_start + C - 1 of one document; keys [B, >= q_start + C, HK, Dk]
    of that document from its first token (later ones are not read); S = the blocks up to the last query's."""
    seq = q_start + q.shape[1]
    num_blocks = num_selection_blocks(seq, selection_block)
    qg = group_queries(q, keys.shape[2]).float()
    logits = torch.einsum("bchgd,bthd->bchgt", qg, keys[:, :seq].float()) * default_scale(q.shape[-1], scale)
    positions = torch.arange(q_start, seq, device=q.device)
    visible = torch.arange(seq, device=q.device)[None, :] <= positions[:, None]
    probs = torch.softmax(logits.masked_fill(~visible[None, :, None, None, :], float("-inf")), dim=-1)
    probs = torch.nn.functional.pad(probs, (0, num_blocks * selection_block - seq))
    return probs.reshape(*probs.shape[:-1], num_blocks, selection_block).sum(dim=-1)


def head_block_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    weights: torch.Tensor,
    scale: float | None = None,
    q_start: int = 0,
) -> torch.Tensor:
    """Each query head's compressed-attention probabilities spread onto selection blocks, before the GQA
    group sums them: [B, C, HK, G, S] float32 for q [B, C, HQ, Dk] at positions q_start .. q_start + C - 1
    of one document; k_cmp [B, N, HK, Dk], lse_cmp [B, C, HQ], weights = overlap_weights(N, S, ...)."""
    qg = group_queries(q, k_cmp.shape[2]).float()
    positions = torch.arange(q_start, q_start + q.shape[1], device=q.device)
    logits = torch.einsum("bchgd,bnhd->bchgn", qg, k_cmp.float()) * default_scale(q.shape[-1], scale)
    visible = compressed_visibility(positions, k_cmp.shape[1], block_size, stride)[None, :, None, None, :]
    lse = lse_cmp.reshape(*qg.shape[:4]).float()[..., None]
    probs = torch.where(visible & torch.isfinite(lse), torch.exp(logits - lse), torch.zeros_like(logits))
    return probs @ weights


def block_key_bounds(keys: torch.Tensor, selection_block: int) -> torch.Tensor:
    """phi for the "bound" score: each whole selection block's channel-wise largest and smallest key,
    [B, T, H, D] -> [B, T // l', H, 2D] (maximum first), in keys' dtype (both are keys, exactly)."""
    blocks = _blocks(keys, selection_block, selection_block)  # [B, N, H, l', D]
    return torch.cat([blocks.amax(dim=-2), blocks.amin(dim=-2)], dim=-1)


def bound_inputs(q: torch.Tensor, keys: torch.Tensor, selection_block: int, cu_seqlens: torch.Tensor | None):
    """The "bound" score as the "sum" score of other inputs. A block's bound of q.k,
    sum_d max(q_d min_d, q_d max_d), is the dot product of [max(q, 0), min(q, 0)] with [max_k, min_k], so
    the bound queries [B, T, HQ, 2D] and the bound keys, one per whole block (block_key_bounds, per packed
    document as phi compresses: blocks of l' every l', visible once complete), go through compressed
    attention (for each head's log-sum-exp; the values [B, N, HK, 16] are zeros) and top-n's "sum" score.
    keys [B, S, HK, D] from position 0; with cu_seqlens they are padded to the documents' end (blocks past
    S are never visible to the queries: they end after them)."""
    if cu_seqlens is not None and keys.shape[1] < int(cu_seqlens[-1]):
        keys = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, int(cu_seqlens[-1]) - keys.shape[1]))
    k_bound = compress_documents(lambda x: block_key_bounds(x, selection_block), keys, cu_seqlens,
                                 selection_block, selection_block)
    q_bound = torch.cat([q.clamp_min(0), q.clamp_max(0)], dim=-1)
    return q_bound, k_bound, k_bound.new_zeros(*k_bound.shape[:3], 16)


def head_block_bounds(
    q: torch.Tensor, keys: torch.Tensor, selection_block: int, scale: float | None = None, q_start: int = 0,
) -> torch.Tensor:
    """Each query head's "bound" score of each selection block, [B, C, HK, G, S] float32, computed directly:
    the largest q.k any key of block j could give, scale * sum_d max(q_d min_jd, q_d max_jd) over the
    block's keys' channel-wise minimum and maximum, then a softmax over the whole blocks that end at or
    before the query (the current one, still filling, is forced and scores 0). q [B, C, HQ, Dk] at positions
    q_start .. q_start + C - 1 of one document; keys [B, >= q_start + C, HK, Dk] of that document."""
    seq = q_start + q.shape[1]
    num_blocks = num_selection_blocks(seq, selection_block)
    k = torch.nn.functional.pad(keys[:, :seq].float(), (0, 0, 0, 0, 0, num_blocks * selection_block - seq))
    k = k.reshape(k.shape[0], num_blocks, selection_block, *k.shape[2:])  # [B, S, l', HK, Dk]
    k_min, k_max = k.amin(dim=2), k.amax(dim=2)  # padding only reaches the current block, never scored
    qg = group_queries(q, keys.shape[2]).float()  # [B, C, HK, G, Dk]
    bound = torch.maximum(torch.einsum("bchgd,bshd->bchgsd", qg, k_min), torch.einsum("bchgd,bshd->bchgsd", qg, k_max))
    logits = bound.sum(-1) * default_scale(q.shape[-1], scale)
    positions = torch.arange(q_start, seq, device=q.device)
    whole = (torch.arange(num_blocks, device=q.device)[None, :] + 1) * selection_block <= positions[:, None] + 1
    probs = torch.softmax(logits.masked_fill(~whole[None, :, None, None, :], float("-inf")), dim=-1)
    return probs.nan_to_num(0.0)  # a row with no whole block yet: all blocks 0
