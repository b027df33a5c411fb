"""Selected attention: Triton kernel against the reference (outputs, lse, gradients), and the inverted
index behind its dK/dV backward."""

import pytest
import torch

import kernels.selected_attention.triton as selected
from kernels.block_selection.naive import topn_from_scores
from kernels.selected_attention.naive import selected_attention_ref
from kernels.selected_attention.triton import inverted_index, selected_attention_triton, selection_layout
from triton_cases import (DEVICE, INTERPRETER_WARNINGS, LOW_PRECISION, assert_close, assert_lse_close,
                          compare_attention, compare_to_fp32, randn)

pytestmark = INTERPRETER_WARNINGS

SEL, NUM_SELECTED = 16, 4  # selection block l', n
T = 131
DK, DV = 32, 16


def random_blocks(batch, seq, kv_heads, q_start=0, doc_starts=None, shuffle=False, sel=SEL):
    """Valid picks as top-n makes them (block 0, the local blocks, random others; -1 padded), per document
    when doc_starts [T] gives each query's document start. shuffle: slots in random order. sel: l'."""
    positions = torch.arange(q_start, q_start + seq)
    if doc_starts is not None:
        positions = positions - doc_starts
    scores = torch.rand(batch, seq, kv_heads, -(-(q_start + seq) // sel))
    blocks = topn_from_scores(scores, positions, sel, NUM_SELECTED)
    if shuffle:
        blocks = torch.gather(blocks, -1, torch.argsort(torch.rand(blocks.shape), dim=-1))
    return blocks.to(DEVICE)


def leaves(batch, seq, num_keys, group, kv_heads, dtype):
    return dict(
        q=randn(batch, seq, group * kv_heads, DK, dtype=dtype),
        k=randn(batch, num_keys, kv_heads, DK, dtype=dtype),
        v=randn(batch, num_keys, kv_heads, DV, dtype=dtype),
    )


@pytest.mark.parametrize(
    "dtype, group, kv_heads",
    [
        (torch.float32, 1, 2),
        (torch.float16, 2, 2),
        (torch.float32, 4, 1),
        (torch.float16, 16, 1),
        (torch.float32, 16, 1),
    ],
)
def test_matches_reference(dtype, group, kv_heads):
    torch.manual_seed(group)
    blocks = random_blocks(1, T, kv_heads, shuffle=group == 4)
    compare_attention(selected_attention_triton, selected_attention_ref, leaves(1, T, T, group, kv_heads, dtype),
                      dtype, block_idx=blocks, selection_block=SEL)


@pytest.mark.parametrize("launch", [{}, {"TMA": True}, {"BY_BLOCKS": True}], ids=["one-token", "tma", "by-blocks"])
def test_rows_without_picks(monkeypatch, launch):
    """Rows whose every slot is -1 (compose_nsa hands the window-covered rows to the kernels so; the one-token
    kernels return early for them): output 0, lse -inf and no gradient into their q; the other rows as the
    reference, forward and backward."""
    for kernel in ("fwd", "dq"):
        monkeypatch.setitem(selected.LAUNCH, kernel, dict(launch))
    torch.manual_seed(7)
    blocks = random_blocks(1, T, 2)
    empty = torch.arange(T, device=DEVICE) % 3 == 1
    blocks[:, empty, 0] = -1  # every third row of the first KV head's group
    inputs = leaves(1, T, T, 2, 2, torch.float32)
    compare_attention(selected_attention_triton, selected_attention_ref, inputs, torch.float32,
                      block_idx=blocks, selection_block=SEL)
    q = inputs["q"].detach().requires_grad_()
    o, lse = selected_attention_triton(q, inputs["k"], inputs["v"], block_idx=blocks, selection_block=SEL)
    (o.square().sum() + lse[lse.isfinite()].sum()).backward()
    assert torch.equal(o[:, empty, :2], torch.zeros_like(o[:, empty, :2]))
    assert (lse[:, empty, :2] == float("-inf")).all() and lse[:, empty, 2:].isfinite().all()
    assert torch.equal(q.grad[:, empty, :2], torch.zeros_like(q.grad[:, empty, :2]))
    assert q.grad[:, empty, 2:].abs().sum() > 0


@pytest.mark.parametrize("launch", [{}, {"TMA": True}, {"BY_BLOCKS": True}], ids=["one-token", "tma", "by-blocks"])
def test_row_list(monkeypatch, launch):
    """rows= (compose_nsa's rows outside the window-covered ones): the one-token kernels launch for the
    listed rows alone, in any order; output, lse and every gradient are those of the launch over every
    row, to the bit, and the unlisted rows (no picks) get 0, -inf and no gradient. An empty list launches
    nothing. The key-block kernels ignore the list."""
    for kernel in ("fwd", "dq"):
        monkeypatch.setitem(selected.LAUNCH, kernel, dict(launch))
    torch.manual_seed(8)
    blocks = random_blocks(1, T, 2)
    empty = torch.arange(T, device=DEVICE) % 3 != 2
    blocks[:, empty] = -1  # two rows in three hold no pick, for both KV heads
    listed = torch.nonzero(~empty).flatten()
    rows = listed[torch.randperm(listed.numel(), device=DEVICE)].to(torch.int32)
    inputs = leaves(1, T, T, 2, 2, torch.float32)

    def run(row_list, picks):
        x = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
        o, lse = selected_attention_triton(x["q"], x["k"], x["v"], block_idx=picks, selection_block=SEL,
                                           rows=row_list)
        (o.square().sum() + lse[lse.isfinite()].sum()).backward()
        return o, lse, x["q"].grad, x["k"].grad, x["v"].grad

    for got, want in zip(run(rows, blocks), run(None, blocks)):
        assert torch.equal(got, want)
    o, lse, dq, dk, dv = run(rows, blocks)
    assert torch.equal(o[:, empty], torch.zeros_like(o[:, empty])) and (lse[:, empty] == float("-inf")).all()
    assert torch.equal(dq[:, empty], torch.zeros_like(dq[:, empty])) and dq[:, ~empty].abs().sum() > 0
    none = torch.full_like(blocks, -1)
    o, lse, dq, dk, dv = run(rows[:0], none)
    assert not o.any() and (lse == float("-inf")).all() and not dq.any() and not dk.any() and not dv.any()
    with pytest.raises(ValueError, match="rows is torch.int64.*1-D int32"):
        run(rows.long(), blocks)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_error_is_at_most_twice_the_references(dtype):
    """The proof model's shape: one KV head shared by 16 query heads."""
    torch.manual_seed(5)
    blocks = random_blocks(1, T, 1)
    compare_to_fp32(selected_attention_triton, selected_attention_ref, leaves(1, T, T, 16, 1, torch.float32), dtype,
                    block_idx=blocks, selection_block=SEL)


def test_launch_override(monkeypatch):
    """Other launch parameters (as benchmarks/kernels-exp-sweep.py sets them): 16-row dK/dV tiles."""
    torch.manual_seed(0)
    monkeypatch.setitem(selected.LAUNCH, "dkv", {"BLOCK_M": 16, "num_warps": 8})
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"num_warps": 2, "num_stages": 2})
    compare_attention(selected_attention_triton, selected_attention_ref, leaves(1, T, T, 2, 1, torch.float32),
                      torch.float32, block_idx=random_blocks(1, T, 1), selection_block=SEL)


