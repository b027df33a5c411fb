"""Fixtures of the kernel tests."""

import pytest

import kernels.range_attention as range_attention


@pytest.fixture(params=[False, True], ids=["split-bwd", "onepass-bwd"])
def range_backward(request, monkeypatch):
    """Runs a test once per backward path of the range attention (BWD_ONE_PASS): the two-kernel one and
    the one pass with atomic dQ."""
    monkeypatch.setattr(range_attention, "BWD_ONE_PASS", request.param)
