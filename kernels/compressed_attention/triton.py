"""Compressed attention, Triton: each query over the compressed blocks of its document that have ended.

The visible compressed tokens of query t are one contiguous range of k_cmp rows, so this branch only
computes those ranges; the forward/backward kernels are the range attention in kernels/range_attention.py.
"""

import functools

import torch

from kernels.common import LAYOUT_CACHE_SIZE, default_scale, document_layout, document_of, longest_document
from kernels.compression.naive import compressed_cu_seqlens
from kernels.range_attention import RangeAttention
from kernels.triton_utils import check_attention_inputs, check_packed, gate_input

# The range attention's backward path (kernels/range_attention.py): one pass with atomic dQ, where
# ONE_PASS_BACKWARD is set and the longest document's work, its tokens x the query heads x the head dim, reaches
# ONE_PASS_MIN_WORK (kernels.common.longest_document: a compressed key's rows are its document's, so the one pass
# pays by document length, not by the batch's tokens); else the dQ and dK/dV kernels (split). The one pass gains
# with more rows a key tile and more programs, so tokens alone do not decide it: at 32K the paper's 64 heads of 128
# take it, 16 heads of 128 or the proof model's 16 heads of 64 do not. Split / one pass ms, bf16, alternated
# (benchmarks/kernels-exp-range-bwd.py; gpu_checks/one_pass_rule/ on one H100, 190b98c):
# - 64 query / 4 KV heads of 128: 16K 2.88 / 2.86 (1.01x, at the threshold), 32K 9.78 / 8.78 (1.11x), 64K
#   36.9 / 30.2 (1.22x); on one H200 128K 142.9 / 122.3 (range-bwd-compressed-2026-12-04-1f8dde3.json);
# - 16 / 4 heads of 128: 32K 0.94x, 64K 1.07x;
# - the proof model's 16 / 1 heads of 64: 32K 0.82x, 48K 0.86x, 128K 0.99x; on one H200 8 documents of 8K 1.19 /
#   1.60, 16 of 2K 0.35 / 0.52 (range-bwd-compressed-proof*-2026-12-04-9efe853.json).
# Until 2026-12-07 the rule was 64K tokens whatever the heads. Module settings, read at each backward, so that one
# process can time both.
ONE_PASS_BACKWARD = True
ONE_PASS_MIN_WORK = 16384 * 64 * 128
# The forward copies its K/V tiles through TMA descriptors (kernels/range_attention.py) where some query sees at
# least TMA_FORWARD_MIN_TOKENS tokens of its document. On one H200, pointer / TMA forward ms alternated
# (benchmarks/kernels-exp-range-tma.py; G=16, D=128): 128K 40.2 / 36.1 (2026-12-05,
# gpu_checks/range-tma-paper-01c47e8.json) and 40.5 / 36.4 (1.11x,
# gpu_checks/dq_reduce/range-tma-compressed-65536-131072-52f48c3.json), 64K 10.65 / 9.92 (1.07x, the same file),
# 16K 0.92 / 0.93; the proof model's 16 / 1 heads of 64 at 32K in documents of 8K lost (0.93x,
# range-tma-proof-01c47e8.json).
TMA_FORWARD_MIN_TOKENS = 65536


