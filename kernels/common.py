"""Helpers shared by the pure-PyTorch reference branches."""

import torch
from torch.utils.checkpoint import checkpoint


def default_scale(head_dim: int, scale: float | None) -> float:
    return head_dim**-0.5 if scale is None else scale


def masked_softmax_lse(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to `mask`, and its natural log-sum-exp.

    A row with no visible entry gets probabilities 0 and lse -inf, with finite gradients: the row max
    is detached (the result does not depend on it) and logs/divisions are guarded.
    """
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