@pytest.mark.parametrize("group, block_n, dtype", [
    (1, None, torch.float32),  # 16 tokens a step
    (3, 32, torch.float16),  # 3 heads padded to 4 rows, 8 tokens a step
    (4, None, torch.float32),
    (16, None, torch.float32),  # one token a step
    (16, 64, torch.float16),  # 4 tokens a step
])
def test_dkv_keys_m(monkeypatch, group, block_n, dtype):
    """dK/dV with the keys as the dots' M (LAUNCH["dkv"]["KEYS_M"]), BLOCK_N rows of whole tokens a step: the
    reference's gradients over packed documents with 64-key blocks, where a block can reach past a document's
    end, a token sees only the keys up to itself, and a segment's last step holds fewer tokens."""
    torch.manual_seed(group)
    sel, seq = 64, 170
    launch = {"KEYS_M": True} if block_n is None else {"KEYS_M": True, "BLOCK_N": block_n}
    monkeypatch.setitem(selected.LAUNCH, "dkv", launch)
    cu_seqlens = torch.tensor([0, 30, 160, seq], dtype=torch.int32)
    doc_starts = cu_seqlens[torch.searchsorted(cu_seqlens, torch.arange(seq), right=True) - 1]
    compare_attention(selected_attention_triton, selected_attention_ref, leaves(1, seq, seq, group, 2, dtype),
                      dtype, block_idx=random_blocks(1, seq, 2, doc_starts=doc_starts, sel=sel),
                      selection_block=sel, cu_seqlens=cu_seqlens.to(DEVICE))


