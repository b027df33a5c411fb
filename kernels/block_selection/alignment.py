"""Selection alignment: a loss that teaches compressed attention where the selected branch looked.

NSA's top-n is not differentiable: compressed attention, whose probabilities rank the blocks, learns only
through its own output o_cmp, and nothing tells it which selected blocks the selected branch found useful.
DeepSeek's sparse attention (DeepSeek-V3.2, "sparse training" stage) trains its block ranker with a KL
divergence to the main attention's distribution over the tokens it selected. This is that loss for NSA:
for each query and KV head, over the free blocks top-n picked (not block 0 or the two local blocks, which
it takes whatever their score) that an ended compressed token overlaps,

    target_j = the selected branch's attention probability in block j, averaged over the group's heads,
               renormalised over those blocks
    pred_j   = the selection score of block j (compressed probabilities spread by overlap and summed over
               the group's heads, as top-n ranks them), renormalised over those blocks
    loss     = KL(target || pred), averaged over the (query, KV head) rows with such a block

The target comes from the selected branch's own forward, which writes each slot's log-sum-exp
(slot_lse), so it costs no second pass over the picked keys. It is a constant (no gradient reaches the
selected branch through it); the gradient reaches the
queries and the compressed keys. Compressed log-sum-exps are constants too (the renormalisation over the
picked blocks removes most of their effect). Not in the NSA paper: opt-in (`nsa.selection_loss`).
"""

import torch

from kernels.common import default_scale, group_queries, masked_kl, query_chunks, run_chunk
from kernels.compression.naive import compressed_cu_seqlens


