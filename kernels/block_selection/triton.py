"""Top-n block selection, Triton: never materializes the T x T/d score matrix (DESIGN §2).

One program owns a tile of BLOCK_T query tokens of one document and one (batch, KV head). It walks the
selection blocks in tiles of ST (>= n) blocks. For each tile it recomputes, for the ST * l'/d compressed
blocks that start inside it, p_cmp = exp(scale * q.k_cmp - lse_cmp) summed over the G query heads of the
group (masked once, after the sum), spreads them onto selection blocks with the overlap weights, and
merges the tile's scores into a running top-ST list kept in registers. Where R = l'/d is a power of two
the spread works on runs: the sums reshaped to [BLOCK_T, ST, R], weighted over R for the block a run
starts in and for the next one, the latter moved one block on (_spread_runs); otherwise it is a product
with a [BLOCK_C, ST] weight matrix built from indices, which an sm_90a compile at the paper config shows
as 512 FMAs a thread and step and a spill (benchmarks/kernels-notes.md, session 58). A compressed block
can reach one selection block past the tile (it ends l - d tokens after it starts); that part is carried
into the next tile. So each compressed score is computed once, as in compressed attention's forward.
With the "max" score (nsa.selection_score) each head's p_cmp is spread on its own and the group's score
is the largest head's: one more [BLOCK_T, BLOCK_C] x [BLOCK_C, ST] product per head, and a carry per head.

Key splits (sum score): at 128K a tile's queries (BLOCK_T tokens x G heads, 256 KB at G=16, D=128) are
reloaded for every head and step, and the resident programs' tiles outgrow L2, so the kernel streamed
them from DRAM (Nsight Compute at 6e59594: 68% of DRAM bandwidth, 8% L2 hit rate). A long tile's steps are
therefore cut into SPLITS runs, one program each, launched next to each other so they read the same
queries from L2; each writes its running list, and a small kernel merges them. A split that starts
mid-tile first recomputes the score its first block would have been carried from the block before it.

Queries with no choice are not scored: one less than n * l' tokens into its document sees at most n blocks
and takes them all. Their picks are written as a pattern (forced_picks) and the tiles that hold only such
queries are left out of the launch (query_tiles): in the proof's first stage, of 256-token samples, that is
nearly every tile.

Ranking: each (score, block) pair is packed into one int64 key, score bits high (scores are >= 0, so
their float bits order like the floats; forced blocks get +inf) and 0x7FFFFFFF - block low, so that a
descending sort of keys ranks by score and breaks ties toward the lower block id, exactly as the
reference's stable sort. Blocks a query may not pick get key -1.

With the "exact" score (nsa.selection_score) top-n reads the selection branch's raw keys instead of the
compressed ones, over query tiles of a few tokens whose (token, head) pairs are the program's rows (the
group's queries loaded once). _topn_exact_one_pass_kernel (EXACT_ONE_PASS, the default) walks the selection
blocks (l' keys each) once: each row's running max and sum over its visible keys, as a flash-attention
forward without output, and each block's own log-sum-exp, kept in a scratch buffer; then, with the row's lse
known, exp(block lse - lse) is the row's mass on the block, summed over the group's heads and merged ST
blocks at a time into the same running top-ST list. One causal QK^T pass with its exps and no PV product.
The two-pass way before it (EXACT_ONE_PASS = False): the range attention's forward without its output
(range_attention_lse) for each head's lse, then _topn_exact_kernel, which recomputes q.k a block at a time
and sums exp(q.k - lse) over the block's keys.
"""

import functools

import torch
import triton
import triton.language as tl

from kernels.block_selection.indexer import indexer_inputs
from kernels.block_selection.naive import SELECTION_SCORES, bound_inputs
from kernels.common import (
    LAYOUT_CACHE_SIZE, default_scale, device_tensor, document_layout, host_bounds, longest_document,
    positions_in_documents,
)
from kernels.compressed_attention.triton import compressed_attention_triton
from kernels.compression.naive import compressed_bounds
from kernels.range_attention import LOG2E, range_attention_lse
from kernels.triton_utils import (
    check_attention_inputs, check_packed, dot_precision, launch_params, pow2,
)

BLOCK_T = 64  # query tokens per program
# Launch parameters set over the defaults (BLOCK_T, num_warps, num_stages, SPLITS, SORTED_MERGE: _merge's
# way) under the keys "topn" and "topn_exact"; empty in use, filled by benchmarks/kernels-exp-sweep.py.
# (A second kernel holding the group's heads as the rows of one tile, so a tile's queries load once, picked
# the same blocks but ran 0.42-0.68x as fast at 128K, G=16, D=128; removed, see benchmarks/kernels-notes.md,
# session 29. The exact score's top-n, whose key tiles are raw keys, is faster that way: EXACT_ROWS.)
LAUNCH: dict[str, dict] = {}


@triton.jit
def _tile_tokens(tiles, tile, q_start, SEL: tl.constexpr, BLOCK_T: tl.constexpr):
    """Query tile `tile` (query_tiles' row): its tokens, which are real, their positions in the document,
    their current selection blocks, the tile's last current block, and the document's first token."""
    tok_lo = tl.load(tiles + tile * 5)
    tok_hi = tl.load(tiles + tile * 5 + 1)
    doc_start = tl.load(tiles + tile * 5 + 2)
    toks = tok_lo + tl.arange(0, BLOCK_T)
    tok_ok = toks < tok_hi
    pos = q_start + toks - doc_start  # position inside the document
    cur = pos // SEL
    return toks, tok_ok, pos, cur, tl.max(tl.where(tok_ok, cur, 0)), doc_start


