"""The learned indexer: top-n's "exact" score with fewer, learned query heads (nsa.indexer_heads).

The "exact" score ranks a selection block by the GQA group's attention probability on its raw keys, summed
over the group's G query heads. It found the needles the paper's compressed score missed (proof v22), but
its kernels make two causal QK^T passes per query head: at 8K and 32K they cost more than the dense
attention they replace. The indexer scores the same way with H < G heads, each a learned combination of
the group's queries:

    q_idx[i] = sum over h of W[i, h] (*) q[h]

where (*) multiplies each RoPE channel pair (x_f, x_{f + D/2}) as the complex number x_f + i x_{f + D/2}
by W[i, h, f]. RoPE rotates each pair by an angle, which is a complex multiplication too, so the two
commute: an indexer query rotated at its position is the indexer of the rotated queries, and its scores
depend on distances only, as the attention's do. Top-n then runs the exact score's kernels on q_idx and the
raw keys, with H heads to a group: about H / G of the exact score's cost.

W starts as the mean of the i-th slice of G / H heads (real weights); with H = G that is the identity, so
the indexer starts as the exact score itself.

It learns from its own loss (indexer_loss_terms): on every k-th query row, KL(target || pred) over the
blocks top-n ranks (not block 0 or the two local blocks, which it takes whatever their score), with
    target_j = the group's exact attention mass on block j, averaged over its G heads,
    pred_j   = the indexer's mass on block j, averaged over its H heads,
each renormalised over those blocks. The queries and keys enter detached, so the loss trains W alone and
never moves the model (DeepSeek-V3.2 trains its lightning indexer on detached inputs the same way; NSA's
selection alignment loss, which did move the attention, broke training: docs/proof-findings.md).
Not in the NSA paper.
"""

from typing import NamedTuple

import torch

from kernels.common import (
    acc_dtype, default_scale, device_tensor, group_queries, host_bounds, masked_kl, run_chunk,
)


