"""The kernels' output buffers (kernels/triton_utils.py, poisoned): pre-filled with NaN (floats) or -2 (ints)
under the tests, so a position a kernel forgets to write fails them; unfilled elsewhere; a setting other
than 0 or 1 is refused, not read as either."""

import pytest
import torch

from kernels.triton_utils import POISON_ENV, poisoned


def test_the_tests_run_with_poisoned_outputs():
    out = poisoned((2, 3), torch.float32, torch.device("cpu"))
    assert out.shape == (2, 3) and torch.isnan(out).all()
    assert (poisoned((4,), torch.int32, torch.device("cpu")) == -2).all()


def test_outside_the_tests_buffers_are_not_filled(monkeypatch):
    for setting in ("0", None):
        if setting is None:
            monkeypatch.delenv(POISON_ENV)
        else:
            monkeypatch.setenv(POISON_ENV, setting)
        out = poisoned((2, 3), torch.bfloat16, torch.device("cpu"))
        assert out.shape == (2, 3) and out.dtype == torch.bfloat16


def test_a_setting_other_than_0_or_1_is_refused(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "yes")
    with pytest.raises(ValueError, match=f"{POISON_ENV}='yes': set it to 1"):
        poisoned((2,), torch.float32, torch.device("cpu"))
