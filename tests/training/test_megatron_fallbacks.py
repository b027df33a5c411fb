"""The stand-ins for Megatron-core's gradient-clipping fallbacks (nsa_dist/megatron_fallbacks.py): the same
values as Megatron's own, without reading a value back to the host."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.core import utils as megatron_utils
from megatron.core.optimizer import clip_grads

from nsa_dist import megatron_fallbacks
from nsa_dist.megatron_cpu import enable_cpu

pytestmark = pytest.mark.timeout(60)


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (.item(), float(), a list of tensors to a tensor): on
    a GPU each one waits for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def gradients():
    torch.manual_seed(0)
    return [torch.randn(shape) for shape in [(64, 32), (32,), (7, 5, 3), (1,)]]


def test_l2_norm_matches_megatrons_without_reading_back():
    enable_cpu()  # Megatron's fallback allocates on "cuda"
    grads = gradients()
    with HostReads() as megatron_reads:
        expected, _ = megatron_utils.local_multi_tensor_l2_norm(2048 * 32, None, [grads], False)
    with HostReads() as our_reads:
        found, _ = megatron_fallbacks.l2_norm(2048 * 32, None, [grads], False)
    # Megatron's reads its total back (float()), and on a GPU each gradient's norm too, inside torch.tensor
    # (77 synchronizations a step in the proof model); on CPU only the first shows here
    assert megatron_reads.count >= 1
    assert our_reads.count == 0
    assert found.shape == expected.shape == (1,) and found.dtype == torch.float32
    torch.testing.assert_close(found, expected)
    torch.testing.assert_close(found[0], torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))


def test_scale_matches_megatrons_in_place():
    grads, expected = gradients(), [g * 0.25 for g in gradients()]
    with HostReads() as reads:
        megatron_fallbacks.scale(2048 * 32, None, [grads, grads], 0.25)
    assert reads.count == 0
    for found, want in zip(grads, expected):
        torch.testing.assert_close(found, want)


def test_install_replaces_only_the_local_fallbacks(monkeypatch):
    monkeypatch.setattr(clip_grads, "l2_norm_impl", megatron_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    megatron_fallbacks.install()
    assert clip_grads.l2_norm_impl is megatron_fallbacks.l2_norm
    assert clip_grads.multi_tensor_scale_impl is megatron_fallbacks.scale

    def apex_norm(*args):  # what Megatron binds where apex is installed: left alone
        raise AssertionError("not called here")

    monkeypatch.setattr(clip_grads, "l2_norm_impl", apex_norm)
    megatron_fallbacks.install()
    assert clip_grads.l2_norm_impl is apex_norm