@pytest.mark.parametrize("block_n", [8, 24])
def test_dkv_keys_m_rows_must_be_whole_tokens(monkeypatch, block_n):
    """BLOCK_N under 16 rows or not a power of two is refused, naming the field and what it must be."""
    monkeypatch.setitem(selected.LAUNCH, "dkv", {"KEYS_M": True, "BLOCK_N": block_n})
    inputs = {name: x.requires_grad_() for name, x in leaves(1, 64, 64, 4, 1, torch.float32).items()}
    o, _ = selected_attention_triton(**inputs, block_idx=random_blocks(1, 64, 1), selection_block=SEL)
    with pytest.raises(ValueError, match=rf"LAUNCH\['dkv'\] BLOCK_N={block_n} with KEYS_M=True must be a power of two"):
        o.sum().backward()


@pytest.mark.parametrize("block_k", [16, 32])
def test_blocks_in_key_parts(monkeypatch, block_k):
    """The forward and dQ kernels taking each 64-token selection block in parts of BLOCK_K keys (a LAUNCH
    override the sweep times): same results, over packed documents, where a part can end past a
    document's last token or start past the query."""
    torch.manual_seed(block_k)
    sel, seq = 64, 170
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"BLOCK_K": block_k})
    monkeypatch.setitem(selected.LAUNCH, "dq", {"BLOCK_K": block_k})
    cu_seqlens = torch.tensor([0, 30, 160, seq], dtype=torch.int32)
    doc_starts = cu_seqlens[torch.searchsorted(cu_seqlens, torch.arange(seq), right=True) - 1]
    compare_attention(selected_attention_triton, selected_attention_ref, leaves(1, seq, seq, 2, 1, torch.float32),
                      torch.float32, block_idx=random_blocks(1, seq, 1, doc_starts=doc_starts, sel=sel),
                      selection_block=sel, cu_seqlens=cu_seqlens.to(DEVICE))


@pytest.mark.parametrize("group, tokens, block_k, dtype", [
    (4, 4, 64, torch.float32),
    (3, 8, 32, torch.float16),  # 3 heads padded to 4 rows a token, 32 rows a tile
    (2, 8, 16, torch.float32),
    (16, 4, 64, torch.float32),  # 64 rows a tile: fewer K/V bytes through L2 than a program a token
])
def test_token_tiles(monkeypatch, group, tokens, block_k, dtype):
    """Forward and dQ over tiles of consecutive tokens walking the union of their picks (a LAUNCH override):
    tiles that span documents, start past q_start, and end past the last token."""
    for kernel in ("fwd", "dq"):
        monkeypatch.setitem(selected.LAUNCH, kernel, {"TOKENS": tokens, "BLOCK_K": block_k})
    compare_on_packed_documents(group, dtype)


def compare_on_packed_documents(group, dtype):
    """Triton against the reference on three packed documents (the last of three 64-token blocks), from
    q_start = 5, two KV heads, shuffled slots."""
    torch.manual_seed(group)
    sel, q_start, seq = 64, 5, 162
    cu_seqlens = torch.tensor([0, 20, 27, q_start + seq], dtype=torch.int32)
    doc_starts = cu_seqlens[torch.searchsorted(cu_seqlens, torch.arange(q_start, q_start + seq), right=True) - 1]
    compare_attention(selected_attention_triton, selected_attention_ref,
                      leaves(1, seq, q_start + seq, group, 2, dtype), dtype,
                      block_idx=random_blocks(1, seq, 2, q_start, doc_starts, shuffle=True, sel=sel),
                      selection_block=sel, q_start=q_start, cu_seqlens=cu_seqlens.to(DEVICE))


