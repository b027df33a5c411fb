"""NSA composed from its branches: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (DESIGN §2)."""

import functools
from typing import Callable, Iterable, NamedTuple

import torch

from kernels.block_selection.alignment import selection_alignment_terms
from kernels.block_selection.indexer import IndexerTerms, indexer_loss_terms
from kernels.block_selection.naive import RAW_KEY_SCORES, select_blocks_ref
from kernels.common import (LAYOUT_CACHE_SIZE, acc_dtype, device_tensor, document_layout, host_bounds,
                            positions_in_documents)
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.compression.naive import compress_documents
from kernels.gate_combine.naive import gated_sum_ref
from kernels.selected_attention.naive import selected_attention_ref
from kernels.window_attention.naive import window_attention_ref

Compress = Callable[[torch.Tensor], torch.Tensor]


class BranchOps(NamedTuple):
    """One implementation of the four branch functions and the gated sum; both share the reference
    signatures. The attention branches take their gate (gate=, [B, T, HQ]) and return their output ungated,
    as `sum` takes it: the Triton ones' backward applies the gate, the reference's sum does."""

    compressed: Callable  # (q, k_cmp, v_cmp, l, d, scale, *, q_start, cu_seqlens, gate) -> (o, lse)
    select: Callable  # (q, k_cmp, lse_cmp, l, d, l', n, scale, *, q_start, cu_seqlens, score, keys, indexer) -> ids
    # (q, k, v, block_idx, l', scale, *, q_start, cu_seqlens, slot_lse, rows, gate) -> (o, lse[, slot_lse])
    selected: Callable
    window: Callable  # (q, k, v, w, scale, *, q_start, k_start, cu_seqlens, gate) -> (o, lse)
    sum: Callable  # (o_cmp, o_slc, o_win or None, g_cmp, g_slc, g_win or None) -> the gated sum


def branch_ops(impl: str) -> BranchOps:
    """The branch functions of `impl`: "reference" (pure PyTorch, any device) or "triton" (the kernels;
    CUDA, or CPU under TRITON_INTERPRET=1). Choosing for "auto" is the caller's business."""
    if impl == "reference":
        return BranchOps(compressed_attention_ref, select_blocks_ref, selected_attention_ref, window_attention_ref,
                         gated_sum_ref)
    if impl == "triton":
        # Imported on first use: Triton decides between compiling and interpreting (TRITON_INTERPRET) when
        # a kernel is defined, so importing this module must not define them.
        from kernels.block_selection.triton import select_blocks_triton
        from kernels.compressed_attention.triton import compressed_attention_triton
        from kernels.gate_combine.triton import gated_sum_triton
        from kernels.selected_attention.triton import selected_attention_triton
        from kernels.window_attention.triton import window_attention_triton

        return BranchOps(
            compressed_attention_triton, select_blocks_triton, selected_attention_triton, window_attention_triton,
            gated_sum_triton,
        )
    raise ValueError(f"impl={impl!r}: expected 'reference' or 'triton' ('auto' is resolved by the caller)")


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto" is the Triton kernels on CUDA and the reference elsewhere; other values pass through."""
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return impl


class NSAResult(NamedTuple):
    output: torch.Tensor  # [B, T, HQ, Dv], q.dtype
    block_idx: torch.Tensor  # [B, T, HK, n] int32 selection block ids, -1 padded
    lse_cmp: torch.Tensor  # [B, T, HQ] float32, per branch
    lse_slc: torch.Tensor
    lse_win: torch.Tensor
    # (summed KL, rows) of the selection alignment loss (kernels.block_selection.alignment), when asked for
    selection_terms: tuple[torch.Tensor, torch.Tensor] | None = None
    # the indexer's loss terms and recall (kernels.block_selection.indexer.IndexerTerms), when asked for
    indexer_terms: IndexerTerms | None = None


class QuerySpan(NamedTuple):
    """Rows [offset, offset + length) of the queries, at global positions start .. start + length - 1, with
    the window branch's keys and values for them (k_win, v_win [B, S, HK, D], whose first token sits at
    global position win_start). One span covers a whole sequence; a CP rank has one per zigzag chunk."""

    offset: int
    start: int
    length: int
    k_win: torch.Tensor
    v_win: torch.Tensor
    win_start: int


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


