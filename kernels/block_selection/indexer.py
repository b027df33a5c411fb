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

import bisect

import torch

from kernels.common import default_scale, group_queries, host_bounds, query_chunks, run_chunk


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
    qg = group_queries(q, num_kv_heads).to(acc)  # [B, T, HK, G, D]
    half = q.shape[-1] // 2
    a, b = qg[..., :half], qg[..., half:]
    real, imag = weight.to(acc).unbind(0)  # [H, G, D / 2] each
    mix = lambda x, w: torch.einsum("bthgf,igf->bthif", x, w)  # noqa: E731
    out = torch.cat([mix(a, real) - mix(b, imag), mix(a, imag) + mix(b, real)], dim=-1)  # [B, T, HK, H, D]
    return out.flatten(2, 3)


def indexer_loss_terms(
    q: torch.Tensor,
    weight: torch.Tensor,
    keys: torch.Tensor,
    *,
    selection_block: int,
    scale: float | None = None,
    q_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    row_stride: int = 1,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's summed KL and the number of rows it sums (float tensors): mean = sum / rows.

    q: [B, T, HQ, Dk], the queries at global positions q_start .. q_start + T - 1, RoPE'd as the attention
    saw them; only every row_stride-th (rows 0, k, 2k, ...) is scored. weight: W [2, H, G, Dk / 2]. keys:
    [B, S, HK, Dk], the selection branch's raw keys from global position 0 through the last query.
    cu_seqlens: packed documents (B = 1): each row sees its own document's keys, with block ids counted
    from the document's start, as top-n does. Rows with no block to rank (fewer than three whole blocks
    before the current one) do not count. The gradient reaches W only (q and keys are detached). Chunked
    over rows; under autograd each chunk is recomputed in the backward, so memory stays one chunk's worth.
    """
    total = rows = q.new_zeros((), dtype=torch.float32)
    q, keys = q[:, ::row_stride].detach(), keys.detach()
    bounds = host_bounds(cu_seqlens) if cu_seqlens is not None else [0]
    cu = cu_seqlens.to(device=q.device, dtype=torch.long) if cu_seqlens is not None else None
    sizes = (selection_block, default_scale(q.shape[-1], scale))
    for start, end in query_chunks(q.shape[1], chunk_size):
        first, last = q_start + start * row_stride, q_start + (end - 1) * row_stride
        lo = bounds[bisect.bisect_right(bounds, first) - 1]  # the first row's document start: no row sees before
        positions = torch.arange(first, last + 1, row_stride, device=q.device)
        doc_start = (cu[torch.searchsorted(cu, positions, right=True) - 1] if cu is not None
                     else torch.zeros_like(positions))
        chunk_total, chunk_rows = run_chunk(_chunk_terms, q[:, start:end], weight, keys[:, lo : last + 1],
                                            positions - lo, doc_start - lo, sizes)
        total, rows = total + chunk_total, rows + chunk_rows
    return total, rows


def _chunk_terms(q, weight, keys, positions, doc_start, sizes):
    """indexer_loss_terms for one chunk of rows at `positions` [R] (documents starting at doc_start [R]),
    both counted from keys' first token."""
    selection_block, scale = sizes
    num_kv_heads = keys.shape[2]
    block = (torch.arange(keys.shape[1], device=q.device)[None, :] - doc_start[:, None]).clamp_min(0) // selection_block
    visible = ((torch.arange(keys.shape[1], device=q.device)[None, :] >= doc_start[:, None])
               & (torch.arange(keys.shape[1], device=q.device)[None, :] <= positions[:, None]))  # [R, K]
    num_blocks = keys.shape[1] // selection_block + 1
    with torch.no_grad():
        target = _block_mass(q, keys, visible, block, num_blocks, scale).mean(dim=3)  # [B, R, HK, S]
    pred = _block_mass(indexer_queries(q, weight, num_kv_heads), keys, visible, block, num_blocks, scale).mean(dim=3)

    # the blocks top-n ranks: whole blocks after block 0 and before the two local ones
    current = (positions - doc_start) // selection_block
    ids = torch.arange(num_blocks, device=q.device)
    rankable = ((ids[None, :] >= 1) & (ids[None, :] <= current[:, None] - 2))[None, :, None, :]  # [1, R, 1, S]
    tiny = torch.finfo(torch.float32).tiny
    target = torch.where(rankable, target, torch.zeros_like(target))
    target_mass = target.sum(-1, keepdim=True)
    scored = target_mass[..., 0] > 0  # [B, R, HK]
    target = target / target_mass.clamp_min(tiny)
    pred = torch.where(rankable, pred, torch.zeros_like(pred))
    log_pred = torch.log(pred.clamp_min(tiny)) - torch.log(pred.sum(-1, keepdim=True).clamp_min(tiny))
    kl = (torch.xlogy(target, target) - target * log_pred).sum(-1)  # target is 0 off the rankable blocks
    kl = torch.where(scored, kl, torch.zeros_like(kl))
    return kl.sum(), scored.sum().float()


def _block_mass(q, keys, visible, block, num_blocks, scale):
    """Each query head's attention probability on each block: q [B, R, HQ, D], keys [B, K, HK, D], visible
    and block [R, K] (each key's block id in the row's document) -> [B, R, HK, G, num_blocks] float32."""
    qg = group_queries(q, keys.shape[2]).float()
    logits = torch.einsum("brhgd,bkhd->brhgk", qg, keys.float()) * scale
    probs = torch.softmax(logits.masked_fill(~visible[None, :, None, None, :], float("-inf")), dim=-1)
    index = block[None, :, None, None, :].expand_as(probs)
    return probs.new_zeros(*probs.shape[:-1], num_blocks).scatter_add(-1, index, probs)