def test_token_tiles_over_a_batch(monkeypatch):
    """Token tiles with two sequences of one document each (no cu_seqlens): block numbers restart per
    sequence, and a tile reads its own sequence's keys."""
    torch.manual_seed(3)
    for kernel in ("fwd", "dq"):
        monkeypatch.setitem(selected.LAUNCH, kernel, {"TOKENS": 4})
    compare_attention(selected_attention_triton, selected_attention_ref, leaves(2, T, T, 4, 1, torch.float32),
                      torch.float32, block_idx=random_blocks(2, T, 1), selection_block=SEL)


@pytest.mark.parametrize("kernels, group, chunk, block_m, dtype", [
    (("fwd", "dq"), 4, None, 64, torch.float32),
    (("fwd", "dq"), 3, 37, 16, torch.float16),  # 3 heads: a row tile ends inside a token's heads; 37-token chunks
    (("fwd",), 16, 50, 64, torch.float32),
    (("dq",), 16, 50, 64, torch.float32),
    (("fwd", "dq"), 2, 1, 32, torch.float32),  # a chunk a token
])
def test_by_key_blocks(monkeypatch, kernels, group, chunk, block_m, dtype):
    """The forward and dQ by key blocks (LAUNCH overrides): the inverted index of a chunk's picks, a block's
    K/V once for its tokens' rows, each pick's partial (softmax; dQ share) merged per token. Over packed
    documents with q_start, shuffled slots and two KV heads; chunks that end inside a document."""
    for kernel in kernels:
        monkeypatch.setitem(selected.LAUNCH, kernel, {"BY_BLOCKS": True, "BLOCK_M": block_m, "CHUNK": chunk})
    compare_on_packed_documents(group, dtype)


def test_by_key_blocks_over_a_batch(monkeypatch):
    """Two sequences of one document each, in chunks: a segment reads its own sequence's keys and rows."""
    torch.manual_seed(9)
    for kernel in ("fwd", "dq"):
        monkeypatch.setitem(selected.LAUNCH, kernel, {"BY_BLOCKS": True, "CHUNK": 64})
    compare_attention(selected_attention_triton, selected_attention_ref, leaves(2, T, T, 4, 1, torch.float32),
                      torch.float32, block_idx=random_blocks(2, T, 1), selection_block=SEL)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("launch, group, kv_heads", [({"BY_BLOCKS": True}, 4, 2), ({"KEYS_M": True}, 16, 1)],
                         ids=["by-blocks", "keys-m"])
def test_launch_low_precision(monkeypatch, launch, group, kv_heads, dtype):
    """By key blocks and with the keys as the dots' M: fp16 / bf16 error at most twice the reference's."""
    torch.manual_seed(10)
    launch_both(monkeypatch, **launch)
    compare_to_fp32(selected_attention_triton, selected_attention_ref,
                    leaves(1, T, T, group, kv_heads, torch.float32), dtype,
                    block_idx=random_blocks(1, T, kv_heads), selection_block=SEL)


def test_by_key_blocks_take_their_own_launch_parameters(monkeypatch):
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"BY_BLOCKS": True, "TOKENS": 4})
    with pytest.raises(ValueError, match=r"BY_BLOCKS takes BLOCK_M, CHUNK.*\['TOKENS'\] belong to the one-token"):
        selected_attention_triton(**leaves(1, 20, 20, 4, 1, torch.float32), block_idx=random_blocks(1, 20, 1),
                                  selection_block=SEL)
    for kernel, bad, message in (("fwd", {"CHUNK": 0}, r"CHUNK=0 must be a whole number of tokens"),
                                 ("dq", {"BLOCK_M": 24}, r"BLOCK_M=24 must be a power of two from 16")):
        monkeypatch.setitem(selected.LAUNCH, kernel, {"BY_BLOCKS": True, **bad})
        with pytest.raises(ValueError, match=message):
            inputs = leaves(1, 20, 20, 4, 1, torch.float32)
            o, _ = selected_attention_triton(**inputs, block_idx=random_blocks(1, 20, 1), selection_block=SEL)
            o.sum().backward()
        monkeypatch.delitem(selected.LAUNCH, kernel)
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"BY_BLOCKS": True})
    with pytest.raises(ValueError, match="BY_BLOCKS: leave it out when asking for slot_lse"):
        selected_attention_triton(**leaves(1, 20, 20, 4, 1, torch.float32), block_idx=random_blocks(1, 20, 1),
                                  selection_block=SEL, slot_lse=True)


