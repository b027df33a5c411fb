"""Sync-free stand-ins for two of Megatron-core's fallbacks on machines without apex or TransformerEngine.

Without either library Megatron-core 0.16.1 clips gradients with `local_multi_tensor_l2_norm`, which
takes each gradient's norm on the device and then builds a host tensor from them: one host-device
synchronization per parameter. In the proof model that is 77 a step (`tools/bench_train.py
--sync-check` on an H200), every one of which stops the host from queueing work ahead of the GPU. When
it clips, `local_multi_tensor_scale` multiplies and copies one gradient at a time.

`install()` replaces the two in Megatron's gradient clipping with torch's multi-tensor (foreach)
kernels: the same norm and the same scaling, a few launches and no synchronization; Megatron then reads
the total norm once, as it does with apex. Where apex or TransformerEngine is importable Megatron uses
their kernels, and this changes nothing.
"""

import torch
from megatron.core import utils as megatron_utils
from megatron.core.optimizer import clip_grads


def install() -> None:
    """Puts the stand-ins in place of Megatron's local fallbacks (idempotent)."""
    if clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
    if clip_grads.multi_tensor_scale_impl is megatron_utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = scale


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The l2 norm of every tensor in tensor_lists together, as a float32 [1] tensor on their device
    (Megatron's local_multi_tensor_l2_norm's result, without reading anything back to the host)."""
    tensors = [t for group in tensor_lists for t in group]
    return torch.nn.utils.get_total_norm(tensors, 2.0).float().reshape(1), None


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """dst = src * factor for each pair of tensor_lists = [srcs, dsts] (local_multi_tensor_scale's)."""
    sources, targets = tensor_lists
    torch._foreach_copy_(targets, torch._foreach_mul(sources, factor))
