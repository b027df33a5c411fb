"""Sliding-window attention: Triton kernel against the reference (outputs, lse, gradients)."""

import pytest
import torch

import kernels.range_attention as range_attention
from kernels.range_attention import _CPU_TILES
from kernels.window_attention.naive import window_attention_ref
from kernels.window_attention.triton import window_attention_triton
from triton_cases import DEVICE, DTYPES, INTERPRETER_WARNINGS, LOW_PRECISION, compare_attention, compare_to_fp32, randn

# every test runs once per backward path (tests/kernels/conftest.py)
pytestmark = [INTERPRETER_WARNINGS, pytest.mark.usefixtures("range_backward")]

WINDOW = 24
T = 131
DK, DV = 32, 16


def leaves(batch, seq, num_keys, group, kv_heads, dtype):
    return dict(
        q=randn(batch, seq, group * kv_heads, DK, dtype=dtype),
        k=randn(batch, num_keys, kv_heads, DK, dtype=dtype),
        v=randn(batch, num_keys, kv_heads, DV, dtype=dtype),
    )


@pytest.mark.parametrize("group", [1, 2, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, group):
    torch.manual_seed(group)
    kv_heads = 1 if group == 16 else 2
    compare_attention(window_attention_triton, window_attention_ref, leaves(2, T, T, group, kv_heads, dtype), dtype,
                      window=WINDOW)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_error_is_at_most_twice_the_references(dtype):
    torch.manual_seed(5)
    compare_to_fp32(window_attention_triton, window_attention_ref, leaves(2, T, T, 4, 2, torch.float32), dtype,
                    window=WINDOW)


def test_window_longer_than_sequence():
    torch.manual_seed(0)
    compare_attention(window_attention_triton, window_attention_ref, leaves(1, T, T, 2, 1, torch.float32),
                      torch.float32, window=200)


def test_chunk_with_left_halo():
    """Queries [64, 131) with keys [40, 131): what context parallelism passes (chunk plus halo)."""
    torch.manual_seed(0)
    q_start, k_start = 64, 40
    compare_attention(window_attention_triton, window_attention_ref,
                      leaves(1, T - q_start, T - k_start, 2, 2, torch.float32), torch.float32,
                      window=WINDOW, q_start=q_start, k_start=k_start)


@pytest.mark.parametrize("q_start", [0, 40])
def test_packed_documents(q_start):
    torch.manual_seed(q_start)
    cu_seqlens = torch.tensor([0, 7, 50, 51, 117, T], dtype=torch.int32, device=DEVICE)
    k_start = max(0, q_start - WINDOW)
    compare_attention(window_attention_triton, window_attention_ref,
                      leaves(1, T - q_start, T - k_start, 4, 1, torch.float32), torch.float32,
                      window=WINDOW, q_start=q_start, k_start=k_start, cu_seqlens=cu_seqlens)


def test_window_over_several_key_tiles():
    """A window of 2.5 key tiles (interpreter tiles): rows whose every key of a tile is visible take the
    kernels' unmasked path, the tiles at the window's two edges the masked one. The split backward's dK/dV
    kernel visits a key tile's 3 unmasked row tiles in the aligned order (window_attention.ALIGNED_ROWS),
    which starts after the first of them for two key tiles in three."""
    torch.manual_seed(0)
    window = 5 * _CPU_TILES["BLOCK_N"] // 2
    seq = 3 * window
    inputs = leaves(1, seq, seq, 2, 1, torch.float32)
    with torch.no_grad():
        inputs["q"].mul_(4.0)
    compare_attention(window_attention_triton, window_attention_ref, inputs, torch.float32, window=window)


@pytest.mark.parametrize("name", ["fwd", "dq", "dkv", "onepass"])
def test_fp32_tries_one_config_on_the_gpu(name):
    """On the GPU fp32 inputs (full-precision dots, slow to compile) are autotuned over one config, the
    smallest of their head dims' list; fp16/bf16 over the whole list (range_attention._autotuned)."""
    tuned = range_attention._TUNED[name]
    small, large = range_attention._CONFIGS[name]
    for dims, listed in (((32, 16), small), ((256, 128), large)):
        dims = dict(BLOCK_DK=dims[0], BLOCK_DV=dims[1])
        assert tuned.early_config_prune(tuned.configs, {}, PRECISION="ieee", **dims) == listed[-1:]
        assert tuned.early_config_prune(tuned.configs, {}, PRECISION="tf32", **dims) == listed
        assert len(listed) > 1


@pytest.mark.parametrize("name", ["fwd", "dq", "dkv", "onepass"])
def test_the_search_times_candidates_briefly(name, monkeypatch):
    """The range kernels' autotuner times each candidate through range_attention._time_candidate, which asks
    triton.testing.do_bench for AUTOTUNE_WARMUP_MS and AUTOTUNE_REP_MS (Triton's default: 25 and 100 ms)."""
    tuned = range_attention._TUNED[name]
    asked = {}

    def fake_do_bench(kernel_call, warmup, rep, quantiles):
        asked.update(warmup=warmup, rep=rep, quantiles=quantiles)
        kernel_call()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(range_attention.triton.testing, "do_bench", fake_do_bench)
    calls = []
    assert tuned.do_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [1.0, 1.0, 1.0]
    assert calls == [1]
    assert asked == dict(warmup=range_attention.AUTOTUNE_WARMUP_MS, rep=range_attention.AUTOTUNE_REP_MS,
                         quantiles=(0.5, 0.2, 0.8))
    assert range_attention.AUTOTUNE_WARMUP_MS + range_attention.AUTOTUNE_REP_MS < 25 + 100


@pytest.mark.parametrize("group", [1, 16])
def test_lse_alone_is_the_forwards_lse(group):
    """range_attention_lse (top-n's exact score) is the range forward's lse without the output, to the bit:
    the same running max and sum, with rows whose range is empty at -inf."""
    from kernels.range_attention import range_attention_fwd, range_attention_lse

    torch.manual_seed(0)
    inputs = leaves(1, T, T, group, 2, torch.float32)
    q, k = inputs["q"].detach(), inputs["k"].detach()
    hi = torch.arange(1, T + 1, dtype=torch.int32, device=DEVICE)
    lo = (hi - 1 - torch.arange(T, device=DEVICE) % 70).to(torch.int32)  # documents of 70 tokens
    lo[5:9] = hi[5:9]  # rows that see nothing
    expected = range_attention_fwd(q, k, k, lo, hi, DK**-0.5)[1]
    lse = range_attention_lse(q, k, lo, hi, DK**-0.5)
    assert torch.equal(lse, expected)
    assert torch.isinf(lse[:, 5:9]).all() and torch.isfinite(lse[:, 9:]).all()
