"""Compressed attention: Triton kernel against the reference (outputs, lse, gradients)."""

import pytest
import torch

import kernels.compressed_attention.triton as compressed_triton
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.compressed_attention.triton import compressed_attention_triton
from kernels.compression.naive import compressed_cu_seqlens, num_compressed_blocks
from kernels.range_attention import _CPU_TILES
from triton_cases import DEVICE, DTYPES, INTERPRETER_WARNINGS, LOW_PRECISION, compare_attention, compare_to_fp32, randn

# every test runs once per backward path (tests/kernels/conftest.py)
pytestmark = [INTERPRETER_WARNINGS, pytest.mark.usefixtures("range_backward")]

L, STRIDE = 16, 8  # compression block, stride
T = 131  # a multiple of no block size
DK, DV = 32, 16


def leaves(batch, seq, num_blocks, group, kv_heads, dtype):
    return dict(
        q=randn(batch, seq, group * kv_heads, DK, dtype=dtype),
        k_cmp=randn(batch, num_blocks, kv_heads, DK, dtype=dtype),
        v_cmp=randn(batch, num_blocks, kv_heads, DV, dtype=dtype),
    )


@pytest.mark.parametrize("group", [1, 2, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, group):
    torch.manual_seed(group)
    kv_heads = 1 if group == 16 else 2
    inputs = leaves(2, T, num_compressed_blocks(T, L, STRIDE), group, kv_heads, dtype)
    compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, dtype, block_size=L, stride=STRIDE)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_error_is_at_most_twice_the_references(dtype):
    torch.manual_seed(5)
    inputs = leaves(2, T, num_compressed_blocks(T, L, STRIDE), 4, 2, torch.float32)
    compare_to_fp32(compressed_attention_triton, compressed_attention_ref, inputs, dtype, block_size=L, stride=STRIDE)


def test_chunk_at_offset():
    """Queries of a chunk at q_start = 45 against the compressed tokens of the whole sequence."""
    torch.manual_seed(0)
    q_start = 45
    inputs = leaves(1, T - q_start, num_compressed_blocks(T, L, STRIDE), 2, 2, torch.float32)
    compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, torch.float32,
                      block_size=L, stride=STRIDE, q_start=q_start)


@pytest.mark.parametrize("q_start", [0, 40])
def test_packed_documents(q_start):
    """Documents shorter than one block, of one token, and of several blocks; the chunk may start inside one."""
    torch.manual_seed(q_start)
    cu_seqlens = torch.tensor([0, 7, 50, 51, 117, T], dtype=torch.int32, device=DEVICE)
    num_blocks = int(compressed_cu_seqlens(cu_seqlens, L, STRIDE)[-1])
    inputs = leaves(1, T - q_start, num_blocks, 4, 1, torch.float32)
    compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, torch.float32,
                      block_size=L, stride=STRIDE, q_start=q_start, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("group, kv_heads, packed", [(2, 1, False), (4, 2, False), (2, 1, True)],
                         ids=["G2", "G4-HK2", "G2-packed"])
def test_several_key_tiles(group, kv_heads, packed):
    """Enough compressed tokens (~200) for three full key tiles and a partial one under the interpreter's
    tiles, so that the online softmax must rescale its running sums when a later tile raises a row's
    max (q is scaled up to make that common), the dK/dV programs of different key tiles meet, and the
    one-pass backward adds the dQ of a row from several key tiles and chunks. The first l - 1 queries
    see nothing (empty ranges). Packed: a document ends after 700 tokens (key tiles whose rows end
    early, one tile of keys from two documents), and one of 10 tokens has no block (its queries see
    nothing in the middle of the sequence)."""
    key_tile = _CPU_TILES["BLOCK_N"]
    seq = 3 * key_tile * STRIDE + 100
    cu_seqlens = torch.tensor([0, 700, 710, seq], dtype=torch.int32, device=DEVICE) if packed else None
    if packed:
        num_blocks = int(compressed_cu_seqlens(cu_seqlens, L, STRIDE)[-1])
    else:
        num_blocks = num_compressed_blocks(seq, L, STRIDE)
    assert num_blocks > 3 * key_tile
    torch.manual_seed(group)
    inputs = leaves(1, seq, num_blocks, group, kv_heads, torch.float32)
    with torch.no_grad():
        inputs["q"].mul_(4.0)
    compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, torch.float32,
                      block_size=L, stride=STRIDE, cu_seqlens=cu_seqlens)


def test_kv_in_registers(monkeypatch):
    """The dK/dV and one-pass kernels with K and V made in registers (KV_REGS, a range_attention.LAUNCH
    config): the reference's gradients over packed documents and several key tiles, the last one partial."""
    import kernels.range_attention as range_attention

    for name in ("dkv", "onepass"):
        monkeypatch.setitem(range_attention.LAUNCH, name, range_attention._config(64, 64, 4, 1, kv_regs=True))
    test_several_key_tiles(2, 1, True)


