"""Helpers shared by the pure-PyTorch reference branches."""

import torch
from torch.utils.checkpoint import checkpoint


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The reference computes in fp32, or in float64 for float64 inputs (so gradcheck can be exact)."""
    return torch.promote_types(x.dtype, torch.float32)


def default_scale(head_dim: int, scale: float | None) -> float:
    return head_dim**-0.5 if scale is None else scale


def masked_softmax_lse(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to `mask`, and its natural log-sum-exp.

    A row with no visible entry gets probabilities 0 and lse -inf, with finite gradients: the row max
    is detached (the result does not depend on it) and logs/divisions are guarded.
    """
    if scores.shape[-1] == 0:  # no key at all, e.g. a document shorter than one compression block
        return scores, scores.new_full(scores.shape[:-1], float("-inf"))
    masked = scores.masked_fill(~mask, float("-inf"))
    row_max = masked.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.where(mask, torch.exp(masked - row_max), torch.zeros_like(masked))
    denom = exp.sum(dim=-1, keepdim=True)
    probs = exp / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    lse = torch.where(
        denom > 0,
        row_max + torch.log(denom.clamp_min(torch.finfo(denom.dtype).tiny)),
        torch.full_like(denom, float("-inf")),
    )
    return probs, lse.squeeze(-1)


def query_chunks(num_queries: int, chunk_size: int):
    """Yields (start, end) ranges that cover [0, num_queries) in chunks of at most chunk_size."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    for start in range(0, num_queries, chunk_size):
        yield start, min(start + chunk_size, num_queries)


def run_chunk(fn, *args):
    """Runs fn(*args); under autograd, recomputes it in backward so that memory stays one chunk's worth."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, T, HQ, D] -> [B, T, HK, G, D]: query heads of one GQA group share a KV head."""
    batch, seq, num_q_heads, dim = q.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return q.reshape(batch, seq, num_kv_heads, num_q_heads // num_kv_heads, dim)


def document_pieces(cu_seqlens: torch.Tensor, q_start: int, seq: int):
    """Yields (doc, lo, hi): document doc holds the queries lo..hi-1 of a chunk of seq queries that starts
    at global position q_start. Used by the references to run each packed document on its own."""
    bounds = cu_seqlens.tolist()
    if bounds[0] > q_start or bounds[-1] < q_start + seq:
        raise ValueError(f"cu_seqlens {bounds} must cover the queries' positions [{q_start}, {q_start + seq})")
    for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        lo, hi = max(start, q_start) - q_start, min(end, q_start + seq) - q_start
        if lo < hi:
            yield doc, lo, hi


def document_of(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Index of the packed document holding each global token position (cu_seqlens: [D+1] boundaries).

    Positions past the last boundary count as the last document.
    """
    docs = torch.searchsorted(cu_seqlens.to(torch.int64), positions.to(torch.int64), right=True) - 1
    return docs.clamp(0, cu_seqlens.numel() - 2)