# Rows the window branch answers for the selected one (window_covered_rows): True in use; False only to time
# the selected kernels on every row against it (tools/bench_train.py --selected-every-row)
WINDOW_SERVES_SELECTION = True


def window_covered_rows(spans: list[QuerySpan], limit: int, cu_seqlens: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor | None:
    """[Tq] bool over the rows of `spans` (laid out by their offsets): True where the row's position in its
    document is below `limit`; None where no row is (known from host-side bounds). compose_nsa passes limit
    = min(w, n * l'): such a row sees at most n selection blocks, so top-n takes all of them, and its window
    reaches back to the document's first token, so its selected and window branches attend the same keys."""
    spans_key = tuple((s.offset, s.start, s.length) for s in spans)
    if cu_seqlens is None:
        if not _any_covered(spans_key, limit, [0, max(start + length for _, start, length in spans_key)]):
            return None
        return _covered_from_start(spans_key, limit, device)
    # the check too once per cu_seqlens: it walks every document, and every layer asks
    return document_layout(cu_seqlens, ("window_covered_rows", spans_key, limit, device),
                           lambda: _covered(spans_key, limit, cu_seqlens, device)
                           if _any_covered(spans_key, limit, host_bounds(cu_seqlens)) else None)


def _any_covered(spans_key: tuple, limit: int, bounds: list[int]) -> bool:
    """Whether any row of the spans sits less than `limit` tokens into its document (bounds: host-side)."""
    return any(max(lo, start) < min(hi, lo + limit, start + length)
               for _, start, length in spans_key for lo, hi in zip(bounds[:-1], bounds[1:]))


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _covered_from_start(spans_key: tuple, limit: int, device: torch.device) -> torch.Tensor:
    """window_covered_rows of one document from position 0, cached per shape (every layer asks the same)."""
    return _covered(spans_key, limit, None, device)


def _covered(spans_key: tuple, limit: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    return torch.cat([positions_in_documents(start, length, cu_seqlens, device) < limit
                      for _, start, length in spans_key])


def window_uncovered_rows(span: QuerySpan, limit: int, cu_seqlens: torch.Tensor | None,
                          device: torch.device) -> torch.Tensor:
    """int32 [R] on `device`: the rows of `span` (counted from its first) that sit `limit` tokens or more into
    their document, the ones window_covered_rows leaves to the selected kernels, which then launch for
    these alone (selected_attention_triton's rows). Built on the host from host-side bounds (no device
    read), once per cu_seqlens (or per shape without)."""
    if cu_seqlens is None:
        return _uncovered_from_start(span.start, span.length, limit, device)
    return document_layout(cu_seqlens, ("window_uncovered_rows", span.start, span.length, limit, device),
                           lambda: _uncovered(span.start, span.length, limit, host_bounds(cu_seqlens), device))


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _uncovered_from_start(start: int, length: int, limit: int, device: torch.device) -> torch.Tensor:
    return _uncovered(start, length, limit, [0, start + length], device)


def _uncovered(start: int, length: int, limit: int, bounds: list[int], device: torch.device) -> torch.Tensor:
    pieces = [torch.arange(max(lo + limit, start), min(hi, start + length)) - start
              for lo, hi in zip(bounds[:-1], bounds[1:]) if max(lo + limit, start) < min(hi, start + length)]
    return device_tensor(torch.cat(pieces) if pieces else torch.zeros(0), torch.int32, device)


def rope_rows(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half convention (Megatron's default): x [B, N, H, D] rotated by angles [N, R]
    (R even, R <= D; each half's angle repeated, as Megatron's rotary tables hold them) on its first R
    channels, the rest passed through. Computed in fp32 (float64 for float64 x), returned in x.dtype."""
    r = angles.shape[-1]
    acc = acc_dtype(x)
    rotated = x[..., :r].to(acc)
    first, second = rotated.chunk(2, dim=-1)
    cos, sin = angles.to(acc).cos()[:, None], angles.to(acc).sin()[:, None]  # [N, 1, R]
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), x[..., r:]], dim=-1)


def compose_nsa(
    q: torch.Tensor,
    gates: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    spans: list[QuerySpan],
    selection_kv: Iterable[tuple[slice, torch.Tensor, torch.Tensor]],
    *,
    block_size: int,
    stride: int,
    selection_block: int,
    num_selected: int,
    window: int,
    scale: float | None = None,
    impl: str = "reference",
    cu_seqlens: torch.Tensor | None = None,
    cmp_rope: torch.Tensor | None = None,
    selection_score: str = "sum",
    selection_loss: int = 0,
    shared_kv: bool = False,
    indexer: torch.Tensor | None = None,
    indexer_loss: int = 0,
) -> NSAResult:
    """NSA's branches and their gated sum for some query rows of a sequence: the one composition that the
    single-rank path (native_sparse_attention) and the sequence-sharded path (nsa_context_parallel) share.

    q: [B, Tq, HQ, Dk] and gates [B, Tq, HQ, 3], the rows of `spans`.
    k_cmp, v_cmp: [B, N, HK, D], every compressed token of the sequence from position 0 (already phi'd).
    selection_kv: (KV-head slice, k, v) items that together cover every KV head; k, v [B, S, h, D] hold the
    raw tokens from global position 0 through every query's last selectable block. Items are consumed one
    at a time after the other branches ran, so a caller can hand out K/V that are still arriving.
    cu_seqlens: packed documents (one span from position 0, B = 1), as in native_sparse_attention.
    cmp_rope: RoPE angles [N, R] of the compressed tokens, one row per k_cmp token (nsa.compression_rope
    "blocks": phi compressed keys before RoPE); None: k_cmp is used as given.
    selection_score: how top-n scores a block for a GQA group, "sum" (the paper), "max", "exact", "bound" or
    "indexer" (kernels.block_selection.naive.SELECTION_SCORES). "exact", "bound" and "indexer" read the
    selection branch's raw keys, so every item of selection_kv is taken before top-n runs (under CP the
    selection gather no longer overlaps the other branches, and all its slices are held at once).
    indexer: the learned indexer's weight W [2, H, G, Dk / 2] (kernels.block_selection.indexer): with
    selection_score "indexer", top-n takes the "exact" score over its H queries a group, not the G heads'.
    indexer_loss: k > 0 also computes the indexer's loss terms over every k-th of these rows
    (NSAResult.indexer_terms); it reads the raw keys too, whatever the score. 0: not.
    selection_loss: k > 0 also computes the selection alignment loss's terms over every k-th of these rows
    (NSAResult.selection_terms; kernels.block_selection.alignment), for nsa.selection_loss; 0: not.
    shared_kv: the selected and window branches read the same keys and values (selection_kv and the spans'
    k_win, v_win hold the same tokens). Then a row that sits less than min(w, n * l') tokens into its
    document attends the same keys in both branches (window_covered_rows): the window's output and lse
    are the selected branch's, so those rows skip the selected kernels (their picks passed as -1, and the
    kernels launched for the other rows alone: window_uncovered_rows) and the window's gate takes g_slc +
    g_win for them. Not with selection_loss, which reads the selected branch's
    own per-slot sums. The result is the same up to rounding; NSAResult.block_idx keeps top-n's picks.

    Each branch is given its gate and ops.sum adds the outputs gated at the end: the Triton branches'
    backward applies the gate, so each branch's output gradient is made inside its own backward and freed
    there, one at a time (kernels/gate_combine/triton.py).
    """
    ops = branch_ops(impl)
    sizes_cmp = (block_size, stride)
    if (selection_score == "indexer" or indexer_loss) and indexer is None:
        raise ValueError(f"compose_nsa: selection_score={selection_score!r} with indexer_loss={indexer_loss} needs "
                         "the indexer's weight (indexer=; nsa.indexer_heads > 0 makes one)")
    selection_keys = None
    if selection_score in RAW_KEY_SCORES or indexer_loss:  # the raw keys: every KV-head slice, in head order
        selection_kv = sorted(selection_kv, key=lambda item: item[0].start)
        selection_keys = _cat([k for _, k, _ in selection_kv], 2).detach()
    if cmp_rope is not None:
        k_cmp = rope_rows(k_cmp, cmp_rope)
    # Four branch calls read q, and the kernels' wrappers copy whatever is not dense: q (in training a slice
    # of the fused projection's output, the gate channels beside it) and the gates (slices of the last dim)
    # are laid out densely once here instead
    q = q.contiguous()
    gate_cmp, gate_slc, gate_win = gates.movedim(-1, 0).contiguous().unbind(0)  # each [B, Tq, HQ], dense
    covered = None  # the rows whose selected output is the window's (shared_kv above)
    limit = min(window, num_selected * selection_block)
    if shared_kv and window > 0 and not selection_loss and WINDOW_SERVES_SELECTION:
        covered = window_covered_rows(spans, limit, cu_seqlens, q.device)
    rows_slc = [None] * len(spans)  # per span, the rows the selected kernels launch for (None: every row)
    if covered is not None:
        rows_slc = [window_uncovered_rows(s, limit, cu_seqlens, q.device) for s in spans]
        rows_covered = covered[None, :, None]
        # fp32 (float64 for float64) holds the sum of two bf16 gates exactly; the gate kernels read any dtype
        wide = gate_win.to(acc_dtype(gate_win))
        gate_win = torch.where(rows_covered, wide + gate_slc, wide)
        gate_slc = gate_slc.masked_fill(rows_covered, 0)
    o_cmp, lse_cmp, blocks, o_win, lse_win = [], [], [], [], []
    g_cmp, g_slc, g_win = [], [], []  # the gates of the outputs' rows, laid out as the outputs are
    for span in spans:
        span_rows = slice(span.offset, span.offset + span.length)
        rows = q[:, span_rows]
        o, lse = ops.compressed(rows, k_cmp, v_cmp, *sizes_cmp, scale, q_start=span.start, cu_seqlens=cu_seqlens,
                                gate=gate_cmp[:, span_rows])
        o_cmp.append(o)
        g_cmp.append(gate_cmp[:, span_rows])
        lse_cmp.append(lse)
        blocks.append(ops.select(rows.detach(), k_cmp.detach(), lse.detach(), *sizes_cmp, selection_block,
                                 num_selected, scale, q_start=span.start, cu_seqlens=cu_seqlens,
                                 score=selection_score, keys=selection_keys, indexer=indexer))
        if window > 0:
            o, lse = ops.window(rows, span.k_win, span.v_win, window, scale, q_start=span.start,
                                k_start=span.win_start, cu_seqlens=cu_seqlens, gate=gate_win[:, span_rows])
            o_win.append(o)
            g_win.append(gate_win[:, span_rows])
            lse_win.append(lse)
    block_idx = _cat(blocks, 1)
    picks = block_idx if covered is None else block_idx.masked_fill(covered[None, :, None, None], -1)

    group = q.shape[2] // block_idx.shape[2]  # query heads per KV head
    o_slc, lse_slc = [], []  # per item (KV-head slice), its spans' rows
    terms = []  # the selection alignment loss's (sum, rows) per item and span
    for heads, k, v in selection_kv:
        q_heads = slice(heads.start * group, heads.stop * group)
        o_item, lse_item, g_item = [], [], []
        for index, s in enumerate(spans):
            rows = slice(s.offset, s.offset + s.length)
            o, lse, *slot_lse = ops.selected(q[:, rows, q_heads], k, v, picks[:, rows, heads], selection_block,
                                             scale, q_start=s.start, cu_seqlens=cu_seqlens,
                                             slot_lse=bool(selection_loss), rows=rows_slc[index],
                                             gate=gate_slc[:, rows, q_heads])
            o_item.append(o)
            g_item.append(gate_slc[:, rows, q_heads])
            lse_item.append(lse)
            if selection_loss:
                terms.append(selection_alignment_terms(
                    q[:, rows, q_heads], slot_lse[0], lse.detach(), k_cmp[:, :, heads], lse_cmp[index][:, :, q_heads],
                    block_idx[:, rows, heads], block_size=block_size, stride=stride,
                    selection_block=selection_block, scale=scale, q_start=s.start, cu_seqlens=cu_seqlens,
                    row_stride=selection_loss))
        o_slc.append(_cat(o_item, 1))
        g_slc.append(_cat(g_item, 1))
        lse_slc.append(_cat(lse_item, 1))
    o_slc, lse_slc, g_slc = _cat(o_slc, 2), _cat(lse_slc, 2), _cat(g_slc, 2)
    lse_cmp = _cat(lse_cmp, 1)
    if window > 0:
        o_win, lse_win, g_win = _cat(o_win, 1), _cat(lse_win, 1), _cat(g_win, 1)
        if covered is not None:
            lse_slc = torch.where(covered[None, :, None], lse_win, lse_slc)
    else:  # fla's configuration: no window branch
        o_win, lse_win, g_win = None, torch.full_like(lse_slc, float("-inf")), None
    output = ops.sum(_cat(o_cmp, 1), o_slc, o_win, _cat(g_cmp, 1), g_slc, g_win)
    selection_terms = (sum(t for t, _ in terms), sum(r for _, r in terms)) if terms else None
    indexer_terms = None
    if indexer_loss:
        parts = [indexer_loss_terms(q[:, s.offset : s.offset + s.length], indexer, selection_keys,
                                    selection_block=selection_block, num_selected=num_selected, scale=scale,
                                    q_start=s.start, cu_seqlens=cu_seqlens, row_stride=indexer_loss, impl=impl)
                 for s in spans]
        indexer_terms = IndexerTerms(*(sum(field) for field in zip(*parts)))
    return NSAResult(output, block_idx, lse_cmp, lse_slc, lse_win, selection_terms, indexer_terms)


def native_sparse_attention(
    q: torch.Tensor,
    kv_cmp: tuple[torch.Tensor, torch.Tensor],
    kv_slc: tuple[torch.Tensor, torch.Tensor],
    kv_win: tuple[torch.Tensor, torch.Tensor],
    gates: torch.Tensor,
    compress_k: Compress,
    compress_v: Compress,
    *,
    block_size: int,
    stride: int,
    selection_block: int,
    num_selected: int,
    window: int,
    scale: float | None = None,
    impl: str = "reference",
    cu_seqlens: torch.Tensor | None = None,
    cmp_rope: torch.Tensor | None = None,
    selection_score: str = "sum",
    selection_loss: int = 0,
    indexer: torch.Tensor | None = None,
    indexer_loss: int = 0,
) -> NSAResult:
    """Native Sparse Attention over one full causal sequence.

    q: [B, T, HQ, Dk] (RoPE already applied; positions are 0..T-1).
    kv_cmp, kv_slc, kv_win: per branch (k [B, T, HK, Dk], v [B, T, HK, Dv]); pass the same pair three
    times for shared K/V. gates: [B, T, HQ, 3] in (0, 1), order (cmp, slc, win).
    compress_k, compress_v: phi, [B, T, HK, D] -> [B, N, HK, D] with N = (T - l) // d + 1 blocks.
    Sizes: compression block l = block_size, stride d, selection block l', n selected blocks, window w
    (w = 0 turns the window branch off: o_win = 0, lse_win = -inf; fla's configuration, for comparisons).
    impl: "reference" or "triton" (branch_ops). cu_seqlens: optional int32 [num_docs + 1] boundaries of
    packed documents (B = 1): phi runs on each document on its own, and no branch attends across them.
    cmp_rope: optional RoPE angles [N, R] of the compressed tokens (compose_nsa); then kv_cmp's keys are
    the keys before RoPE. selection_score: "sum", "max", "exact", "bound" or "indexer" (compose_nsa).
    selection_loss, indexer, indexer_loss: compose_nsa's.
    """
    k_cmp = compress_documents(compress_k, kv_cmp[0], cu_seqlens, block_size, stride)
    v_cmp = compress_documents(compress_v, kv_cmp[1], cu_seqlens, block_size, stride)
    whole = QuerySpan(offset=0, start=0, length=q.shape[1], k_win=kv_win[0], v_win=kv_win[1], win_start=0)
    all_heads = slice(0, kv_slc[0].shape[2])
    return compose_nsa(q, gates, k_cmp, v_cmp, [whole], [(all_heads, *kv_slc)], block_size=block_size,
                       stride=stride, selection_block=selection_block, num_selected=num_selected, window=window,
                       scale=scale, impl=impl, cu_seqlens=cu_seqlens, cmp_rope=cmp_rope,
                       selection_score=selection_score, selection_loss=selection_loss,
                       shared_kv=same_pair(kv_slc, kv_win), indexer=indexer, indexer_loss=indexer_loss)


def same_pair(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether two branches were given the same (k, v) tensors: shared K/V (compose_nsa's shared_kv). Equal
    values in other tensors do not count: only the caller knows they are one projection's."""
    return a[0] is b[0] and a[1] is b[1]