def test_dkv_gpu_default_by_group_yields_to_launch(monkeypatch):
    """dK/dV: a GPU runs groups of 16 heads on the kernel with the keys as M, one token a step (measured faster
    there), other groups and the interpreter on the 64-row kernel; a LAUNCH entry decides alone, over the
    64-row kernel's parameters."""
    dkv = selected._dkv_launch
    rows = {"BLOCK_M": selected.ROWS_PER_TILE, "num_warps": 4, "num_stages": 2}
    assert dkv(16, on_gpu=True) == selected.DKV_KEYS_M_LAUNCH
    assert selected.DKV_KEYS_M_LAUNCH["KEYS_M"] and selected.DKV_KEYS_M_LAUNCH["BLOCK_N"] == 16
    for group, on_gpu in ((16, False), (4, True), (8, True), (32, True), (1, False)):
        assert dkv(group, on_gpu) == rows
    monkeypatch.setitem(selected.LAUNCH, "dkv", {"BLOCK_M": 32})
    assert dkv(16, on_gpu=True) == {**rows, "BLOCK_M": 32}
    monkeypatch.setitem(selected.LAUNCH, "dkv", {"KEYS_M": True, "num_stages": 3})
    assert dkv(4, on_gpu=False) == {"KEYS_M": True, "num_warps": 4, "num_stages": 3}
    monkeypatch.setitem(selected.LAUNCH, "dkv", {"KEYS_M": True, "BLOCK_M": 32})
    with pytest.raises(ValueError,
                       match=r"KEYS_M=True takes BLOCK_N \(rows a step\), not BLOCK_M=32.*leave BLOCK_M out"):
        dkv(16, on_gpu=True)


def test_gpu_defaults_choose_by_group_and_yield_to_launch(monkeypatch):
    """Where LAUNCH is silent, a GPU runs groups of at most 4 heads by key blocks (measured faster at G=4,
    slower at G=16) and larger groups on the one-token kernels; the interpreter always on the one-token
    kernels; a forward asked for slot_lse on the one-token kernels; a LAUNCH entry decides alone."""
    by_blocks = selected._by_blocks_launch
    for group in (1, 2, 4):
        assert by_blocks("fwd", group, on_gpu=True) == selected.BY_BLOCKS_LAUNCH["fwd"]
        assert by_blocks("dq", group, on_gpu=True) == selected.BY_BLOCKS_LAUNCH["dq"]
    for group, on_gpu, slot_lse in ((8, True, False), (16, True, False), (4, False, False), (4, True, True)):
        assert by_blocks("fwd", group, on_gpu, slot_lse) is None
    launch = by_blocks("dq", 4, on_gpu=True)
    launch["BLOCK_M"] = 999
    assert selected.BY_BLOCKS_LAUNCH["dq"]["BLOCK_M"] != 999, "the default was handed out, not a copy"
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"num_warps": 4})
    assert by_blocks("fwd", 4, on_gpu=True) is None
    monkeypatch.setitem(selected.LAUNCH, "dq", {"BY_BLOCKS": True, "BLOCK_M": 16})
    assert by_blocks("dq", 16, on_gpu=False) == {"BLOCK_M": 16}
    q, k, v = (torch.zeros(1, 4, heads, 64) for heads in (4, 1, 1))
    assert selected._tma_by_default("dq", q, k, v) == {}, "TMA by default off the GPU"


def launch_both(monkeypatch, **params):
    """The forward and dQ both launched with `params` (LAUNCH overrides, undone after the test)."""
    for kernel in ("fwd", "dq"):
        monkeypatch.setitem(selected.LAUNCH, kernel, dict(params))


def tma_on(monkeypatch, **params):
    launch_both(monkeypatch, TMA=True, **params)


def test_tma_over_a_batch(monkeypatch):
    """K/V parts through TMA descriptors (a LAUNCH override the sweep times), two sequences: a
    descriptor's rows are its batch's keys and those before it."""
    torch.manual_seed(7)
    tma_on(monkeypatch)
    compare_attention(selected_attention_triton, selected_attention_ref, leaves(2, T, T, 16, 1, torch.float32),
                      torch.float32, block_idx=random_blocks(2, T, 1, shuffle=True), selection_block=SEL)


