"""Dense causal attention, the baseline NSA is measured against: on one rank (also over packed
documents, one varlen flash launch on the GPU) and under the same context parallelism.

Under CP, K/V are all-gathered into sequence order (reduce-scattered in fp32 in the backward). Each local chunk
of queries starting at global position s attends to keys [0, s + C) as two fused attention calls with no
mask tensor: causal over its own chunk (the diagonal block) and unmasked over the keys before it. The two
partial results are merged by their log-sum-exps; the backward runs each call's own backward with the
merged output and log-sum-exp, which gives exactly that part's share of the gradient (as ring attention
does). On CUDA the calls are cuDNN's fused attention; on CPU, torch's CPU flash attention. Over packed
documents the same two calls run per document piece of a chunk: its queries over the document's keys up to
the piece's last token (a launch pair per piece, where the single-rank path has one varlen launch).
"""

import inspect

import torch
import torch.nn.functional as F

from kernels.common import document_pieces, host_bounds
from nsa_dist.parallel.comm import CommStats, gather_zigzag, group_size_rank
from nsa_dist.parallel.layout import ZigzagLayout

try:
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10: flash attention over packed documents
except ImportError:
    varlen_attn = None
# the causal flag became a window in torch 2.11; GQA support came later still (read once, not per call)
VARLEN_PARAMS = set() if varlen_attn is None else set(inspect.signature(varlen_attn).parameters)
VARLEN_CAUSAL = {"window_size": (-1, 0)} if "window_size" in VARLEN_PARAMS else {"is_causal": True}


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _reduce_heads(grad: torch.Tensor, group: int) -> torch.Tensor:
    return grad if group == 1 else grad.unflatten(1, (-1, group)).sum(dim=2)


def _cpu_inputs(q, k, v):
    """The CPU kernel has no GQA and needs one head size: K/V repeated per query head, zero channels
    appended to the smaller of Dk and Dv (zeros change no score and no output channel)."""
    group = q.shape[1] // k.shape[1]
    width = max(q.shape[-1], v.shape[-1])

    def pad(x):
        return F.pad(x, (0, width - x.shape[-1]))

    return pad(q), pad(_expand_heads(k, group)), pad(_expand_heads(v, group)), group


def _attend(q, k, v, causal: bool, scale: float):
    """One fused attention over [B, H, S, D] tensors (K/V may have fewer heads: GQA). Returns the output
    and the log-sum-exp [B, HQ, Sq] (fp32), both needed by the backward."""
    if q.is_cuda:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
        return out, lse.view(q.shape[:3])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *_cpu_inputs(q, k, v)[:3], 0.0, causal, scale=scale)
    return out[..., : v.shape[-1]], lse


def _attend_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float):
    if q.is_cuda:  # no dropout: the RNG state is unused; no bias and no packed sequences: None
        rng = torch.zeros((), dtype=torch.int64, device=q.device)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, q, k, v, out, lse.unsqueeze(-1), rng, rng, None, None, None, q.shape[2], k.shape[2],
            0.0, causal, scale=scale)
    q_in, k_in, v_in, group = _cpu_inputs(q, k, v)
    width = q_in.shape[-1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        F.pad(grad_out, (0, width - grad_out.shape[-1])), q_in, k_in, v_in, F.pad(out, (0, width - out.shape[-1])),
        lse, 0.0, causal, scale=scale)
    dk, dv = dk[..., : k.shape[-1]], dv[..., : v.shape[-1]]
    return dq[..., : q.shape[-1]], _reduce_heads(dk, group), _reduce_heads(dv, group)


class _ChunkAttention(torch.autograd.Function):
    """Queries of one chunk [s, s + C) over keys [0, s + C): causal diagonal block + unmasked past."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        # q: [B, HQ, C, D]; k, v: [B, HK, s + C, D], the chunk's own keys last
        c = q.shape[2]
        past = k.shape[2] - c
        out, lse = _attend(q, k[:, :, past:], v[:, :, past:], True, scale)
        if past:
            out_past, lse_past = _attend(q, k[:, :, :past], v[:, :, :past], False, scale)
            merged = torch.logaddexp(lse, lse_past)
            wide = torch.promote_types(q.dtype, torch.float32)
            out = (out.to(wide) * (lse - merged).exp().unsqueeze(-1)
                   + out_past.to(wide) * (lse_past - merged).exp().unsqueeze(-1)).to(q.dtype)
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        c = q.shape[2]
        past = k.shape[2] - c
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dq, dk[:, :, past:], dv[:, :, past:] = _attend_backward(
            grad_out, q, k[:, :, past:], v[:, :, past:], out, lse, True, ctx.scale)
        if past:
            dq_past, dk[:, :, :past], dv[:, :, :past] = _attend_backward(
                grad_out, q, k[:, :, :past], v[:, :, :past], out, lse, False, ctx.scale)
            dq = dq + dq_past
        return dq, dk, dv, None


def dense_context_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, scale: float | None = None,
                           stats: CommStats | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, T_local, HQ, Dk], k: [B, T_local, HK, Dk], v: [B, T_local, HK, Dv] (this rank's zigzag shard,
    RoPE applied at global positions). Returns [B, T_local, HQ, Dv], equal to the matching rows of full
    causal attention over the whole sequence. cu_seqlens: optional int32 boundaries of packed documents
    over the whole sequence (B = 1); each token then attends within its document only."""
    cp_size, cp_rank = group_size_rank(group)
    layout = ZigzagLayout(q.shape[1] * cp_size, cp_size, cp_rank)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dk = k.shape[-1]
    k_all, v_all = gather_zigzag(torch.cat([k, v], dim=-1), group, stats, "dense_kv").split(
        [dk, v.shape[-1]], dim=-1)
    k_all, v_all = k_all.transpose(1, 2).contiguous(), v_all.transpose(1, 2).contiguous()  # [B, HK, T, D]
    c = layout.chunk_len
    outs = []
    for i, start in enumerate(layout.chunk_starts):
        q_chunk = q[:, i * c : (i + 1) * c].transpose(1, 2)
        if cu_seqlens is None:
            pieces = [(0, 0, c)]  # causal: keys from 0 to the chunk's last token
        else:
            bounds = host_bounds(cu_seqlens)
            pieces = [(bounds[doc], lo, hi) for doc, lo, hi in document_pieces(cu_seqlens, start, c)]
        for first_key, lo, hi in pieces:  # queries lo..hi-1 of the chunk see keys first_key .. start + hi - 1
            keys = slice(first_key, start + hi)
            out = _ChunkAttention.apply(q_chunk[:, :, lo:hi].contiguous(), k_all[:, :, keys], v_all[:, :, keys], scale)
            outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of [B, T, H, D] tensors (GQA: fewer K/V heads) through torch's fused kernels."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def dense_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, longest: int,
                    scale: float | None) -> torch.Tensor:
    """Causal attention inside each packed document of [1, T, H, D] tensors (documents end at cu_seqlens,
    the longest has `longest` tokens). In bf16/fp16 on the GPU, one launch of torch's varlen flash kernel
    for all documents; otherwise one SDPA call per document, which costs a launch (and a host sync for the
    bounds) per document."""
    if varlen_attn is None or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        bounds = cu_seqlens.tolist()
        return torch.cat([causal_sdpa(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], scale)
                          for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)
    options = dict(VARLEN_CAUSAL)
    q, k, v = q[0], k[0], v[0]
    if "enable_gqa" in VARLEN_PARAMS:
        options["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=scale, **options)[None]