def indexer_init(heads: int, group: int, head_dim: int) -> torch.Tensor:
    """W's start, [2, H, G, D / 2] float32 (real and imaginary parts): head i the mean of query heads
    i * G / H .. (i + 1) * G / H - 1."""
    if heads < 1 or group % heads or head_dim % 2:
        raise ValueError(f"indexer of {heads} heads for a group of {group} query heads of dim {head_dim}: the "
                         "heads must divide the group and the head dim must be even (RoPE's pairs)")
    per = group // heads
    weight = torch.zeros(2, heads, group, head_dim // 2)
    for i in range(heads):
        weight[0, i, i * per : (i + 1) * per] = 1.0 / per
    return weight


def indexer_queries(q: torch.Tensor, weight: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The indexer's queries: q [B, T, HQ, D] (RoPE'd or not: the map commutes with RoPE), W [2, H, G, D / 2]
    -> [B, T, HK * H, D] float32 (float64 for float64 q), each KV head's H heads together, as top-n groups
    query heads. Differentiable in q and W."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, seq, _, dim = q.shape
    group, half, heads = q.shape[2] // num_kv_heads, dim // 2, weight.shape[1]
    # one batched product per frequency f: rows (batch, token, KV head), columns (half c, query head g), where
    # c = 0 holds the pairs' first channels a and c = 1 their second b
    x = group_queries(q, num_kv_heads).to(acc).reshape(-1, group, 2, half).permute(3, 0, 2, 1).reshape(half, -1, 2 * group)
    real, imag = (w.permute(2, 1, 0) for w in weight.to(acc).unbind(0))  # [D / 2, G, H] each
    # (a + ib)(re + i im) = (a re - b im) + i (a im + b re): columns (c', i), c' = 0 the real part
    mix = torch.cat([torch.cat([real, imag], dim=2), torch.cat([-imag, real], dim=2)], dim=1)  # [D / 2, 2G, 2H]
    out = torch.bmm(x, mix).reshape(half, batch, seq, num_kv_heads, 2, heads)
    return out.permute(1, 2, 3, 5, 4, 0).reshape(batch, seq, num_kv_heads * heads, dim)


def indexer_inputs(caller: str, q: torch.Tensor, keys: torch.Tensor | None, weight: torch.Tensor | None) -> torch.Tensor:
    """The queries top-n's "indexer" score ranks with (as "exact" does with the group's): indexer_queries of
    q [B, T, HQ, Dk] for the KV heads of keys [B, S, HK, Dk], in q's dtype, not differentiable."""
    if keys is None or weight is None:
        raise ValueError(f"{caller}: the 'indexer' selection score needs the raw keys (keys=) and the indexer's "
                         "weight (indexer=; nsa.indexer_heads > 0 makes one)")
    return indexer_queries(q.detach(), weight.detach(), keys.shape[2]).to(q.dtype)


# a loss chunk's logits at most (rows x window keys x query heads): 256 MB in fp32. The chunk count sets the
# loss's cost more than its size does: each chunk is ~150 kernel launches, forward and backward, and the
# launches, not the arithmetic, took the time on the GPU (session 47)
_CHUNK_LOGITS = 1 << 26


class IndexerTerms(NamedTuple):
    """Sums over the scored (row, KV head) terms of indexer_loss_terms (float tensors): the mean KL is
    kl / rows, the recall overlap / choices."""

    kl: torch.Tensor
    rows: torch.Tensor
    # of the free picks the exact score makes (n - 3 a row; block 0 and the local blocks are forced) where a
    # row has more blocks to rank than that, how many the indexer's score makes too, and how many there are
    overlap: torch.Tensor
    choices: torch.Tensor


def indexer_loss_terms(
    q: torch.Tensor,
    weight: torch.Tensor,
    keys: torch.Tensor,
    *,
    selection_block: int,
    num_selected: int,
    scale: float | None = None,
    q_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    row_stride: int = 1,
    chunk_size: int = 64,
    impl: str = "reference",
) -> IndexerTerms:
    """The indexer's summed KL over (row, KV head) terms, their count, and its recall of the exact score's
    free picks (IndexerTerms; n = num_selected).

    q: [B, T, HQ, Dk], the queries at global positions q_start .. q_start + T - 1, RoPE'd as the attention
    saw them; only every row_stride-th (rows 0, k, 2k, ...) is scored. weight: W [2, H, G, Dk / 2]. keys:
    [B, S, HK, Dk], the selection branch's raw keys from global position 0 through the last query.
    cu_seqlens: packed documents (B = 1): each row sees its own document's keys, with block ids counted
    from the document's start, as top-n does. Rows with fewer than two blocks to rank (less than 4 l' into
    their document) are left out before anything is computed: with one block both distributions are 1.
    The gradient reaches W only (q and keys are detached).

    The scored rows of each document go in segments of at most chunk_size rows, each segment's window the
    document's keys from its start through the segment's last row, so a row's blocks are whole blocks of
    its window and a block's mass is a log-sum-exp over a reshape (no scatter). Segments are stacked into
    chunks of [segments, rows, window] padded to the largest, at most _CHUNK_LOGITS logits each (one
    segment a chunk at least). The rows are found from host-side bounds and reach the device in one copy a
    chunk: no host-device synchronisation. impl "reference": the blocks' log-sum-exps in PyTorch, the
    target outside autograd and the prediction recomputed in the backward, so memory stays one chunk's
    worth; "triton": in kernels (indexer_triton.py) that keep no [rows, heads, window] logits, nothing
    recomputed (fp32, fp16 or bf16 inputs).
    """
    if impl not in ("reference", "triton"):
        raise ValueError(f"indexer_loss_terms: impl={impl!r}, expected 'reference' or 'triton'")
    terms = [q.new_zeros((), dtype=torch.float32)] * 4
    q, keys = q.detach(), keys.detach()
    bounds = host_bounds(cu_seqlens) if cu_seqlens is not None else [0, q_start + q.shape[1]]
    segments = _segments(bounds, q_start, q.shape[1], row_stride, selection_block, chunk_size, q.shape[2])
    sizes = (selection_block, default_scale(q.shape[-1], scale), num_selected - 3)
    for chunk in _chunks(segments, q.shape[2]):
        rows, seen, window = _layout(chunk, keys, q_start)
        rows_q = q[:, rows]  # [B, N, R, HQ, D]
        with torch.no_grad():
            target = _block_mass(rows_q, window, seen, sizes, impl).mean(dim=-2)  # [B, N, R, HK, S]
        if impl == "triton":
            chunk_terms = _chunk_terms(rows_q, weight, window, seen, target, sizes, impl)
        else:
            chunk_terms = run_chunk(_chunk_terms, rows_q, weight, window, seen, target, sizes, impl)
        terms = [total + part for total, part in zip(terms, chunk_terms)]
    return IndexerTerms(*terms)


def _segments(bounds, q_start, seq, row_stride, selection_block, chunk_size, heads) -> list[tuple]:
    """The scored rows, rows 0, k, 2k, ... of the seq queries from global position q_start that sit at least
    4 l' into their document, as segments (document start, [local rows], window): one document's
    consecutive rows, at most chunk_size of them and, with their window (the keys from the document's start
    through the last row, rounded up to whole blocks), at most _CHUNK_LOGITS logits for `heads` heads."""
    segments = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        lo, hi = max(start + 4 * selection_block, q_start) - q_start, min(end, q_start + seq) - q_start
        rows, span = [], 0
        for row in range(_round_up(lo, row_stride), hi, row_stride):  # the first sampled row at or after lo
            grown = _round_up(row + q_start - start + 1, selection_block)
            if rows and (len(rows) == chunk_size or (len(rows) + 1) * grown * heads > _CHUNK_LOGITS):
                segments.append((start, rows, span))
                rows = []
            rows.append(row)
            span = grown
        if rows:
            segments.append((start, rows, span))
    return segments


def _chunks(segments: list[tuple], heads: int):
    """Yields lists of segments whose stacked logits ([segments, most rows, longest window] x heads) stay
    within _CHUNK_LOGITS (one segment a list at least), in order of window length."""
    chunk, most_rows = [], 0
    for segment in sorted(segments, key=lambda segment: segment[2]):  # the last one added has the longest window
        rows, span = segment[1], segment[2]
        if chunk and (len(chunk) + 1) * max(most_rows, len(rows)) * span * heads > _CHUNK_LOGITS:
            yield chunk
            chunk, most_rows = [], 0
        chunk.append(segment)
        most_rows = max(most_rows, len(rows))
    if chunk:
        yield chunk


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _layout(chunk: list[tuple], keys: torch.Tensor, q_start: int):
    """A chunk's segments stacked: the local rows [N, R] (short segments padded with their last row), how
    many keys before each row its document holds [N, R, 1] (-1 on padding: it sees nothing), and each
    segment's window of keys from its document's start [B, N, S, HK, D], S whole blocks."""
    most, span = max(len(rows) for _, rows, _ in chunk), max(span for _, _, span in chunk)
    padded = [rows + rows[-1:] * (most - len(rows)) for _, rows, _ in chunk]
    seen = [[row + q_start - start for row in rows] + [-1] * (most - len(rows)) for start, rows, _ in chunk]
    starts = [start for start, _, _ in chunk]
    table = device_tensor([x for rows in padded for x in rows] + [x for rows in seen for x in rows] + starts,
                          torch.int64, keys.device)
    count = len(chunk) * most
    rows, seen = table[:count].view(len(chunk), most), table[count : 2 * count].view(len(chunk), most, 1)
    index = (table[2 * count :, None] + torch.arange(span, device=keys.device)).clamp_max(keys.shape[1] - 1)
    return rows, seen, keys[:, index]  # past the last key: any key, never visible


def _chunk_terms(q, weight, window, seen, target, sizes, impl):
    """IndexerTerms' four sums for one chunk (q [B, N, R, HQ, D], window [B, N, S, HK, D], seen [N, R, 1];
    target: the group's mean mass [B, N, R, HK, S / l'])."""
    selection_block, _, free = sizes
    q_idx = indexer_queries(q.flatten(1, 2), weight, window.shape[3]).unflatten(1, q.shape[1:3])
    pred = _block_mass(q_idx, window, seen, sizes, impl).mean(dim=-2)

    # the blocks top-n ranks: whole blocks after block 0 and before the two local ones
    ids = torch.arange(target.shape[-1], device=q.device)
    rankable = ((ids >= 1) & (ids <= seen // selection_block - 2))[None, :, :, None, :]  # [1, N, R, 1, S]
    kl, scored = masked_kl(target, pred, rankable)  # [B, N, R, HK]
    overlap, choices = _shared_picks(target.detach(), pred.detach(), rankable, scored, free)
    return kl.sum(), scored.sum().float(), overlap, choices


def _shared_picks(target, pred, rankable, scored, free):
    """Of the `free` blocks each scored row's target ranks first, how many its prediction ranks first too,
    over the rows with more than `free` blocks to rank (others take them all), and their count x free."""
    choice = scored & (rankable.sum(-1) > free)  # [B, R, HK]
    if free < 1:
        return choice.new_zeros((), dtype=torch.float32), choice.new_zeros((), dtype=torch.float32)
    top = min(free, target.shape[-1])
    picked = [x.masked_fill(~rankable, -1.0).topk(top, dim=-1).indices for x in (target, pred)]
    shared = (picked[0][..., :, None] == picked[1][..., None, :]).any(-1).sum(-1)  # [B, R, HK]
    return torch.where(choice, shared, 0).sum().float(), choice.sum().float() * free


def _block_mass(q, window, seen, sizes, impl):
    """Each query head's attention probability on each block of its window: q [B, N, R, HQ, D], window
    [B, N, S, HK, D], row r of segment n seeing the first seen[n, r] + 1 keys -> [B, N, R, HK, G, S / l']
    float32 (float64 for float64 q, impl "reference")."""
    selection_block, scale, _ = sizes
    batch, segments, rows, heads, dim = q.shape
    kv_heads = window.shape[3]
    if impl == "triton":
        # imported on first use, as kernels.nsa.branch_ops does: importing this module must not define kernels
        from kernels.block_selection.indexer_triton import block_lse_triton

        block_lse = block_lse_triton(q, window, seen, selection_block, scale)
        block_lse = block_lse.view(batch, segments, rows, kv_heads, heads // kv_heads, -1)
    else:
        acc = acc_dtype(q)
        qg = (q.to(acc) * scale).view(batch, segments, rows, kv_heads, heads // kv_heads, dim)
        logits = torch.einsum("bnrhgd,bnkhd->bnrhgk", qg, window.to(acc))
        visible = torch.arange(window.shape[2], device=q.device) <= seen  # [N, R, S]
        # the lowest finite fp32, not -inf: a block no key of which the row sees would give log-sum-exp -inf,
        # and NaN gradients (the kernels write it for such blocks). In place: the product's backward does
        # not read its output
        logits.masked_fill_(~visible[None, :, :, None, None, :], torch.finfo(torch.float32).min)
        block_lse = logits.unflatten(-1, (-1, selection_block)).logsumexp(dim=-1)
    return torch.exp(block_lse - block_lse.logsumexp(dim=-1, keepdim=True))