def compressed_ranges(
    seq: int, num_blocks: int, block_size: int, stride: int, q_start: int, cu_seqlens: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """Key ranges per query token and query ranges per compressed token (all int32).

    Query j (global position q_start + j, local position p in its document) sees the rows
    [first row of its document, + number of its document's blocks with i*d + l - 1 <= p).
    Compressed row r (block i of document D) is seen by query tokens from the one where block i ends
    up to the end of D.
    """
    if cu_seqlens is None:
        return _one_document_ranges(seq, num_blocks, block_size, stride, q_start, device)

    def build():
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        cmp_cu = compressed_cu_seqlens(cu, block_size, stride).to(torch.int64)
        return _ranges(seq, num_blocks, block_size, stride, q_start, cu, cmp_cu)

    return document_layout(cu_seqlens, ("compressed_ranges", seq, num_blocks, block_size, stride, q_start, device),
                           build)


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _one_document_ranges(seq: int, num_blocks: int, block_size: int, stride: int, q_start: int,
                         device: torch.device) -> tuple[torch.Tensor, ...]:
    """compressed_ranges of one document, cached per shape (every layer of a step asks the same)."""
    # [0, end] boundaries built on the device: a tensor copied from a host list waits for the GPU
    pair = torch.arange(2, device=device)
    return _ranges(seq, num_blocks, block_size, stride, q_start, pair * (q_start + seq), pair * num_blocks)


def _ranges(seq: int, num_blocks: int, block_size: int, stride: int, q_start: int, cu: torch.Tensor,
            cmp_cu: torch.Tensor) -> tuple[torch.Tensor, ...]:
    device = cu.device
    pos = torch.arange(q_start, q_start + seq, device=device)
    doc = document_of(pos, cu)
    local = pos - cu[doc]
    seen = torch.where(local >= block_size - 1, (local - block_size + 1) // stride + 1, 0)
    lo = cmp_cu[doc]
    hi = torch.minimum(lo + seen, cmp_cu[doc + 1])

    rows = torch.arange(num_blocks, device=device)
    row_doc = document_of(rows, cmp_cu)
    block_end = cu[row_doc] + (rows - cmp_cu[row_doc]) * stride + block_size - 1
    qlo = (block_end - q_start).clamp(0, seq)
    qhi = (cu[row_doc + 1] - q_start).clamp(0, seq)
    return tuple(x.to(torch.int32).contiguous() for x in (lo, hi, qlo, qhi))


def compressed_attention_triton(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    q_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of queries over compressed tokens (Triton; same meaning as compressed_attention_ref).

    q: [B, T, HQ, Dk]; k_cmp: [B, N, HK, Dk]; v_cmp: [B, N, HK, Dv]; one dtype among fp32/fp16/bf16,
    HQ = G * HK with G <= 32, Dk and Dv <= 256. Query j sits at global position q_start + j and sees
    compressed block i iff i*stride + block_size - 1 <= its position.
    cu_seqlens: optional int32 [num_docs + 1] boundaries of packed documents (B must be 1); positions
    restart at each document, a query sees only its document's blocks, and k_cmp holds every document's
    compressed tokens in document order (kernels.compression.naive.compress_documents).
    gate: optional [B, T, HQ], this branch's gate in NSA's gated sum. The output stays ungated, for
    kernels.gate_combine.triton.gated_sum_triton, and its backward applies the gate: the gradient it is
    given is taken as the gated sum's, and the gate gets its gradient (kernels/gate_combine/triton.py).
    Returns o: [B, T, HQ, Dv] q.dtype (0 for a query that sees no block) and
    lse: [B, T, HQ] float32, natural log-sum-exp of the scaled scores (-inf where no block is visible).
    Differentiable in q, k_cmp, v_cmp (and through lse), and the gate.
    """
    check_attention_inputs("compressed_attention_triton", q, k_cmp, v_cmp)
    check_packed("compressed_attention_triton", q.shape[0], cu_seqlens)
    ranges = compressed_ranges(q.shape[1], k_cmp.shape[1], block_size, stride, q_start, cu_seqlens, q.device)
    scale = default_scale(q.shape[-1], scale)
    longest = longest_document(q.shape[1], q_start, cu_seqlens)
    one_pass = ONE_PASS_BACKWARD and longest * q.shape[2] * q.shape[3] >= ONE_PASS_MIN_WORK
    gate = gate_input("compressed_attention_triton", q, gate)
    return RangeAttention.apply(q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous(), *ranges, scale, one_pass,
                                gate, False, longest >= TMA_FORWARD_MIN_TOKENS)
