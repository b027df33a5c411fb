"""The range attention's kernels copying their streamed tiles through TMA tensor descriptors
(range_attention.TMA_LOADS: K/V in the forward and dQ kernels, q/dO in the dK/dV and one-pass kernels):
the compressed and window branches against their references, on both backward paths, over batches (a
descriptor covers its batch's rows and those before it), packed documents and several key tiles."""

import pytest
import torch

import kernels.compressed_attention.triton as compressed_triton
import kernels.range_attention as range_attention
import kernels.window_attention.triton as window_triton
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.compressed_attention.triton import compressed_attention_triton
from kernels.compression.naive import compressed_cu_seqlens, num_compressed_blocks
from kernels.range_attention import _CPU_TILES
from kernels.window_attention.naive import window_attention_ref
from kernels.window_attention.triton import window_attention_triton
from triton_cases import DEVICE, INTERPRETER_WARNINGS, LOW_PRECISION, compare_attention, compare_to_fp32, randn

pytestmark = INTERPRETER_WARNINGS

L, STRIDE = 16, 8  # compression block, stride
DK, DV = 32, 16


ALL_KERNELS = ("fwd", "dq", "dkv", "onepass")


@pytest.fixture(params=[(False, False), (False, True), (True, False), (True, True)],
                ids=["split-bwd", "split-bwd-row-stats", "onepass-bwd", "onepass-dq-reduce"])
def tma_loads(request, monkeypatch):
    """TMA copies on in every kernel, once per backward path of both branches, and each path once more with the
    dK/dV kernel's lse and delta read by TMA copies (TMA_ROW_STATS) and the one pass's dQ added by TMA bulk
    reductions (TMA_DQ_REDUCE); checks that every launch took the TMA path, the row stats' copies exactly where
    the group has 4 heads or more, and that the forward and this path's backward kernels all ran."""
    one_pass, tma_rows = request.param
    monkeypatch.setattr(range_attention, "TMA_LOADS", ALL_KERNELS)
    monkeypatch.setattr(range_attention, "TMA_DQ_REDUCE", tma_rows and one_pass)
    monkeypatch.setattr(range_attention, "TMA_ROW_STATS", tma_rows)
    for branch in (compressed_triton, window_triton):
        monkeypatch.setattr(branch, "ONE_PASS_BACKWARD", one_pass)
    monkeypatch.setattr(compressed_triton, "ONE_PASS_MIN_WORK", 0)
    taken = []
    use_tma, use_dq_reduce = range_attention.use_tma, range_attention.use_dq_reduce
    use_row_stats_tma = range_attention.use_row_stats_tma

    def counting(kernel, q, k, v, wanted=False):
        taken.append((kernel, use_tma(kernel, q, k, v, wanted)))
        return taken[-1][1]

    def counting_reductions(q, k, v):
        taken.append(("dq-reduce", use_dq_reduce(q, k, v)))
        return taken[-1][1]

    def counting_stats(q, k, v):
        taken.append((f"row-stats-G{q.shape[2] // k.shape[2]}", use_row_stats_tma(q, k, v)))
        return taken[-1][1]

    monkeypatch.setattr(range_attention, "use_tma", counting)
    monkeypatch.setattr(range_attention, "use_dq_reduce", counting_reductions)
    monkeypatch.setattr(range_attention, "use_row_stats_tma", counting_stats)
    yield taken
    kernels = [kernel for kernel, _ in taken if not kernel.startswith("row-stats")]
    assert set(kernels) == ({"fwd", "onepass", "dq-reduce"} if one_pass else {"fwd", "dq", "dkv"}), taken
    assert all(on for kernel, on in taken if kernel in ALL_KERNELS), f"a kernel did not take the TMA path: {taken}"
    assert all(on == tma_rows for kernel, on in taken if kernel == "dq-reduce"), taken
    stats = [(int(kernel.removeprefix("row-stats-G")), on) for kernel, on in taken if kernel.startswith("row-stats")]
    assert len(stats) == kernels.count("onepass") + kernels.count("dkv"), taken
    assert all(on == (tma_rows and group >= 4) for group, on in stats), taken


def leaves(batch, seq, num_keys, group, kv_heads, dk=DK, dv=DV):
    return dict(q=randn(batch, seq, group * kv_heads, dk), k=randn(batch, num_keys, kv_heads, dk),
                v=randn(batch, num_keys, kv_heads, dv))