@pytest.mark.parametrize("block_k", [64, 16])
def test_tma_over_packed_documents(monkeypatch, block_k):
    """TMA copies whole parts, past a document's end or the query: those rows must not count (masked and
    zeroed), with the chunk at q_start inside a document."""
    torch.manual_seed(block_k)
    tma_on(monkeypatch, BLOCK_K=block_k)
    sel, q_start, seq = 64, 5, 165
    cu_seqlens = torch.tensor([0, 30, 160, q_start + seq], dtype=torch.int32)
    doc_starts = cu_seqlens[torch.searchsorted(cu_seqlens, torch.arange(q_start, q_start + seq), right=True) - 1]
    compare_attention(selected_attention_triton, selected_attention_ref,
                      leaves(1, seq, q_start + seq, 2, 2, torch.float32), torch.float32,
                      block_idx=random_blocks(1, seq, 2, q_start, doc_starts, sel=sel), selection_block=sel,
                      q_start=q_start, cu_seqlens=cu_seqlens.to(DEVICE))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_tma_low_precision_error_is_at_most_twice_the_references(monkeypatch, dtype):
    torch.manual_seed(8)
    tma_on(monkeypatch)
    compare_to_fp32(selected_attention_triton, selected_attention_ref, leaves(1, T, T, 16, 1, torch.float32), dtype,
                    block_idx=random_blocks(1, T, 1), selection_block=SEL)


@pytest.mark.parametrize("launch", [{"KEYS_M": True}, {"KEYS_M": True, "TMA": True, "BLOCK_K": 16}],
                         ids=["pointers", "tma-parts"])
def test_keys_as_m_over_packed_documents(monkeypatch, launch):
    """The forward and dQ with the key part as the dots' first operand (LAUNCH KEYS_M: scores, output and dQ
    transposed): packed documents at an offset, shuffled slots, rows past a document's end or the query
    masked."""
    torch.manual_seed(11)
    launch_both(monkeypatch, **launch)
    sel, q_start, seq = 64, 5, 165
    cu_seqlens = torch.tensor([0, 30, 160, q_start + seq], dtype=torch.int32)
    doc_starts = cu_seqlens[torch.searchsorted(cu_seqlens, torch.arange(q_start, q_start + seq), right=True) - 1]
    compare_attention(selected_attention_triton, selected_attention_ref,
                      leaves(1, seq, q_start + seq, 16, 2, torch.float32), torch.float32,
                      block_idx=random_blocks(1, seq, 2, q_start, doc_starts, shuffle=True, sel=sel),
                      selection_block=sel, q_start=q_start, cu_seqlens=cu_seqlens.to(DEVICE))


def test_keys_as_m_gives_the_slot_lse_and_the_one_token_forwards_result(monkeypatch):
    """KEYS_M changes the dots' operand order only: slot_lse, output and lse agree with the default forward's
    (fp32, to rounding)."""
    torch.manual_seed(13)
    inputs = {name: x.detach() for name, x in leaves(1, T, T, 4, 2, torch.float32).items()}
    kwargs = dict(block_idx=random_blocks(1, T, 2, shuffle=True), selection_block=SEL, slot_lse=True)
    plain = selected_attention_triton(**inputs, **kwargs)
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"KEYS_M": True})
    keys_m = selected_attention_triton(**inputs, **kwargs)
    for name, a, b in zip(("o", "lse", "slot_lse"), plain, keys_m):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b)), name
        assert torch.allclose(a[finite], b[finite], atol=1e-5, rtol=0), name


def test_keys_as_m_is_the_one_token_kernels(monkeypatch):
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"KEYS_M": True, "TOKENS": 4})
    with pytest.raises(ValueError, match=r"LAUNCH\['fwd'\] KEYS_M=True is for the one-token kernels"):
        selected_attention_triton(**leaves(1, 20, 20, 4, 1, torch.float32), block_idx=random_blocks(1, 20, 1),
                                  selection_block=SEL)


