"""Top-n block selection: Triton kernel against the reference, which it must match exactly."""

import pytest
import torch

import kernels.block_selection.triton as block_selection
from kernels.block_selection.naive import select_blocks_ref
from kernels.block_selection.triton import select_blocks_triton
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.common import longest_document
from kernels.compression.naive import compressed_cu_seqlens, num_compressed_blocks
from triton_cases import DEVICE, INTERPRETER_WARNINGS, randn, require_backend

pytestmark = INTERPRETER_WARNINGS

T = 131
DK = 32


def check(group, kv_heads, dtype, sizes, q_start=0, cu_seqlens=None, score="sum", seq=T):
    require_backend()
    block_size, stride, selection_block, num_selected = sizes
    if cu_seqlens is None:
        num_blocks = num_compressed_blocks(seq, block_size, stride)
    else:
        num_blocks = int(compressed_cu_seqlens(cu_seqlens, block_size, stride)[-1])
    q = randn(1, seq - q_start, group * kv_heads, DK, dtype=dtype, grad=False)
    k_cmp = randn(1, num_blocks, kv_heads, DK, dtype=dtype, grad=False)
    _, lse = compressed_attention_ref(q, k_cmp, k_cmp, block_size, stride, q_start=q_start, cu_seqlens=cu_seqlens)
    args = (q, k_cmp, lse, block_size, stride, selection_block, num_selected)
    picked = select_blocks_triton(*args, q_start=q_start, cu_seqlens=cu_seqlens, score=score)
    expected = select_blocks_ref(*args, q_start=q_start, cu_seqlens=cu_seqlens, score=score)
    assert picked.dtype == torch.int32 and picked.shape == expected.shape
    mismatch = (picked != expected).any(-1).nonzero()
    assert len(mismatch) == 0, f"{len(mismatch)} rows differ, first (b, t, hk) = {mismatch[0].tolist()}"


@pytest.mark.parametrize(
    "dtype, group, kv_heads",
    [(torch.float32, 1, 2), (torch.float16, 2, 1), (torch.float32, 3, 1), (torch.float32, 4, 1),
     (torch.float16, 16, 1), (torch.float32, 32, 1)],
)
def test_matches_reference(dtype, group, kv_heads):
    """Groups of 3 (heads padded to 4 in the kernel's dot) and 32 (two dots of 16 heads per key tile)."""
    torch.manual_seed(group)
    check(group, kv_heads, dtype, (16, 8, 16, 4))


@pytest.mark.parametrize(
    "sizes",
    [
        (8, 4, 8, 5),  # 17 selection blocks: two tiles, scores carried across the tile boundary
        (16, 8, 32, 3),  # l < l'
        (16, 4, 16, 2),  # n smaller than the three forced blocks
        (16, 8, 24, 4),  # l' / d = 3 compressed blocks start in a selection block: not a power of two
    ],
    ids=["two-tiles", "l-below-l'", "n-below-forced", "three-runs-a-block"],
)
def test_block_sizes(sizes):
    torch.manual_seed(0)
    check(2, 1, torch.float32, sizes)


