"""Sliding-window attention, Triton: query t over keys (t - w, t] of its document.

The visible keys of a query are one contiguous range, so this branch only computes the ranges; the
forward/backward kernels are the range attention in kernels/range_attention.py.
"""

import functools

import torch

from kernels.common import LAYOUT_CACHE_SIZE, default_scale, document_layout, document_of
from kernels.range_attention import RangeAttention
from kernels.triton_utils import check_attention_inputs, check_packed, gate_input

# The range attention's backward path (kernels/range_attention.py): one pass with atomic dQ (True) or the
# dQ and dK/dV kernels (False). A window row is seen by about (w + key tile) / key tile key tiles (5 at
# w=512), so the one pass adds each dQ row ~5 times in fp32 atomics that mostly miss L2; the split path
# writes it once. Measured on one H200 (benchmarks/range-bwd-window-2026-12-04-1f8dde3.json,
# range-bwd-window-proof-2026-12-04-1f8dde3.json; bf16, w=512), split / one pass ms: G=16, D=128 16K
# 2.86 / 4.03, 128K 22.9 / 24.8 (peak 2.3 / 6.8 GB); the proof model's 16 / 1 heads of 64 at 32K 0.85 /
# 1.65, and over 16 documents of 2K 0.82 / 1.41 (range-bwd-window-proof-2kdocs-2026-12-04-9efe853.json).
# Again with the one pass's TMA bulk reductions and row statistics (93a6b62, one H100,
# benchmarks/gpu_checks/row_stats/range-bwd-window-*.json), split / one pass: 16K 2.87 / 4.90, 128K 22.75 /
# 32.01, the proof's heads over 2K documents at 32K 0.86 / 1.74.
# A module setting, read at each backward, so that one process can time both.
ONE_PASS_BACKWARD = False
# The split path's dK/dV kernel visits its rows in an order that neighbouring key tiles share
# (range_attention._range_attn_bwd_dkv, ALIGNED_ROWS): every key of a window is seen by the same number of
# rows, so the key tiles that run together read each row tile at the same step, from L2. 1.02-1.05x the
# in-order backward on one H100 (benchmarks/aligned-rows-*-h100-33a55b5.json). Read at each backward.
ALIGNED_ROWS = True


def window_ranges(
    seq: int, num_keys: int, window: int, q_start: int, k_start: int, cu_seqlens: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """Key ranges per query token and query ranges per key (all int32, local indices).

    Query j (global position t = q_start + j) sees the keys at global positions max(t - w + 1, start of
    its document) .. t; key s (global position k_start + s) is seen by queries up to min(its position
    + w, end of its document) - 1.
    """
    if cu_seqlens is None:
        return _one_document_ranges(seq, num_keys, window, q_start, k_start, device)
    return document_layout(
        cu_seqlens, ("window_ranges", seq, num_keys, window, q_start, k_start, device),
        lambda: _ranges(seq, num_keys, window, q_start, k_start, cu_seqlens.to(device=device, dtype=torch.int64)))


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _one_document_ranges(seq: int, num_keys: int, window: int, q_start: int, k_start: int,
                         device: torch.device) -> tuple[torch.Tensor, ...]:
    """window_ranges of one document, cached per shape (every layer of a step asks the same)."""
    # [0, end] built on the device: a tensor copied from a host list waits for the GPU
    end = max(q_start + seq, k_start + num_keys)
    return _ranges(seq, num_keys, window, q_start, k_start, torch.arange(2, device=device) * end)


def _ranges(seq: int, num_keys: int, window: int, q_start: int, k_start: int,
            cu: torch.Tensor) -> tuple[torch.Tensor, ...]:
    device = cu.device
    pos = torch.arange(q_start, q_start + seq, device=device)
    first = torch.maximum(pos - window + 1, cu[document_of(pos, cu)])
    lo = (first - k_start).clamp(0, num_keys)
    hi = (pos + 1 - k_start).clamp(0, num_keys)

    key_pos = torch.arange(k_start, k_start + num_keys, device=device)
    last = torch.minimum(key_pos + window, cu[document_of(key_pos, cu) + 1])
    qlo = (key_pos - q_start).clamp(0, seq)
    qhi = (last - q_start).clamp(0, seq)
    return tuple(x.to(torch.int32).contiguous() for x in (lo, hi, qlo, qhi))


def window_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    q_start: int = 0,
    k_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention (Triton; same meaning as window_attention_ref).

    q: [B, Tq, HQ, Dk]; k: [B, Tk, HK, Dk]; v: [B, Tk, HK, Dv]; one dtype among fp32/fp16/bf16,
    HQ = G * HK with G <= 32, Dk and Dv <= 256. Query j sits at global position q_start + j, key s at
    k_start + s (context parallelism passes a chunk with its left halo); query t sees keys p with
    t - window < p <= t.
    cu_seqlens: optional int32 [num_docs + 1] boundaries of packed documents in global positions
    (B must be 1); a query sees only keys of its own document.
    gate: optional [B, Tq, HQ], this branch's gate in NSA's gated sum. The output stays ungated, for
    kernels.gate_combine.triton.gated_sum_triton, and its backward applies the gate: the gradient it is
    given is taken as the gated sum's, and the gate gets its gradient (kernels/gate_combine/triton.py).
    Returns o: [B, Tq, HQ, Dv] q.dtype and lse: [B, Tq, HQ] float32 (-inf, with o = 0, where no key is
    visible). Differentiable in q, k, v (and through lse), and the gate.
    """
    check_attention_inputs("window_attention_triton", q, k, v)
    check_packed("window_attention_triton", q.shape[0], cu_seqlens)
    ranges = window_ranges(q.shape[1], k.shape[1], window, q_start, k_start, cu_seqlens, q.device)
    scale = default_scale(q.shape[-1], scale)
    gate = gate_input("window_attention_triton", q, gate)
    return RangeAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), *ranges, scale, ONE_PASS_BACKWARD,
                                gate, ALIGNED_ROWS)
