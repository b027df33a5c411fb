"""Flash attention in which each query sees one contiguous range of keys: the Triton kernel behind the
compressed branch (query t sees the compressed blocks of its document that have ended) and the
sliding-window branch (query t sees keys (t - w, t] of its document). The branches only compute the
ranges (compressed_attention/triton.py, window_attention/triton.py); forward and backward live here.

Layout [B, T, H, D]. A program owns a tile of BLOCK_M rows, where row r is the pair (token r // G,
query head r % G) of one GQA group: every query head of a group shares the KV head, so each key tile
is loaded once per group, and any group size 1..32 fills the tile without padding.

Each loop over tiles runs in three parts: the tiles at its start and end, where some (row, key) pairs
are not visible, compute and apply the visibility mask; the tiles between, visible to every row of
the program (most of them: a compressed-attention row sees all earlier blocks, a window row w keys),
skip the mask and its integer work.

Backward, two paths (each branch chooses: its ONE_PASS_BACKWARD). The split path (FlashAttention-2's
Triton tutorial): dQ by query tiles, dK/dV by key tiles, each output element written by exactly one
program (no atomics, deterministic), but both kernels recompute S and dP: 7 matmuls per (row, key)
pair, 3.5x the forward's 2. The dK/dV program computes the transposed scores (keys as the rows of its dots), so that
P^T and dS^T come out of one dot already in the layout of the next, and visits only the query rows
whose ranges can contain its keys (per-key query ranges that the branches pass in). The compressed
branch has few keys (T/d) that each see up to T*G rows, so too few key tiles to fill the GPU: the
rows of a key tile are then split among several programs, each writing an fp32 partial, summed in
split order.

The one-pass path (FlashAttention-2's paper) is the dK/dV kernel that also adds each row tile's dQ
share, dS K, into an fp32 dQ with atomics: 5 matmuls per pair, 2.5x the forward. Atomics on the dQ
side, not the dK/dV side (row tiles outer, dK/dV added atomically): a (row tile, key tile) pair adds
BLOCK_M x Dk values to dQ but BLOCK_N x (Dk + Dv) to dK and dV, so with tiles of equal sides the key
side adds 2x as many. Per pair there is one dQ atomic per 10 BLOCK_N FLOPs (the ratio of
FlashAttention-2's backward at equal tiles): ~1.4 TB/s of fp32 additions at ~440 TFLOP/s with
128-key tiles. dQ in fp32 is 4.3 GB at 128K (G=16, HQ=64) and does not fit in L2, so the rows of
each key tile are cut into chunks counted back from its last row and the programs of one chunk run
together (see the kernel); dK and dV (fp32, 17 MB each at 128K) get one addition per program.

On the GPU the tile sizes, warps and pipeline stages are autotuned per shape (triton.autotune, cached
per (T, TK, G, Dk, Dv, dtype), in memory and in Triton's cache directory); rows are visited
longest-first (the last query tiles of the compressed branch see the most keys), so that the long
programs do not start last and leave the GPU idle at the end. Under the interpreter (CPU) one fixed
configuration runs.

The streamed tiles (K/V in the forward and dQ kernels, q/dO in the dK/dV and one-pass kernels) can come
through TMA tensor descriptors instead of pointer loads (TMA_LOADS, per kernel; Hopper and later, head
dims and group sizes that are powers of two): one copy instruction a tile, no per-thread addresses. Timed
against the pointer loads (benchmarks/kernels-exp-range-tma.py), only the compressed forward over long
documents gains, so that branch asks for it there (range_attention_fwd's tma) and TMA_LOADS is empty. The
one pass adds its dQ tiles by TMA bulk reductions, and both dK/dV kernels read their rows' lse and delta by TMA
copies, where the shapes fit (TMA_DQ_REDUCE, TMA_ROW_STATS). The tests run both under the interpreter.
"""

import os

import torch
import triton
import triton.language as tl
import triton.testing

from kernels import compile_ahead
from kernels.triton_utils import (dot_precision, interpreter_bulk_reductions, poisoned, pow2, programs_wanted,
                                  tma_unfit)

LOG2E = 1.4426950408889634  # the kernels work in base 2 (exp2 is the fast instruction)
if os.environ.get("TRITON_INTERPRET") == "1":
    interpreter_bulk_reductions()


def _config(block_m, block_n, warps, stages, kv_regs=False):
    """kv_regs: the dK/dV and one-pass kernels keep K and V in registers (KV_REGS, _dkv_tile)."""
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, **({"KV_REGS": True} if kv_regs else {}))
    return triton.Config(tiles, num_warps=warps, num_stages=stages)


# (BLOCK_M query rows, BLOCK_N keys, warps, stages) tried per kernel on the GPU: the winners of a wider
# search on the H200 (benchmarks/kernels-notes.md) at T = 16K..128K, G = 16, D = 128, compressed and
# window branch; head dims above 128 get smaller tiles, which keep dK and dV (fp32, side by side in
# registers) from spilling.
_CONFIGS = {
    # fwd 64 x 32 at 4 warps, 3 stages (session 61, one H100, benchmarks/gpu_checks/range_configs/): the window
    # forward 1.09x at 16K and 1.02x at 128K against the pick; slower for the compressed branch and at the
    # proof model's heads, where the autotuner keeps the others
    "fwd": ([_config(128, 64, 8, 3), _config(64, 32, 4, 3), _config(64, 64, 4, 2)],
            [_config(64, 32, 8, 2), _config(64, 32, 4, 2)]),
    "dq": ([_config(128, 64, 8, 3), _config(64, 64, 4, 2)], [_config(64, 32, 8, 2), _config(64, 32, 4, 2)]),
    "dkv": ([_config(64, 128, 8, 3), _config(64, 64, 4, 2), _config(64, 64, 8, 2)],
            [_config(64, 32, 8, 2), _config(32, 64, 8, 2)]),
    # not yet measured on a GPU: dK/dV's winner (it holds the same accumulators) and the configs that
    # an offline sm_90a compile shows spill at most 40 bytes (64 keys at 4 warps spills ~400, 128 rows
    # x 64 keys ~700); 128 keys halve the dQ atomics of 64 (one row tile's dQ per key tile)
    "onepass": ([_config(64, 128, 8, 3), _config(64, 128, 8, 2), _config(64, 64, 8, 2)],
                [_config(64, 32, 8, 2), _config(32, 32, 4, 2)]),
}
# The kernels that copy their streamed tiles through TMA tensor descriptors (the forward and dQ their
# K/V tiles, the dK/dV and one-pass kernels their q/dO row tiles), by _KERNELS name. None until timed
# against the pointer loads on the GPU (benchmarks/kernels-exp-range-tma.py): these kernels measured at
# about 0.4 instructions a cycle with 8 warps a multiprocessor (Nsight Compute, benchmarks/kernels-notes.md,
# session 38), latency-bound, and a TMA copy is one instruction for a whole tile where the pointer loads
# issue one per thread and vector, with their addresses. Per kernel: in an offline sm_90a compile
# (benchmarks/tma-offline.py) TMA saves the forward registers but makes the one pass at D = 128 spill.
TMA_LOADS: tuple[str, ...] = ()
# Whether the one-pass backward adds each row tile's dQ share through a TMA bulk reduction (the tile staged in
# shared memory, one copy instruction) instead of fp32 atomics from every thread (Hopper and later, shapes that
# take TMA; under the interpreter, triton_utils.interpreter_bulk_reductions adds them). In an offline sm_90a
# compile at D = 128 (64 rows x 128 keys, 8 warps) it drops the 40-48 bytes the atomics' addresses spill and 7%
# of the instructions, for 16 KB more shared memory. On one H200 (benchmarks/kernels-exp-range-tma.py, ABAB,
# benchmarks/gpu_checks/dq_reduce/): the compressed one pass 1.02x at 64K and 1.005x at 128K (G = 16, D = 128),
# the same gradients' error; about the noise floor, not slower.
TMA_DQ_REDUCE = True
# Whether the dK/dV kernels (one pass and split) read each row tile's lse and delta by two TMA copies (shapes that
# take TMA, with groups of at least 4 heads: a copy's rows must be 16 bytes or more) instead of every thread
# loading those of its 16 columns of the transposed scores, each with its own 64-bit address. In an offline sm_90a
# compile at D = 128 (64 rows x 128 keys, 8 warps, 3 stages; benchmarks/onepass-offline.py) the one pass's unmasked
# step drops from 836 SASS instructions to 608, and to 528 with dkv_row_stats' base-2 lse and scaled delta; the
# split kernel's from 677 to 448. On one H100, each against the kernels before it, alternated twice
# (benchmarks/gpu_checks/row_stats/): the compressed one pass 1.14x at 128K, 1.10x at 64K (93a6b62, G = 16,
# D = 128); the window's split dK/dV 1.18x at 128K, 1.09x at 16K (fa29c1f).
TMA_ROW_STATS = True
# A fixed launch config per kernel name (_KERNELS), taken on the GPU instead of the autotuner's pick; empty
# in use, set by experiments to time one config against the pick (benchmarks/kernels-exp-aligned-rows.py
# --dkv-configs).
LAUNCH: dict[str, triton.Config] = {}
# The interpreter runs one numpy op per tile op: big tiles make it fast.
_CPU_TILES = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)


