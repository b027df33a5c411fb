"""Helpers shared by the pure-PyTorch reference branches, and the per-documents layout cache of the
Triton branches."""

from collections.abc import Callable
from typing import TypeVar

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


def masked_kl(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(target || pred) over the last dim's entries where `mask` holds, each of the two normalised to
    sum 1 there (both non-negative masses, not logits). Returns the KL per row, 0 on rows whose target has
    no mass in the mask, and those rows' mask (True where the KL counts)."""
    tiny = torch.finfo(torch.float32).tiny
    target = torch.where(mask, target, torch.zeros_like(target))
    target_mass = target.sum(-1, keepdim=True)
    scored = target_mass[..., 0] > 0
    target = target / target_mass.clamp_min(tiny)
    pred = torch.where(mask, pred, torch.zeros_like(pred))
    log_pred = torch.log(pred.clamp_min(tiny)) - torch.log(pred.sum(-1, keepdim=True).clamp_min(tiny))
    kl = (torch.xlogy(target, target) - target * log_pred).sum(-1)  # target is 0 off the mask
    return torch.where(scored, kl, torch.zeros_like(kl)), scored


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
    at global position q_start. Used to run each packed document on its own (the references, the dense
    baseline under context parallelism)."""
    bounds = host_bounds(cu_seqlens)
    if bounds[0] > q_start or bounds[-1] < q_start + seq:
        raise ValueError(f"cu_seqlens {bounds} must cover the queries' positions [{q_start}, {q_start + seq})")
    for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        lo, hi = max(start, q_start) - q_start, min(end, q_start + seq) - q_start
        if lo < hi:
            yield doc, lo, hi


Layout = TypeVar("Layout")
# One-document layouts kept per branch (functools.lru_cache): a step asks for a few shapes (its forward
# chunks), and each entry holds O(T) int32 on the device.
LAYOUT_CACHE_SIZE = 16


def remember_bounds(cu_seqlens: torch.Tensor, bounds: list[int]) -> None:
    """Records cu_seqlens's values as known on the host (whoever built it from a list passes the list), so
    host_bounds never has to read them back from the GPU."""
    cu_seqlens.__dict__.setdefault("_document_layouts", {})["bounds"] = list(bounds)


def host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a Python list: given to remember_bounds, or read from the device once per tensor."""
    return document_layout(cu_seqlens, "bounds", cu_seqlens.tolist)


def longest_document(seq: int, q_start: int, cu_seqlens: torch.Tensor | None) -> int:
    """The most tokens any query of a chunk (seq queries from global position q_start) can see in its
    document, from host-side bounds (no device read), once per cu_seqlens (document_layout)."""
    if cu_seqlens is None:
        return q_start + seq

    def build():
        bounds = host_bounds(cu_seqlens)
        return max((min(hi, q_start + seq) - lo for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > q_start),
                   default=0)

    return document_layout(cu_seqlens, ("longest_document", seq, q_start), build)


def device_tensor(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or CPU tensor) as a tensor on `device`, without waiting for the GPU: a copy from pageable
    memory synchronizes with the stream, one from pinned memory runs behind the queued work."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def document_layout(cu_seqlens: torch.Tensor, key: tuple | str, build: Callable[[], Layout]) -> Layout:
    """build() once per cu_seqlens tensor and key, then the same result.

    The Triton branches turn document boundaries into index tables (query tiles, key-block ranges,
    compression rows): a dozen small launches each, and some need a count on the host, which waits for
    the GPU. The tables depend only on the boundaries and the sizes in `key`, which every layer of a step
    shares, so the first layer builds them and the others reuse them: the result is kept on the
    cu_seqlens tensor itself and lives as long as it does. cu_seqlens must not be changed in place.
    """
    layouts = cu_seqlens.__dict__.setdefault("_document_layouts", {})
    if key not in layouts:
        layouts[key] = build()
    return layouts[key]


def positions_in_documents(q_start: int, seq: int, cu_seqlens: torch.Tensor | None,
                           device: torch.device) -> torch.Tensor:
    """[seq] int64: how far into its document each of seq queries from global position q_start sits (its
    global position without cu_seqlens). Built once per cu_seqlens (document_layout)."""
    positions = torch.arange(q_start, q_start + seq, device=device)
    if cu_seqlens is None:
        return positions

    def build():
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        return positions - cu[document_of(positions, cu)]

    return document_layout(cu_seqlens, ("positions_in_documents", q_start, seq, device), build)


def document_of(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Index of the packed document holding each global token position (cu_seqlens: [D+1] boundaries).

    Positions past the last boundary count as the last document.
    """
    docs = torch.searchsorted(cu_seqlens.to(torch.int64), positions.to(torch.int64), right=True) - 1
    return docs.clamp(0, cu_seqlens.numel() - 2)