def test_deterministic_algorithms_take_the_split_backward(monkeypatch):
    """The one-pass backward adds with atomics in any order; torch.use_deterministic_algorithms(True) must
    get the split path, whose result does not depend on the order in which programs run."""
    import kernels.range_attention as range_attention

    def one_pass(*args):
        raise AssertionError("the one-pass backward ran")

    monkeypatch.setattr(compressed_triton, "ONE_PASS_BACKWARD", True)
    monkeypatch.setattr(compressed_triton, "ONE_PASS_MIN_WORK", 0)
    monkeypatch.setattr(range_attention, "_bwd_one_pass", one_pass)
    torch.manual_seed(0)
    inputs = leaves(1, 40, num_compressed_blocks(40, L, STRIDE), 2, 1, torch.float32)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, torch.float32,
                          block_size=L, stride=STRIDE)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    with pytest.raises(AssertionError, match="one-pass backward ran"):
        compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, torch.float32,
                          block_size=L, stride=STRIDE)


LONG = 40  # the length rules' threshold in documents_short_and_long (at its 2 query heads)


def documents_short_and_long():
    """Compressed attention against its reference (fp32, forward and backward) over documents whose longest is
    shorter than LONG tokens or not: one document of 39 and of 40 tokens, then 80 tokens packed as 39 + 39 + 2 and
    as 38 + 40 + 2 (packed documents count one by one, not by the batch's tokens). Yields (T, boundaries or
    None, whether the longest reaches LONG) after each run."""
    torch.manual_seed(0)
    for seq, bounds, long in [(39, None, False), (40, None, True), (80, [0, 39, 78, 80], False),
                              (80, [0, 38, 78, 80], True)]:
        cu_seqlens = None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
        num_blocks = num_compressed_blocks(seq, L, STRIDE) if bounds is None else \
            int(compressed_cu_seqlens(cu_seqlens, L, STRIDE)[-1])
        inputs = leaves(1, seq, num_blocks, 2, 1, torch.float32)
        compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, torch.float32,
                          block_size=L, stride=STRIDE, cu_seqlens=cu_seqlens)
        yield seq, bounds, long


def test_short_documents_take_the_split_backward(monkeypatch):
    """ONE_PASS_MIN_WORK: where the longest document's tokens x query heads x head dim fall short of it the split
    backward runs, else the one pass; packed documents count one by one, not by the batch's tokens, and a group
    with half the heads needs a document twice as long."""
    import kernels.range_attention as range_attention

    ran = []
    for name in ("_bwd_one_pass", "_bwd_split"):
        monkeypatch.setattr(range_attention, name,
                            lambda *args, name=name, run=getattr(range_attention, name): ran.append(name) or run(*args))
    monkeypatch.setattr(compressed_triton, "ONE_PASS_BACKWARD", True)
    monkeypatch.setattr(compressed_triton, "ONE_PASS_MIN_WORK", LONG * 2 * DK)  # documents_short_and_long: 2 heads
    for seq, bounds, long in documents_short_and_long():
        path = "_bwd_one_pass" if long else "_bwd_split"
        assert ran.pop() == path and not ran, f"T={seq}, documents {bounds}: expected {path}"
    for seq, heads, path in [(LONG, 1, "_bwd_split"), (2 * LONG - 1, 1, "_bwd_split"), (2 * LONG, 1, "_bwd_one_pass")]:
        inputs = leaves(1, seq, num_compressed_blocks(seq, L, STRIDE), heads, 1, torch.float32)
        compare_attention(compressed_attention_triton, compressed_attention_ref, inputs, torch.float32,
                          block_size=L, stride=STRIDE)
        assert ran.pop() == path and not ran, f"T={seq}, {heads} head: expected {path}"


def test_long_documents_take_the_tma_forward(monkeypatch):
    """TMA_FORWARD_MIN_TOKENS: where some query sees that many tokens of its document the forward copies its
    K/V tiles through TMA descriptors, else through pointers (TMA_LOADS empty). The TMA forward matches the
    reference too."""
    import kernels.range_attention as range_attention

    taken = []
    use_tma = range_attention.use_tma

    def counting(kernel, q, k, v, wanted=False):
        if kernel == "fwd":
            taken.append(use_tma(kernel, q, k, v, wanted))
        return use_tma(kernel, q, k, v, wanted)

    monkeypatch.setattr(range_attention, "use_tma", counting)
    monkeypatch.setattr(range_attention, "TMA_LOADS", ())
    monkeypatch.setattr(compressed_triton, "TMA_FORWARD_MIN_TOKENS", LONG)
    for seq, bounds, long in documents_short_and_long():
        assert taken and all(on == long for on in taken), f"T={seq}, documents {bounds}: TMA taken {taken}"
        taken.clear()