def _candidates(name, BLOCK_DK, BLOCK_DV, PRECISION, **_):
    """The configs of _CONFIGS[name] tried for these head dims and this precision."""
    small, large = _CONFIGS[name]
    tried = large if max(BLOCK_DK, BLOCK_DV) > 128 else small
    # fp32 inputs (full-precision dots: for checking, never for speed) get the last, smallest config
    # alone. Their dots are FMA loops: on an H200 the one-pass backward's 64 x 128 fp32 configs took
    # 14 s or more each to build and run once (one spills ~37 KB a thread), while the runs took
    # milliseconds (benchmarks/gpu_checks/onepass_stall-fd26132.txt); trying them all most likely
    # held the GPU kernel tests for minutes
    return tried[-1:] if PRECISION == "ieee" else tried


# How long the autotuner times each candidate config, in ms of warmup and of timed runs. Triton's default is
# 25 and 100, about an eighth of a second a candidate, and a proof job searches again for each new length
# (T_BUCKET below): about 15 candidates at each of its stages' lengths, and the evaluation's 256 and 1K
# tokens, a few seconds of its first steps that dense attention does not pay. 25 ms is still 10 or more
# runs of a proof kernel at 32K and hundreds at 2K for the median that ranks them. Not yet timed on a GPU
# (session 65): what it saves is the first steps' seconds in a proof pair, what it could cost a worse pick.
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 25


