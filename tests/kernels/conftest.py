"""Fixtures of the kernel tests."""

import pytest

import kernels.compressed_attention.triton as compressed_attention
import kernels.window_attention.triton as window_attention


@pytest.fixture(params=[False, True], ids=["split-bwd", "onepass-bwd"])
def range_backward(request, monkeypatch):
    """Runs a test once per backward path of the range attention (each branch's ONE_PASS_BACKWARD): the
    two-kernel one and the one pass with atomic dQ."""
    for branch in (compressed_attention, window_attention):
        monkeypatch.setattr(branch, "ONE_PASS_BACKWARD", request.param)
    monkeypatch.setattr(compressed_attention, "ONE_PASS_MIN_WORK", 0)
