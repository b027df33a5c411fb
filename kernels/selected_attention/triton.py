"""Selected attention, Triton: each query over the raw tokens <= t of its GQA group's selected blocks.

Forward and dQ (paper §3.4, group-centric): one program per (query token, batch, KV head) holds all G
query heads of the group as the rows of its tile (padded to >= 16 rows, the smallest tl.dot) and loops
over the group's n selected blocks, so each selected KV block is read once per group, not per head. The
loop stops after the row's last valid slot: a query near its document's start has fewer than n blocks. A
block is taken whole per loop step, or in BLOCK_K-key parts (a LAUNCH override; see _key_tiled). For
groups under 16 heads, a LAUNCH override (TOKENS; see _token_tile) runs them over tiles of consecutive
tokens instead, which walk the union of their picks once, masking each row by its token's picks. On a
GPU, groups of at most 4 heads run forward and dQ by key blocks instead (_forward_by_blocks; measured
faster there), and larger groups copy K/V through TMA descriptors (see BY_BLOCKS_LAUNCH).

dK/dV: deterministic through an inverted index, no atomics. Scattering from the query side would make
many programs add into the same popular KV block (block 0 and the local blocks are picked by every
query): a race, or atomics whose summation order varies between runs. Instead the host sorts the
(query token, KV block) pairs of block_idx by KV block (a stable sort, so tokens stay ascending) into a
CSR list: for each KV block, the query tokens of the group that picked it. A program owns one KV block
and walks its list, rows = (token, head) pairs, accumulating dK/dV in registers. Lists are cut into
segments of at most ~2x the mean list length so that block 0 (picked by all T queries) does not
serialize the backward; each segment writes an fp32 partial, and a second kernel sums a block's
partials in segment order. Every output element has exactly one writer and a fixed summation order.
"""

import functools

import torch
import triton
import triton.language as tl

from kernels.common import LAYOUT_CACHE_SIZE, default_scale, document_layout, document_of, host_bounds
from kernels.range_attention import (
    LOG2E, attention_delta, dq_step, dq_step_keys, kv_sources, online_softmax_step, online_softmax_step_keys,
    store_rows,
)
from kernels.triton_utils import (
    check_attention_inputs, check_packed, dot_precision, gate_input, launch_params, poisoned, pow2, programs_wanted,
    tma_unfit,
)

ROWS_PER_TILE = 64  # (token, head) rows per tile in the dK/dV kernel
# Launch parameters set over the defaults, per kernel: "fwd", "dq" (num_warps, num_stages, BLOCK_K: keys a
# loop step, TOKENS: tokens a program, TMA: K/V parts through TMA descriptors, KEYS_M: the dots with the
# keys as M (_keys_as_m); "fwd" also BY_BLOCKS: the forward by key blocks, with BLOCK_M, CHUNK, num_warps,
# num_stages, see _forward_by_blocks), "dkv" (BLOCK_M, num_warps, num_stages; KEYS_M: the keys as the dots'
# M, with BLOCK_N rows a step, _selected_bwd_dkv_keys_m; see _dkv_launch), "reduce" (num_warps, num_stages);
# empty in use, filled by benchmarks/kernels-exp-sweep.py
LAUNCH: dict[str, dict] = {}

# What the forward and dQ run on a GPU where LAUNCH does not set the kernel (measured on one H200, HK=4,
# D=128, bf16, at 16K and 128K; the interpreter keeps the one-token pointer kernels, and the CPU tests reach
# these paths through LAUNCH):
# - groups of at most BY_BLOCKS_UP_TO_GROUP heads: by key blocks, with BY_BLOCKS_LAUNCH. At G=4 the forward
#   ran 1.72-1.80x and dQ 1.35-1.40x the one-token kernels, which pad 4 rows to 16 and read a block's K/V for
#   every (token, pick); at G=16 by key blocks ran at 0.6x (benchmarks/gpu_checks/sweep-selected-by-blocks-01c47e8.json)
# - larger groups: the one-token kernels copying K/V through TMA descriptors where the shapes fit:
#   forward 1.11x, dQ 1.04x at G=16 (benchmarks/gpu_checks/sweep-selected-tma-01c47e8.json)
BY_BLOCKS_UP_TO_GROUP = 4
BY_BLOCKS_LAUNCH = {"fwd": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3},
                    "dq": {"BLOCK_M": 32, "num_warps": 4, "num_stages": 2}}


def _by_blocks_launch(kernel: str, group: int, on_gpu: bool, want_slot_lse: bool = False) -> dict | None:
    """The launch parameters of `kernel` ("fwd" or "dq") by key blocks, or None for the one-token kernels:
    LAUNCH[kernel] with BY_BLOCKS where LAUNCH sets the kernel, else the GPU default above (not when the
    forward is asked for slot_lse, which only the one-token forward writes)."""
    if kernel in LAUNCH:
        launch = dict(LAUNCH[kernel])
        return launch if launch.pop("BY_BLOCKS", False) else None
    if on_gpu and group <= BY_BLOCKS_UP_TO_GROUP and not want_slot_lse:
        return dict(BY_BLOCKS_LAUNCH[kernel])
    return None


# What the dK/dV kernel runs on a GPU where LAUNCH does not set it: groups of 16 heads take the kernel with the
# keys as the dots' M, one token a step (_selected_bwd_dkv_keys_m, BLOCK_N 16). On one H100 the whole selected
# backward ran 1.04x at 128K and 1.06x at 16K (HQ = 64, HK = 4, D = 128) and 1.12x at the proof model's 16 / 1
# heads of 64 at 32K, against the 64-row kernel in the same run (2929fbc, as _selected_bwd_dkv_by_token, whose
# sm_90a SASS this kernel's equals at both head dims: benchmarks/selected-dkv-sass.py;
# benchmarks/gpu_checks/dkv_keys_m/). Other groups keep the 64-row kernel: at G = 4 several tokens a step ran
# 0.94-1.02x (e897e0a).
DKV_KEYS_M_GROUP = 16
DKV_KEYS_M_LAUNCH = {"KEYS_M": True, "BLOCK_N": 16, "num_warps": 4, "num_stages": 3}


def _dkv_launch(group: int, on_gpu: bool) -> dict:
    """The dK/dV kernel's launch parameters: LAUNCH["dkv"] over the 64-row kernel's where LAUNCH sets it, else
    DKV_KEYS_M_LAUNCH for a group of DKV_KEYS_M_GROUP heads on a GPU, else the 64-row kernel's."""
    if on_gpu and group == DKV_KEYS_M_GROUP and "dkv" not in LAUNCH:
        return dict(DKV_KEYS_M_LAUNCH)
    if LAUNCH.get("dkv", {}).get("KEYS_M"):
        if "BLOCK_M" in LAUNCH["dkv"]:
            raise ValueError(f"selected attention: LAUNCH['dkv'] KEYS_M=True takes BLOCK_N (rows a step), not "
                             f"BLOCK_M={LAUNCH['dkv']['BLOCK_M']}, which is the 64-row kernel's: leave BLOCK_M out")
        return {"num_warps": 4, "num_stages": 2, **LAUNCH["dkv"]}
    # 4 warps: 28.5 ms against 56.7 with 8 at 128K, G=16 (benchmarks/kernels-notes.md, session 4)
    return launch_params(LAUNCH, "dkv", BLOCK_M=ROWS_PER_TILE, num_warps=4, num_stages=2)


def _keys_m_rows(block_n: int | None, group: int) -> int:
    """The dK/dV kernel with the keys as M (_selected_bwd_dkv_keys_m): its rows a step, BLOCK_N from LAUNCH or
    one token's heads (padded to 16, the smallest tl.dot); whole tokens, so a power of two from there."""
    least = pow2(group)
    if block_n is None:
        return least
    if block_n < least or block_n != pow2(block_n):
        raise ValueError(f"selected attention: LAUNCH['dkv'] BLOCK_N={block_n} with KEYS_M=True must be a power of "
                         f"two of at least {least} (whole tokens of a group of {group}, at least 16 rows)")
    return block_n