def test_tma_needs_tile_wide_head_dims(monkeypatch):
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"TMA": True})
    inputs = leaves(1, 20, 20, 2, 1, torch.float32)
    inputs["v"] = randn(1, 20, 1, 24)
    with pytest.raises(ValueError, match="TMA=True needs head dims that are powers of two .*Dv=24.*leave TMA out"):
        selected_attention_triton(**inputs, block_idx=random_blocks(1, 20, 1), selection_block=SEL)


def test_tma_needs_the_one_token_kernels(monkeypatch):
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"TMA": True, "TOKENS": 4})
    with pytest.raises(ValueError, match="TMA=True needs the one-token kernels .*got 4.*leave TMA out"):
        selected_attention_triton(**leaves(1, 20, 20, 4, 1, torch.float32), block_idx=random_blocks(1, 20, 1),
                                  selection_block=SEL)


def test_token_tile_must_fill_a_dot(monkeypatch):
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"TOKENS": 2})
    with pytest.raises(ValueError, match="TOKENS=2 must be a power of two .* for G=4, TOKENS 4 to 32"):
        selected_attention_triton(**leaves(1, 20, 20, 4, 1, torch.float32), block_idx=random_blocks(1, 20, 1),
                                  selection_block=SEL)


def test_key_part_must_fit_the_block(monkeypatch):
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"BLOCK_K": 32})
    with pytest.raises(ValueError, match="BLOCK_K=32 must be a power of two from 16"):
        selected_attention_triton(**leaves(1, 20, 20, 2, 1, torch.float32), block_idx=random_blocks(1, 20, 1),
                                  selection_block=SEL)


def test_chunk_at_offset_in_packed_documents():
    torch.manual_seed(0)
    q_start = 40
    cu_seqlens = torch.tensor([0, 7, 50, 51, 117, T], dtype=torch.int32)
    doc_starts = cu_seqlens[torch.searchsorted(cu_seqlens, torch.arange(q_start, T), right=True) - 1]
    blocks = random_blocks(1, T - q_start, 1, q_start, doc_starts)
    compare_attention(selected_attention_triton, selected_attention_ref,
                      leaves(1, T - q_start, T, 2, 1, torch.float32), torch.float32,
                      block_idx=blocks, selection_block=SEL, q_start=q_start, cu_seqlens=cu_seqlens.to(DEVICE))


def check_inverted_index(blocks, block_base, num_blocks):
    """The index lists, per (batch, KV head, key block), exactly the tokens that picked it, ascending, cut
    into consecutive segments; the segments past the real ones (the launch is sized without a host
    sync) are empty. Returns the segments' lengths and counts."""
    kv_heads = blocks.shape[2]
    entries, seg_block, seg_lo, seg_hi, seg_first, seg_count = inverted_index(blocks, block_base, num_blocks)
    expected = {}
    for b, t, h, slot in torch.nonzero(blocks >= 0).tolist():
        expected.setdefault((b * kv_heads + h) * num_blocks + int(block_base[t] + blocks[b, t, h, slot]), []).append(t)
    found = {}
    num_real = int(seg_count.sum())
    for seg, block in enumerate(seg_block.tolist()):
        if seg >= num_real:  # padding up to the host-side bound on the number of segments: empty
            assert seg_lo[seg] == seg_hi[seg]
            continue
        assert seg_first[block] <= seg < seg_first[block] + seg_count[block]
        found.setdefault(block, []).extend(entries[seg_lo[seg] : seg_hi[seg]].tolist())
    assert found == expected
    return seg_hi - seg_lo, seg_count


@pytest.mark.parametrize("programs, cap", [(4, 118), (40, 79)])
def test_inverted_index_lists_every_pick_once(monkeypatch, programs, cap):
    """One document: segments hold at most twice the mean list length (118 here) or, with more programs
    wanted, an even share of the 3,144 slots (79 for 40 programs)."""
    torch.manual_seed(0)
    monkeypatch.setattr(selected, "programs_wanted", lambda device: programs)
    blocks = random_blocks(2, T, 3)
    _, block_base, block_start, _ = selection_layout(T, T, SEL, 0, None, blocks.device)
    lengths, seg_count = check_inverted_index(blocks, block_base, block_start.numel())
    assert int(lengths.max()) == cap
    assert int(seg_count[0]) > 1, "block 0 (picked by every query) should span several segments"