def selection_alignment_terms(
    q: torch.Tensor,
    slot_lse: torch.Tensor,
    lse_slc: torch.Tensor,
    k_cmp: torch.Tensor,
    lse_cmp: torch.Tensor,
    block_idx: torch.Tensor,
    *,
    block_size: int,
    stride: int,
    selection_block: int,
    scale: float | None = None,
    q_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    row_stride: int = 1,
    chunk_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed KL and the number of rows it sums (a float tensor each): mean = sum / rows.

    q: [B, T, HQ, Dk], the queries at global positions q_start .. q_start + T - 1 (RoPE'd, as the branches
    saw them); slot_lse: [B, T, HQ, n], the selected branch's log-sum-exp over each slot's block alone
    (selected attention's slot_lse=True); lse_slc: [B, T, HQ], its log-sum-exp; k_cmp: [B, N, HK, Dk], the
    compressed keys as compressed attention saw them (RoPE'd where nsa.compression_rope is "blocks");
    lse_cmp: [B, T, HQ]; block_idx: [B, T, HK, n] (-1 padded). cu_seqlens: packed documents (B = 1), each
    scored on its own tokens, with positions and block ids counted from its start (as top-n does).
    row_stride: only every row_stride-th query (0, k, 2k, ... of these rows) counts, for a cheaper loss.
    Chunked over queries; under autograd each chunk's scores are recomputed in the backward, so memory
    stays one chunk's worth. Reads nothing back from the device.
    """
    total, rows = q.new_zeros((), dtype=torch.float32), q.new_zeros((), dtype=torch.float32)
    if k_cmp.shape[1] == 0:  # no compressed token yet (a sequence shorter than one block): no score to align
        return total, rows
    if row_stride > 1:
        q, slot_lse, lse_slc, lse_cmp, block_idx = (x[:, ::row_stride]
                                                    for x in (q, slot_lse, lse_slc, lse_cmp, block_idx))
    positions = torch.arange(q_start, q_start + q.shape[1] * row_stride, row_stride, device=q.device)
    first = cmp_first = torch.zeros_like(positions)  # each row's document: its first token and compressed token
    if cu_seqlens is not None:
        bounds = cu_seqlens.to(device=q.device, dtype=torch.long)
        doc = torch.searchsorted(bounds, positions, right=True) - 1
        first = bounds[doc]
        cmp_first = compressed_cu_seqlens(cu_seqlens, block_size, stride).to(device=q.device, dtype=torch.long)[doc]
    sizes = (block_size, stride, selection_block, default_scale(q.shape[-1], scale))
    for start, end in query_chunks(q.shape[1], chunk_size):
        position = positions[start:end] - first[start:end]
        target = _chunk_target(slot_lse[:, start:end], lse_slc[:, start:end], block_idx.shape[2])
        chunk_total, chunk_rows = run_chunk(_chunk_terms, q[:, start:end], k_cmp, lse_cmp[:, start:end],
                                            block_idx[:, start:end], target, position, cmp_first[start:end], sizes)
        total, rows = total + chunk_total, rows + chunk_rows
    return total, rows


@torch.no_grad()
def _chunk_target(slot_lse, lse_slc, num_kv_heads):
    """The selected branch's probability mass in each picked block of one chunk of rows, averaged over the
    group's heads: [B, R, HK, n] float32 (0 for -1 slots and rows that saw no key)."""
    batch, num_rows, num_q_heads, n = slot_lse.shape
    lse = lse_slc.float()[..., None]
    mass = torch.exp(slot_lse.float() - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    return mass.reshape(batch, num_rows, num_kv_heads, num_q_heads // num_kv_heads, n).mean(3)


def _chunk_terms(q, k_cmp, lse_cmp, block_idx, target, position, cmp_first, sizes):
    """KL(target || the picked blocks' selection scores) for one chunk of rows (target from _chunk_target):
    the summed KL and the rows it sums. position [R] counts from each row's document start, cmp_first [R] is
    the index of its document's first compressed key in k_cmp."""
    block_size, stride, selection_block, scale = sizes
    batch, num_rows, num_kv_heads, n = block_idx.shape
    qg = group_queries(q, num_kv_heads).float()  # [B, R, HK, G, D]
    group = qg.shape[3]
    position = position[None, :, None, None]  # [1, R, 1, 1]
    cmp_first = cmp_first[None, :, None, None, None]
    heads = torch.arange(num_kv_heads, device=q.device)[None, None, :, None, None]
    batches = torch.arange(batch, device=q.device)[:, None, None, None, None]
    picked = block_idx.long()  # [B, R, HK, n]
    valid = picked >= 0

    # prediction: each picked block's selection score from the compressed tokens that overlap it
    per_block = selection_block // stride + block_size // stride - 1  # compressed tokens overlapping a block
    token = (picked * (selection_block // stride) - (block_size // stride - 1))[..., None] + torch.arange(
        per_block, device=q.device)  # [B, R, HK, n, C], counted from the document's first compressed token
    token_start = token * stride
    overlap = (torch.minimum(token_start + block_size, (picked[..., None] + 1) * selection_block)
               - torch.maximum(token_start, picked[..., None] * selection_block)).clamp_min(0).float() / stride
    # an ended compressed block of the row's document (it ends at or before the row, inside the document)
    visible = (valid[..., None] & (token >= 0) & (token_start + block_size - 1 <= position[..., None])
               & (cmp_first + token < k_cmp.shape[1]))
    index = (cmp_first + token).clamp(0, max(k_cmp.shape[1] - 1, 0))
    cmp_keys = k_cmp[batches, index, heads].float()  # [B, R, HK, n, C, D]
    cmp_logits = torch.einsum("brhgd,brhncd->brhgnc", qg, cmp_keys) * scale
    cmp_lse = lse_cmp.detach().reshape(batch, num_rows, num_kv_heads, group).float()[..., None, None]
    cmp_lse = torch.where(torch.isfinite(cmp_lse), cmp_lse, torch.zeros_like(cmp_lse))
    weight = torch.where(visible, overlap, torch.zeros_like(overlap))  # [B, R, HK, n, C]
    # masked before the exp: a token the row cannot see (a later one, or a clamped index) can have a logit
    # far above the row's log-sum-exp, and its exp's inf times a zero weight is a NaN in the backward
    exponent = torch.where(visible[:, :, :, None], cmp_logits - cmp_lse, torch.full_like(cmp_logits, float("-inf")))
    score = (torch.exp(exponent) * weight[:, :, :, None]).sum(-1).sum(3)  # [B, R, HK, n]

    # both distributions are taken over the free picks that some ended compressed token overlaps: top-n
    # ranks only those (block 0 and the local blocks are taken whatever their score, and a query's own block
    # often has no ended compressed token yet)
    current = position // selection_block
    forced = (picked == 0) | (picked == current) | (picked == current - 1)
    comparable = (weight.sum(-1) > 0) & ~forced  # [B, R, HK, n]
    kl, scored = masked_kl(target, score, comparable)  # [B, R, HK]
    return kl.sum(), scored.sum().float()