@triton.jit
def _tile(tiles, tile, L: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, q_start, BLOCK_T: tl.constexpr):
    """_tile_tokens' tokens, which are real, current blocks, the compressed tokens each has seen, the tile's
    last current block, and the document's first compressed row and number of them."""
    toks, tok_ok, pos, cur, last, _ = _tile_tokens(tiles, tile, q_start, SEL, BLOCK_T)
    num_seen = tl.where(pos >= L - 1, (pos - L + 1) // STRIDE + 1, 0)
    return toks, tok_ok, cur, num_seen, last, tl.load(tiles + tile * 5 + 3), tl.load(tiles + tile * 5 + 4)


@triton.jit
def _spread(c, c_ok, j0, L: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, ST: tl.constexpr):
    """Overlap weights of the compressed tokens c on the selection blocks j0 .. j0 + ST - 1: [BLOCK_C, ST],
    |tokens(compressed block c) & tokens(selection block j)| / d, and [BLOCK_C] the part past the tile
    (carried into the next tile)."""
    c_first = c * STRIDE
    blocks = j0 + tl.arange(0, ST)
    overlap = (tl.minimum(c_first[:, None] + L, (blocks[None, :] + 1) * SEL)
               - tl.maximum(c_first[:, None], blocks[None, :] * SEL))
    weight = tl.where(c_ok[:, None], tl.maximum(overlap, 0).to(tl.float32) / STRIDE, 0.0)
    spill = tl.minimum(c_first + L, (j0 + ST + 1) * SEL) - tl.maximum(c_first, (j0 + ST) * SEL)
    return weight, tl.where(c_ok, tl.maximum(spill, 0).to(tl.float32) / STRIDE, 0.0)


@triton.jit
def _spread_runs(p, carry, L: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, ST: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    """_spread's weights applied to p [BLOCK_T, ST * R] (R = l' / d a power of two: the compressed blocks
    starting in each of the ST selection blocks, in order), without the [ST * R, ST] product: the r-th block
    starting in selection block j puts min(l, l' - r d) / d on j and the rest, (r d + l - l')+ / d, on j + 1
    (l <= l'). Returns the ST blocks' scores, carry (from the step before) added to the first, and what the
    last one's compressed blocks carry into the next step. [BLOCK_T, ST], [BLOCK_T]"""
    R: tl.constexpr = SEL // STRIDE
    r = tl.arange(0, R)
    own_weight = tl.minimum(L, SEL - r * STRIDE).to(tl.float32) / STRIDE
    next_weight = tl.maximum(r * STRIDE + L - SEL, 0).to(tl.float32) / STRIDE
    runs = tl.reshape(p, [BLOCK_T, ST, R])
    own = tl.sum(runs * own_weight[None, None, :], 2)
    to_next = tl.sum(runs * next_weight[None, None, :], 2)
    cols = tl.arange(0, ST)
    from_before = tl.gather(to_next, tl.broadcast_to(tl.maximum(cols - 1, 0)[None, :], [BLOCK_T, ST]), 1)
    from_before = tl.where(cols[None, :] == 0, carry[:, None], from_before)
    return own + from_before, tl.sum(tl.where(cols[None, :] == ST - 1, to_next, 0.0), 1)


@triton.jit
def _merge(running, scores, tok_ok, cur, blocks, BLOCK_T: tl.constexpr, ST: tl.constexpr, SORTED_MERGE: tl.constexpr):
    """Merges one tile of selection blocks' scores [BLOCK_T, ST] into the running top-ST keys, sorted
    descending (the module docstring's ranking; block 0 and the two local blocks forced, blocks after the
    query's refused). SORTED_MERGE: the tile's keys are sorted ascending, and their elementwise maximum with
    the running list (a bitonic sequence holding the top ST of the union) takes one bitonic merge: at ST=16,
    14 compare-and-swap rounds over ST keys a row, against 10 rounds over 2 ST and 4 over ST for topk of the
    two lists side by side; half the keys live at once. The same keys in the same order either way."""
    allowed = tok_ok[:, None] & (blocks[None, :] <= cur[:, None])
    forced = (blocks[None, :] == 0) | (blocks[None, :] == cur[:, None]) | (blocks[None, :] == cur[:, None] - 1)
    scores = tl.where(forced, float("inf"), scores)
    key = (scores.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (0x7FFFFFFF - blocks).to(tl.int64)[None, :]
    key = tl.where(allowed, key, -1)
    if SORTED_MERGE:
        return tl.bitonic_merge(tl.maximum(running, tl.sort(key)), descending=True)
    return tl.topk(tl.reshape(tl.join(running, key), [BLOCK_T, 2 * ST]), ST)


@triton.jit
def _store_picks(out, running, toks, tok_ok, b, hk, T, HK, NSEL, ST: tl.constexpr):
    """The first n keys are the pick: writes their block ids in ascending order, -1 after them."""
    cols = tl.arange(0, ST)
    picked = (cols[None, :] < NSEL) & (running >= 0)
    ids = tl.where(picked, 0x7FFFFFFF - (running & 0x7FFFFFFF), 0x7FFFFFFF).to(tl.int32)
    ids = tl.sort(ids)
    ids = tl.where(ids == 0x7FFFFFFF, -1, ids)
    dst = ((b * T + toks) * HK + hk)[:, None] * NSEL + cols[None, :]
    tl.store(out + dst, ids, mask=tok_ok[:, None] & (cols[None, :] < NSEL))


@triton.jit
def _head_exp(q, lse, kt, b, hk, g, toks, tok_ok, T, HQ, scale_log2,
              G: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr):
    """exp(scale * q.k - lse) of query head g of the group for the tile's tokens and the compressed keys kt,
    [BLOCK_T, keys], for every pair: p_cmp where the key is visible, any value >= 0 (+inf included) where
    not, to be masked by the caller."""
    dk = tl.arange(0, BLOCK_DK)
    flat = (b * T + toks) * HQ + hk * G + g
    qt = tl.load(q + flat[:, None] * DK + dk[None, :], mask=tok_ok[:, None] & (dk[None, :] < DK), other=0.0)
    row_lse = tl.load(lse + flat, mask=tok_ok, other=0.0)
    row_lse = tl.where(row_lse == float("-inf"), 0.0, row_lse * 1.4426950408889634)
    s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_log2
    return tl.exp2(s - row_lse[:, None])


@triton.jit
def _head_probs(q, lse, kt, visible, b, hk, g, toks, tok_ok, T, HQ, scale_log2,
                G: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr):
    """p_cmp of query head g of the group for the tile's tokens and the compressed keys kt: [BLOCK_T, keys]."""
    return tl.where(visible, _head_exp(q, lse, kt, b, hk, g, toks, tok_ok, T, HQ, scale_log2, G, DK, BLOCK_DK,
                                       PRECISION), 0.0)


@triton.jit
def _carry_in(q, k_cmp, lse, b, hk, j, toks, tok_ok, num_seen, cmp_start, cmp_count, T, NC, HQ, HK, scale_log2,
              G: tl.constexpr, L: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, DK: tl.constexpr,
              BLOCK_DK: tl.constexpr, BLOCK_T: tl.constexpr, CARRY_C: tl.constexpr, PRECISION: tl.constexpr):
    """The sum score that selection block j gets from compressed blocks starting before it (a compressed
    block spans at most one selection block boundary): what a split that starts at block j would
    otherwise have carried from the tile before it. [BLOCK_T]"""
    c = j * (SEL // STRIDE) - CARRY_C + tl.arange(0, CARRY_C)
    c_ok = (c >= 0) & (c < cmp_count)
    dk = tl.arange(0, BLOCK_DK)
    kv_row = (b * NC + cmp_start + c) * HK + hk
    kt = tl.load(k_cmp + kv_row[:, None] * DK + dk[None, :], mask=c_ok[:, None] & (dk[None, :] < DK), other=0.0)
    visible = tok_ok[:, None] & c_ok[None, :] & (c[None, :] < num_seen[:, None])
    c_first = c * STRIDE
    overlap = tl.minimum(c_first + L, (j + 1) * SEL) - tl.maximum(c_first, j * SEL)
    weight = tl.where(c_ok, tl.maximum(overlap, 0).to(tl.float32) / STRIDE, 0.0)
    p_sum = tl.zeros([BLOCK_T, CARRY_C], tl.float32)
    for g in range(G):
        p_sum += _head_probs(q, lse, kt, visible, b, hk, g, toks, tok_ok, T, HQ, scale_log2, G, DK, BLOCK_DK,
                             PRECISION)
    return tl.sum(p_sum * weight[None, :], 1)


@triton.jit(do_not_specialize=["NC"])  # NC: the compressed tokens of the batch (triton_utils)
def _topn_kernel(
    q, k_cmp, lse, tiles, out, part,
    T, NC, HQ, HK, NSEL, q_start, scale_log2,
    G: tl.constexpr, L: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr,
    DK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ST: tl.constexpr,
    PRECISION: tl.constexpr, MAX_SCORE: tl.constexpr, BLOCK_G: tl.constexpr, SPLITS: tl.constexpr,
    CARRY_C: tl.constexpr, SORTED_MERGE: tl.constexpr, SPREAD_RUNS: tl.constexpr,
):
    """A program a tile of BLOCK_T tokens; the group's heads one after another (a [BLOCK_T, D] query tile
    loaded and multiplied per head and key tile). With SPLITS > 1 (sum score only) a tile's selection
    blocks are cut into SPLITS runs of whole ST-block steps, one program each, launched side by side so
    that the tile's queries, reloaded for every head and step, are served by L2 rather than DRAM; each
    writes its running top-ST keys to part [B, T, HK, SPLITS, ST] and _topn_merge_kernel picks from them."""
    R: tl.constexpr = SEL // STRIDE  # compressed blocks starting inside one selection block
    b = (tl.program_id(1) // HK).to(tl.int64)
    hk = tl.program_id(1) % HK
    split = tl.program_id(0) % SPLITS
    toks, tok_ok, cur, num_seen, last, cmp_start, cmp_count = _tile(
        tiles, tl.program_id(0) // SPLITS, L, STRIDE, SEL, q_start, BLOCK_T)
    cols = tl.arange(0, ST)
    local_c = tl.arange(0, BLOCK_C)
    dk = tl.arange(0, BLOCK_DK)

    steps = last // ST + 1
    per_split = tl.cdiv(steps, SPLITS)
    first = split * per_split
    stop = tl.minimum(steps, first + per_split)
    running = tl.full([BLOCK_T, ST], -1, tl.int64)
    carry = tl.zeros([BLOCK_T], tl.float32)
    if SPLITS > 1:
        if (first > 0) & (first < stop):
            carry = _carry_in(q, k_cmp, lse, b, hk, first * ST, toks, tok_ok, num_seen, cmp_start, cmp_count,
                              T, NC, HQ, HK, scale_log2, G, L, STRIDE, SEL, DK, BLOCK_DK, BLOCK_T, CARRY_C, PRECISION)
    heads = tl.arange(0, BLOCK_G)
    head_carry = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)  # "max": each head's carry, one column a head
    for step in range(first, stop):
        j0 = step * ST
        c = j0 * R + local_c
        c_ok = (local_c < ST * R) & (c < cmp_count)
        kv_row = (b * NC + cmp_start + c) * HK + hk
        kt = tl.load(k_cmp + kv_row[:, None] * DK + dk[None, :], mask=c_ok[:, None] & (dk[None, :] < DK), other=0.0)
        visible = tok_ok[:, None] & c_ok[None, :] & (c[None, :] < num_seen[:, None])
        if MAX_SCORE:
            if not SPREAD_RUNS:
                weight, spill_weight = _spread(c, c_ok, j0, L, STRIDE, SEL, ST)
            scores = tl.zeros([BLOCK_T, ST], tl.float32)
            for g in range(G):
                p = _head_probs(q, lse, kt, visible, b, hk, g, toks, tok_ok, T, HQ, scale_log2, G, DK, BLOCK_DK,
                                PRECISION)
                is_g = heads[None, :] == g
                carried = tl.sum(tl.where(is_g, head_carry, 0.0), 1)
                if SPREAD_RUNS:
                    head_scores, carried = _spread_runs(p, carried, L, STRIDE, SEL, ST, BLOCK_T)
                else:
                    head_scores = (tl.dot(p, weight, input_precision="ieee")
                                   + tl.where(cols[None, :] == 0, carried[:, None], 0.0))
                    carried = tl.sum(p * spill_weight[None, :], 1)
                scores = tl.maximum(scores, head_scores)
                head_carry = tl.where(is_g, carried[:, None], head_carry)
        else:
            # the heads' exps summed unmasked (an invisible pair's may be +inf), then masked once
            p_sum = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
            for g in range(G):
                p_sum += _head_exp(q, lse, kt, b, hk, g, toks, tok_ok, T, HQ, scale_log2, G, DK, BLOCK_DK,
                                   PRECISION)
            p_sum = tl.where(visible, p_sum, 0.0)
            if SPREAD_RUNS:
                scores, carry = _spread_runs(p_sum, carry, L, STRIDE, SEL, ST, BLOCK_T)
            else:
                weight, spill_weight = _spread(c, c_ok, j0, L, STRIDE, SEL, ST)
                scores = (tl.dot(p_sum, weight, input_precision="ieee")
                          + tl.where(cols[None, :] == 0, carry[:, None], 0.0))
                carry = tl.sum(p_sum * spill_weight[None, :], 1)
        running = _merge(running, scores, tok_ok, cur, j0 + cols, BLOCK_T, ST, SORTED_MERGE)
    if SPLITS == 1:
        _store_picks(out, running, toks, tok_ok, b, hk, T, HK, NSEL, ST)
    else:
        dst = (((b * T + toks) * HK + hk) * SPLITS + split)[:, None] * ST + cols[None, :]
        tl.store(part + dst, running, mask=tok_ok[:, None])


@triton.jit
def _topn_merge_kernel(part, tiles, out, T, HK, NSEL, q_start,
                       SEL: tl.constexpr, BLOCK_T: tl.constexpr, ST: tl.constexpr, SPLITS: tl.constexpr):
    """The top ST of a tile's SPLITS partial lists (keys rank as in _merge, so the union's top ST is the
    single pass's list), stored as _topn_kernel stores its picks."""
    b = (tl.program_id(1) // HK).to(tl.int64)
    hk = tl.program_id(1) % HK
    toks, tok_ok, _, _, _, _ = _tile_tokens(tiles, tl.program_id(0), q_start, SEL, BLOCK_T)
    cols = tl.arange(0, SPLITS * ST)
    keys = tl.load(part + ((b * T + toks) * HK + hk)[:, None] * (SPLITS * ST) + cols[None, :],
                   mask=tok_ok[:, None], other=-1)
    _store_picks(out, tl.topk(keys, ST), toks, tok_ok, b, hk, T, HK, NSEL, ST)


@triton.jit
def _block_keys(k, b, hk, j, doc_start, TK, HK, SEL: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr):
    """Selection block j's raw keys [SEL, BLOCK_DK] (zero where past the keys given) and their positions."""
    kpos = j * SEL + tl.arange(0, SEL)
    dk = tl.arange(0, BLOCK_DK)
    rows = (b * TK + doc_start + kpos) * HK + hk
    ok = (doc_start + kpos < TK)[:, None] & (dk[None, :] < DK)
    return tl.load(k + rows[:, None] * DK + dk[None, :], mask=ok, other=0.0), kpos


@triton.jit
def _exact_rows(q, tiles, tile, b, hk, T, HQ, q_start, doc_start, G: tl.constexpr, DK: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """The exact score's rows of query tile `tile`: its (token, head) pairs, head fastest (BLOCK_G a token, the
    group padded), which are real, their positions in the document, their flat offsets in [B, T, HQ] and their
    queries [rows, BLOCK_DK] (zero for padding rows)."""
    rows = tl.arange(0, BLOCK_T * BLOCK_G)
    row_tok = tl.load(tiles + tile * 5) + rows // BLOCK_G
    row_g = rows % BLOCK_G
    row_ok = (row_tok < tl.load(tiles + tile * 5 + 1)) & (row_g < G)
    row_pos = q_start + row_tok - doc_start
    flat = (b * T + row_tok) * HQ + hk * G + row_g
    dk = tl.arange(0, BLOCK_DK)
    qr = tl.load(q + flat[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
    return rows, row_ok, row_pos, flat, qr


@triton.jit(do_not_specialize=["TK"])
def _topn_exact_kernel(
    q, k, lse, tiles, out,
    T, TK, HQ, HK, NSEL, q_start, scale_log2,
    G: tl.constexpr, SEL: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr, ST: tl.constexpr, PRECISION: tl.constexpr, SORTED_MERGE: tl.constexpr,
):
    """Top-n by the group's exact attention mass on each block: sum over its heads and the block's visible
    keys of exp2(s - lse) (lse: natural log, range_attention_lse's), ST blocks scored into one [BLOCK_T, ST]
    tile and then merged. The tile's rows are its (token, head) pairs, head fastest: the group's queries
    are loaded once and stay in registers, and each block's keys take one [BLOCK_T * BLOCK_G, l'] product."""
    b = (tl.program_id(1) // HK).to(tl.int64)
    hk = tl.program_id(1) % HK
    tile = tl.program_id(0)
    toks, tok_ok, _, cur, last, doc_start = _tile_tokens(tiles, tile, q_start, SEL, BLOCK_T)
    _, row_ok, row_pos, flat, qr = _exact_rows(q, tiles, tile, b, hk, T, HQ, q_start, doc_start, G, DK, BLOCK_DK,
                                               BLOCK_T, BLOCK_G)
    # in log2 units; +inf for padding rows, whose exp2(s - lse) is then 0
    row_lse = tl.load(lse + flat, mask=row_ok, other=float("inf")) * 1.4426950408889634
    cols = tl.arange(0, ST)
    running = tl.full([BLOCK_T, ST], -1, tl.int64)
    for j0 in range(0, last + 1, ST):
        scores = tl.zeros([BLOCK_T, ST], tl.float32)
        for jj in range(0, ST):
            kt, kpos = _block_keys(k, b, hk, j0 + jj, doc_start, TK, HK, SEL, DK, BLOCK_DK)
            s = tl.dot(qr, tl.trans(kt), input_precision=PRECISION) * scale_log2
            p = tl.where(kpos[None, :] <= row_pos[:, None], tl.exp2(s - row_lse[:, None]), 0.0)
            mass = tl.sum(tl.reshape(tl.sum(p, 1), [BLOCK_T, BLOCK_G]), 1)
            scores = tl.where(cols[None, :] == jj, mass[:, None], scores)
        running = _merge(running, scores, tok_ok, cur, j0 + cols, BLOCK_T, ST, SORTED_MERGE)
    _store_picks(out, running, toks, tok_ok, b, hk, T, HK, NSEL, ST)


@triton.jit
def _exact_block(qr, k, b, hk, j, doc_start, TK, HK, row_pos, m, l_sum, scratch, rows, scale_log2,
                 SEL: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr, ROWS: tl.constexpr,
                 PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One selection block j of _topn_exact_one_pass_kernel's first loop: the rows' scores against its keys
    (MASKED: the keys after a row's own position left out), folded into the running max m and sum l_sum, and
    the block's own log-sum-exp (base 2; -inf where the block adds nothing) written to row r's slot
    scratch[j * ROWS + r]. Returns the new (m, l_sum)."""
    kt, kpos = _block_keys(k, b, hk, j, doc_start, TK, HK, SEL, DK, BLOCK_DK)
    s = tl.dot(qr, tl.trans(kt), input_precision=PRECISION) * scale_log2
    if MASKED:
        s = tl.where(kpos[None, :] <= row_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf) for rows that see nothing yet
    block_sum = tl.sum(tl.exp2(s - shift[:, None]), 1)
    l_sum = l_sum * tl.exp2(m - shift) + block_sum
    seen = block_sum > 0
    tl.store(scratch + j * ROWS + rows,
             tl.where(seen, shift + tl.log2(tl.where(seen, block_sum, 1.0)), float("-inf")))
    return m_new, l_sum


@triton.jit(do_not_specialize=["TK", "TILE0", "NB"])
def _topn_exact_one_pass_kernel(
    q, k, tiles, block_lse, out,
    T, TK, HQ, HK, NSEL, q_start, scale_log2, TILE0, NB,
    G: tl.constexpr, SEL: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr, ST: tl.constexpr, PRECISION: tl.constexpr, SORTED_MERGE: tl.constexpr,
):
    """_topn_exact_kernel's picks with one pass over the keys instead of two. The first loop walks the tile's
    blocks once, as a flash-attention forward without its output: each (token, head) row's running max m and
    sum l over its visible keys, and each block's own log-sum-exp (base 2), m + log2(sum of the block's
    exp2(s - m)), which it writes to this program's slice of `block_lse` ([NB, rows] fp32, NB >= the tile's
    blocks). Then lse = m + log2(l) is known, and the second loop reads the block log-sum-exps back, so a
    block's mass for a row is exp2(block lse - lse): one exp a (row, block) instead of a dot and an exp a key.
    The heads' masses are summed per token and merged ST blocks at a time as in _topn_exact_kernel.
    Program (i, batch x KV head) scores query tile TILE0 + i."""
    b = (tl.program_id(1) // HK).to(tl.int64)
    hk = tl.program_id(1) % HK
    tile = TILE0 + tl.program_id(0)
    toks, tok_ok, _, cur, last, doc_start = _tile_tokens(tiles, tile, q_start, SEL, BLOCK_T)
    ROWS: tl.constexpr = BLOCK_T * BLOCK_G
    rows, row_ok, row_pos, _, qr = _exact_rows(q, tiles, tile, b, hk, T, HQ, q_start, doc_start, G, DK,
                                               BLOCK_DK, BLOCK_T, BLOCK_G)
    scratch = block_lse + (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * NB * ROWS

    m = tl.full([ROWS], float("-inf"), tl.float32)
    l_sum = tl.zeros([ROWS], tl.float32)
    # blocks before every token's current one are wholly visible to all the tile's rows: no mask there
    first = tl.min(tl.where(tok_ok, cur, last))
    for j in range(0, first):
        m, l_sum = _exact_block(qr, k, b, hk, j, doc_start, TK, HK, row_pos, m, l_sum, scratch, rows, scale_log2,
                                SEL, DK, BLOCK_DK, ROWS, PRECISION, False)
    for j in range(first, last + 1):
        m, l_sum = _exact_block(qr, k, b, hk, j, doc_start, TK, HK, row_pos, m, l_sum, scratch, rows, scale_log2,
                                SEL, DK, BLOCK_DK, ROWS, PRECISION, True)
    # +inf for padding rows and rows that see no key: every exp2(block lse - lse) is then 0
    seen = row_ok & (l_sum > 0)
    row_lse = tl.where(seen, m + tl.log2(tl.where(seen, l_sum, 1.0)), float("inf"))
    tl.debug_barrier()  # the block log-sum-exps one thread wrote are read back by others of the program

    cols = tl.arange(0, ST)
    running = tl.full([BLOCK_T, ST], -1, tl.int64)
    for j0 in range(0, last + 1, ST):
        blocks = j0 + cols
        part = tl.load(scratch + blocks[None, :] * ROWS + rows[:, None], mask=(blocks <= last)[None, :],
                       other=float("-inf"))
        mass = tl.sum(tl.reshape(tl.exp2(part - row_lse[:, None]), [BLOCK_T, BLOCK_G, ST]), 1)
        running = _merge(running, mass, tok_ok, cur, blocks, BLOCK_T, ST, SORTED_MERGE)
    _store_picks(out, running, toks, tok_ok, b, hk, T, HK, NSEL, ST)


def query_tiles(
    seq: int, num_blocks: int, block_size: int, stride: int, q_start: int, cu_seqlens: torch.Tensor | None,
    block_t: int, device: torch.device, forced_until: int = 0,
) -> torch.Tensor:
    """Tiles of at most block_t query tokens that never straddle a document, the longest first, leaving out
    the tiles whose every query sits less than `forced_until` tokens into its document (select_blocks_triton
    passes n * l': such a query can see at most n blocks, so its picks are forced_picks', whatever the scores).

    Returns int64 [num_tiles, 5]: (first token, end token) as local query indices, the document's first
    global position, its first compressed row, its number of compressed rows.
    """
    if cu_seqlens is None:
        return _one_document_tiles(seq, num_blocks, q_start, block_t, device, forced_until)
    bounds = host_bounds(cu_seqlens)
    key = ("query_tiles", seq, block_size, stride, q_start, block_t, device, forced_until)
    return document_layout(cu_seqlens, key, lambda: _tiles(seq, q_start, bounds, compressed_bounds(
        bounds, block_size, stride), block_t, device, forced_until))


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _one_document_tiles(seq: int, num_blocks: int, q_start: int, block_t: int, device: torch.device,
                        forced_until: int) -> torch.Tensor:
    """query_tiles of one document, cached per shape (every layer of a step asks the same)."""
    return _tiles(seq, q_start, [0, q_start + seq], [0, num_blocks], block_t, device, forced_until)


def _tiles(seq: int, q_start: int, bounds: list[int], cmp_bounds: list[int], block_t: int,
           device: torch.device, forced_until: int) -> torch.Tensor:
    rows = []
    for doc_lo, doc_hi, cmp_lo, cmp_hi in zip(bounds[:-1], bounds[1:], cmp_bounds[:-1], cmp_bounds[1:]):
        lo, hi = max(doc_lo, q_start) - q_start, min(doc_hi, q_start + seq) - q_start
        rows += [(t, min(t + block_t, hi), doc_lo, cmp_lo, cmp_hi - cmp_lo) for t in range(lo, hi, block_t)]
    # a tile's last token sits q_start + end - 1 - doc_lo tokens into its document
    rows = [row for row in rows if q_start + row[1] - row[2] > forced_until]
    # longest first: a tile's work grows with its last token's position in its document (the compressed
    # rows it scans), and programs start in launch order, so the longest ones must not be left for last
    rows.sort(key=lambda row: q_start + row[1] - row[2], reverse=True)
    return device_tensor(rows, torch.int64, device).reshape(-1, 5)


def forced_picks(seq: int, q_start: int, cu_seqlens: torch.Tensor | None, selection_block: int, num_selected: int,
                 device: torch.device) -> torch.Tensor:
    """[seq, n] int32, what top-n picks for a query less than n * l' tokens into its document: it can see at
    most n blocks, so it takes every one, 0 .. p // l' (p: its position in its document), then -1 (as the
    reference's ascending picks). Further in, the row holds 0 .. n - 1, which the kernel overwrites: those
    queries' tiles are never left out (query_tiles)."""
    if cu_seqlens is None:
        return _forced_picks_from_start(seq, q_start, selection_block, num_selected, device)
    key = ("forced_picks", seq, q_start, selection_block, num_selected, device)
    return document_layout(cu_seqlens, key, lambda: _picks_of_every_block(
        positions_in_documents(q_start, seq, cu_seqlens, device), selection_block, num_selected))


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _forced_picks_from_start(seq: int, q_start: int, selection_block: int, num_selected: int,
                             device: torch.device) -> torch.Tensor:
    """forced_picks of one document from position 0, cached per shape."""
    return _picks_of_every_block(positions_in_documents(q_start, seq, None, device), selection_block, num_selected)


def _picks_of_every_block(in_document: torch.Tensor, selection_block: int, num_selected: int) -> torch.Tensor:
    ids = torch.arange(num_selected, device=in_document.device)
    last = (in_document // selection_block)[:, None]
    return torch.where(ids[None, :] <= last, ids[None, :], -1).to(torch.int32)


def _forced_output(batch: int, seq: int, num_kv_heads: int, num_selected: int, selection_block: int, q_start: int,
                   cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """top-n's output [B, T, HK, n] before its kernels run: forced_picks in every row; the kernels then write
    the rows of the tiles query_tiles keeps."""
    picks = forced_picks(seq, q_start, cu_seqlens, selection_block, num_selected, device)
    return picks[None, :, None, :].expand(batch, seq, num_kv_heads, num_selected).contiguous()


@torch.no_grad()
def select_blocks_triton(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    selection_block: int,
    num_selected: int,
    scale: float | None = None,
    q_start: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    score: str = "sum",
    keys: torch.Tensor | None = None,
    indexer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selection blocks each GQA group's queries attend to (Triton; same result as select_blocks_ref).

    q: [B, T, HQ, Dk]; k_cmp: [B, N, HK, Dk] (one dtype among fp32/fp16/bf16); lse_cmp: [B, T, HQ] float32
    from compressed attention. HQ = G * HK with G <= 32; Dk <= 256; stride must divide block_size and
    selection_block, and block_size <= selection_block.
    Query j sits at position q_start + j; block j covers [j*l', (j+1)*l'). Block 0 and the two local
    blocks are always picked; the rest by overlap-weighted p_cmp, summed over the group's heads (score
    "sum") or the largest head's ("max"), ties to the lower id.
    cu_seqlens: optional int32 [num_docs + 1] boundaries of packed documents (B must be 1); positions
    and block ids are then per document, and k_cmp holds every document's compressed tokens in order.
    keys: with score "exact" or "bound" only, the raw keys [B, S, HK, Dk] from global position 0 through the
    queries' last one (k_cmp and lse_cmp are then not read; "exact": l' a power of two >= 16; "bound":
    2 Dk <= 256, its queries and keys being twice as wide).
    indexer: with score "indexer" only, the learned indexer's weight: "exact" over its queries
    (select_blocks_ref).
    Returns block ids [B, T, HK, n] int32, ascending, -1 where fewer than n blocks are valid.
    """
    if score == "indexer":
        q, score = indexer_inputs("select_blocks_triton", q, keys, indexer), "exact"
    if score == "exact":
        return _select_blocks_exact(q, keys, selection_block, num_selected, scale, q_start, cu_seqlens)
    if score == "bound":  # the "sum" score over the bound's queries and keys (naive.bound_inputs)
        if keys is None:
            raise ValueError("select_blocks_triton: the 'bound' selection score needs the raw keys (keys=)")
        q_bound, k_bound, v_zero = bound_inputs(q, keys, selection_block, cu_seqlens)
        scale = default_scale(q.shape[-1], scale)  # q.k's scale: the bound's inputs are twice as wide
        _, lse = compressed_attention_triton(q_bound, k_bound, v_zero, selection_block, selection_block, scale,
                                             q_start=q_start, cu_seqlens=cu_seqlens)
        return select_blocks_triton(q_bound, k_bound, lse, selection_block, selection_block, selection_block,
                                    num_selected, scale, q_start=q_start, cu_seqlens=cu_seqlens)
    if block_size % stride or selection_block % stride or block_size > selection_block:
        raise ValueError(
            f"select_blocks_triton: need stride | block_size, stride | selection_block and block_size <= "
            f"selection_block; got l={block_size}, d={stride}, l'={selection_block}"
        )
    if score not in SELECTION_SCORES:
        raise ValueError(f"select_blocks_triton: score {score!r} is not one of {SELECTION_SCORES}")
    check_attention_inputs("select_blocks_triton", q, k_cmp, k_cmp)
    check_packed("select_blocks_triton", q.shape[0], cu_seqlens)
    batch, seq, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cmp.shape[2]
    group = num_q_heads // num_kv_heads
    scale = default_scale(head_dim, scale)
    # head dim <= 128: 4 warps, 3 stages (measured on one H200 at 128K, G=16, D=128: 49.2 ms against 55.7
    # with 8 warps; benchmarks/kernels-2026-11-30-sweep.json); above 128, 8 warps (no register spills on
    # sm_90 up to 256, ptxas resource usage)
    warps = 4 if head_dim <= 128 else 8
    top = pow2(num_selected)
    launch = launch_params(LAUNCH, "topn", BLOCK_T=BLOCK_T, num_warps=warps, num_stages=3, SORTED_MERGE=True,
                           SPLITS=topn_splits(q, num_kv_heads, selection_block, num_selected, q_start, cu_seqlens, score))
    if launch["SPLITS"] & (launch["SPLITS"] - 1) or (launch["SPLITS"] > 1 and score == "max"):
        raise ValueError(f"select_blocks_triton: LAUNCH['topn']['SPLITS']={launch['SPLITS']} cannot be launched; "
                         "set a power of two, and 1 with the 'max' score (its per-head carry has no split)")
    tiles = query_tiles(seq, k_cmp.shape[1], block_size, stride, q_start, cu_seqlens, launch["BLOCK_T"], q.device,
                        forced_until=num_selected * selection_block)
    out = _forced_output(batch, seq, num_kv_heads, num_selected, selection_block, q_start, cu_seqlens, q.device)
    if tiles.shape[0] == 0:
        return out
    splits = launch["SPLITS"]
    runs = selection_block // stride  # compressed blocks starting in a selection block
    # every (token, KV head, split) row is written: each split program stores its list, empty or not
    part = torch.empty((batch, seq, num_kv_heads, splits, top) if splits > 1 else (1,), dtype=torch.int64,
                       device=q.device)
    _topn_kernel[(tiles.shape[0] * splits, batch * num_kv_heads)](
        q.contiguous(), k_cmp.contiguous(), lse_cmp.float().contiguous(), tiles, out, part,
        seq, k_cmp.shape[1], num_q_heads, num_kv_heads, num_selected, q_start, scale * LOG2E,
        G=group, L=block_size, STRIDE=stride, SEL=selection_block, DK=head_dim, BLOCK_DK=pow2(head_dim),
        BLOCK_C=pow2(top * selection_block // stride), ST=top, PRECISION=dot_precision(q.dtype),
        MAX_SCORE=score == "max", BLOCK_G=pow2(group), CARRY_C=max(16, pow2(selection_block // stride)),
        SPREAD_RUNS=runs & (runs - 1) == 0, **launch,
    )
    if splits > 1:
        _topn_merge_kernel[(tiles.shape[0], batch * num_kv_heads)](
            part, tiles, out, seq, num_kv_heads, num_selected, q_start,
            SEL=selection_block, BLOCK_T=launch["BLOCK_T"], ST=top, SPLITS=splits, num_warps=4,
        )
    return out


# Top-n's key splits (one H200, benchmarks/gpu_checks/sweep-topn-splits-*.json, ms of 1 / 2 / 4 splits):
# G=16, D=128 (a tile's queries 256 KB) 46.4 / 39.2 / 39.0 at 128K, 12.0 / 10.1 / 10.2 at 64K, 0.81 / 0.74
# at 16K; G=4 (64 KB, whose tiles fit L2 without splits) 5.4 / 6.2 / 6.6 at 64K, 0.39 / 0.47 at 16K; the
# proof model's G=16, D=64 (128 KB) 0.51 / 0.55 / 0.58 at 32K. So two splits, for tiles of more than
# SPLIT_TILE_BYTES of queries with at least MIN_SPLIT_STEPS steps a split (a split's first step also
# recomputes the score carried into it).
MIN_SPLIT_STEPS = 8
MAX_SPLITS = 2
SPLIT_TILE_BYTES = 128 * 1024


def topn_splits(q: torch.Tensor, num_kv_heads: int, selection_block: int, num_selected: int, q_start: int,
                cu_seqlens: torch.Tensor | None, score: str) -> int:
    """The key splits select_blocks_triton launches top-n with (before any LAUNCH override): by the longest
    document's steps of pow2(n) selection blocks and the queries of a BLOCK_T tile; 1 with the 'max' score."""
    if score == "max":
        return 1
    steps = -(-longest_document(q.shape[1], q_start, cu_seqlens) // (selection_block * pow2(num_selected)))
    return _splits(steps, BLOCK_T * q.shape[2] // num_kv_heads * q.shape[3] * q.element_size())


def _splits(steps: int, tile_bytes: int) -> int:
    """Splits of the longest query tile's `steps` of ST blocks, for a tile of `tile_bytes` of queries: the
    largest power of two <= MAX_SPLITS that leaves each run at least MIN_SPLIT_STEPS steps, or 1."""
    splits = 1
    while tile_bytes > SPLIT_TILE_BYTES and splits * 2 <= MAX_SPLITS and steps // (splits * 2) >= MIN_SPLIT_STEPS:
        splits *= 2
    return splits


def exact_ranges(seq: int, q_start: int, cu_seqlens: torch.Tensor | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw keys the exact score sums over, per query token (int32 [seq] each): keys lo .. hi - 1, from
    its document's first token through itself (keys are indexed by global position, as the selection
    branch's raw keys are). Once per cu_seqlens, or per shape without."""
    if cu_seqlens is None:
        return _exact_ranges_from_start(seq, q_start, device)

    def build():
        end = torch.arange(q_start + 1, q_start + seq + 1, device=device)
        start = end - 1 - positions_in_documents(q_start, seq, cu_seqlens, device)
        return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()

    return document_layout(cu_seqlens, ("exact_ranges", seq, q_start, device), build)


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _exact_ranges_from_start(seq: int, q_start: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    end = torch.arange(q_start + 1, q_start + seq + 1, dtype=torch.int32, device=device)
    return torch.zeros_like(end), end


# Rows of a _topn_exact_kernel program: its tokens' (token, head) pairs. One H100, the proof's G=16, D=64
# (benchmarks/gpu_checks/exact_score/exact-score-64cb326.json, top-n alone at 1 x 32K): 64 rows (4 tokens,
# 4 warps) 4.60 ms, 128 rows 4.78-5.12, 256 rows 4.64-5.08, 512 rows 4.91; the kernel before them, 64
# tokens with the group's heads one after another, 6.54-6.58.
EXACT_ROWS = 64
# The exact score's top-n in one pass over the keys (_topn_exact_one_pass_kernel: each block's log-sum-exp kept
# in a scratch buffer, read back once the row's lse is known) instead of two (range_attention_lse, then
# _topn_exact_kernel). The scratch holds, per query tile, the longest document's blocks x the tile's rows in
# fp32: 128 KB a tile at the proof's 32K (G = 16, 4 tokens a tile), 1 GB for a 32K layer call, 0.5 GB for 8
# documents of 8K. Tiles beyond EXACT_SCRATCH_BYTES run in further launches, a chunk of tiles each. On one H100
# (bb12bd1, benchmarks/gpu_checks/exact_score/exact-one-pass-*, both ways alternated in one run): 5.67 against
# 7.81 ms at 1 x 32K, 2.84 against 4.16 at 8 x 8K, the same picks; the proof's 8K and 32K steps 1.02-1.09x.
# Since then (not yet run on a GPU) the blocks before every token's own skip the causal mask: in an offline sm_90a
# compile at the proof's shapes their step is 367 SASS instructions against 446 (benchmarks/exact-offline.py).
EXACT_ONE_PASS = True
EXACT_SCRATCH_BYTES = 1 << 30


def exact_tile_tokens(group: int) -> int:
    """Query tokens a program of _topn_exact_kernel scores: EXACT_ROWS (token, head) rows, at most BLOCK_T
    tokens."""
    return min(BLOCK_T, max(1, EXACT_ROWS // pow2(group)))


def _select_blocks_exact(q, keys, selection_block, num_selected, scale, q_start, cu_seqlens):
    """select_blocks_triton with the "exact" score: range_attention_lse over each query's document up to
    itself (every query row, tiles or not: the tiles' forced queries are scored too), then _topn_exact_kernel."""
    if keys is None:
        raise ValueError("select_blocks_triton: the 'exact' selection score needs the raw keys (keys=)")
    if selection_block < 16 or selection_block & (selection_block - 1):
        raise ValueError(f"select_blocks_triton: the 'exact' score takes l' = {selection_block} keys per dot; "
                         "it must be a power of two >= 16 (set nsa.selection_block so, or use the 'sum' score)")
    check_attention_inputs("select_blocks_triton", q, keys, keys)
    check_packed("select_blocks_triton", q.shape[0], cu_seqlens)
    batch, seq, num_q_heads, head_dim = q.shape
    if keys.shape[1] < q_start + seq:
        raise ValueError(f"select_blocks_triton: the 'exact' score reads every raw key up to each query's own "
                         f"position, so keys must hold at least q_start + T = {q_start + seq} tokens; got "
                         f"{keys.shape[1]} (pass the selection branch's keys from position 0 through the last query)")
    num_kv_heads = keys.shape[2]
    scale = default_scale(head_dim, scale)
    group = num_q_heads // num_kv_heads
    launch = launch_params(LAUNCH, "topn_exact", BLOCK_T=exact_tile_tokens(group), num_warps=4, num_stages=2,
                           SORTED_MERGE=True)
    tiles = query_tiles(seq, 0, selection_block, selection_block, q_start, cu_seqlens, launch["BLOCK_T"], q.device,
                        forced_until=num_selected * selection_block)
    out = _forced_output(batch, seq, num_kv_heads, num_selected, selection_block, q_start, cu_seqlens, q.device)
    if tiles.shape[0] == 0:
        return out
    q, keys = q.contiguous(), keys.contiguous()
    sorted_merge = launch.pop("SORTED_MERGE")
    shapes = dict(G=group, BLOCK_G=pow2(group), SEL=selection_block, DK=head_dim, BLOCK_DK=pow2(head_dim),
                  PRECISION=dot_precision(q.dtype), **launch)
    common = (seq, keys.shape[1], num_q_heads, num_kv_heads)
    if EXACT_ONE_PASS:
        _topn_exact_one_pass(q, keys, tiles, out, common, num_selected, q_start, scale, sorted_merge, shapes,
                             triton.cdiv(longest_document(seq, q_start, cu_seqlens), selection_block))
        return out
    lo, hi = exact_ranges(seq, q_start, cu_seqlens, q.device)
    lse = range_attention_lse(q, keys, lo, hi, scale)
    grid = (tiles.shape[0], batch * num_kv_heads)
    _topn_exact_kernel[grid](q, keys, lse, tiles, out, *common, num_selected, q_start, scale * LOG2E,
                             ST=pow2(num_selected), SORTED_MERGE=sorted_merge, **shapes)
    return out


def _topn_exact_one_pass(q, keys, tiles, out, common, num_selected, q_start, scale, sorted_merge, shapes,
                         num_blocks):
    """_topn_exact_one_pass_kernel over every tile, in chunks of tiles whose block log-sum-exps (num_blocks
    of them a row: the longest document's) fit EXACT_SCRATCH_BYTES."""
    batch_heads = q.shape[0] * keys.shape[2]
    tile_bytes = batch_heads * num_blocks * shapes["BLOCK_T"] * shapes["BLOCK_G"] * 4
    chunk = max(1, min(tiles.shape[0], EXACT_SCRATCH_BYTES // tile_bytes))
    block_lse = torch.empty(chunk * tile_bytes // 4, dtype=torch.float32, device=q.device)
    for first in range(0, tiles.shape[0], chunk):
        grid = (min(chunk, tiles.shape[0] - first), batch_heads)
        _topn_exact_one_pass_kernel[grid](q, keys, tiles, block_lse, out, *common, num_selected, q_start,
                                          scale * LOG2E, first, num_blocks, ST=pow2(num_selected),
                                          SORTED_MERGE=sorted_merge, **shapes)