def _tma_by_default(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """{"TMA": True} for the one-token `kernel`'s defaults on a GPU whose TMA unit the shapes fit, where
    LAUNCH does not set the kernel (an override names TMA itself); else {}."""
    fits = kernel not in LAUNCH and q.is_cuda and tma_unfit(q, k, v, whole_groups=False) is None
    return {"TMA": True} if fits else {}


@triton.jit
def _used_slots(block_idx, row, NSEL, BLOCK_N: tl.constexpr):
    """1 + the last slot of a block_idx row that holds a block (0 if none): the slots a query walks. Top-n
    writes its picks first and -1 after them, so this is the number of picks; slots after the last valid
    one (a short document's queries have few blocks to pick) cost no loop iteration."""
    slots = tl.arange(0, BLOCK_N)
    ids = tl.load(block_idx + row * NSEL + slots, mask=slots < NSEL, other=-1)
    return tl.max(tl.where(ids >= 0, slots + 1, 0), axis=0)


@triton.jit
def _program_row(rows, ROWS: tl.constexpr):
    """The query row of a one-token program: rows[program 0] under ROWS (a launch over the rows that hold
    picks), else the program's own index."""
    if ROWS:
        return tl.load(rows + tl.program_id(0)).to(tl.int64)
    return tl.program_id(0).to(tl.int64)


@triton.jit
def _key_part(k, v, b, hk, key0, keys, key_ok, TK, HK, dk, dv, DK: tl.constexpr, DV: tl.constexpr,
              TMA: tl.constexpr):
    """The K and V rows of `keys` (key0, key0 + 1, ...: one part of a selection block), zero where not key_ok.
    k, v: pointers, or TMA descriptors (kv_sources), whose copy reads the rows whatever key_ok says (zeros
    past the batch's keys): a masked key's score is -inf and its weights in the dots zero, so its rows need
    only be finite, as they are in the model (0 * NaN would be NaN); zeroing them here would take the
    tiles through registers before the dots."""
    if TMA:
        first = (b * TK + key0).to(tl.int32)
        kt = k.load([first, (hk * DK).to(tl.int32)])
        vt = v.load([first, (hk * DV).to(tl.int32)])
    else:
        kv_row = (b * TK + keys) * HK + hk
        kt = tl.load(k + kv_row[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
        vt = tl.load(v + kv_row[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
    return kt, vt


@triton.jit
def _selected_fwd(
    q, k, v, block_idx, doc_start, o, lse, slot_lse, rows,
    T, TK, HQ, HK, NSEL, q_start, scale_log2,
    G: tl.constexpr, SEL: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SLOT_LSE: tl.constexpr,
    TMA: tl.constexpr, ROWS: tl.constexpr, KEYS_M: tl.constexpr,
):
    """KEYS_M: the dots take the key part as their first operand (online_softmax_step_keys), so their M is
    the keys and the head dim, not the group's rows. SLOT_LSE also writes each visited slot's log-sum-exp (its block's visible keys alone) to slot_lse
    [B, T, HQ, NSEL]: from the running sums before and after the slot's keys, l_after - l_before * 2^(m_before -
    m_after) (the slot's share, in the base of m_after), so the loop does no more dots. Slots past the last
    visited one are left as they were (the caller fills -inf). ROWS: program i runs the query row rows[i]
    (the rows that hold picks; the caller wrote the others' 0 and -inf), not row i."""
    t = _program_row(rows, ROWS)
    b = (tl.program_id(1) // HK).to(tl.int64)
    hk = tl.program_id(1) % HK
    pos = q_start + t
    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < G
    flat = (b * T + t) * HQ + hk * G + heads
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    offs = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    acc_t = tl.zeros([BLOCK_DV, BLOCK_G], tl.float32)  # KEYS_M: the output transposed
    row = (b * T + t) * HK + hk
    used = _used_slots(block_idx, row, NSEL, BLOCK_N)
    if used == 0:  # a row without picks (compose_nsa's window-covered rows) reads nothing more: 0 and -inf
        store_rows(o, lse, flat, head_ok, dv, DV, m, l_sum, acc)
        return
    first_key = tl.load(doc_start + t).to(tl.int64)
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=head_ok[:, None] & (dk[None, :] < DK), other=0.0)
    k, v = kv_sources(k, v, b, TK, HK, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_K, TMA)
    m_before = tl.full([BLOCK_G], float("-inf"), tl.float32)  # SLOT_LSE: the sums before the slot's first part
    l_before = tl.zeros([BLOCK_G], tl.float32)
    for it in range(used * (BLOCK_S // BLOCK_K)):
        j = tl.load(block_idx + row * NSEL + it // (BLOCK_S // BLOCK_K))
        part = (it % (BLOCK_S // BLOCK_K)) * BLOCK_K  # the part's first key's place in its selection block
        in_block = part + offs  # a key's place in its selection block
        keys = first_key + j.to(tl.int64) * SEL + in_block
        key_ok = (j >= 0) & (in_block < SEL) & (keys <= pos)
        kt, vt = _key_part(k, v, b, hk, first_key + j.to(tl.int64) * SEL + part, keys, key_ok, TK, HK, dk, dv,
                           DK, DV, TMA)
        if SLOT_LSE:
            slot_start = it % (BLOCK_S // BLOCK_K) == 0
            m_before = tl.where(slot_start, m, m_before)
            l_before = tl.where(slot_start, l_sum, l_before)
        if KEYS_M:
            m, l_sum, acc_t = online_softmax_step_keys(qt, kt, vt, key_ok[:, None], m, l_sum, acc_t, scale_log2,
                                                       PRECISION)
        else:
            m, l_sum, acc = online_softmax_step(qt, kt, vt, key_ok[None, :], m, l_sum, acc, scale_log2, PRECISION)
        if SLOT_LSE:
            shift = tl.where(m == float("-inf"), 0.0, m)
            share = l_sum - l_before * tl.exp2(m_before - shift)
            slot_value = tl.where(share > 0, (shift + tl.log2(tl.where(share > 0, share, 1.0))) * 0.6931471805599453,
                                  float("-inf"))
            slot_end = it % (BLOCK_S // BLOCK_K) == BLOCK_S // BLOCK_K - 1
            tl.store(slot_lse + flat * NSEL + it // (BLOCK_S // BLOCK_K), slot_value, mask=head_ok & slot_end)
    if KEYS_M:
        acc = tl.trans(acc_t)
    store_rows(o, lse, flat, head_ok, dv, DV, m, l_sum, acc)


@triton.jit
def _selected_bwd_dq(
    q, k, v, do, lse, delta, block_idx, doc_start, dq, rows,
    T, TK, HQ, HK, NSEL, q_start, scale_log2, scale,
    G: tl.constexpr, SEL: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, ROWS: tl.constexpr,
    KEYS_M: tl.constexpr,
):
    """ROWS and KEYS_M: as _selected_fwd's (the caller zeroed the other rows' dq)."""
    t = _program_row(rows, ROWS)
    b = (tl.program_id(1) // HK).to(tl.int64)
    hk = tl.program_id(1) % HK
    pos = q_start + t
    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < G
    flat = (b * T + t) * HQ + hk * G + heads
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_G, BLOCK_DK], tl.float32)
    row = (b * T + t) * HK + hk
    used = _used_slots(block_idx, row, NSEL, BLOCK_N)
    if used == 0:  # a row without picks reads nothing more and writes 0
        tl.store(dq + flat[:, None] * DK + dk[None, :], acc.to(dq.dtype.element_ty),
                 mask=head_ok[:, None] & (dk[None, :] < DK))
        return
    first_key = tl.load(doc_start + t).to(tl.int64)
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=head_ok[:, None] & (dk[None, :] < DK), other=0.0)
    dot = tl.load(do + flat[:, None] * DV + dv[None, :], mask=head_ok[:, None] & (dv[None, :] < DV), other=0.0)
    row_lse = tl.load(lse + flat, mask=head_ok, other=0.0)
    row_lse = tl.where(row_lse == float("-inf"), 0.0, row_lse * 1.4426950408889634)
    row_delta = tl.load(delta + flat, mask=head_ok, other=0.0)
    k, v = kv_sources(k, v, b, TK, HK, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_K, TMA)
    acc_t = tl.zeros([BLOCK_DK, BLOCK_G], tl.float32)  # KEYS_M: dQ transposed
    for it in range(used * (BLOCK_S // BLOCK_K)):
        j = tl.load(block_idx + row * NSEL + it // (BLOCK_S // BLOCK_K))
        part = (it % (BLOCK_S // BLOCK_K)) * BLOCK_K  # the part's first key's place in its selection block
        in_block = part + offs  # a key's place in its selection block
        keys = first_key + j.to(tl.int64) * SEL + in_block
        key_ok = (j >= 0) & (in_block < SEL) & (keys <= pos)
        kt, vt = _key_part(k, v, b, hk, first_key + j.to(tl.int64) * SEL + part, keys, key_ok, TK, HK, dk, dv,
                           DK, DV, TMA)
        if KEYS_M:
            acc_t = dq_step_keys(qt, dot, kt, vt, key_ok[:, None], row_lse, row_delta, acc_t, scale_log2, PRECISION)
        else:
            s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
            p = tl.where(key_ok[None, :], tl.exp2(s - row_lse[:, None]), 0.0)
            dp = tl.dot(dot, tl.trans(vt), input_precision=PRECISION)
            ds = p * (dp - row_delta[:, None])
            acc += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
    if KEYS_M:
        acc = tl.trans(acc_t)
    tl.store(dq + flat[:, None] * DK + dk[None, :], (acc * scale).to(dq.dtype.element_ty),
             mask=head_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def _tile_picks(block_idx, block_base, b, hk, t0, T, HK, NSEL, TT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks a tile of TT consecutive tokens picked, by global key-block number (the token's
    document's block_base + its pick, so a tile may span documents). Returns, per slot of the tile
    ([TT * BLOCK_N], token-major): the block (-1: none), the token it belongs to (0 .. TT-1), and each
    distinct block's rank in ascending order (-1 for repeats and empty slots); and the number of distinct
    blocks, the tile's loop length."""
    lane = tl.arange(0, TT * BLOCK_N)
    tok = t0 + lane // BLOCK_N
    slot = lane % BLOCK_N
    pick = tl.load(block_idx + ((b * T + tok) * HK + hk) * NSEL + slot, mask=(tok < T) & (slot < NSEL), other=-1)
    base = tl.load(block_base + tok, mask=tok < T, other=0)
    ids = tl.where(pick >= 0, base + pick, -1)
    repeat = tl.max(((ids[None, :] == ids[:, None]) & (lane[None, :] < lane[:, None])).to(tl.int32), axis=1)
    first = (ids >= 0) & (repeat == 0)  # the slot holds a block no earlier slot of the tile holds
    rank = tl.sum((first[None, :] & (ids[None, :] < ids[:, None])).to(tl.int32), axis=1)
    return ids, lane // BLOCK_N, tl.where(first, rank, -1), tl.sum(first.to(tl.int32), axis=0)


@triton.jit
def _tile_rows(T, HQ, HK, q_start, G: tl.constexpr, TT: tl.constexpr, HEADS: tl.constexpr):
    """A token tile's program: its first token, batch, KV head, and per row (token-major, HEADS = the
    group padded to a power of two) its token within the tile, validity, position and flat (b, t, head)."""
    t0 = tl.program_id(0) * TT
    b = (tl.program_id(1) // HK).to(tl.int64)
    hk = tl.program_id(1) % HK
    r = tl.arange(0, TT * HEADS)
    row_tok = r // HEADS
    tok = t0 + row_tok
    flat = (b * T + tok) * HQ + hk * G + r % HEADS
    return t0, b, hk, row_tok, (r % HEADS < G) & (tok < T), q_start + tok, flat


@triton.jit
def _tile_step(k, v, b, hk, TK, HK, ids, owner, rank, it, row_tok, pos, block_start, block_end, offs, dk, dv,
               DK: tl.constexpr, DV: tl.constexpr, PARTS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Loop step `it` of a token tile: part it % PARTS of its (it // PARTS)-th distinct block. Returns the
    K and V tiles of those keys and which (row, key) pairs are visible: the row's token picked the block,
    the key lies in it and at or before the row's position."""
    j = tl.sum(tl.where(rank == it // PARTS, ids, 0), axis=0)
    keys = tl.load(block_start + j).to(tl.int64) + (it % PARTS) * BLOCK_K + offs
    key_ok = keys < tl.load(block_end + j)
    picked = tl.max(((ids[None, :] == j) & (owner[None, :] == row_tok[:, None])).to(tl.int32), axis=1) > 0
    kv_row = (b * TK + keys) * HK + hk
    kt = tl.load(k + kv_row[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
    vt = tl.load(v + kv_row[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
    return kt, vt, picked[:, None] & key_ok[None, :] & (keys[None, :] <= pos[:, None])


@triton.jit
def _selected_fwd_tokens(
    q, k, v, block_idx, block_base, block_start, block_end, o, lse,
    T, TK, HQ, HK, NSEL, q_start, scale_log2,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, TT: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """The forward over a tile of TT tokens, walking the union of their picks once: for groups under 16
    heads, whose per-token programs pad their rows to 16 (the smallest tl.dot) anyway."""
    t0, b, hk, row_tok, row_ok, pos, flat = _tile_rows(T, HQ, HK, q_start, G, TT, HEADS)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    offs = tl.arange(0, BLOCK_K)
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
    ids, owner, rank, count = _tile_picks(block_idx, block_base, b, hk, t0, T, HK, NSEL, TT, BLOCK_N)

    m = tl.full([TT * HEADS], float("-inf"), tl.float32)
    l_sum = tl.zeros([TT * HEADS], tl.float32)
    acc = tl.zeros([TT * HEADS, BLOCK_DV], tl.float32)
    for it in range(count * (BLOCK_S // BLOCK_K)):
        kt, vt, visible = _tile_step(k, v, b, hk, TK, HK, ids, owner, rank, it, row_tok, pos, block_start,
                                     block_end, offs, dk, dv, DK, DV, BLOCK_S // BLOCK_K, BLOCK_K)
        m, l_sum, acc = online_softmax_step(qt, kt, vt, visible, m, l_sum, acc, scale_log2, PRECISION)
    store_rows(o, lse, flat, row_ok, dv, DV, m, l_sum, acc)


@triton.jit
def _selected_bwd_dq_tokens(
    q, k, v, do, lse, delta, block_idx, block_base, block_start, block_end, dq,
    T, TK, HQ, HK, NSEL, q_start, scale_log2, scale,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, TT: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ over a tile of TT tokens, as _selected_fwd_tokens walks them."""
    t0, b, hk, row_tok, row_ok, pos, flat = _tile_rows(T, HQ, HK, q_start, G, TT, HEADS)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    offs = tl.arange(0, BLOCK_K)
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
    dot = tl.load(do + flat[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    row_lse = tl.load(lse + flat, mask=row_ok, other=0.0)
    row_lse = tl.where(row_lse == float("-inf"), 0.0, row_lse * 1.4426950408889634)
    row_delta = tl.load(delta + flat, mask=row_ok, other=0.0)
    ids, owner, rank, count = _tile_picks(block_idx, block_base, b, hk, t0, T, HK, NSEL, TT, BLOCK_N)

    acc = tl.zeros([TT * HEADS, BLOCK_DK], tl.float32)
    for it in range(count * (BLOCK_S // BLOCK_K)):
        kt, vt, visible = _tile_step(k, v, b, hk, TK, HK, ids, owner, rank, it, row_tok, pos, block_start,
                                     block_end, offs, dk, dv, DK, DV, BLOCK_S // BLOCK_K, BLOCK_K)
        acc = dq_step(qt, dot, kt, vt, visible, row_lse, row_delta, acc, scale_log2, PRECISION, True)
    tl.store(dq + flat[:, None] * DK + dk[None, :], (acc * scale).to(dq.dtype.element_ty),
             mask=row_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def _segment_block(k, v, seg_block, seg_lo, seg_hi, block_start, block_end, TK, HK, KB, G: tl.constexpr,
                   DK: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """This program's segment of the inverted index (inverted_index_slots): its batch and KV head, its
    first entry and number of (token, head) rows, the key block's keys (global positions), which exist,
    the head-dim ranges, and the block's K and V tiles (zero past the block's end)."""
    seg = tl.program_id(0).to(tl.int64)
    block = tl.load(seg_block + seg).to(tl.int64)  # (b * HK + hk) * KB + key block
    b = block // (HK * KB)
    hk = (block // KB) % HK
    kb = block % KB
    e0 = tl.load(seg_lo + seg)
    num_rows = (tl.load(seg_hi + seg) - e0) * G
    offs = tl.arange(0, BLOCK_S)
    keys = tl.load(block_start + kb).to(tl.int64) + offs
    key_ok = keys < tl.load(block_end + kb)
    kv_row = (b * TK + keys) * HK + hk
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(k + kv_row[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
    vt = tl.load(v + kv_row[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
    return b, hk, e0, num_rows, offs, keys, key_ok, dk, dv, kt, vt


@triton.jit
def _store_partials(part_k, part_v, offs, dk, dv, acc_k, acc_v, scale, BLOCK_S: tl.constexpr,
                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """This program's fp32 partial dK (scaled) and dV of its segment, which _selected_bwd_reduce sums."""
    seg = tl.program_id(0).to(tl.int64)
    tl.store(part_k + (seg * BLOCK_S + offs[:, None]) * BLOCK_DK + dk[None, :], acc_k * scale)
    tl.store(part_v + (seg * BLOCK_S + offs[:, None]) * BLOCK_DV + dv[None, :], acc_v)


@triton.jit(do_not_specialize=["KB"])  # sizes that follow the packed documents (triton_utils)
def _selected_bwd_dkv(
    q, k, v, do, lse, delta, entries, seg_block, seg_lo, seg_hi, block_start, block_end, part_k, part_v,
    T, TK, HQ, HK, KB, q_start, scale_log2, scale,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, hk, e0, num_rows, offs, keys, key_ok, dk, dv, kt, vt = _segment_block(
        k, v, seg_block, seg_lo, seg_hi, block_start, block_end, TK, HK, KB, G, DK, DV, BLOCK_S, BLOCK_DK, BLOCK_DV)

    acc_k = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    acc_v = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for r0 in range(0, num_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        tok = tl.load(entries + e0 + rows // G, mask=row_ok, other=0).to(tl.int64)
        flat = (b * T + tok) * HQ + hk * G + rows % G
        qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
        dot = tl.load(do + flat[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
        row_lse = tl.load(lse + flat, mask=row_ok, other=0.0)
        row_lse = tl.where(row_lse == float("-inf"), 0.0, row_lse * 1.4426950408889634)
        row_delta = tl.load(delta + flat, mask=row_ok, other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
        visible = row_ok[:, None] & key_ok[None, :] & (keys[None, :] <= q_start + tok[:, None])
        p = tl.where(visible, tl.exp2(s - row_lse[:, None]), 0.0)
        acc_v += tl.dot(tl.trans(p.to(dot.dtype)), dot, input_precision=PRECISION)
        dp = tl.dot(dot, tl.trans(vt), input_precision=PRECISION)
        ds = p * (dp - row_delta[:, None])
        acc_k += tl.dot(tl.trans(ds.to(qt.dtype)), qt, input_precision=PRECISION)
    _store_partials(part_k, part_v, offs, dk, dv, acc_k, acc_v, scale, BLOCK_S, BLOCK_DK, BLOCK_DV)


@triton.jit
def _keys_m_step(q, do, lse, delta, entries, e0, i0, num_tokens, b, hk, T, HQ, q_start, keys, key_ok, kt, vt, dk, dv,
                 acc_k, acc_v, scale_log2, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                 GROUP_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Tokens i0 .. i0 + BLOCK_N // GROUP_P - 1 of the segment into the block's dK and dV (transposed scores,
    _selected_bwd_dkv_keys_m). MASKED: the step may reach past the segment's last token. One token a step
    (BLOCK_N == GROUP_P) loads it once, as a scalar: its rows are one contiguous run, and no row is masked
    but the group's padding (at 128K, G = 16 on one H100 the scalar token's kernel took 66.7 ms, 2929fbc, and a
    row-wise token one a step 84.4, e897e0a)."""
    r = tl.arange(0, BLOCK_N)
    head = r % GROUP_P
    if BLOCK_N == GROUP_P:
        tok = tl.load(entries + e0 + i0).to(tl.int64)
        row_ok = head < G
        flat = (b * T + tok) * HQ + hk * G + head
        pos = q_start + tok + tl.zeros([BLOCK_N], tl.int64)
    else:
        i = i0 + r // GROUP_P
        if MASKED:
            row_ok = (head < G) & (i < num_tokens)
            tok = tl.load(entries + e0 + i, mask=row_ok, other=0).to(tl.int64)
        else:
            row_ok = head < G
            tok = tl.load(entries + e0 + i).to(tl.int64)
        flat = (b * T + tok) * HQ + hk * G + head
        pos = q_start + tok
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
    dot = tl.load(do + flat[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    row_lse = tl.load(lse + flat, mask=row_ok, other=0.0)
    row_lse = tl.where(row_lse == float("-inf"), 0.0, row_lse * 1.4426950408889634)
    row_delta = tl.load(delta + flat, mask=row_ok, other=0.0)
    st = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * scale_log2
    visible = key_ok[:, None] & row_ok[None, :] & (keys[:, None] <= pos[None, :])
    pt = tl.where(visible, tl.exp2(st - row_lse[None, :]), 0.0)
    acc_v += tl.dot(pt.to(dot.dtype), dot, input_precision=PRECISION)
    dpt = tl.dot(vt, tl.trans(dot), input_precision=PRECISION)
    dst = pt * (dpt - row_delta[None, :])
    acc_k += tl.dot(dst.to(qt.dtype), qt, input_precision=PRECISION)
    return acc_k, acc_v


@triton.jit(do_not_specialize=["KB"])  # sizes that follow the packed documents (triton_utils)
def _selected_bwd_dkv_keys_m(
    q, k, v, do, lse, delta, entries, seg_block, seg_lo, seg_hi, block_start, block_end, part_k, part_v,
    T, TK, HQ, HK, KB, q_start, scale_log2, scale,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP_P: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """_selected_bwd_dkv with the block's keys as the dots' M (LAUNCH["dkv"]["KEYS_M"]): scores [keys, rows] =
    K q^T, so the step's dots are warpgroup MMAs of M = 64 keys at any group, and P^T and dS^T, already in the
    accumulator's layout, feed dV += P^T dO and dK += dS^T q from registers. A step's BLOCK_N rows are
    BLOCK_N // GROUP_P tokens of the segment, each its G heads padded to GROUP_P (the group's power of two);
    whole steps first, then the last, partial one (_keys_m_step)."""
    b, hk, e0, num_rows, offs, keys, key_ok, dk, dv, kt, vt = _segment_block(
        k, v, seg_block, seg_lo, seg_hi, block_start, block_end, TK, HK, KB, G, DK, DV, BLOCK_S, BLOCK_DK, BLOCK_DV)
    # K and V made in registers (the select changes nothing: _segment_block loaded zeros there), so that an
    # sm_90a compile takes them as the first operand from registers, not from shared memory every step
    kt = tl.where(key_ok[:, None], kt, 0.0).to(k.dtype.element_ty)
    vt = tl.where(key_ok[:, None], vt, 0.0).to(v.dtype.element_ty)
    tokens_per_step: tl.constexpr = BLOCK_N // GROUP_P
    num_tokens = num_rows // G
    whole = num_tokens // tokens_per_step * tokens_per_step
    acc_k = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    acc_v = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for i0 in range(0, whole, tokens_per_step):
        acc_k, acc_v = _keys_m_step(q, do, lse, delta, entries, e0, i0, num_tokens, b, hk, T, HQ, q_start, keys,
                                    key_ok, kt, vt, dk, dv, acc_k, acc_v, scale_log2, G, DK, DV, GROUP_P, BLOCK_N,
                                    PRECISION, False)
    for i0 in range(whole, num_tokens, tokens_per_step):
        acc_k, acc_v = _keys_m_step(q, do, lse, delta, entries, e0, i0, num_tokens, b, hk, T, HQ, q_start, keys,
                                    key_ok, kt, vt, dk, dv, acc_k, acc_v, scale_log2, G, DK, DV, GROUP_P, BLOCK_N,
                                    PRECISION, True)
    _store_partials(part_k, part_v, offs, dk, dv, acc_k, acc_v, scale, BLOCK_S, BLOCK_DK, BLOCK_DV)


@triton.jit(do_not_specialize=["KB"])
def _selected_bwd_reduce(
    part_k, part_v, seg_first, seg_count, block_start, block_end, dk_out, dv_out,
    TK, HK, KB,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    b = block // (HK * KB)
    hk = (block // KB) % HK
    kb = block % KB
    first = tl.load(seg_first + block)
    count = tl.load(seg_count + block)
    offs = tl.arange(0, BLOCK_S)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    acc_k = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    acc_v = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for i in range(count):
        seg = (first + i).to(tl.int64)
        acc_k += tl.load(part_k + (seg * BLOCK_S + offs[:, None]) * BLOCK_DK + dk[None, :])
        acc_v += tl.load(part_v + (seg * BLOCK_S + offs[:, None]) * BLOCK_DV + dv[None, :])
    keys = tl.load(block_start + kb).to(tl.int64) + offs
    key_ok = keys < tl.load(block_end + kb)
    kv_row = (b * TK + keys) * HK + hk
    tl.store(dk_out + kv_row[:, None] * DK + dk[None, :], acc_k.to(dk_out.dtype.element_ty),
             mask=key_ok[:, None] & (dk[None, :] < DK))
    tl.store(dv_out + kv_row[:, None] * DV + dv[None, :], acc_v.to(dv_out.dtype.element_ty),
             mask=key_ok[:, None] & (dv[None, :] < DV))


@triton.jit
def _segment_rows(q, entries, slots, b, hk, e0, r0, num_rows, keys, key_ok, dk, T, HQ, T0, q_start,
                  G: tl.constexpr, DK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_M - 1 of a segment (_segment_block), each a (token, head) of its entries, the
    tokens chunk-local (T0 + entry): which exist, their flat (b, token, head) offsets, which of the block's
    keys each sees (causal), their partials' index (slot * G + head) and their q tile."""
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    entry = e0 + rows // G
    tok = T0 + tl.load(entries + entry, mask=row_ok, other=0).to(tl.int64)
    head = rows % G
    flat = (b * T + tok) * HQ + hk * G + head
    visible = row_ok[:, None] & key_ok[None, :] & (keys[None, :] <= q_start + tok[:, None])
    part = tl.load(slots + entry, mask=row_ok, other=0) * G + head
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
    return row_ok, flat, visible, part, qt


@triton.jit(do_not_specialize=["KB", "T0"])
def _selected_fwd_blocks(
    q, k, v, entries, slots, seg_block, seg_lo, seg_hi, block_start, block_end, part_o, part_m, part_l,
    T, TK, HQ, HK, KB, T0, q_start, scale_log2,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The forward by key blocks (_forward_by_blocks): one segment of a key block's list of query tokens
    (tokens T0 + entries, chunk-local), the block's K and V loaded once, its rows (token, head) BLOCK_M at a
    time. Each row's softmax over this block alone goes to its slot's partial: the running max m (base 2),
    the sum l of exp2(s - m) and the unnormalized output, at part_*[slot * G + head]."""
    b, hk, e0, num_rows, offs, keys, key_ok, dk, dv, kt, vt = _segment_block(
        k, v, seg_block, seg_lo, seg_hi, block_start, block_end, TK, HK, KB, G, DK, DV, BLOCK_S, BLOCK_DK, BLOCK_DV)
    for r0 in range(0, num_rows, BLOCK_M):
        row_ok, flat, visible, part, qt = _segment_rows(q, entries, slots, b, hk, e0, r0, num_rows, keys, key_ok, dk,
                                                        T, HQ, T0, q_start, G, DK, BLOCK_M)
        s = tl.where(visible, tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp2(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
        tl.store(part_o + part[:, None] * BLOCK_DV + dv[None, :],
                 tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION), mask=row_ok[:, None])
        tl.store(part_m + part, m, mask=row_ok)
        tl.store(part_l + part, tl.sum(p, 1), mask=row_ok)


@triton.jit
def _merge_program(HK, C, G: tl.constexpr, BLOCK_G: tl.constexpr):
    """A merge program's token (chunk-local), batch, KV head, the group's heads, which exist, and the
    token's block_idx row in the chunk of C tokens."""
    t = tl.program_id(0).to(tl.int64)
    b = (tl.program_id(1) // HK).to(tl.int64)
    hk = tl.program_id(1) % HK
    heads = tl.arange(0, BLOCK_G)
    return t, b, hk, heads, heads < G, (b * C + t) * HK + hk


@triton.jit
def _selected_fwd_merge(
    block_idx, part_o, part_m, part_l, o, lse,
    T, HQ, HK, NSEL, C, T0,
    G: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Token T0 + program_id(0) of a chunk of C tokens, one (batch, KV head): its slots' partials
    (_selected_fwd_blocks) merged as the online softmax merges key tiles, then normalized and stored with
    its lse, as the one-token forward stores them."""
    t, b, hk, heads, head_ok, row = _merge_program(HK, C, G, BLOCK_G)
    dv = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for j in range(_used_slots(block_idx, row, NSEL, BLOCK_N)):
        picked = tl.load(block_idx + row * NSEL + j) >= 0
        part = (row * NSEL + j) * G + heads
        ok = head_ok & picked
        m_j = tl.load(part_m + part, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, m_j)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - shift)
        beta = tl.exp2(m_j - shift)
        l_sum = l_sum * alpha + beta * tl.load(part_l + part, mask=ok, other=0.0)
        acc = acc * alpha[:, None] + beta[:, None] * tl.load(part_o + part[:, None] * BLOCK_DV + dv[None, :],
                                                              mask=ok[:, None], other=0.0)
        m = m_new
    flat = (b * T + T0 + t) * HQ + hk * G + heads
    store_rows(o, lse, flat, head_ok, dv, DV, m, l_sum, acc)


@triton.jit(do_not_specialize=["KB", "T0"])
def _selected_bwd_dq_blocks(
    q, k, v, do, lse, delta, entries, slots, seg_block, seg_lo, seg_hi, block_start, block_end, part_dq,
    T, TK, HQ, HK, KB, T0, q_start, scale_log2,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ by key blocks (_dq_by_blocks): as _selected_fwd_blocks, each row's share of dQ from this block
    alone, dS K (unscaled), to part_dq[slot * G + head]."""
    b, hk, e0, num_rows, offs, keys, key_ok, dk, dv, kt, vt = _segment_block(
        k, v, seg_block, seg_lo, seg_hi, block_start, block_end, TK, HK, KB, G, DK, DV, BLOCK_S, BLOCK_DK, BLOCK_DV)
    for r0 in range(0, num_rows, BLOCK_M):
        row_ok, flat, visible, part, qt = _segment_rows(q, entries, slots, b, hk, e0, r0, num_rows, keys, key_ok, dk,
                                                        T, HQ, T0, q_start, G, DK, BLOCK_M)
        dot = tl.load(do + flat[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
        row_lse = tl.load(lse + flat, mask=row_ok, other=0.0)
        row_lse = tl.where(row_lse == float("-inf"), 0.0, row_lse * 1.4426950408889634)
        row_delta = tl.load(delta + flat, mask=row_ok, other=0.0)
        share = dq_step(qt, dot, kt, vt, visible, row_lse, row_delta, tl.zeros([BLOCK_M, BLOCK_DK], tl.float32),
                        scale_log2, PRECISION, True)
        tl.store(part_dq + part[:, None] * BLOCK_DK + dk[None, :], share, mask=row_ok[:, None])


@triton.jit
def _selected_bwd_dq_merge(
    block_idx, part_dq, dq, T, HQ, HK, NSEL, C, T0, scale,
    G: tl.constexpr, DK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Token T0 + program_id(0) of a chunk of C tokens, one (batch, KV head): its slots' dQ shares
    (_selected_bwd_dq_blocks) summed, scaled and stored."""
    t, b, hk, heads, head_ok, row = _merge_program(HK, C, G, BLOCK_G)
    dk = tl.arange(0, BLOCK_DK)
    acc = tl.zeros([BLOCK_G, BLOCK_DK], tl.float32)
    for j in range(_used_slots(block_idx, row, NSEL, BLOCK_N)):
        picked = tl.load(block_idx + row * NSEL + j) >= 0
        part = (row * NSEL + j) * G + heads
        acc += tl.load(part_dq + part[:, None] * BLOCK_DK + dk[None, :], mask=(head_ok & picked)[:, None], other=0.0)
    flat = (b * T + T0 + t) * HQ + hk * G + heads
    tl.store(dq + flat[:, None] * DK + dk[None, :], (acc * scale).to(dq.dtype.element_ty),
             mask=head_ok[:, None] & (dk[None, :] < DK))


def selection_layout(
    seq: int, num_keys: int, selection_block: int, q_start: int, cu_seqlens: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """Where selection blocks live in the key tensor.

    Returns doc_start [T] (global position of each query's document start: its block j starts at
    doc_start + j*l'), block_base [T] (number of key blocks before its document), and per key block
    (documents in order, each cut into blocks of l'), block_start / block_end [KB] (global positions,
    end exclusive, never past the document's end). All int32.
    """
    if cu_seqlens is None:
        return _one_document_layout(seq, num_keys, selection_block, device)
    return document_layout(cu_seqlens, ("selection_layout", seq, selection_block, q_start, device),
                           lambda: _document_blocks(seq, selection_block, q_start, cu_seqlens, device))


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _one_document_layout(seq: int, num_keys: int, selection_block: int,
                         device: torch.device) -> tuple[torch.Tensor, ...]:
    """selection_layout of one document, cached per shape (every layer of a step asks the same)."""
    block_start = torch.arange(0, num_keys, selection_block, dtype=torch.int32, device=device)
    block_end = (block_start + selection_block).clamp_max(num_keys)
    zeros = torch.zeros(seq, dtype=torch.int32, device=device)
    return zeros, zeros, block_start, block_end


def _document_blocks(seq: int, selection_block: int, q_start: int, cu_seqlens: torch.Tensor,
                     device: torch.device) -> tuple[torch.Tensor, ...]:
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    blocks_per_doc = -(-cu.diff() // selection_block)
    block_cu = torch.cat([blocks_per_doc.new_zeros(1), blocks_per_doc.cumsum(0)])
    doc = document_of(torch.arange(q_start, q_start + seq, device=device), cu)
    bounds = host_bounds(cu_seqlens)  # the number of key blocks, without reading it from the GPU
    blocks = torch.arange(sum(-(-(hi - lo) // selection_block) for lo, hi in zip(bounds[:-1], bounds[1:])),
                          device=device)
    block_doc = document_of(blocks, block_cu)
    block_start = cu[block_doc] + (blocks - block_cu[block_doc]) * selection_block
    block_end = torch.minimum(block_start + selection_block, cu[block_doc + 1])
    return tuple(x.to(torch.int32).contiguous() for x in (cu[doc], block_cu[doc], block_start, block_end))


INDEX_BLOCK = 1024  # slots, entries or segments per program of the inverted-index kernels


@triton.jit(do_not_specialize=["KB", "TOTAL"])
def _index_keys(block_idx, block_base, key, N, T, HK, NSEL, KB, TOTAL, BLOCK: tl.constexpr):
    """key of each block_idx slot: (b * HK + hk) * KB + the document's first key block + the pick, or
    TOTAL for an unused slot (sorted last)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    ids = tl.load(block_idx + i, mask=ok, other=-1).to(tl.int64)
    tok = (i // (HK * NSEL)) % T
    group = (i // (T * HK * NSEL)) * HK + (i // NSEL) % HK
    base = tl.load(block_base + tok, mask=ok, other=0).to(tl.int64)
    tl.store(key + i, tl.where(ids >= 0, group * KB + base + ids, TOTAL), mask=ok)


@triton.jit(do_not_specialize=["TOTAL", "CAP"])
def _index_entries(order, entries, bounds, seg_count, N, T, SLOTS, TOTAL, CAP, BLOCK: tl.constexpr):
    """The query token of each sorted slot, and (the first TOTAL programs' lanes) each key block's number
    of segments, ceil(count / CAP), from its list's bounds."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    slot = tl.load(order + i, mask=ok, other=0)
    tl.store(entries + i, ((slot // SLOTS) % T).to(tl.int32), mask=ok)
    is_block = i < TOTAL
    count = tl.load(bounds + i + 1, mask=is_block, other=0) - tl.load(bounds + i, mask=is_block, other=0)
    tl.store(seg_count + i, (count + CAP - 1) // CAP, mask=is_block)


@triton.jit(do_not_specialize=["NSEG", "TOTAL", "CAP", "STEPS"])
def _index_segments(bounds, seg_end, seg_count, seg_block, seg_lo, seg_hi, NSEG, TOTAL, CAP, STEPS,
                    BLOCK: tl.constexpr):
    """For each segment s: its key block (the first whose seg_end > s, by binary search; block 0 with an
    empty slice past the last real segment) and its slice [seg_lo, seg_hi) of the block's list."""
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = s < NSEG
    lo = tl.zeros([BLOCK], tl.int64)
    hi = tl.zeros([BLOCK], tl.int64) + TOTAL
    for _ in range(STEPS):
        mid = (lo + hi) // 2
        searching = lo < hi
        below = tl.load(seg_end + mid, mask=searching, other=0) <= s
        lo = tl.where(searching & below, mid + 1, lo)
        hi = tl.where(searching & ~below, mid, hi)
    real = lo < TOTAL
    block = tl.where(real, lo, 0)
    first = tl.load(seg_end + block) - tl.load(seg_count + block)
    start = tl.load(bounds + block)
    seg_start = start + (s - first) * CAP
    end = tl.minimum(seg_start + CAP, tl.load(bounds + block + 1))
    tl.store(seg_block + s, block, mask=ok)
    tl.store(seg_lo + s, tl.where(real, seg_start, start), mask=ok)
    tl.store(seg_hi + s, tl.where(real, end, start), mask=ok)


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _block_ids(total_blocks: int, device: torch.device) -> torch.Tensor:
    """0 .. total_blocks, the key blocks' first keys to search for (the same in every layer)."""
    return torch.arange(total_blocks + 1, device=device)


def inverted_index(block_idx: torch.Tensor, block_base: torch.Tensor, num_blocks: int):
    """block_idx [B, T, HK, n] -> for each (b, hk, key block): the query tokens that selected it.
    (inverted_index_slots' first six values; see there.)"""
    return inverted_index_slots(block_idx, block_base, num_blocks)[:6]


def inverted_index_slots(block_idx: torch.Tensor, block_base: torch.Tensor, num_blocks: int):
    """block_idx [B, T, HK, n] -> for each (b, hk, key block): the query tokens that selected it.

    Returns entries (int32 query tokens, grouped by key block, ascending within one) and segments: each
    a slice [seg_lo, seg_hi) of entries belonging to key block seg_block ((b * HK + hk) * KB + block);
    a block's segments are consecutive, from seg_first[block], seg_count[block] of them. Last, slots
    (int64, beside entries): each entry's place in block_idx flattened, ((b * T + t) * HK + hk) * n + j. No host sync:
    the number of segments is data-dependent, so there are as many as it can be at most
    (segments_bound); the ones past the last real segment are empty and belong to no block's range.

    Three small kernels around one stable sort of the slots by key block and one search for the lists'
    bounds (a counting sort's second pass in the sort's place would need a [token chunks, key blocks]
    table, 2^28 counts at 128K): eight launches, where the same in torch operators took about thirty.
    """
    batch, seq, num_kv_heads, num_selected = block_idx.shape
    device = block_idx.device
    total_blocks = batch * num_kv_heads * num_blocks
    num_slots = block_idx.numel()
    cap = segment_cap(seq, num_selected, num_blocks, num_slots, programs_wanted(device))
    num_segments = segments_bound(num_slots, total_blocks, cap) if total_blocks else 0
    key = torch.empty(num_slots, dtype=torch.int64, device=device)
    if num_slots:
        _index_keys[(triton.cdiv(num_slots, INDEX_BLOCK),)](
            block_idx, block_base, key, num_slots, seq, num_kv_heads, num_selected, num_blocks, total_blocks,
            BLOCK=INDEX_BLOCK)
    sorted_key, order = torch.sort(key, stable=True)  # stable: tokens stay ascending within a block
    bounds = torch.searchsorted(sorted_key, _block_ids(total_blocks, device))
    entries = torch.empty(num_slots, dtype=torch.int32, device=device)
    seg_count = torch.empty(total_blocks, dtype=torch.int64, device=device)
    if max(num_slots, total_blocks):
        _index_entries[(triton.cdiv(max(num_slots, total_blocks), INDEX_BLOCK),)](
            order, entries, bounds, seg_count, num_slots, seq, num_kv_heads * num_selected, total_blocks, cap,
            BLOCK=INDEX_BLOCK)
    seg_end = seg_count.cumsum(0)
    seg_first = seg_end - seg_count
    seg_block, seg_lo, seg_hi = (torch.empty(num_segments, dtype=torch.int64, device=device) for _ in range(3))
    if num_segments:
        _index_segments[(triton.cdiv(num_segments, INDEX_BLOCK),)](
            bounds, seg_end, seg_count, seg_block, seg_lo, seg_hi, num_segments, total_blocks, cap,
            total_blocks.bit_length(), BLOCK=INDEX_BLOCK)
    return entries, seg_block, seg_lo, seg_hi, seg_first, seg_count, order


def segment_cap(seq: int, num_selected: int, num_blocks: int, num_entries: int, programs: int) -> int:
    """Entries per segment: at most twice the mean list length, so that no program gets much more than
    its share (block 0, picked by every query, is cut into many), and at most an even share of all
    entries among `programs` programs. The second bound is for packed documents of mixed lengths: in
    the proof's first stage (16 x 2K: 112 documents of 256 tokens, two of 2K) the mean counts every
    slot, though a short document's queries fill only the few blocks they have, so twice the mean was
    2,048 tokens. That is a whole list of a 2K document (512 row tiles at G = 16) against about 230 a
    multiprocessor for the whole step: one program left running alone at the end. num_entries is
    every slot of block_idx (a bound on the picks, known without reading them)."""
    mean = -(-seq * num_selected // max(num_blocks, 1))
    return max(ROWS_PER_TILE, min(2 * mean, -(-num_entries // max(programs, 1))))


def segments_bound(num_entries: int, total_blocks: int, cap: int) -> int:
    """At most sum over blocks of ceil(count / cap) <= entries / cap + blocks segments."""
    return total_blocks + -(-num_entries // cap)


def _consts(q, k, v, selection_block):
    group = q.shape[2] // k.shape[2]
    return dict(
        G=group, DK=q.shape[-1], DV=v.shape[-1], BLOCK_S=pow2(selection_block),
        BLOCK_DK=pow2(q.shape[-1]), BLOCK_DV=pow2(v.shape[-1]), PRECISION=dot_precision(q.dtype),
    )


def _dq_launch(q, v) -> dict:
    # head dims <= 128: 2 warps, 2 stages (measured on one H200, D=128, against 4 warps and 3 stages: the
    # whole selected backward 1.03x at 128K and 1.04x at 8K with G=16, 1.05x at 128K with G=4, within the
    # bf16 error bound; benchmarks/gpu_checks/sweep-selected-*-6571f5a.json); above 128, 8 warps
    if max(q.shape[-1], v.shape[-1]) > 128:
        return {"num_warps": 8}
    return {"num_warps": 2, "num_stages": 2}


def _key_tiled(params: dict, block_s: int) -> dict:
    """params with BLOCK_K, the keys of one selection block that the forward and dQ kernels take per loop
    step: the whole (padded) block unless a LAUNCH override sets fewer. Fewer keys a step mean smaller K/V
    tiles in shared memory, so more programs fit on a multiprocessor, at more loop steps each."""
    block_k = params.setdefault("BLOCK_K", block_s)
    if block_k < 16 or block_k > block_s or block_k & (block_k - 1):
        raise ValueError(f"selected attention: LAUNCH BLOCK_K={block_k} must be a power of two from 16 (the "
                         f"smallest tl.dot) to the padded selection block, {block_s}")
    return params


def _token_tile(params: dict, group: int) -> tuple[int, int]:
    """(tokens a program, rows a token) of the forward and dQ kernels: TOKENS (a LAUNCH override, popped
    from params; default 1, a program a token with its group's rows padded to 16) consecutive tokens
    whose TOKENS x pow2(G) rows walk the union of their picks once. For G under 16, where the padding
    already pays for those rows. Not yet timed on a GPU (benchmarks/kernels-notes.md, session 25)."""
    tokens = params.pop("TOKENS", 1)
    heads = triton.next_power_of_2(group)
    if tokens == 1:
        return 1, heads
    if tokens & (tokens - 1) or not 16 <= tokens * heads <= 128:
        raise ValueError(f"selected attention: LAUNCH TOKENS={tokens} must be a power of two with TOKENS x "
                         f"{heads} (the group's {group} heads, to a power of two) rows from 16 (the smallest "
                         f"tl.dot) to 128: for G={group}, TOKENS {max(1, 16 // heads)} to {max(1, 128 // heads)}")
    return tokens, heads


def _tma_loads(params: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int) -> bool:
    """TMA (popped from params: a LAUNCH override, or a GPU default where the shapes fit, _tma_by_default):
    whether the one-token forward and dQ kernels copy their K/V parts through TMA descriptors
    (range_attention.kv_sources). An override that inputs cannot serve is an error, not a quiet fallback."""
    if not params.pop("TMA", False):
        return False
    unfit = f"the one-token kernels (leave TOKENS out, or 1; got {tokens})" if tokens > 1 else \
        tma_unfit(q, k, v, whole_groups=False)
    if unfit:
        raise ValueError(f"selected attention: LAUNCH TMA=True needs {unfit}; or leave TMA out of LAUNCH")
    return True


def _keys_as_m(params: dict, kernel: str, tokens: int) -> bool:
    """KEYS_M (popped from params, a LAUNCH override; default off): whether the one-token forward or dQ takes
    the key part as its dots' first operand, so that their M is the keys and the head dim rather than the
    group's rows (16 at G = 16: Hopper's warpgroup MMA wants 64, and takes it at 4 warps)."""
    keys_m = params.pop("KEYS_M", False)
    if keys_m and tokens > 1:
        raise ValueError(f"selected attention: LAUNCH['{kernel}'] KEYS_M=True is for the one-token kernels; it "
                         f"sets TOKENS={tokens}: leave one of them out")
    return keys_m


def _forward_launch(q, v) -> dict:
    # head dims <= 128: 2 warps, 2 stages (measured on one H200 at 128K, G=16, D=128: 35.4 ms against
    # 39.2 with 4 warps and 3 stages, within the bf16 error bound; benchmarks/kernels-2026-11-30-sweep.json)
    if max(q.shape[-1], v.shape[-1]) > 128:
        return {"num_warps": 8}
    return {"num_warps": 2, "num_stages": 2}


# Partial results the kernels by key blocks hold at once: they run chunks of tokens this large or smaller
PARTIALS_BYTES = 1 << 30


def _launch_by_blocks(launch: dict, kernel: str) -> tuple[dict, int | None]:
    """(kernel launch parameters, CHUNK or None) from LAUNCH[kernel] without its BY_BLOCKS."""
    unknown = set(launch) - {"BLOCK_M", "CHUNK", "num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"selected attention: LAUNCH['{kernel}'] with BY_BLOCKS takes BLOCK_M, CHUNK, num_warps and "
                         f"num_stages; {sorted(unknown)} belong to the one-token kernels: leave them out")
    params = {"BLOCK_M": ROWS_PER_TILE, "num_warps": 4, "num_stages": 2, **launch}
    block_m, chunk = params["BLOCK_M"], params.pop("CHUNK", None)
    if not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"selected attention: LAUNCH['{kernel}'] BLOCK_M={block_m!r} must be a power of two from "
                         f"16 (the smallest tl.dot), e.g. {ROWS_PER_TILE}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"selected attention: LAUNCH['{kernel}'] CHUNK={chunk!r} must be a whole number of tokens, "
                         f"at least 1; or leave it out to size chunks by PARTIALS_BYTES")
    return params, chunk


def _key_block_chunks(block_idx, block_base, num_blocks, part_width, chunk):
    """The chunks of tokens a kernel by key blocks runs: (first token, tokens, their picks, the inverted index
    of those picks: entries, seg_block, seg_lo, seg_hi, slots). Each chunk's partials, part_width fp32
    values a (slot, head), fit PARTIALS_BYTES, or the chunk is `chunk` tokens."""
    batch, seq, num_kv_heads, num_selected = block_idx.shape
    chunk = chunk or max(1, min(seq, PARTIALS_BYTES // (batch * num_kv_heads * num_selected * part_width * 4)))
    for t0 in range(0, seq, chunk):
        tokens = min(chunk, seq - t0)
        picks = block_idx[:, t0 : t0 + tokens].contiguous()
        entries, seg_block, seg_lo, seg_hi, _, _, slots = inverted_index_slots(
            picks, block_base[t0 : t0 + tokens], num_blocks)
        yield t0, tokens, picks, entries, seg_block, seg_lo, seg_hi, slots


def _forward_by_blocks(q, k, v, block_idx, layout, o, lse, q_start, scale, consts, launch):
    """The forward by key blocks (LAUNCH["fwd"]["BY_BLOCKS"], or on a GPU the default for groups of at most
    BY_BLOCKS_UP_TO_GROUP heads): per chunk of tokens, the inverted index of their picks (as the dK/dV
    backward builds it), then one program a segment of a key block's list loads the block's K and V once
    and runs its tokens' rows against them
    (_selected_fwd_blocks), writing each (slot, head) a partial softmax; a second kernel merges each
    token's partials (_selected_fwd_merge). Where the one-token forward reads a block's 32 KB of K and V
    (64 keys of 128) for every (token, pick) and pads the group's rows to 16, this reads the block once a
    segment and the rows' q, M = BLOCK_M (token, head) rows a dot: for small groups (G = 4: 16 rows of
    which 4 are used) it moves ~6 KB a (token, pick) instead of ~33. The partials (fp32, [slots, G, Dv])
    bound the chunk: at most PARTIALS_BYTES, or launch["CHUNK"] tokens. No slot_lse."""
    params, chunk = _launch_by_blocks(launch, "fwd")
    batch, seq, num_q_heads, _ = q.shape
    num_kv_heads, num_selected = k.shape[2], block_idx.shape[-1]
    _, block_base, block_start, block_end = layout
    group, block_dv = consts["G"], consts["BLOCK_DV"]
    for t0, tokens, picks, entries, seg_block, seg_lo, seg_hi, slots in _key_block_chunks(
            block_idx, block_base, block_start.numel(), block_dv + 2, chunk):
        rows = picks.numel() * group
        part_o = poisoned((rows, block_dv), torch.float32, q.device)  # every picked slot's rows are written
        part_m = poisoned((rows,), torch.float32, q.device)
        part_l = poisoned((rows,), torch.float32, q.device)
        if seg_block.numel():
            _selected_fwd_blocks[(seg_block.numel(),)](
                q, k, v, entries, slots, seg_block, seg_lo, seg_hi, block_start, block_end, part_o, part_m, part_l,
                seq, k.shape[1], num_q_heads, num_kv_heads, block_start.numel(), t0, q_start, scale * LOG2E,
                **consts, **params,
            )
        _selected_fwd_merge[(tokens, batch * num_kv_heads)](
            picks, part_o, part_m, part_l, o, lse, seq, num_q_heads, num_kv_heads, num_selected, tokens, t0,
            G=group, DV=consts["DV"], BLOCK_G=pow2(group), BLOCK_DV=block_dv, BLOCK_N=pow2(num_selected),
        )


def _dq_by_blocks(q, k, v, do, lse, delta, block_idx, layout, dq, q_start, scale, consts, launch):
    """dQ by key blocks (LAUNCH["dq"]["BY_BLOCKS"], or on a GPU the default as the forward's), as the forward
    by key blocks: each (slot, head) row's share dS K from its block (_selected_bwd_dq_blocks), then each
    token's shares summed (_selected_bwd_dq_merge). Partials fp32 [slots, G, Dk]."""
    params, chunk = _launch_by_blocks(launch, "dq")
    batch, seq, num_q_heads, _ = q.shape
    num_kv_heads, num_selected = k.shape[2], block_idx.shape[-1]
    _, block_base, block_start, block_end = layout
    group, block_dk = consts["G"], consts["BLOCK_DK"]
    for t0, tokens, picks, entries, seg_block, seg_lo, seg_hi, slots in _key_block_chunks(
            block_idx, block_base, block_start.numel(), block_dk, chunk):
        part_dq = poisoned((picks.numel() * group, block_dk), torch.float32, q.device)
        if seg_block.numel():
            _selected_bwd_dq_blocks[(seg_block.numel(),)](
                q, k, v, do, lse, delta, entries, slots, seg_block, seg_lo, seg_hi, block_start, block_end, part_dq,
                seq, k.shape[1], num_q_heads, num_kv_heads, block_start.numel(), t0, q_start, scale * LOG2E,
                **consts, **params,
            )
        _selected_bwd_dq_merge[(tokens, batch * num_kv_heads)](
            picks, part_dq, dq, seq, num_q_heads, num_kv_heads, num_selected, tokens, t0, scale,
            G=group, DK=consts["DK"], BLOCK_G=pow2(group), BLOCK_DK=block_dk, BLOCK_N=pow2(num_selected),
        )


def _forward_by_tokens(q, k, v, block_idx, layout, o, lse, slot_lse, selection_block, sizes, consts, want_slot_lse,
                       rows):
    """The forward a program a token (or TOKENS tokens), as used: _selected_fwd or _selected_fwd_tokens. rows
    (or None): the one-token forward runs those rows alone (o and lse already hold the others' 0 and -inf)."""
    batch, seq = q.shape[:2]
    doc_start, block_base, block_start, block_end = layout
    defaults = {**_forward_launch(q, v), **_tma_by_default("fwd", q, k, v)}
    if defaults.get("TMA") and q.shape[-1] == v.shape[-1] == 128:
        # through TMA at D = 128: 32-key parts and 3 stages, 1.04-1.07x of whole blocks and 2 stages at 8K-128K,
        # the kernel alone, both in one run (one H100, G=16, bf16; session 49 in benchmarks/kernels-notes.md;
        # the layer at 64K moved within the spread between runs); other head dims keep the choice above,
        # not yet swept
        defaults.update(num_stages=3, BLOCK_K=min(32, consts["BLOCK_S"]))
    if want_slot_lse:
        # the slot sums' registers: at G = 16, D = 128, 2 warps, whole 64-key blocks spill 16 bytes (255
        # registers, an sm_90a compile by benchmarks/selected-occupancy-offline.py); 32-key parts take
        # 168 and no spill, and ran the forward at 0.99-1.05x of whole blocks (kernels-notes, session 26)
        defaults["BLOCK_K"] = min(32, consts["BLOCK_S"])
    launch = _key_tiled(launch_params(LAUNCH, "fwd", **defaults), consts["BLOCK_S"])
    tokens, heads = _token_tile(launch, consts["G"])
    tma = _tma_loads(launch, q, k, v, tokens)
    keys_m = _keys_as_m(launch, "fwd", tokens)
    if tokens == 1:
        if rows is not None and rows.numel() == 0:
            return
        _selected_fwd[(seq if rows is None else rows.numel(), batch * k.shape[2])](
            q, k, v, block_idx, doc_start, o, lse, slot_lse, rows, *sizes,
            SEL=selection_block, BLOCK_G=pow2(consts["G"]), BLOCK_N=pow2(block_idx.shape[-1]),
            SLOT_LSE=want_slot_lse, TMA=tma, ROWS=rows is not None, KEYS_M=keys_m, **consts, **launch,
        )
    elif want_slot_lse:
        raise ValueError(f"selected_attention_triton: slot_lse is written by the one-token forward only; "
                         f"LAUNCH['fwd'] sets TOKENS={tokens}: leave TOKENS out when asking for slot_lse")
    else:
        _selected_fwd_tokens[(triton.cdiv(seq, tokens), batch * k.shape[2])](
            q, k, v, block_idx, block_base, block_start, block_end, o, lse, *sizes,
            TT=tokens, HEADS=heads, BLOCK_N=pow2(block_idx.shape[-1]), **consts, **launch,
        )


def _dq_by_tokens(q, k, v, do, lse, delta, block_idx, layout, dq, sizes, selection_block, q_start, scale, consts,
                  rows):
    """dQ a program a token (or TOKENS tokens), as used: _selected_bwd_dq or _selected_bwd_dq_tokens. rows (or
    None): the one-token kernel runs those rows alone (dq already holds the others' 0)."""
    batch, seq = q.shape[:2]
    doc_start, block_base, block_start, block_end = layout
    num_kv_heads = k.shape[2]
    defaults = {**_dq_launch(q, v), **_tma_by_default("dq", q, k, v)}
    launch = _key_tiled(launch_params(LAUNCH, "dq", **defaults), consts["BLOCK_S"])
    tokens, heads = _token_tile(launch, consts["G"])
    tma = _tma_loads(launch, q, k, v, tokens)
    keys_m = _keys_as_m(launch, "dq", tokens)
    if tokens == 1:
        if rows is not None and rows.numel() == 0:
            return
        _selected_bwd_dq[(seq if rows is None else rows.numel(), batch * num_kv_heads)](
            q, k, v, do, lse, delta, block_idx, doc_start, dq, rows,
            *sizes, block_idx.shape[-1], q_start, scale * LOG2E, scale,
            SEL=selection_block, BLOCK_G=pow2(consts["G"]), BLOCK_N=pow2(block_idx.shape[-1]), TMA=tma,
            ROWS=rows is not None, KEYS_M=keys_m, **consts, **launch,
        )
    else:
        _selected_bwd_dq_tokens[(triton.cdiv(seq, tokens), batch * num_kv_heads)](
            q, k, v, do, lse, delta, block_idx, block_base, block_start, block_end, dq,
            *sizes, block_idx.shape[-1], q_start, scale * LOG2E, scale,
            TT=tokens, HEADS=heads, BLOCK_N=pow2(block_idx.shape[-1]), **consts, **launch,
        )


class SelectedAttention(torch.autograd.Function):
    """(o, lse) of selected attention; differentiable in q, k, v (and the gate, whose backward it applies:
    kernels.range_attention.RangeAttention). Arguments as selected_attention_triton, plus the layout from
    selection_layout."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, selection_block, scale, q_start, layout, want_slot_lse, rows, gate=None):
        batch, seq, num_q_heads, _ = q.shape
        consts = _consts(q, k, v, selection_block)
        if rows is None:  # every row is written by the kernels
            o = poisoned((batch, seq, num_q_heads, v.shape[-1]), q.dtype, q.device)
            lse = poisoned((batch, seq, num_q_heads), torch.float32, q.device)
        else:  # the rows without picks are not launched: their output is 0, their lse -inf, written here
            o = torch.zeros((batch, seq, num_q_heads, v.shape[-1]), dtype=q.dtype, device=q.device)
            lse = torch.full((batch, seq, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
        # the kernel writes the slots it visits; the others (after a row's last pick) stay -inf
        slot_shape = (batch, seq, num_q_heads, block_idx.shape[-1]) if want_slot_lse else (0,)
        slot_lse = torch.full(slot_shape, float("-inf"), dtype=torch.float32, device=q.device)
        sizes = (seq, k.shape[1], num_q_heads, k.shape[2], block_idx.shape[-1], q_start, scale * LOG2E)
        by_blocks = _by_blocks_launch("fwd", consts["G"], q.is_cuda, want_slot_lse)
        if by_blocks is not None:
            if want_slot_lse:
                raise ValueError("selected_attention_triton: slot_lse is written by the one-token forward only; "
                                 "LAUNCH['fwd'] sets BY_BLOCKS: leave it out when asking for slot_lse")
            _forward_by_blocks(q, k, v, block_idx, layout, o, lse, q_start, scale, consts, by_blocks)
        else:
            _forward_by_tokens(q, k, v, block_idx, layout, o, lse, slot_lse, selection_block, sizes, consts,
                               want_slot_lse, rows)
        ctx.save_for_backward(q, k, v, o, lse, block_idx, gate, *layout)
        ctx.args = (selection_block, scale, q_start, rows)
        ctx.mark_non_differentiable(slot_lse)
        return o, lse, slot_lse

    @staticmethod
    def backward(ctx, do, dlse, dslot_lse):
        q, k, v, o, lse, block_idx, gate, *layout = ctx.saved_tensors
        _, block_base, block_start, block_end = layout
        selection_block, scale, q_start, rows = ctx.args
        batch, seq, num_q_heads, _ = q.shape
        num_keys, num_kv_heads = k.shape[1], k.shape[2]
        delta, do, d_gate = attention_delta(o, do.contiguous(), dlse, gate)
        consts = _consts(q, k, v, selection_block)
        sizes = (seq, num_keys, num_q_heads, num_kv_heads)

        dq = poisoned(q.shape, q.dtype, q.device) if rows is None else torch.zeros_like(q)
        by_blocks = _by_blocks_launch("dq", consts["G"], q.is_cuda)
        if by_blocks is not None:
            _dq_by_blocks(q, k, v, do, lse, delta, block_idx, layout, dq, q_start, scale, consts, by_blocks)
        else:
            _dq_by_tokens(q, k, v, do, lse, delta, block_idx, layout, dq, sizes, selection_block, q_start, scale, consts,
                          rows)

        num_blocks = block_start.numel()
        entries, seg_block, seg_lo, seg_hi, seg_first, seg_count = inverted_index(block_idx, block_base, num_blocks)
        tile = (consts["BLOCK_S"], consts["BLOCK_DK"], consts["BLOCK_DV"])
        part_k = torch.empty(seg_block.numel(), tile[0], tile[1], dtype=torch.float32, device=q.device)
        part_v = torch.empty(seg_block.numel(), tile[0], tile[2], dtype=torch.float32, device=q.device)
        if seg_block.numel():
            launch = _dkv_launch(consts["G"], q.is_cuda)
            if launch.pop("KEYS_M", False):
                kernel = _selected_bwd_dkv_keys_m
                launch["GROUP_P"] = pow2(consts["G"], minimum=1)
                launch["BLOCK_N"] = _keys_m_rows(launch.get("BLOCK_N"), consts["G"])
            else:
                kernel = _selected_bwd_dkv
            kernel[(seg_block.numel(),)](
                q, k, v, do, lse, delta, entries, seg_block, seg_lo, seg_hi, block_start, block_end, part_k, part_v,
                *sizes, num_blocks, q_start, scale * LOG2E, scale, **consts, **launch,
            )
        dk = poisoned(k.shape, k.dtype, k.device)
        dv = poisoned(v.shape, v.dtype, v.device)
        _selected_bwd_reduce[(batch * num_kv_heads * num_blocks,)](
            part_k, part_v, seg_first, seg_count, block_start, block_end, dk, dv,
            num_keys, num_kv_heads, num_blocks,
            DK=consts["DK"], DV=consts["DV"], BLOCK_S=tile[0], BLOCK_DK=tile[1], BLOCK_DV=tile[2],
            **launch_params(LAUNCH, "reduce"),
        )
        return dq, dk, dv, None, None, None, None, None, None, None, d_gate


def selected_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    selection_block: int,
    scale: float | None = None,
    q_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    slot_lse: bool = False,
    rows: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Attention of query t over tokens <= t of its group's selected blocks (Triton; as selected_attention_ref).

    q: [B, T, HQ, Dk]; k: [B, TK, HK, Dk]; v: [B, TK, HK, Dv]; one dtype among fp32/fp16/bf16,
    HQ = G * HK with G <= 32, Dk and Dv <= 256. Keys are indexed by global position; query j sits at
    q_start + j. block_idx: [B, T, HK, n] int32, distinct ids per row (any order), -1 for unused slots;
    block j covers tokens [j*l', (j+1)*l') of the query's document.
    cu_seqlens: optional int32 [num_docs + 1] boundaries of packed documents (B must be 1); block ids
    are then per document (block j of document D covers cu_seqlens[D] + [j*l', (j+1)*l')).
    Returns o: [B, T, HQ, Dv] q.dtype and lse: [B, T, HQ] float32 (-inf, with o = 0, where nothing is
    visible). Differentiable in q, k, v (and through lse). slot_lse: also each slot's log-sum-exp over its
    block's visible keys alone, [B, T, HQ, n] float32, no gradient (as selected_attention_ref's).
    rows: optional int32 [R] on q's device, the query rows (0 <= row < T, any order, each once) that hold
    picks; every other row must have none (-1 throughout, for every batch and KV head). The one-token
    kernels then launch a program a listed row instead of a row each, and the others get o = 0, lse = -inf
    and no gradient without a launch (compose_nsa's window-covered rows: about nine in ten of the proof's
    first-stage rows). The result is the same as without it; the key-block and token-tile paths ignore it.
    gate: optional [B, T, HQ], this branch's gate in NSA's gated sum. The output stays ungated, for
    kernels.gate_combine.triton.gated_sum_triton, and its backward applies the gate: the gradient it is
    given is taken as the gated sum's, and the gate gets its gradient (kernels/gate_combine/triton.py).
    """
    check_attention_inputs("selected_attention_triton", q, k, v)
    check_packed("selected_attention_triton", q.shape[0], cu_seqlens)
    if selection_block > 256:
        raise ValueError(f"selected_attention_triton: selection_block={selection_block} > 256 is not supported")
    if rows is not None and (rows.dtype != torch.int32 or rows.dim() != 1 or rows.device != q.device):
        raise ValueError(f"selected_attention_triton: rows is {rows.dtype} of shape {tuple(rows.shape)} on "
                         f"{rows.device}; give a 1-D int32 tensor of row indices on q's device ({q.device}), "
                         "or None for every row")
    layout = selection_layout(q.shape[1], k.shape[1], selection_block, q_start, cu_seqlens, q.device)
    scale = default_scale(q.shape[-1], scale)
    o, lse, slots = SelectedAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), block_idx.to(torch.int32).contiguous(),
        selection_block, scale, q_start, layout, slot_lse, rows, gate_input("selected_attention_triton", q, gate),
    )
    return (o, lse, slots) if slot_lse else (o, lse)