def _time_candidate(kernel_call, quantiles):
    """The autotuner's timer (triton.autotune's do_bench): triton.testing.do_bench, shorter (AUTOTUNE_*_MS)."""
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def _autotuned(kernel, name, accumulators):
    """kernel autotuned over _CONFIGS[name]; `accumulators` (argument names) are zeroed before every
    trial run and after the search, for kernels that add into their outputs."""
    small, large = _CONFIGS[name]

    def by_head_dim(configs, named_args, **kwargs):
        return _candidates(name, **kwargs)

    # keyed on the powers of two above T and TK, not on T and TK: with packed documents TK (the compressed
    # tokens of all documents) changes from micro-batch to micro-batch, and every new key would time every
    # config again (~0.65 s a step). cache_results keeps each search's timings in Triton's cache directory,
    # beside the compiled kernels, so that a resumed or repeated run on the machine skips the search too
    return triton.autotune(small + large, key=["T_BUCKET", "TK_BUCKET", "G", "DK", "DV", "TMA", "LSE_ONLY",
                                               "ALIGNED_ROWS", "DQ_TMA", "STATS_TMA"],
                           reset_to_zero=accumulators,
                           prune_configs_by={"early_config_prune": by_head_dim}, do_bench=_time_candidate,
                           cache_results=True)(kernel)


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
def _longest_first(T, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's row tile, counted from the last: later queries see more keys (causal ranges)."""
    return tl.cdiv(T * G, BLOCK_M) - 1 - tl.program_id(0)


@triton.jit
def _split_loop(start, end, full_lo, full_hi, BLOCK: tl.constexpr):
    """Tiles start, start + BLOCK, ... < end, in three parts: [start, mid_lo) masked, [mid_lo, mid_hi)
    entirely inside [full_lo, full_hi) (no mask needed), [mid_hi, end) masked. Returns (mid_lo, mid_hi)."""
    mid_lo = tl.minimum(start + tl.cdiv(tl.maximum(full_lo - start, 0), BLOCK) * BLOCK, end)
    mid_hi = mid_lo + tl.maximum(tl.minimum(full_hi, end) - mid_lo, 0) // BLOCK * BLOCK
    return mid_lo, mid_hi


@triton.jit
def online_softmax_step(qt, kt, vt, visible, m, l_sum, acc, scale_log2, PRECISION: tl.constexpr,
                        MASKED: tl.constexpr = True):
    """One key tile of a flash-attention forward (base 2): the scores of qt against kt where `visible`
    (everywhere if not MASKED), folded into the running row max m, row sum l_sum and output acc.
    Returns the new (m, l_sum, acc)."""
    s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
    if MASKED:
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
def online_softmax_step_keys(qt, kt, vt, visible, m, l_sum, acc_t, scale_log2, PRECISION: tl.constexpr):
    """online_softmax_step with the key tile as the dots' first operand: the scores come out transposed, [keys,
    rows] = kt qt^T, and the output too, acc_t [Dv, rows] += vt^T p^T. For few query rows (selected attention's
    one-token programs: a group's 16 heads) the dots' M is then the keys (64) and the head dim, which Hopper's
    warpgroup MMA takes, where 16 rows leave it to the older warp MMA. visible: [keys, 1] or [keys, rows]."""
    s = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * scale_log2
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - shift)
    p = tl.exp2(s - shift[None, :])
    l_sum = l_sum * alpha + tl.sum(p, 0)
    acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(vt), p.to(vt.dtype), input_precision=PRECISION)
    return m_new, l_sum, acc_t


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
def kv_sources(k, v, b, TK, HK, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """What a kernel reads K and V ([B, TK, HK, D], contiguous) through: the pointers, or (TMA) tensor
    descriptors over batch b's keys and those before it, [(b + 1) * TK, HK * D], whose [BLOCK_N, D]
    tiles at (b * TK + key, hk * D) the Hopper TMA unit copies (rows outside come back zero). Also
    used by selected attention's kernels."""
    if TMA:
        rows = ((b + 1) * TK).to(tl.int32)
        k_src = tl.make_tensor_descriptor(k, shape=[rows, HK * DK], strides=[HK * DK, 1],
                                          block_shape=[BLOCK_N, BLOCK_DK])
        v_src = tl.make_tensor_descriptor(v, shape=[rows, HK * DV], strides=[HK * DV, 1],
                                          block_shape=[BLOCK_N, BLOCK_DV])
    else:
        k_src = k
        v_src = v
    return k_src, v_src


@triton.jit
def row_sources(q, do, b, T, HQ, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                TMA: tl.constexpr):
    """What the dK/dV kernels read q and dO ([B, T, HQ, D], contiguous) through: the pointers, or (TMA)
    descriptors over batch b's tokens and those before it, [(b + 1) T, HQ, D], whose [BLOCK_M / G, G, D]
    tiles (BLOCK_M rows: tokens x one KV head's G query heads) the TMA unit copies. G must divide BLOCK_M."""
    if TMA:
        rows = ((b + 1) * T).to(tl.int32)
        q_src = tl.make_tensor_descriptor(q, shape=[rows, HQ, DK], strides=[HQ * DK, DK, 1],
                                          block_shape=[BLOCK_M // G, G, DK])
        do_src = tl.make_tensor_descriptor(do, shape=[rows, HQ, DV], strides=[HQ * DV, DV, 1],
                                           block_shape=[BLOCK_M // G, G, DV])
    else:
        q_src = q
        do_src = do
    return q_src, do_src


@triton.jit
def row_stats_sources(lse, delta, b, T, HQ, G: tl.constexpr, BLOCK_M: tl.constexpr, STATS_TMA: tl.constexpr):
    """What the dK/dV kernels read the rows' lse and delta ([B, T, HQ] fp32) through: the pointers, or
    (STATS_TMA) descriptors over [(b + 1) T, HQ] whose [BLOCK_M / G, G] tiles are a row tile's (G >= 4, so
    that a tile's rows are 16 bytes or more)."""
    if STATS_TMA:
        rows = ((b + 1) * T).to(tl.int32)
        lse = tl.make_tensor_descriptor(lse, shape=[rows, HQ], strides=[HQ, 1], block_shape=[BLOCK_M // G, G])
        delta = tl.make_tensor_descriptor(delta, shape=[rows, HQ], strides=[HQ, 1], block_shape=[BLOCK_M // G, G])
    return lse, delta


@triton.jit
def _key_tile(k, v, b, hk, n0, end, TK, HK, dk, dv, DK: tl.constexpr, DV: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr = False):
    """Keys n0 .. n0 + BLOCK_N - 1 and their K and V tiles (rows past `end` zero when MASKED; an unmasked
    tile lies inside [0, end) by construction). k, v: pointers, or TMA descriptors (kv_sources; then DK
    and DV are the tiles' widths, and rows past `end` are not zeroed: K and V must be finite there, as
    they are in the model, since a zero weight times NaN is NaN)."""
    keys = n0 + tl.arange(0, BLOCK_N)
    if TMA:  # (constexpr branches: a return inside one would not keep the other from being compiled)
        # rows past `end` hold other keys (or zeros past the batch): the callers' masks give them zero
        # weight, and zeroing them here would cost a trip through registers before the dots
        row = (b * TK + n0).to(tl.int32)
        kt = k.load([row, (hk * DK).to(tl.int32)])
        vt = v.load([row, (hk * DV).to(tl.int32)])
    else:
        kv_row = (b.to(tl.int64) * TK + keys) * HK + hk
        k_ptr = k + kv_row[:, None] * DK + dk[None, :]
        v_ptr = v + kv_row[:, None] * DV + dv[None, :]
        if MASKED:
            key_ok = keys < end
            kt = tl.load(k_ptr, mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
            vt = tl.load(v_ptr, mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
        else:
            kt = tl.load(k_ptr, mask=dk[None, :] < DK, other=0.0)
            vt = tl.load(v_ptr, mask=dv[None, :] < DV, other=0.0)
    return keys, kt, vt


# TK: the keys; in the compressed branch, the batch's compressed tokens (kernels/triton_utils.py)
@triton.jit(do_not_specialize=["TK"])
def _range_attn_fwd(
    q, k, v, o, lse, lo, hi,
    T, TK, HQ, HK, scale_log2,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    T_BUCKET, TK_BUCKET,  # unused: the autotuning key (_autotuned)
    LSE_ONLY: tl.constexpr = False,  # the lse alone (range_attention_lse): no V read, no P V product, no o
):
    pid_m = _longest_first(T, G, BLOCK_M)
    b = tl.program_id(1) // HK
    hk = tl.program_id(1) % HK
    tok, flat, row_ok = _row_pointers(pid_m, b, hk, T, HQ, G, BLOCK_M)
    row_lo = tl.load(lo + tok, mask=row_ok, other=0)
    row_hi = tl.load(hi + tok, mask=row_ok, other=0)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
    k, v = kv_sources(k, v, b, TK, HK, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_N, TMA)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    start = tl.min(tl.where(row_ok & (row_lo < row_hi), row_lo, TK))
    end = tl.max(tl.where(row_ok, row_hi, 0))
    # keys every row of the tile sees (none if one row sees nothing)
    mid_lo, mid_hi = _split_loop(start, end, tl.max(tl.where(row_ok, row_lo, 0)),
                                 tl.min(tl.where(row_ok, row_hi, TK)), BLOCK_N)
    for n0 in range(start, mid_lo, BLOCK_N):
        keys, kt, vt = _key_tile(k, v, b, hk, n0, end, TK, HK, dk, dv, DK, DV, BLOCK_N, True, TMA)
        visible = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
        m, l_sum, acc = _fwd_step(qt, kt, vt, visible, m, l_sum, acc, scale_log2, PRECISION, True, LSE_ONLY)
    for n0 in range(mid_lo, mid_hi, BLOCK_N):
        keys, kt, vt = _key_tile(k, v, b, hk, n0, end, TK, HK, dk, dv, DK, DV, BLOCK_N, False, TMA)
        m, l_sum, acc = _fwd_step(qt, kt, vt, None, m, l_sum, acc, scale_log2, PRECISION, False, LSE_ONLY)
    for n0 in range(mid_hi, end, BLOCK_N):
        keys, kt, vt = _key_tile(k, v, b, hk, n0, end, TK, HK, dk, dv, DK, DV, BLOCK_N, True, TMA)
        visible = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
        m, l_sum, acc = _fwd_step(qt, kt, vt, visible, m, l_sum, acc, scale_log2, PRECISION, True, LSE_ONLY)
    if LSE_ONLY:
        seen = l_sum > 0
        row_lse = tl.where(seen, (m + tl.log2(tl.where(seen, l_sum, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse + flat, row_lse, mask=row_ok)
    else:
        store_rows(o, lse, flat, row_ok, dv, DV, m, l_sum, acc)


@triton.jit
def _fwd_step(qt, kt, vt, visible, m, l_sum, acc, scale_log2, PRECISION: tl.constexpr, MASKED: tl.constexpr,
              LSE_ONLY: tl.constexpr):
    """online_softmax_step, or with LSE_ONLY its running max and sum alone (acc passed through; vt unused,
    so its load is dropped by the compiler)."""
    if LSE_ONLY:
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
        if MASKED:
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_sum = l_sum * tl.exp2(m - shift) + tl.sum(tl.exp2(s - shift[:, None]), 1)
        return m_new, l_sum, acc
    return online_softmax_step(qt, kt, vt, visible, m, l_sum, acc, scale_log2, PRECISION, MASKED)


@triton.jit
def dq_step(qt, dot, kt, vt, visible, row_lse, row_delta, acc, scale_log2, PRECISION: tl.constexpr,
             MASKED: tl.constexpr):
    """One key tile of dQ: acc += dS @ K with dS = P * (dO V^T - delta)."""
    s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
    p = tl.exp2(s - row_lse[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(dot, tl.trans(vt), input_precision=PRECISION)
    ds = p * (dp - row_delta[:, None])
    return acc + tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)


@triton.jit
def dq_step_keys(qt, dot, kt, vt, visible, row_lse, row_delta, acc_t, scale_log2, PRECISION: tl.constexpr):
    """dq_step with the key tile as the dots' first operand (as online_softmax_step_keys): P, dP and dS come
    out [keys, rows], and acc_t [Dk, rows] += K^T dS^T. visible: [keys, 1] or [keys, rows]."""
    s = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * scale_log2
    p = tl.where(visible, tl.exp2(s - row_lse[None, :]), 0.0)
    dp = tl.dot(vt, tl.trans(dot), input_precision=PRECISION)
    ds = p * (dp - row_delta[None, :])
    return acc_t + tl.dot(tl.trans(kt), ds.to(kt.dtype), input_precision=PRECISION)


@triton.jit(do_not_specialize=["TK"])
def _range_attn_bwd_dq(
    q, k, v, do, lse, delta, dq, lo, hi,
    T, TK, HQ, HK, scale_log2, scale,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    T_BUCKET, TK_BUCKET,  # unused: the autotuning key (_autotuned)
):
    pid_m = _longest_first(T, G, BLOCK_M)
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
    k, v = kv_sources(k, v, b, TK, HK, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_N, TMA)

    acc = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    start = tl.min(tl.where(row_ok & (row_lo < row_hi), row_lo, TK))
    end = tl.max(tl.where(row_ok, row_hi, 0))
    mid_lo, mid_hi = _split_loop(start, end, tl.max(tl.where(row_ok, row_lo, 0)),
                                 tl.min(tl.where(row_ok, row_hi, TK)), BLOCK_N)
    for n0 in range(start, mid_lo, BLOCK_N):
        keys, kt, vt = _key_tile(k, v, b, hk, n0, end, TK, HK, dk, dv, DK, DV, BLOCK_N, True, TMA)
        visible = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
        acc = dq_step(qt, dot, kt, vt, visible, row_lse, row_delta, acc, scale_log2, PRECISION, True)
    for n0 in range(mid_lo, mid_hi, BLOCK_N):
        keys, kt, vt = _key_tile(k, v, b, hk, n0, end, TK, HK, dk, dv, DK, DV, BLOCK_N, False, TMA)
        acc = dq_step(qt, dot, kt, vt, None, row_lse, row_delta, acc, scale_log2, PRECISION, False)
    for n0 in range(mid_hi, end, BLOCK_N):
        keys, kt, vt = _key_tile(k, v, b, hk, n0, end, TK, HK, dk, dv, DK, DV, BLOCK_N, True, TMA)
        visible = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
        acc = dq_step(qt, dot, kt, vt, visible, row_lse, row_delta, acc, scale_log2, PRECISION, True)
    tl.store(dq + flat[:, None] * DK + dk[None, :], (acc * scale).to(dq.dtype.element_ty),
             mask=row_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def _dkv_step(q, do, lse, delta, lo, hi, dq_acc, b, hk, r0, row_end, keys, kt, vt, acc_k, acc_v, dk, dv,
              T, HQ, scale_log2, scale, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr = False,
              DQ_TMA: tl.constexpr = False, STATS_TMA: tl.constexpr = False):
    """Rows r0 .. r0 + BLOCK_M - 1 into dK, dV of one key tile, transposed (keys are the dots' rows):
    acc_v += P^T dO, acc_k += dS^T Q with dS^T = P^T * (scale * V dO^T - delta), the softmax scale folded into
    dS (so acc_k is dK itself). lse and delta come as dkv_row_stats makes them: lse in base 2 (0 for rows
    that see nothing), delta times scale; STATS_TMA: they are TMA descriptors over [B * T, HQ]. An
    unmasked tile's rows all exist and see every key of the tile, by construction. With an fp32 dq_acc (the
    one-pass backward), the rows' dQ share, dS K, is added into it atomically (DQ_TMA: dq_acc is a TMA
    descriptor, and the tile goes in one bulk reduction); None leaves dQ to its own kernel."""
    rows = r0 + tl.arange(0, BLOCK_M)
    tok = rows // G
    flat = (b.to(tl.int64) * T + tok) * HQ + hk * G + rows % G
    # (the pointer path's statements in their order before the TMA path, which keeps its PTX as it was;
    # loading lse and delta first had moved the one pass's spills)
    if TMA:  # q and do: row_sources' descriptors; r0 is a multiple of G. Rows past row_end get zero weight
        if MASKED:
            row_ok = rows < row_end
        at = [(b * T + r0 // G).to(tl.int32), (hk * G).to(tl.int32), 0]
        qt = tl.reshape(q.load(at), [BLOCK_M, DK])
        dot = tl.reshape(do.load(at), [BLOCK_M, DV])
    else:
        q_ptr = q + flat[:, None] * DK + dk[None, :]
        do_ptr = do + flat[:, None] * DV + dv[None, :]
        if MASKED:
            row_ok = rows < row_end
            qt = tl.load(q_ptr, mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
            dot = tl.load(do_ptr, mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
        else:
            qt = tl.load(q_ptr, mask=dk[None, :] < DK, other=0.0)
            dot = tl.load(do_ptr, mask=dv[None, :] < DV, other=0.0)
    if STATS_TMA:  # rows past row_end get real rows' (or, past the batch, zero) stats and zero weight
        at = [(b * T + r0 // G).to(tl.int32), (hk * G).to(tl.int32)]
        row_lse = tl.reshape(lse.load(at), [BLOCK_M])
        row_delta = tl.reshape(delta.load(at), [BLOCK_M])
    elif MASKED:
        row_lse = tl.load(lse + flat, mask=row_ok, other=0.0)
        row_delta = tl.load(delta + flat, mask=row_ok, other=0.0)
    else:
        row_lse = tl.load(lse + flat)
        row_delta = tl.load(delta + flat)
    s_t = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * scale_log2
    p_t = tl.exp2(s_t - row_lse[None, :])
    if MASKED:
        row_lo = tl.load(lo + tok, mask=row_ok, other=0)
        row_hi = tl.load(hi + tok, mask=row_ok, other=0)
        visible = row_ok[None, :] & (keys[:, None] >= row_lo[None, :]) & (keys[:, None] < row_hi[None, :])
        p_t = tl.where(visible, p_t, 0.0)
    acc_v += tl.dot(p_t.to(dot.dtype), dot, input_precision=PRECISION)
    dp_t = tl.dot(vt, tl.trans(dot), input_precision=PRECISION)
    ds_t = (p_t * (dp_t * scale - row_delta[None, :])).to(qt.dtype)
    acc_k += tl.dot(ds_t, qt, input_precision=PRECISION)
    if dq_acc is not None:
        dq_part = tl.dot(tl.trans(ds_t), kt, input_precision=PRECISION)
        if DQ_TMA:  # one bulk reduction of the tile (rows outside the chunk add zeros: their p_t is 0)
            at = [(b * T + r0 // G).to(tl.int32), (hk * G).to(tl.int32), 0]
            dq_acc.atomic_add(at, tl.reshape(dq_part, [BLOCK_M // G, G, dq_part.shape[1]]))
        else:
            dq_ptr = dq_acc + flat[:, None] * DK + dk[None, :]
            if MASKED:
                tl.atomic_add(dq_ptr, dq_part, mask=row_ok[:, None] & (dk[None, :] < DK), sem="relaxed")
            else:
                tl.atomic_add(dq_ptr, dq_part, mask=dk[None, :] < DK, sem="relaxed")
    return acc_k, acc_v


@triton.jit
def _dkv_tile(k, v, qlo, qhi, pid_n, b, hk, T, TK, HK, dk, dv, G: tl.constexpr, DK: tl.constexpr,
              DV: tl.constexpr, BLOCK_N: tl.constexpr, KV_REGS: tl.constexpr = False):
    """A dK/dV program's key tile: keys, key_ok, their (b, key, head) rows, K and V tiles, and the rows
    (token, head) [row_start, row_end) of the queries that may see any of its keys, [full_lo, full_hi)
    of those that see all of them (empty if the tile has a missing key or one nobody sees). KV_REGS: K and V
    are made in registers after loading (a select that changes nothing: missing keys loaded as zeros), so
    that an sm_90a compile takes them as the S^T and dP^T dots' first operand from registers instead of
    reading them from shared memory at every step; it needs a tile that leaves registers for them. Not in the
    autotuner's lists: on one H100 (e897e0a, benchmarks/gpu_checks/kv_regs/) the tiles that hold them without
    spilling (32 x 64 keys, 4 warps) ran 1.05-1.09x the same tile without it in the compressed one pass, and
    0.97-0.98x in the window's split dK/dV, but every one of them slower than the pick (0.70-0.98x)."""
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < TK
    kv_row = (b.to(tl.int64) * TK + keys) * HK + hk
    kt = tl.load(k + kv_row[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
    vt = tl.load(v + kv_row[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
    if KV_REGS:
        kt = tl.where(key_ok[:, None], kt, 0.0).to(k.dtype.element_ty)
        vt = tl.where(key_ok[:, None], vt, 0.0).to(v.dtype.element_ty)
    key_qlo = tl.load(qlo + keys, mask=key_ok, other=0)
    key_qhi = tl.load(qhi + keys, mask=key_ok, other=0)
    row_start = tl.min(tl.where(key_ok & (key_qlo < key_qhi), key_qlo, T)) * G
    row_end = tl.max(tl.where(key_ok, key_qhi, 0)) * G
    full_lo = tl.max(tl.where(key_ok, key_qlo, T)) * G
    full_hi = tl.min(tl.where(key_ok, key_qhi, 0)) * G
    return keys, key_ok, kv_row, kt, vt, row_start, row_end, full_lo, full_hi


@triton.jit(do_not_specialize=["TK", "NUM_SPLITS"])
def _range_attn_bwd_dkv(
    q, k, v, do, lse, delta, dk_out, dv_out, lo, hi, qlo, qhi,
    B, T, TK, HQ, HK, scale_log2, scale, NUM_SPLITS,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    T_BUCKET, TK_BUCKET,  # unused: the autotuning key (_autotuned)
    ALIGNED_ROWS: tl.constexpr = False, STATS_TMA: tl.constexpr = False, KV_REGS: tl.constexpr = False,
):
    """dK and dV of one key tile (axis 0) over its share (axis 2) of the rows that see it. ALIGNED_ROWS: the
    rows that see the whole tile are visited from the tile whose index is a multiple of their count,
    wrapping round, instead of from the first: where every key tile is seen by as many rows (the window
    branch), neighbouring key tiles, which run at the same time, then read each row tile at the same step,
    so that it comes from L2 after the first of them. In order, key tile p + 1 reads a row tile
    BLOCK_N * G / BLOCK_M steps before key tile p: at 128K, G = 16, D = 128 the programs in flight read some
    70 MB of q and dO in between, more than L2 holds. Measured on one H100 (benchmarks/kernels-exp-aligned-rows.py,
    benchmarks/aligned-rows-*-h100-33a55b5.json; the window's split backward, both orders alternated twice):
    1.02x at 16K and 128K, 1.03x at 64K (HQ = 64, HK = 4, D = 128), 1.05x at the proof model's 16 / 1 heads of
    64 over 2K documents. So the order is not what holds the window backward at twice its floor.
    STATS_TMA: lse and delta by TMA copies (row_stats_sources, TMA_ROW_STATS). KV_REGS: see _dkv_tile."""
    b = tl.program_id(1) // HK
    hk = tl.program_id(1) % HK
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    keys, key_ok, kv_row, kt, vt, row_start, row_end, full_lo, full_hi = _dkv_tile(
        k, v, qlo, qhi, tl.program_id(0), b, hk, T, TK, HK, dk, dv, G, DK, DV, BLOCK_N, KV_REGS)
    q, do = row_sources(q, do, b, T, HQ, G, DK, DV, BLOCK_M, TMA)
    lse, delta = row_stats_sources(lse, delta, b, T, HQ, G, BLOCK_M, STATS_TMA)
    # this program's share of the rows
    share = tl.cdiv(tl.cdiv(tl.maximum(row_end - row_start, 0), NUM_SPLITS), BLOCK_M) * BLOCK_M
    split = tl.program_id(2)
    split_lo = row_start + split * share
    split_hi = tl.minimum(split_lo + share, row_end)
    mid_lo, mid_hi = _split_loop(split_lo, split_hi, full_lo, full_hi, BLOCK_M)

    acc_k = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for r0 in range(split_lo, mid_lo, BLOCK_M):
        acc_k, acc_v = _dkv_step(q, do, lse, delta, lo, hi, None, b, hk, r0, split_hi, keys, kt, vt, acc_k, acc_v,
                                 dk, dv, T, HQ, scale_log2, scale, G, DK, DV, BLOCK_M, PRECISION, True, TMA,
                                 STATS_TMA=STATS_TMA)
    turn = mid_lo  # the unmasked tiles from `turn` to mid_hi, then (ALIGNED_ROWS) from mid_lo to `turn`
    if ALIGNED_ROWS:
        count = tl.maximum((mid_hi - mid_lo) // BLOCK_M, 1)
        turn = mid_lo + (count - (mid_lo // BLOCK_M) % count) % count * BLOCK_M
    for r0 in range(turn, mid_hi, BLOCK_M):
        acc_k, acc_v = _dkv_step(q, do, lse, delta, lo, hi, None, b, hk, r0, split_hi, keys, kt, vt, acc_k, acc_v,
                                 dk, dv, T, HQ, scale_log2, scale, G, DK, DV, BLOCK_M, PRECISION, False, TMA,
                                 STATS_TMA=STATS_TMA)
    if ALIGNED_ROWS:
        for r0 in range(mid_lo, turn, BLOCK_M):
            acc_k, acc_v = _dkv_step(q, do, lse, delta, lo, hi, None, b, hk, r0, split_hi, keys, kt, vt, acc_k,
                                     acc_v, dk, dv, T, HQ, scale_log2, scale, G, DK, DV, BLOCK_M, PRECISION, False,
                                     TMA, STATS_TMA=STATS_TMA)
    for r0 in range(mid_hi, split_hi, BLOCK_M):
        acc_k, acc_v = _dkv_step(q, do, lse, delta, lo, hi, None, b, hk, r0, split_hi, keys, kt, vt, acc_k, acc_v,
                                 dk, dv, T, HQ, scale_log2, scale, G, DK, DV, BLOCK_M, PRECISION, True, TMA,
                                 STATS_TMA=STATS_TMA)
    out_row = split.to(tl.int64) * B * TK * HK + kv_row  # split s writes slice s of [NUM_SPLITS, B, TK, HK, D]
    tl.store(dk_out + out_row[:, None] * DK + dk[None, :], acc_k.to(dk_out.dtype.element_ty),
             mask=key_ok[:, None] & (dk[None, :] < DK))
    tl.store(dv_out + out_row[:, None] * DV + dv[None, :], acc_v.to(dv_out.dtype.element_ty),
             mask=key_ok[:, None] & (dv[None, :] < DV))


@triton.jit(do_not_specialize=["TK"])
def _range_attn_bwd_onepass(
    q, k, v, do, lse, delta, dq_acc, dk_acc, dv_acc, lo, hi, qlo, qhi,
    T, TK, HQ, HK, scale_log2, scale,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    T_BUCKET, TK_BUCKET,  # unused: the autotuning key (_autotuned)
    DQ_TMA: tl.constexpr = False, STATS_TMA: tl.constexpr = False, KV_REGS: tl.constexpr = False,
):
    """dQ, dK and dV in one pass (S and dP computed once per (row tile, key tile)): program (key tile,
    chunk c, batch x KV head) takes the rows of chunk c of its key tile and adds its dQ, dK and dV
    shares atomically into fp32 buffers (dq_acc [B, T, HQ, DK], dk_acc/dv_acc [B, TK, HK, D], zeroed).
    Chunks hold the same number of rows for every key tile (a multiple of BLOCK_M), counted back from
    the tile's last row: in the compressed branch every key is seen up to the last query, so the
    programs that run together (the key tiles of one chunk, axis 0 running fastest) walk the same rows
    and their dQ additions meet in L2. Chunks past a key tile's first row have no rows (and add nothing).
    DQ_TMA: each row tile's dQ share goes to dq_acc as one TMA bulk reduction (the tile staged in shared
    memory) instead of fp32 atomics from every thread (TMA_DQ_REDUCE). STATS_TMA: each row tile's lse and
    delta come by two TMA copies instead of every thread loading those of its columns of the transposed
    scores (TMA_ROW_STATS). KV_REGS: see _dkv_tile."""
    b = tl.program_id(2) // HK
    hk = tl.program_id(2) % HK
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    keys, key_ok, kv_row, kt, vt, row_start, row_end, full_lo, full_hi = _dkv_tile(
        k, v, qlo, qhi, tl.program_id(0), b, hk, T, TK, HK, dk, dv, G, DK, DV, BLOCK_N, KV_REGS)
    q, do = row_sources(q, do, b, T, HQ, G, DK, DV, BLOCK_M, TMA)
    if DQ_TMA:
        dq_acc = tl.make_tensor_descriptor(dq_acc, shape=[((b + 1) * T).to(tl.int32), HQ, DK],
                                           strides=[HQ * DK, DK, 1], block_shape=[BLOCK_M // G, G, BLOCK_DK])
    lse, delta = row_stats_sources(lse, delta, b, T, HQ, G, BLOCK_M, STATS_TMA)
    chunk_rows = tl.cdiv(tl.cdiv(T * G, tl.num_programs(1)), BLOCK_M) * BLOCK_M
    chunk_hi = row_end - tl.program_id(1) * chunk_rows
    chunk_lo = tl.maximum(chunk_hi - chunk_rows, row_start)
    mid_lo, mid_hi = _split_loop(chunk_lo, chunk_hi, full_lo, full_hi, BLOCK_M)

    acc_k = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for r0 in range(chunk_lo, mid_lo, BLOCK_M):
        acc_k, acc_v = _dkv_step(q, do, lse, delta, lo, hi, dq_acc, b, hk, r0, chunk_hi, keys, kt, vt, acc_k,
                                 acc_v, dk, dv, T, HQ, scale_log2, scale, G, DK, DV, BLOCK_M, PRECISION, True, TMA,
                                 DQ_TMA, STATS_TMA)
    for r0 in range(mid_lo, mid_hi, BLOCK_M):
        acc_k, acc_v = _dkv_step(q, do, lse, delta, lo, hi, dq_acc, b, hk, r0, chunk_hi, keys, kt, vt, acc_k,
                                 acc_v, dk, dv, T, HQ, scale_log2, scale, G, DK, DV, BLOCK_M, PRECISION, False, TMA,
                                 DQ_TMA, STATS_TMA)
    for r0 in range(mid_hi, chunk_hi, BLOCK_M):
        acc_k, acc_v = _dkv_step(q, do, lse, delta, lo, hi, dq_acc, b, hk, r0, chunk_hi, keys, kt, vt, acc_k,
                                 acc_v, dk, dv, T, HQ, scale_log2, scale, G, DK, DV, BLOCK_M, PRECISION, True, TMA,
                                 DQ_TMA, STATS_TMA)
    has_rows = chunk_lo < chunk_hi
    tl.atomic_add(dk_acc + kv_row[:, None] * DK + dk[None, :], acc_k,
                  mask=has_rows & key_ok[:, None] & (dk[None, :] < DK), sem="relaxed")
    tl.atomic_add(dv_acc + kv_row[:, None] * DV + dv[None, :], acc_v,
                  mask=has_rows & key_ok[:, None] & (dv[None, :] < DV), sem="relaxed")


@triton.jit
def _delta_kernel(o, do, dlse, gate, d_o, d_gate, delta, R, DV: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_GATE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    dv = tl.arange(0, BLOCK_DV)
    offs = rows[:, None] * DV + dv[None, :]
    mask = row_ok[:, None] & (dv[None, :] < DV)
    out = tl.load(o + offs, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(do + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:  # grad is the gated sum's: the gate's gradient, then the branch's, g * grad, rounded as stored
        tl.store(d_gate + rows, tl.sum(out * grad, 1).to(d_gate.dtype.element_ty), mask=row_ok)
        g = tl.load(gate + rows, mask=row_ok, other=0.0).to(tl.float32)
        gated = (g[:, None] * grad).to(d_o.dtype.element_ty)
        tl.store(d_o + offs, gated, mask=mask)
        grad = gated.to(tl.float32)
    row_delta = tl.sum(out * grad, 1)
    if HAS_DLSE:
        row_delta -= tl.load(dlse + rows, mask=row_ok, other=0.0)
    tl.store(delta + rows, row_delta, mask=row_ok)


def attention_delta(o: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None,
                    gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward's correction term delta = rowsum(o * dO) - dlse, fp32 [B, T, HQ] (dL/ds = p * (dp -
    delta); a gradient on lse folds in here), in one pass over o and dO ([B, T, HQ, Dv] contiguous).

    gate: the branch's gate in NSA's gated sum ([B, T, HQ], any float dtype), or None. With a gate, `do` is
    the gated sum's gradient, and the same pass makes the gate's gradient, rowsum(o * dO) in the gate's
    dtype, and the branch output's, g * dO in o's dtype, which delta then uses. Returns (delta, the branch
    output's gradient, the gate's gradient or None); without a gate the second is `do` itself."""
    rows, dv = o.numel() // o.shape[-1], o.shape[-1]
    delta = torch.empty(o.shape[:-1], dtype=torch.float32, device=o.device)
    dlse = dlse.float().contiguous() if dlse is not None else None
    d_o, d_gate = (torch.empty_like(o), torch.empty_like(gate)) if gate is not None else (do, None)
    block_r = 16
    _delta_kernel[(triton.cdiv(rows, block_r),)](
        o, do, dlse if dlse is not None else delta, gate if gate is not None else delta, d_o,
        d_gate if d_gate is not None else delta, delta, rows,
        DV=dv, BLOCK_R=block_r, BLOCK_DV=pow2(dv), HAS_DLSE=dlse is not None, HAS_GATE=gate is not None,
    )
    return delta, d_o, d_gate


_KERNELS = {"fwd": _range_attn_fwd, "dq": _range_attn_bwd_dq, "dkv": _range_attn_bwd_dkv,
            "onepass": _range_attn_bwd_onepass}
_TUNED = {name: _autotuned(kernel, name, ["dq_acc", "dk_acc", "dv_acc"] if name == "onepass" else None)
          for name, kernel in _KERNELS.items()}
_MAX_SPLITS = 32
_SPLIT_KEYS = 64  # keys per tile assumed when choosing the dK/dV split (the autotuned tile may differ)

# One-pass grid: about this many times programs_wanted programs (key tiles x chunks of rows; in the
# compressed branch about half of them have rows), so that the longest, a chunk of key tile 0, is
# short and leaves a short tail. Measured at 128K: 1 -> 137.3 ms, 4 -> 125.2, 16 -> 119.3.
ONEPASS_CHUNKING = 16
_MAX_CHUNKS = 64


def _launch(name, device, grid, *args, **consts):
    """Runs kernel `name`: autotuned on the GPU, the fixed CPU tiles under the interpreter. grid maps
    the tile sizes (a dict with BLOCK_M, BLOCK_N) to the launch grid. Under PyTorch's deterministic
    algorithms (training.deterministic) the GPU takes the first candidate config, not the search's pick:
    the search times the candidates, so two runs may pick other tiles, which sum in another order. Where
    LAUNCH sets the kernel, the GPU takes that config. In compile_ahead's dry pass every candidate is
    recorded for compiling, and nothing runs. Under the interpreter LAUNCH's tile sizes and flags apply too."""
    if device.type == "cpu":  # LAUNCH's tiles and flags (KV_REGS) apply, not its warps and stages
        tiles = {**_CPU_TILES, **LAUNCH[name].kwargs} if name in LAUNCH else _CPU_TILES
        _KERNELS[name][grid(tiles)](*args, **consts, **tiles)
    elif name in LAUNCH or torch.are_deterministic_algorithms_enabled():
        config = LAUNCH[name] if name in LAUNCH else _candidates(name, **consts)[0]
        _KERNELS[name][grid(config.kwargs)](*args, **consts, **config.kwargs, num_warps=config.num_warps,
                                            num_stages=config.num_stages)
    elif compile_ahead.recording():
        _TUNED[name].warmup(*args, grid=grid, **consts)
    else:
        _TUNED[name][grid](*args, **consts)


def use_tma(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wanted: bool = False) -> bool:
    """Whether `kernel` copies its tiles through TMA descriptors: TMA_LOADS names it, or the caller wants it
    for these inputs (the compressed branch's forward over long documents), and the inputs fit
    (triton_utils.tma_unfit). Shapes that do not fit take the pointer loads, as they always could."""
    return (wanted or kernel in TMA_LOADS) and tma_unfit(q, k, v, whole_groups=True) is None


def use_dq_reduce(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the one-pass backward adds dQ through TMA bulk reductions: TMA_DQ_REDUCE, for inputs that fit a
    descriptor (triton_utils.tma_unfit)."""
    return TMA_DQ_REDUCE and tma_unfit(q, k, v, whole_groups=True) is None


def use_row_stats_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the dK/dV kernels (one pass and split) read lse and delta through TMA descriptors: TMA_ROW_STATS,
    for inputs that fit a descriptor (triton_utils.tma_unfit) with groups of at least 4 query heads (a copy's
    [tokens, G] fp32 tile needs rows of 16 bytes or more)."""
    return TMA_ROW_STATS and q.shape[2] // k.shape[2] >= 4 and tma_unfit(q, k, v, whole_groups=True) is None


def dkv_row_stats(lse: torch.Tensor, delta: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The dK/dV kernels' per-row inputs (_dkv_step): lse in base 2, 0 where a row sees no key (-inf), and delta
    times the softmax scale, which _dkv_step folds into dS. Made once a backward, so that the kernels' inner
    steps do neither for every (row, key tile) pair."""
    return torch.where(lse == float("-inf"), 0.0, lse * LOG2E), delta * scale


def _launch_args(q, k, v, scale):
    group = q.shape[2] // k.shape[2]
    return dict(
        G=group, DK=q.shape[-1], DV=v.shape[-1], BLOCK_DK=pow2(q.shape[-1]), BLOCK_DV=pow2(v.shape[-1]),
        PRECISION=dot_precision(q.dtype), T_BUCKET=pow2(q.shape[1]), TK_BUCKET=pow2(k.shape[1]),
    ), (q.shape[1], k.shape[1], q.shape[2], k.shape[2], scale * LOG2E)


def range_attention_fwd(q, k, v, lo, hi, scale, tma=False):
    """(o, lse) of RangeAttention's forward; tma: copy the K/V tiles through TMA descriptors where the inputs
    fit, whatever TMA_LOADS says (use_tma)."""
    batch, seq, num_q_heads, _ = q.shape
    consts, sizes = _launch_args(q, k, v, scale)
    o = poisoned((batch, seq, num_q_heads, v.shape[-1]), q.dtype, q.device)
    lse = poisoned((batch, seq, num_q_heads), torch.float32, q.device)

    def grid(tiles):
        return (triton.cdiv(seq * consts["G"], tiles["BLOCK_M"]), batch * k.shape[2])

    _launch("fwd", q.device, grid, q, k, v, o, lse, lo, hi, *sizes, **consts, TMA=use_tma("fwd", q, k, v, tma))
    return o, lse


def range_attention_lse(q, k, lo, hi, scale):
    """lse [B, T, HQ] float32 of range_attention_fwd without its output: each query row's natural
    log-sum-exp of scale * q.k over its key range (-inf where the range is empty). The same kernel with its
    V read and P V product left out (LSE_ONLY), autotuned on its own: top-n's exact score
    (kernels/block_selection/triton.py). Not differentiable."""
    batch, seq, num_q_heads, _ = q.shape
    consts, sizes = _launch_args(q, k, k, scale)
    lse = poisoned((batch, seq, num_q_heads), torch.float32, q.device)

    def grid(tiles):
        return (triton.cdiv(seq * consts["G"], tiles["BLOCK_M"]), batch * k.shape[2])

    # o: lse stands in for it, never written
    _launch("fwd", q.device, grid, q, k, k, lse, lse, lo, hi, *sizes, **consts, TMA=False, LSE_ONLY=True)
    return lse


def range_attention_bwd(q, k, v, lse, do, delta, lo, hi, qlo, qhi, scale, one_pass, aligned_rows=False):
    """(dq, dk, dv) in the dtypes of q, k, v, given the output's gradient do and attention_delta's delta: by
    the one-pass backward if one_pass, else by the split one, whose dK/dV kernel visits its rows in the
    order ALIGNED_ROWS describes (_range_attn_bwd_dkv) if aligned_rows.
    The one pass adds in fp32 atomics, in any order, so its gradients vary in the last bits from run to
    run: when PyTorch is asked for deterministic algorithms the split path runs instead."""
    if one_pass and not torch.are_deterministic_algorithms_enabled():
        return _bwd_one_pass(q, k, v, lse, do, delta, lo, hi, qlo, qhi, scale)
    return _bwd_split(q, k, v, lse, do, delta, lo, hi, qlo, qhi, scale, aligned_rows)


def _bwd_one_pass(q, k, v, lse, do, delta, lo, hi, qlo, qhi, scale):
    """One kernel over key tiles and chunks of their rows, fp32 atomics into dQ, dK, dV (then cast)."""
    batch = q.shape[0]
    consts, sizes = _launch_args(q, k, v, scale)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)

    def grid(tiles):
        key_tiles = triton.cdiv(k.shape[1], tiles["BLOCK_N"])
        key_programs = max(1, key_tiles * batch * k.shape[2])
        chunks = triton.cdiv(ONEPASS_CHUNKING * programs_wanted(q.device), key_programs)
        return (key_tiles, max(1, min(_MAX_CHUNKS, chunks)), batch * k.shape[2])

    row_lse, row_delta = dkv_row_stats(lse, delta, scale)
    _launch("onepass", q.device, grid, q, k, v, do, row_lse, row_delta, dq_acc, dk_acc, dv_acc, lo, hi, qlo, qhi,
            *sizes, scale, **consts, TMA=use_tma("onepass", q, k, v), DQ_TMA=use_dq_reduce(q, k, v),
            STATS_TMA=use_row_stats_tma(q, k, v))
    return dq_acc.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


def _bwd_split(q, k, v, lse, do, delta, lo, hi, qlo, qhi, scale, aligned_rows=False):
    """dQ by row tiles, then dK/dV by key tiles (split over rows into fp32 partials where key tiles are
    too few); each recomputes S and dP, no atomics, deterministic."""
    batch, seq, _, _ = q.shape
    consts, sizes = _launch_args(q, k, v, scale)
    dq = poisoned(q.shape, q.dtype, q.device)
    dk = poisoned(k.shape, k.dtype, k.device)
    dv = poisoned(v.shape, v.dtype, v.device)

    def grid_q(tiles):
        return (triton.cdiv(seq * consts["G"], tiles["BLOCK_M"]), batch * k.shape[2])

    _launch("dq", q.device, grid_q, q, k, v, do, lse, delta, dq, lo, hi, *sizes, scale, **consts,
            TMA=use_tma("dq", q, k, v))
    key_programs = max(1, triton.cdiv(k.shape[1], _SPLIT_KEYS) * batch * k.shape[2])
    splits = max(1, min(_MAX_SPLITS, programs_wanted(q.device) // key_programs))
    if splits > 1:
        dk_parts = poisoned((splits, *k.shape), torch.float32, k.device)
        dv_parts = poisoned((splits, *v.shape), torch.float32, v.device)
    else:
        dk_parts, dv_parts = dk, dv

    def grid_k(tiles):
        return (triton.cdiv(k.shape[1], tiles["BLOCK_N"]), batch * k.shape[2], splits)

    row_lse, row_delta = dkv_row_stats(lse, delta, scale)
    _launch("dkv", q.device, grid_k, q, k, v, do, row_lse, row_delta, dk_parts, dv_parts, lo, hi, qlo, qhi, batch,
            *sizes, scale, splits, **consts, TMA=use_tma("dkv", q, k, v), ALIGNED_ROWS=aligned_rows,
            STATS_TMA=use_row_stats_tma(q, k, v))
    if splits > 1:
        dk.copy_(dk_parts.sum(0))
        dv.copy_(dv_parts.sum(0))
    return dq, dk, dv


class RangeAttention(torch.autograd.Function):
    """(o, lse) = softmax attention of each query over its key range; differentiable in q, k, v.

    q: [B, T, HQ, Dk]; k: [B, TK, HK, Dk]; v: [B, TK, HK, Dv]; contiguous, one dtype.
    lo, hi: [T] int32, query token t sees keys lo[t] <= s < hi[t] (empty when lo >= hi).
    qlo, qhi: [TK] int32, key s is seen by exactly the query tokens qlo[s] <= t < qhi[s] (qlo >= qhi: by
    none): the inverse of lo/hi, which the dK/dV kernel uses to bound its rows and to skip the mask.
    one_pass, aligned_rows: the backward path (range_attention_bwd).
    tma_forward: the forward copies its K/V tiles through TMA where the inputs fit (range_attention_fwd).
    gate: None, or the branch's gate in NSA's gated sum ([B, T, HQ] contiguous): o is returned ungated for
    kernels.gate_combine.triton.gated_sum_triton, whose backward hands o the sum's gradient as it is, and
    this backward applies the gate (attention_delta) and returns the gate's gradient too.
    Returns o: [B, T, HQ, Dv] q.dtype (0 where nothing is visible) and lse: [B, T, HQ] float32 (-inf there).
    """

    @staticmethod
    def forward(ctx, q, k, v, lo, hi, qlo, qhi, scale, one_pass, gate=None, aligned_rows=False, tma_forward=False):
        o, lse = range_attention_fwd(q, k, v, lo, hi, scale, tma_forward)
        ctx.save_for_backward(q, k, v, o, lse, lo, hi, qlo, qhi, gate)
        ctx.scale = scale
        ctx.one_pass = one_pass
        ctx.aligned_rows = aligned_rows
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, lo, hi, qlo, qhi, gate = ctx.saved_tensors
        delta, do, d_gate = attention_delta(o, do.contiguous(), dlse, gate)
        dq, dk, dv = range_attention_bwd(q, k, v, lse, do, delta, lo, hi, qlo, qhi, ctx.scale, ctx.one_pass,
                                         ctx.aligned_rows)
        return dq, dk, dv, None, None, None, None, None, None, d_gate, None, None
