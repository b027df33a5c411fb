"""tools/kernel_floors.py: its per-token key counts against what the reference kernels attend, and the tool
end to end on a committed tools/bench_kernels.py JSON (a separate process, as a user runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.block_selection.naive import select_blocks_ref
from kernels.compressed_attention.naive import compressed_attention_ref
from kernels.compression.naive import num_compressed_blocks
from kernels.window_attention.naive import window_attention_ref

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from kernel_floors import (  # noqa: E402
    compressed_keys, dense_flops, floors, has_choice, long_floors, selected_blocks, window_keys,
)

T, HQ, HK, D = 150, 4, 2, 8
L, STRIDE, SEL, N, W = 8, 4, 16, 3, 24
MEASURED = "benchmarks/kernels-2026-12-04-fla-g4-e364bce.json"  # has a per-branch breakdown at 128K


def keys_seen(lse: torch.Tensor) -> np.ndarray:
    """With every score 0, a row's log-sum-exp is the log of the keys it sees: [B, T, HQ] -> [T] (head 0)."""
    return lse[0, :, 0].exp().round().to(torch.int64).numpy()


def test_compressed_and_window_counts_are_the_references_visible_keys():
    torch.manual_seed(0)
    q = torch.zeros(1, T, HQ, D)
    num_cmp = num_compressed_blocks(T, L, STRIDE)
    k_cmp, v_cmp = torch.randn(1, num_cmp, HK, D), torch.randn(1, num_cmp, HK, D)
    _, lse = compressed_attention_ref(q, k_cmp, v_cmp, L, STRIDE)
    np.testing.assert_array_equal(keys_seen(lse), compressed_keys(T, L, STRIDE))
    k, v = torch.randn(1, T, HK, D), torch.randn(1, T, HK, D)
    _, lse = window_attention_ref(q, k, v, W)
    np.testing.assert_array_equal(keys_seen(lse), window_keys(T, W))


def test_selected_counts_are_the_reference_top_n_picks():
    torch.manual_seed(1)
    q = torch.randn(1, T, HQ, D)
    num_cmp = num_compressed_blocks(T, L, STRIDE)
    k_cmp = torch.randn(1, num_cmp, HK, D)
    _, lse = compressed_attention_ref(q, k_cmp, torch.randn(1, num_cmp, HK, D), L, STRIDE)
    picks = select_blocks_ref(q, k_cmp, lse, L, STRIDE, SEL, N)
    for head in range(HK):
        np.testing.assert_array_equal((picks[0, :, head] >= 0).sum(-1).numpy(), selected_blocks(T, SEL, N))
    # a token without a choice has seen at most n blocks, and top-n gives it all of them
    seen = np.arange(T) // SEL + 1
    assert (seen[~has_choice(T, SEL, N)] <= N).all() and (seen[has_choice(T, SEL, N)] > N).all()


def test_dense_flops_are_a_window_as_long_as_the_sequence():
    assert dense_flops(T, HQ, D)["fwd"] == 4 * D * HQ * int(window_keys(T, T).sum())
    assert dense_flops(T, HQ, D)["bwd"] == 10 * D * HQ * int(window_keys(T, T).sum())


def test_a_long_length_over_ranks_is_the_longest_measured_lengths_floor_shared():
    report = json.loads((ROOT / MEASURED).read_text())
    entries = floors(report, 16, 8.9, 1, 1.0)
    longest = entries[-1]
    for ranks in (1, 4):
        long = long_floors(entries, report, 16, longest["T"], ranks, 8.9)
        for part in ("fwd", "bwd"):
            assert long[part]["floor_ms"] == pytest.approx(longest[part]["floor_ms"] / ranks)
    # a 1M layer on 4 ranks: 64x the compressed work (quadratic) and 8x the rest, over 4
    million = long_floors(entries, report, 16, 1 << 20, 4, 8.9)
    per = {(b["branch"], b["pass"]): b["floor_ms"] for b in million["branches"]}
    at_128k = {(b["branch"], b["pass"]): b["floor_ms"] for b in longest["branches"]}
    compressed, window = ("compressed attention", "fwd"), ("window attention", "fwd")
    assert per[compressed] == pytest.approx(at_128k[compressed] * 64 / 4, rel=1e-3)
    assert per[window] == pytest.approx(at_128k[window] * 8 / 4, rel=5e-3)  # the first w tokens see fewer keys
    assert million["fwd_bwd"]["target_ms"] == 2500.0


@pytest.mark.timeout(120)
def test_tool_no_measured_branch_beats_its_floor(tmp_path):
    out = tmp_path / "floors.json"
    done = subprocess.run([sys.executable, "tools/kernel_floors.py", MEASURED, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    entries = {e["T"]: e for e in json.loads(out.read_text())["floors"]}
    assert sorted(entries) == [65536, 131072]
    measured = [b for b in entries[131072]["branches"] if b["measured_ms"] is not None]
    assert {b["branch"] for b in measured} == {"compressed attention", "top-n selection", "window attention",
                                               "selected attention"}
    for b in measured:  # a floor above a measured time would mean the work or the rates are miscounted
        assert b["floor_ms"] <= b["measured_ms"], b
    for e in entries.values():
        for part in ("fwd", "bwd"):
            assert e[part]["ratio_measured"] <= e[part]["ratio_allowed"]
    assert "at best" in done.stdout.splitlines()[-1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    (["benchmarks/no-such.json"], "does not exist"),
    ([MEASURED, "--tile-tokens", "4", "--union-ratio", "5"], "--union-ratio 5"),
    ([MEASURED, "--group", "8"], "no cuDNN row at G=8 (cuDNN rows at G: [4, 16])"),
    (["benchmarks/kernels-2026-11-30-sweep.json"], "is not a JSON of tools/bench_kernels.py"),
    ([MEASURED, "--long-seq", "1048576", "--ranks", "0"], "--ranks 0: give a positive number"),
    ([MEASURED, "--tensor-tflops", "0"], "--tensor-tflops 0.0: give a positive number"),
])
def test_tool_refuses_bad_input_by_name(args, message):
    done = subprocess.run([sys.executable, "tools/kernel_floors.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=110)
    assert done.returncode != 0 and message in done.stderr, done.stderr