def test_inverted_index_over_packed_documents(monkeypatch):
    """Packed documents, each with its own key blocks (block_base), and a document of one token."""
    torch.manual_seed(1)
    monkeypatch.setattr(selected, "programs_wanted", lambda device: 40)
    cu_seqlens = torch.tensor([0, 7, 50, 51, 117, T], dtype=torch.int32)
    doc_starts = cu_seqlens[torch.searchsorted(cu_seqlens, torch.arange(T), right=True) - 1]
    blocks = random_blocks(1, T, 2, 0, doc_starts)
    _, block_base, block_start, _ = selection_layout(T, T, SEL, 0, cu_seqlens.to(DEVICE), blocks.device)
    lengths, seg_count = check_inverted_index(blocks, block_base, block_start.numel())
    assert int(block_base.max()) > 0 and int(lengths.max()) > 0


def test_segment_cap_splits_packed_short_documents_finely():
    """The proof's first-stage step (32K tokens in 512 blocks, n = 16, one KV head) on an H200 (132
    multiprocessors, 1,056 programs wanted): an even share of the slots (497 tokens), not twice the mean
    list length (2,048, a whole 2K document's list). One 128K document (4 KV heads): the mean bounds."""
    assert selected.segment_cap(32768, 16, 512, 32768 * 16, 1056) == 497
    assert selected.segment_cap(131072, 16, 2048, 131072 * 4 * 16, 1056) == 2048
    assert selected.segment_cap(64, 4, 4, 64 * 4, 1056) == selected.ROWS_PER_TILE


@pytest.mark.parametrize("block_k, dtype", [(32, torch.float32), (16, torch.float32), (32, torch.float16)])
def test_slot_lse_matches_reference(monkeypatch, block_k, dtype):
    """slot_lse=True: each slot's log-sum-exp over its block's visible keys, from the forward's running
    sums, as the reference computes it from the block's scores; whole blocks and 16-key parts, packed
    documents at an offset, shuffled slots (so -1 slots sit between picks), two KV heads. Their
    log-sum-exp is the row's lse, and the output and lse match the reference's and are those of a
    launch without slot_lse."""
    torch.manual_seed(7)
    sel, q_start, seq = 32, 5, 92
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"BLOCK_K": block_k})
    cu_seqlens = torch.tensor([0, 20, 27, q_start + seq], dtype=torch.int32)  # the last: 3 blocks of 32
    doc_starts = cu_seqlens[torch.searchsorted(cu_seqlens, torch.arange(q_start, q_start + seq), right=True) - 1]
    inputs = {name: x.detach() for name, x in leaves(1, seq, q_start + seq, 4, 2, dtype).items()}
    kwargs = dict(block_idx=random_blocks(1, seq, 2, q_start, doc_starts, shuffle=True, sel=sel), selection_block=sel,
                  q_start=q_start, cu_seqlens=cu_seqlens.to(DEVICE))
    o, lse, slots = selected_attention_triton(**inputs, **kwargs, slot_lse=True)
    o_ref, lse_ref, ref = selected_attention_ref(**{k: x.double() for k, x in inputs.items()}, **kwargs, slot_lse=True)
    assert slots.shape == (1, seq, 8, NUM_SELECTED) and slots.dtype == torch.float32
    empty = ref == float("-inf")  # -1 slots
    assert empty.any() and (~empty).any() and torch.equal(slots == float("-inf"), empty)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(slots[~empty].double(), ref[~empty], atol=tolerance, rtol=0)
    assert torch.allclose(torch.logsumexp(slots, -1), lse, atol=tolerance, rtol=0)
    assert_close("o", o, o_ref.to(dtype), dtype)
    assert_lse_close("lse", lse, lse_ref.float(), dtype)
    o_plain, lse_plain = selected_attention_triton(**inputs, **kwargs)
    assert torch.equal(o, o_plain) and torch.equal(lse, lse_plain)


def test_slot_lse_is_the_one_token_forwards(monkeypatch):
    monkeypatch.setitem(selected.LAUNCH, "fwd", {"TOKENS": 4})
    with pytest.raises(ValueError, match="slot_lse is written by the one-token forward only"):
        selected_attention_triton(**leaves(1, 20, 20, 4, 1, torch.float32), block_idx=random_blocks(1, 20, 1),
                                  selection_block=SEL, slot_lse=True)
