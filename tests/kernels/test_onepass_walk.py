"""The one-pass backward's walk order (range_attention.ONEPASS_ROTATE): a program may start its walk over
its rows anywhere (at _rotation_point) and wrap around; the gradients must not depend on where."""

import pytest
import torch

import kernels.range_attention as range_attention
from kernels.range_attention import _CPU_TILES
from kernels.window_attention.naive import window_attention_ref
from kernels.window_attention.triton import window_attention_triton
from triton_cases import INTERPRETER_WARNINGS, compare_attention, randn

pytestmark = INTERPRETER_WARNINGS


@pytest.mark.parametrize("rotate", [True, False])
def test_window_rows_walked_from_a_rotation_point(rotate, monkeypatch):
    """One chunk a key tile (ONEPASS_CHUNKING = 1): key tile k's rows are those of tokens [64 k, 64 k + 223),
    446 rows at G = 2, and its walk starts at the first row tile at or after a multiple of 446 (key tile 1:
    rows 448.., then 128..447), so the walk wraps, through masked and unmasked tiles both."""
    monkeypatch.setattr(range_attention, "BWD_ONE_PASS", True)
    monkeypatch.setattr(range_attention, "ONEPASS_CHUNKING", 1)
    monkeypatch.setattr(range_attention, "ONEPASS_ROTATE", rotate)
    assert _CPU_TILES["BLOCK_N"] == 64 and _CPU_TILES["BLOCK_M"] == 64  # the rows above assume them
    torch.manual_seed(3)
    window, seq = 160, 480
    inputs = dict(q=randn(1, seq, 2, 32), k=randn(1, seq, 1, 32), v=randn(1, seq, 1, 16))
    with torch.no_grad():
        inputs["q"].mul_(4.0)
    compare_attention(window_attention_triton, window_attention_ref, inputs, torch.float32, window=window)
