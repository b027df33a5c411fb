"""Flash attention in which each query sees one contiguous range of keys: the Triton kernel behind the
compressed branch (query t sees the compressed blocks of its document that have ended) and the
sliding-window branch (query t sees keys (t - w, t] of its document). The branches only compute the
ranges (compressed_attention/triton.py, window_attention/triton.py); forward and backward live here.

Layout [B, T, H, D]. A program owns a tile of BLOCK_M rows, where row r is the pair (token r // G,
query head r % G) of one GQA group: every query head of a group shares the KV head, so each key tile
is loaded once per group, and any group size 1..32 fills the tile without padding.

Backward (FlashAttention-2): dQ by query tiles, dK/dV by key tiles, each output element written by
exactly one program (no atomics, deterministic). The dK/dV program visits only the query rows whose
ranges can contain its keys, bounded by per-key query ranges that the branches pass in. The compressed
branch has few keys (T/d) that each see up to T*G rows, so too few key tiles to fill the GPU: the rows of
a key tile are then split among several programs, each writing an fp32 partial, summed in split order.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_utils import dot_precision, poisoned, pow2

LOG2E = 1.4426950408889634  # the kernels work in base 2 (exp2 is the fast instruction)


def _tiles(device: torch.device, head_dim: int, kernel: str) -> dict:
    """Tile sizes and warps per kernel ("fwd", "dq", "dkv"); chosen so that no kernel spills registers on
    sm_90 (ptxas resource usage) at head dims 32..256."""
    # The interpreter (CPU) runs one numpy op per tile op: big tiles make it fast.
    if device.type == "cpu":
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if head_dim > 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    # dK and dV accumulate in registers side by side: twice the fp32 state of the other two
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if kernel == "dkv" else 4, num_stages=2)


@triton.jit
def _row_pointers(pid_m, b, hk, T, HQ, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of a tile -> (token, flat offset of (b, token, head) in a [B, T, HQ] array, valid mask)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * G
    tok = rows // G
    head = hk * G + rows % G
    flat = (b.to(tl.int64) * T + tok) * HQ + head
    return tok, flat, row_ok


@triton.jit
def online_softmax_step(qt, kt, vt, visible, m, l_sum, acc, scale_log2, PRECISION: tl.constexpr):
    """One key tile of a flash-attention forward (base 2): the scores of qt against kt where `visible`,
    folded into the running row max m, row sum l_sum and output acc. Returns the new (m, l_sum, acc)."""
    s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # a row with nothing visible yet keeps m = -inf; shifting by 0 instead avoids (-inf) - (-inf)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - shift)
    p = tl.exp2(s - shift[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
    return m_new, l_sum, acc


@triton.jit
def store_rows(o, lse, flat, row_ok, dv, DV: tl.constexpr, m, l_sum, acc):
    """Normalizes and stores a forward's rows: output (0 where a row saw no key) and natural-log lse
    (-inf there)."""
    seen = l_sum > 0
    out = acc / tl.where(seen, l_sum, 1.0)[:, None]
    tl.store(o + flat[:, None] * DV + dv[None, :], out.to(o.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    row_lse = tl.where(seen, (m + tl.log2(tl.where(seen, l_sum, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse + flat, row_lse, mask=row_ok)


@triton.jit
def _range_attn_fwd(
    q, k, v, o, lse, lo, hi,
    T, TK, HQ, HK, scale_log2,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HK
    hk = tl.program_id(1) % HK
    tok, flat, row_ok = _row_pointers(pid_m, b, hk, T, HQ, G, BLOCK_M)
    row_lo = tl.load(lo + tok, mask=row_ok, other=0)
    row_hi = tl.load(hi + tok, mask=row_ok, other=0)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    start = tl.min(tl.where(row_ok & (row_lo < row_hi), row_lo, TK))
    end = tl.max(tl.where(row_ok, row_hi, 0))
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kv_row = (b.to(tl.int64) * TK + keys) * HK + hk
        key_ok = keys < end
        kt = tl.load(k + kv_row[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
        vt = tl.load(v + kv_row[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
        visible = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
        m, l_sum, acc = online_softmax_step(qt, kt, vt, visible, m, l_sum, acc, scale_log2, PRECISION)
    store_rows(o, lse, flat, row_ok, dv, DV, m, l_sum, acc)


@triton.jit
def _range_attn_bwd_dq(
    q, k, v, do, lse, delta, dq, lo, hi,
    T, TK, HQ, HK, scale_log2, scale,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HK
    hk = tl.program_id(1) % HK
    tok, flat, row_ok = _row_pointers(pid_m, b, hk, T, HQ, G, BLOCK_M)
    row_lo = tl.load(lo + tok, mask=row_ok, other=0)
    row_hi = tl.load(hi + tok, mask=row_ok, other=0)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
    dot = tl.load(do + flat[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    row_lse = tl.load(lse + flat, mask=row_ok, other=0.0)
    # rows that see nothing have lse = -inf and no visible key; 0 keeps exp2 finite for them
    row_lse = tl.where(row_lse == float("-inf"), 0.0, row_lse * 1.4426950408889634)
    row_delta = tl.load(delta + flat, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    start = tl.min(tl.where(row_ok & (row_lo < row_hi), row_lo, TK))
    end = tl.max(tl.where(row_ok, row_hi, 0))
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kv_row = (b.to(tl.int64) * TK + keys) * HK + hk
        key_ok = keys < end
        kt = tl.load(k + kv_row[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
        vt = tl.load(v + kv_row[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
        visible = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
        p = tl.where(visible, tl.exp2(s - row_lse[:, None]), 0.0)
        dp = tl.dot(dot, tl.trans(vt), input_precision=PRECISION)
        ds = p * (dp - row_delta[:, None])
        acc += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
    tl.store(dq + flat[:, None] * DK + dk[None, :], (acc * scale).to(dq.dtype.element_ty),
             mask=row_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def _range_attn_bwd_dkv(
    q, k, v, do, lse, delta, dk_out, dv_out, lo, hi, qlo, qhi,
    B, T, TK, HQ, HK, scale_log2, scale, NUM_SPLITS,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1) // HK
    hk = tl.program_id(1) % HK
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < TK
    kv_row = (b.to(tl.int64) * TK + keys) * HK + hk
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(k + kv_row[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
    vt = tl.load(v + kv_row[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
    key_qlo = tl.load(qlo + keys, mask=key_ok, other=0)
    key_qhi = tl.load(qhi + keys, mask=key_ok, other=0)
    # rows (token, head) of the queries that may see any key of this tile; this program's share of them
    row_start = tl.min(tl.where(key_ok & (key_qlo < key_qhi), key_qlo, T)) * G
    row_end = tl.max(tl.where(key_ok, key_qhi, 0)) * G
    share = tl.cdiv(tl.cdiv(tl.maximum(row_end - row_start, 0), NUM_SPLITS), BLOCK_M) * BLOCK_M
    split = tl.program_id(2)
    split_lo = row_start + split * share
    split_hi = tl.minimum(split_lo + share, row_end)

    acc_k = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for r0 in range(split_lo, split_hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < split_hi
        tok = rows // G
        flat = (b.to(tl.int64) * T + tok) * HQ + hk * G + rows % G
        qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
        dot = tl.load(do + flat[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
        row_lse = tl.load(lse + flat, mask=row_ok, other=0.0)
        row_lse = tl.where(row_lse == float("-inf"), 0.0, row_lse * 1.4426950408889634)
        row_delta = tl.load(delta + flat, mask=row_ok, other=0.0)
        row_lo = tl.load(lo + tok, mask=row_ok, other=0)
        row_hi = tl.load(hi + tok, mask=row_ok, other=0)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
        visible = row_ok[:, None] & (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
        p = tl.where(visible, tl.exp2(s - row_lse[:, None]), 0.0)
        acc_v += tl.dot(tl.trans(p.to(dot.dtype)), dot, input_precision=PRECISION)
        dp = tl.dot(dot, tl.trans(vt), input_precision=PRECISION)
        ds = p * (dp - row_delta[:, None])
        acc_k += tl.dot(tl.trans(ds.to(qt.dtype)), qt, input_precision=PRECISION)
    out_row = split.to(tl.int64) * B * TK * HK + kv_row  # split s writes slice s of [NUM_SPLITS, B, TK, HK, D]
    tl.store(dk_out + out_row[:, None] * DK + dk[None, :], (acc_k * scale).to(dk_out.dtype.element_ty),
             mask=key_ok[:, None] & (dk[None, :] < DK))
    tl.store(dv_out + out_row[:, None] * DV + dv[None, :], acc_v.to(dv_out.dtype.element_ty),
             mask=key_ok[:, None] & (dv[None, :] < DV))


_MAX_SPLITS = 32


def _programs_wanted(device: torch.device) -> int:
    """dK/dV programs that keep every multiprocessor busy with several at once (one alone leaves it
    latency-bound); on CPU (interpreter) a few, so that the tests exercise the split too."""
    if device.type == "cpu":
        return 4
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def _launch_args(q, k, v, scale):
    group = q.shape[2] // k.shape[2]
    return dict(
        G=group, DK=q.shape[-1], DV=v.shape[-1], BLOCK_DK=pow2(q.shape[-1]), BLOCK_DV=pow2(v.shape[-1]),
        PRECISION=dot_precision(q.dtype),
    ), (q.shape[1], k.shape[1], q.shape[2], k.shape[2], scale * LOG2E)


def range_attention_fwd(q, k, v, lo, hi, scale):
    batch, seq, num_q_heads, _ = q.shape
    consts, sizes = _launch_args(q, k, v, scale)
    tiles = _tiles(q.device, max(q.shape[-1], v.shape[-1]), "fwd")
    o = poisoned((batch, seq, num_q_heads, v.shape[-1]), q.dtype, q.device)
    lse = poisoned((batch, seq, num_q_heads), torch.float32, q.device)
    grid = (triton.cdiv(seq * consts["G"], tiles["BLOCK_M"]), batch * k.shape[2])
    _range_attn_fwd[grid](q, k, v, o, lse, lo, hi, *sizes, **consts, **tiles)
    return o, lse


def range_attention_bwd(q, k, v, o, lse, do, dlse, lo, hi, qlo, qhi, scale):
    batch, seq, _, _ = q.shape
    consts, sizes = _launch_args(q, k, v, scale)
    head_dim = max(q.shape[-1], v.shape[-1])
    # dL/ds = p * (dp - delta + dlse): a gradient on lse folds into delta
    delta = (o.float() * do.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    dq = poisoned(q.shape, q.dtype, q.device)
    dk = poisoned(k.shape, k.dtype, k.device)
    dv = poisoned(v.shape, v.dtype, v.device)
    tiles = _tiles(q.device, head_dim, "dq")
    grid_q = (triton.cdiv(seq * consts["G"], tiles["BLOCK_M"]), batch * k.shape[2])
    _range_attn_bwd_dq[grid_q](q, k, v, do, lse, delta, dq, lo, hi, *sizes, scale, **consts, **tiles)
    tiles = _tiles(q.device, head_dim, "dkv")
    key_programs = max(1, triton.cdiv(k.shape[1], tiles["BLOCK_N"]) * batch * k.shape[2])
    splits = max(1, min(_MAX_SPLITS, _programs_wanted(q.device) // key_programs))
    if splits > 1:
        dk_parts = poisoned((splits, *k.shape), torch.float32, k.device)
        dv_parts = poisoned((splits, *v.shape), torch.float32, v.device)
    else:
        dk_parts, dv_parts = dk, dv
    grid_k = (triton.cdiv(k.shape[1], tiles["BLOCK_N"]), batch * k.shape[2], splits)
    _range_attn_bwd_dkv[grid_k](q, k, v, do, lse, delta, dk_parts, dv_parts, lo, hi, qlo, qhi, batch, *sizes, scale,
                                splits, **consts, **tiles)
    if splits > 1:
        dk.copy_(dk_parts.sum(0))
        dv.copy_(dv_parts.sum(0))
    return dq, dk, dv


class RangeAttention(torch.autograd.Function):
    """(o, lse) = softmax attention of each query over its key range; differentiable in q, k, v.

    q: [B, T, HQ, Dk]; k: [B, TK, HK, Dk]; v: [B, TK, HK, Dv]; contiguous, one dtype.
    lo, hi: [T] int32, query token t sees keys lo[t] <= s < hi[t] (empty when lo >= hi).
    qlo, qhi: [TK] int32, key s is seen by at most the query tokens qlo[s] <= t < qhi[s] (a bound for the
    backward's loop; masking always uses lo/hi).
    Returns o: [B, T, HQ, Dv] q.dtype (0 where nothing is visible) and lse: [B, T, HQ] float32 (-inf there).
    """

    @staticmethod
    def forward(ctx, q, k, v, lo, hi, qlo, qhi, scale):
        o, lse = range_attention_fwd(q, k, v, lo, hi, scale)
        ctx.save_for_backward(q, k, v, o, lse, lo, hi, qlo, qhi)
        ctx.scale = scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, lo, hi, qlo, qhi = ctx.saved_tensors
        dq, dk, dv = range_attention_bwd(q, k, v, o, lse, do.contiguous(), dlse, lo, hi, qlo, qhi, ctx.scale)
        return dq, dk, dv, None, None, None, None, None