@pytest.mark.parametrize("q_start", [0, 40])
def test_packed_documents(q_start):
    torch.manual_seed(q_start)
    cu_seqlens = torch.tensor([0, 7, 50, 51, 117, T], dtype=torch.int32, device=DEVICE)
    check(2, 1, torch.float32, (16, 8, 16, 4), q_start=q_start, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize(
    "dtype, group, sizes, q_start, packed",
    [(torch.float32, 4, (16, 8, 16, 4), 0, False),
     (torch.float16, 16, (16, 8, 16, 4), 0, False),
     (torch.float32, 3, (8, 4, 8, 5), 0, False),  # two tiles: each head's score carried across the boundary
     (torch.float32, 2, (16, 8, 16, 4), 40, True)],
    ids=["G4", "G16-fp16", "G3-two-tiles", "packed-at-offset"],
)
def test_max_score_matches_reference(dtype, group, sizes, q_start, packed):
    """nsa.selection_score "max": each head's scores spread on their own, the largest head's ranks."""
    torch.manual_seed(group)
    cu_seqlens = torch.tensor([0, 7, 50, 51, 117, T], dtype=torch.int32, device=DEVICE) if packed else None
    check(group, 1, dtype, sizes, q_start=q_start, cu_seqlens=cu_seqlens, score="max")


@pytest.mark.parametrize("score", ["sum", "max"])
def test_scores_carried_across_tiles(score):
    """A compressed token that starts in a tile's last selection block (16 blocks a tile here) and ends in
    the next one: its share of block 16 is carried over. With l = l' = 8 and d = 4, the token at keys
    124-131 gives block 16 a quarter of its score, and queries from block 18 on (T = 200) rank it among
    their 6 free picks (n = 9)."""
    torch.manual_seed(5)
    check(4, 1, torch.float32, (8, 4, 8, 9), score=score, seq=200)


@pytest.mark.parametrize("score", ["sum", "max"])
def test_a_compressed_block_scores_the_selection_block_after_its_start(score):
    """A compressed block that starts near a selection block's end gives most of its score to the next one.
    With l = l' = 16 and d = 4, compressed block 19 covers tokens 76-91: 4 in block 4 (weight 1) and 12 in
    block 5 (weight 3). Planted as the one key every query matches, it must win block 5 the one free pick
    (n = 4 with three forced) of the queries from block 7 on; block 4 wins it if the 12 tokens' share is
    dropped. Both blocks lie in one step of the kernel's 16 (pow2(n), at least 16) blocks, so this is the
    spread within a step; test_scores_carried_across_tiles covers the carry between steps."""
    require_backend()
    torch.manual_seed(11)
    sizes, seq, group, planted = (16, 4, 16, 4), 200, 2, 19
    q = 0.1 * randn(1, seq, group, DK, grad=False)
    k_cmp = 0.1 * randn(1, num_compressed_blocks(seq, 16, 4), 1, DK, grad=False)
    q[..., 0] += 3.0
    k_cmp[:, planted, :, 0] += 3.0
    _, lse = compressed_attention_ref(q, k_cmp, k_cmp, 16, 4)
    args = (q, k_cmp, lse, *sizes)
    picked = select_blocks_triton(*args, score=score)
    expected = select_blocks_ref(*args, score=score)
    assert torch.equal(picked, expected)
    later = picked[0, 7 * 16:, 0]  # queries in block 7 and after: blocks 0, cur - 1, cur forced, one free
    assert (later == 5).any(-1).all() and not (later == 4).any()


def test_chunk_at_offset():
    torch.manual_seed(0)
    check(2, 1, torch.float32, (8, 4, 8, 5), q_start=45)


def test_launch_override(monkeypatch):
    """Another tile of query tokens (as benchmarks/kernels-exp-sweep.py sets it) picks the same blocks."""
    torch.manual_seed(0)
    monkeypatch.setitem(block_selection.LAUNCH, "topn", {"BLOCK_T": 16, "num_warps": 4})
    check(2, 1, torch.float32, (8, 4, 8, 5))


@pytest.mark.parametrize("tokens", [4, 64])
def test_exact_launch_override(monkeypatch, tokens):
    """The exact score's top-n with other tiles than its default (16 tokens at G = 4: 64 (token, head) rows),
    as tools/bench_exact_score.py --launches sets them: 16 and 256 rows pick the reference's blocks too,
    over several documents and merges (n = 5: two free picks from 80 tokens into a document on)."""
    torch.manual_seed(tokens)
    monkeypatch.setitem(block_selection.LAUNCH, "topn_exact", {"BLOCK_T": tokens})
    cu_seqlens = torch.tensor([0, 7, 50, 51, 200], dtype=torch.int32, device=DEVICE)  # the last: 149 tokens
    check_raw_key_score("exact", 4, 1, torch.float32, 16, 5, cu_seqlens=cu_seqlens, seq=200)


@pytest.mark.parametrize("one_pass, scratch_bytes", [(True, 1), (True, 6_500), (False, None)],
                         ids=["one-pass-a-launch-a-tile", "one-pass-in-chunks", "two-pass"])
def test_exact_score_ways(monkeypatch, one_pass, scratch_bytes):
    """The exact score's ways to its picks, over packed documents, two KV heads and several merges: one pass
    whose scratch holds a single query tile's block log-sum-exps (each of the 11 tiles its own launch) or two
    tiles' (6 launches, the last with one tile), and the two passes (range_attention_lse, then
    _topn_exact_kernel)."""
    torch.manual_seed(11)
    monkeypatch.setattr(block_selection, "EXACT_ONE_PASS", one_pass)
    if scratch_bytes is not None:
        monkeypatch.setattr(block_selection, "EXACT_SCRATCH_BYTES", scratch_bytes)
    cu_seqlens = torch.tensor([0, 30, 31, 120, 200], dtype=torch.int32, device=DEVICE)
    check_raw_key_score("exact", 4, 2, torch.float32, 16, 4, cu_seqlens=cu_seqlens, seq=200)


@pytest.mark.parametrize("score", ["sum", "max", "exact"])
def test_topk_merge_picks_what_the_sorted_merge_picks(monkeypatch, score):
    """SORTED_MERGE=False (each step's keys and the running list through topk, the merge before the sorted
    one, kept for timing both in one run): the reference's picks too, over several merges (T = 200)."""
    torch.manual_seed(7)
    for kernel in ("topn", "topn_exact"):
        monkeypatch.setitem(block_selection.LAUNCH, kernel, {"SORTED_MERGE": False})
    if score == "exact":
        check_raw_key_score("exact", 2, 1, torch.float32, 16, 4, seq=200)
    else:
        check(4, 1, torch.float32, (8, 4, 8, 9), score=score, seq=200)


@pytest.mark.parametrize(
    "splits, sizes, seq, q_start, packed",
    [(2, (8, 4, 8, 9), 200, 0, False),  # split 1 starts at block 16: its carry-in is the planted share above
     (4, (8, 4, 8, 5), T, 0, False),  # 3 steps of 8 blocks over 4 splits: one split is empty
     (2, (16, 8, 16, 4), 200, 0, False),  # l < l': a carried compressed block starts mid-block
     (4, (8, 4, 8, 5), T, 40, True)],
    ids=["carry", "empty-split", "l-below-l'", "packed-at-offset"],
)
def test_key_splits_pick_what_one_pass_picks(monkeypatch, splits, sizes, seq, q_start, packed):
    """A tile's selection blocks cut into SPLITS runs, one program each, merged by _topn_merge_kernel: the
    same picks as the reference."""
    torch.manual_seed(splits)
    monkeypatch.setitem(block_selection.LAUNCH, "topn", {"SPLITS": splits})
    cu_seqlens = torch.tensor([0, 7, 50, 51, 117, T], dtype=torch.int32, device=DEVICE) if packed else None
    check(4, 1, torch.float32, sizes, q_start=q_start, cu_seqlens=cu_seqlens, seq=seq)


def test_key_splits_by_length_and_tile_size():
    """Splits only where the longest document has MIN_SPLIT_STEPS steps a split and a tile's queries are
    larger than SPLIT_TILE_BYTES; at most MAX_SPLITS."""
    one, most, big = block_selection.MIN_SPLIT_STEPS, block_selection.MAX_SPLITS, 4 * block_selection.SPLIT_TILE_BYTES
    assert block_selection._splits(2 * one - 1, big) == 1 and block_selection._splits(2 * one, big) == 2
    assert block_selection._splits(1000 * one, big) == most
    assert block_selection._splits(1000 * one, block_selection.SPLIT_TILE_BYTES) == 1
    # as launched: 128K tokens, 64 / 4 heads of 128 in bf16 (256 KB a tile) split; 16 / 4 heads, or 'max', not
    q = torch.empty(1, 131072, 64, 128, dtype=torch.bfloat16, device="meta")
    assert block_selection.topn_splits(q, 4, 64, 16, 0, None, "sum") == 2
    assert block_selection.topn_splits(q[:, :, :16], 4, 64, 16, 0, None, "sum") == 1
    assert block_selection.topn_splits(q, 4, 64, 16, 0, None, "max") == 1
    cu_seqlens = torch.tensor([0, 10, 300, 310], dtype=torch.int32)
    assert longest_document(310, 0, cu_seqlens) == 290
    assert longest_document(100, 210, cu_seqlens) == 290  # query 299 sees 10..299
    assert longest_document(5, 302, cu_seqlens) == 7  # queries 302..306, document from 300
    assert longest_document(64, 1000, None) == 1064


def test_key_splits_refused_with_max_score(monkeypatch):
    monkeypatch.setitem(block_selection.LAUNCH, "topn", {"SPLITS": 2})
    with pytest.raises(ValueError, match=r"\['SPLITS'\]=2 cannot be launched"):
        check(2, 1, torch.float32, (8, 4, 8, 5), score="max")


@pytest.mark.parametrize("q_start", [0, 37])
@pytest.mark.parametrize("forced_until", [0, 20])
def test_query_tiles_cover_each_query_once_longest_first(q_start, forced_until):
    """The tiles partition the chunk's queries without straddling a document, each with its document's
    compressed rows, and come longest first (the last token's position in its document descending); the
    queries they leave out are those of tiles that sit wholly less than forced_until tokens into their
    document, and only those (8-token tiles: some tiles hold queries on both sides of 20)."""
    bounds = [0, 50, 51, 120, T]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    seq = T - q_start
    tiles = block_selection.query_tiles(seq, 999, 16, 8, q_start, cu_seqlens, 8, torch.device("cpu"),
                                        forced_until=forced_until).tolist()
    cmp_bounds = compressed_cu_seqlens(cu_seqlens, 16, 8).tolist()
    covered = []
    for lo, hi, doc_lo, cmp_lo, cmp_count in tiles:
        doc = bounds.index(doc_lo)
        assert 0 < hi - lo <= 8 and doc_lo <= q_start + lo and q_start + hi <= bounds[doc + 1]
        assert (cmp_lo, cmp_count) == (cmp_bounds[doc], cmp_bounds[doc + 1] - cmp_bounds[doc])
        assert q_start + hi - 1 - doc_lo >= forced_until  # its last query has a choice
        covered += range(lo, hi)
    assert len(covered) == len(set(covered))
    left_out = sorted(set(range(seq)) - set(covered))
    in_document = [q_start + t - max(b for b in bounds if b <= q_start + t) for t in range(seq)]
    assert all(in_document[t] < forced_until for t in left_out)
    assert bool(left_out) == (forced_until > 0)
    work = [q_start + hi - doc_lo for _, hi, doc_lo, _, _ in tiles]
    assert work == sorted(work, reverse=True)


@pytest.mark.parametrize("score", ["sum", "max", "exact", "bound"])
def test_documents_within_n_blocks_need_no_kernel(monkeypatch, score):
    """Packed documents of at most n * l' tokens (the proof's 256-token samples): every query's picks are
    every block it can see, so top-n leaves out every tile and launches no kernel; its picks are still the
    reference's."""
    require_backend()
    torch.manual_seed(0)
    launched = []
    for name in ("_topn_kernel", "_topn_exact_kernel"):
        kernel = getattr(block_selection, name)
        monkeypatch.setattr(block_selection, name, _Recorded(kernel, launched, name))
    lse_pass = block_selection.range_attention_lse  # the exact score's first pass

    def recorded_lse_pass(*args, **kwargs):
        launched.append("range_attention_lse")
        return lse_pass(*args, **kwargs)

    monkeypatch.setattr(block_selection, "range_attention_lse", recorded_lse_pass)
    cu_seqlens = torch.tensor([0, 64, 70, 121, T], dtype=torch.int32, device=DEVICE)  # n * l' = 64
    if score in ("exact", "bound"):
        check_raw_key_score(score, 2, 1, torch.float32, 16, 4, cu_seqlens=cu_seqlens)
    else:
        check(2, 1, torch.float32, (16, 8, 16, 4), cu_seqlens=cu_seqlens, score=score)
    assert launched == []
    longer = torch.tensor([0, 50, T], dtype=torch.int32, device=DEVICE)  # 81 tokens: its second tile is kept
    check(2, 1, torch.float32, (16, 8, 16, 4), cu_seqlens=longer, score="sum")
    assert launched == ["_topn_kernel"]


class _Recorded:
    """A kernel whose launches (kernel[grid](...)) are recorded by name."""

    def __init__(self, kernel, launched, name):
        self.kernel, self.launched, self.name = kernel, launched, name

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def check_raw_key_score(score, group, kv_heads, dtype, selection_block, num_selected, q_start=0, cu_seqlens=None,
                        seq=T):
    """nsa.selection_score "exact" or "bound": the Triton kernels pick the reference's blocks from the raw
    keys."""
    require_backend()
    q = randn(1, seq - q_start, group * kv_heads, DK, dtype=dtype, grad=False)
    keys = randn(1, seq, kv_heads, DK, dtype=dtype, grad=False)
    args = (q, None, None, 0, 0, selection_block, num_selected)
    picked = select_blocks_triton(*args, q_start=q_start, cu_seqlens=cu_seqlens, score=score, keys=keys)
    expected = select_blocks_ref(*args, q_start=q_start, cu_seqlens=cu_seqlens, score=score, keys=keys)
    assert picked.dtype == torch.int32 and picked.shape == expected.shape
    mismatch = (picked != expected).any(-1).nonzero()
    assert len(mismatch) == 0, f"{len(mismatch)} rows differ, first (b, t, hk) = {mismatch[0].tolist()}"


RAW_KEY_CASES = {  # id: dtype, group, kv_heads, selection_block, num_selected
    "G2-HK2": (torch.float32, 2, 2, 16, 4),
    "G16-fp16": (torch.float16, 16, 1, 16, 4),
    "G3": (torch.float32, 3, 1, 16, 3),  # n below the three forced blocks' count plus one
    "G1-many-merges": (torch.float32, 1, 1, 16, 2),  # T = 200: 13 blocks, ST = 2: seven merges
}


# "bound" runs the "sum" kernel on other inputs (tested on every shape above): its shapes are the new ones
@pytest.mark.parametrize(
    "score, dtype, group, kv_heads, selection_block, num_selected",
    [pytest.param("exact", *case, id=f"exact-{name}") for name, case in RAW_KEY_CASES.items()]
    + [pytest.param("bound", *RAW_KEY_CASES[name], id=f"bound-{name}") for name in ("G2-HK2", "G16-fp16")],
)
def test_raw_key_score_matches_reference(score, dtype, group, kv_heads, selection_block, num_selected):
    torch.manual_seed(group + kv_heads)
    check_raw_key_score(score, group, kv_heads, dtype, selection_block, num_selected, seq=200 if group == 1 else T)


# "bound" once: its document and offset handling is the sum kernels', tested above for every layout
@pytest.mark.parametrize("score, q_start, packed",
                         [("exact", 0, True), ("exact", 40, True), ("exact", 45, False), ("bound", 40, True)])
def test_raw_key_score_documents_and_offsets(score, q_start, packed):
    torch.manual_seed(q_start)
    cu_seqlens = torch.tensor([0, 7, 50, 51, 117, T], dtype=torch.int32, device=DEVICE) if packed else None
    check_raw_key_score(score, 4, 1, torch.float32, 16, 4, q_start=q_start, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("score", ["exact", "bound"])
def test_raw_key_score_finds_a_planted_key(score):
    """One key far back that matches every query head of the group: the exact mass, and the bound that no
    key of a block can beat, put its block in every later query's picks, in both implementations (block 3
    of 12, free: neither block 0 nor a local one)."""
    require_backend()
    torch.manual_seed(3)
    seq, group = 192, 4
    q = randn(1, seq, group, DK, grad=False) * 0.1
    keys = randn(1, seq, 1, DK, grad=False) * 0.1
    direction = torch.randn(DK, device=DEVICE)
    q += direction
    keys[0, 3 * 16 + 5, 0] = 4 * direction
    for select in (select_blocks_triton, select_blocks_ref):
        picks = select(q, None, None, 0, 0, 16, 4, score=score, keys=keys)[0, :, 0]
        later = picks[6 * 16:]  # queries from block 6 on: block 3 is neither block 0 nor a local one
        assert (later == 3).any(-1).all(), f"{select.__name__}: block 3 missing in some rows"


def test_raw_key_score_refusals():
    q = torch.zeros(1, 32, 2, DK)
    for score in ("exact", "bound"):
        for select in (select_blocks_ref, select_blocks_triton):
            with pytest.raises(ValueError, match=f"the '{score}' selection score needs the raw keys"):
                select(q, None, None, 0, 0, 16, 4, score=score)
    with pytest.raises(ValueError, match="power of two >= 16"):
        select_blocks_triton(q, None, None, 0, 0, 8, 4, score="exact", keys=torch.zeros(1, 32, 1, DK))
    with pytest.raises(ValueError, match=r"keys must hold at least q_start \+ T = 48 tokens; got 40"):
        select_blocks_triton(q, None, None, 0, 0, 16, 4, q_start=16, score="exact", keys=torch.zeros(1, 40, 1, DK))


@pytest.mark.parametrize("value, says", [("{bad", "is not JSON"), ("[4]", "is not a JSON object")])
def test_bench_exact_score_refuses_a_bad_launch(monkeypatch, capsys, value, says):
    """tools/bench_exact_score.py --launches: a value that is not a JSON object of launch parameters stops
    the tool with a message naming it and the form to give, before any GPU is looked for."""
    import sys

    from tools import bench_exact_score
    monkeypatch.setattr(sys, "argv", ["bench_exact_score.py", "--launches", '{"BLOCK_T": 4}', value])
    with pytest.raises(SystemExit):
        bench_exact_score.parse_args()
    err = capsys.readouterr().err
    assert f"--launches {value!r} {says}" in err and '{"BLOCK_T": 8, "num_warps": 4}' in err
