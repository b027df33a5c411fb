"""The kernels' host-side helpers (kernels/triton_utils.py). Output buffers (poisoned): pre-filled with NaN
(floats) or -2 (ints) under the tests, so a position a kernel forgets to write fails them; unfilled elsewhere;
a setting other than 0 or 1 is refused, not read as either. Tile sizes (pow2)."""

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


def test_pow2_is_the_smallest_power_of_two_at_or_above_the_minimum():
    """Tile sizes (triton_utils.pow2, plain integer arithmetic): the same as Triton's next_power_of_2 floored
    at the minimum, for every size a wrapper asks about."""
    import triton

    from kernels.triton_utils import pow2

    assert [pow2(x) for x in (0, 1, 15, 16, 17, 64, 65, 128)] == [16, 16, 16, 16, 32, 64, 128, 128]
    assert all(pow2(x, minimum) == max(minimum, triton.next_power_of_2(x))
               for x in range(1, 3000) for minimum in (1, 2, 16))