def compressed_leaves(batch, seq, num_blocks, group, kv_heads):
    inputs = leaves(batch, seq, num_blocks, group, kv_heads)
    return dict(q=inputs["q"], k_cmp=inputs["k"], v_cmp=inputs["v"])


@pytest.mark.parametrize("group, kv_heads", [(2, 2), (16, 1)], ids=["G2-HK2", "G16"])
def test_compressed_over_a_batch(tma_loads, group, kv_heads):
    torch.manual_seed(group)
    seq = 131
    inputs = compressed_leaves(2, seq, num_compressed_blocks(seq, L, STRIDE), group, kv_heads)
    compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, torch.float32,
                      block_size=L, stride=STRIDE)


def test_compressed_packed_over_several_key_tiles(tma_loads):
    """Three full key tiles and a partial one; a document ends after 700 tokens and one of 10 tokens
    has no block; q scaled up so that later tiles raise rows' maxima (the online rescale)."""
    seq = 3 * _CPU_TILES["BLOCK_N"] * STRIDE + 100
    cu_seqlens = torch.tensor([0, 700, 710, seq], dtype=torch.int32, device=DEVICE)
    num_blocks = int(compressed_cu_seqlens(cu_seqlens, L, STRIDE)[-1])
    torch.manual_seed(3)
    inputs = compressed_leaves(1, seq, num_blocks, 2, 1)
    with torch.no_grad():
        inputs["q"].mul_(4.0)
    compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, torch.float32,
                      block_size=L, stride=STRIDE, cu_seqlens=cu_seqlens)


def test_window_over_a_batch(tma_loads):
    torch.manual_seed(4)
    compare_attention(window_attention_triton, window_attention_ref, leaves(2, 131, 131, 4, 2), torch.float32,
                      window=24)


@pytest.mark.parametrize("q_start", [0, 40])
def test_window_packed_documents(tma_loads, q_start):
    """The chunk may start inside a document; its keys start at 0 (a left halo of q_start keys)."""
    seq = 131
    torch.manual_seed(q_start)
    cu_seqlens = torch.tensor([0, 7, 50, 51, 117, seq], dtype=torch.int32, device=DEVICE)
    compare_attention(window_attention_triton, window_attention_ref, leaves(1, seq - q_start, seq, 2, 1),
                      torch.float32, window=24, q_start=q_start, cu_seqlens=cu_seqlens)


def test_window_over_several_key_tiles(tma_loads):
    """A window of 150 keys over key tiles of 64: masked tiles at both ends of a row tile's keys, whole
    tiles between."""
    torch.manual_seed(5)
    seq = 300
    compare_attention(window_attention_triton, window_attention_ref, leaves(1, seq, seq, 2, 1), torch.float32,
                      window=150)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_error_is_at_most_twice_the_references(tma_loads, dtype):
    """fp16 (and bf16 on a GPU), both branches: within 2x the reference's own error in that dtype."""
    torch.manual_seed(6)
    seq = 131
    compare_to_fp32(compressed_attention_triton, compressed_attention_ref,
                    compressed_leaves(2, seq, num_compressed_blocks(seq, L, STRIDE), 4, 2), dtype,
                    block_size=L, stride=STRIDE)
    compare_to_fp32(window_attention_triton, window_attention_ref, leaves(2, seq, seq, 4, 2), dtype, window=24)


def test_shapes_that_do_not_fit_a_tile_keep_the_pointer_loads(monkeypatch):
    """A descriptor's tile is the head dim wide and holds whole groups: other head dims and group sizes
    read through pointers (masked columns and rows); and only the kernels TMA_LOADS names take TMA."""
    monkeypatch.setattr(range_attention, "TMA_LOADS", ("fwd", "dkv"))
    use_tma = range_attention.use_tma
    assert not use_tma("fwd", **leaves(1, 8, 8, 2, 1, dk=24, dv=16))
    assert not use_tma("fwd", **leaves(1, 8, 8, 3, 1))
    fitting = leaves(1, 8, 8, 2, 1)
    assert use_tma("fwd", **fitting) and use_tma("dkv", **fitting)
    assert not use_tma("dq", **fitting) and not use_tma("onepass", **fitting)
