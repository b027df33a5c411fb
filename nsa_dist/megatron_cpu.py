"""Lets Megatron-core 0.16.1 run on CPU with the gloo backend (tests, laptops, the quick start).

Megatron-core assumes CUDA: it allocates on `device="cuda"` or `torch.cuda.current_device()`, forks the
CUDA RNG state around recomputation, synchronizes and waits on CUDA streams, pins host memory, and
checks that gradients are `torch.cuda.FloatTensor` before clipping. `enable_cpu()` redirects exactly
those calls to their CPU equivalents, so Megatron's own model, DDP, optimizer and pipeline schedules run
unchanged. It is called once by the trainer before anything else and is a no-op when CUDA is available;
nothing else in nsa-dist knows about it.

What each redirect does:
- device="cuda" / device=<int> / `.cuda()` / `.to("cuda")` / pin_memory: a TorchFunctionMode rewrites the
  device to CPU and drops pinning. An integer device can only mean a GPU index, so it maps to CPU too.
- `torch.cuda.current_device()` returns 0 (which the mode then maps to CPU).
- `torch.cuda.synchronize`, streams and events: CPU execution is synchronous, so they do nothing.
- `torch.cuda.get_rng_state()` returns the CPU generator's state: Megatron's RNG tracker and recompute
  only save and restore it. Setting the CUDA state is already a queued no-op in a CPU build of torch, so
  the tracker's fork (used around weight init) draws from the CPU generator and logs "CPU RNG state
  changed within GPU RNG context" each time: expected here, so that logger is quietened.
- Custom autograd backwards (Megatron's sequence-parallel linear layers allocate there) run in the same
  mode: the autograd engine does not carry the mode into them.
- `tensor.type()` reports a CPU float32 tensor as `torch.cuda.FloatTensor`: Megatron's gradient clipping
  asserts that name to mean "fp32 gradients", which is what it checks on CPU too.
"""

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_MODE = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function and tensor method."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return "torch.cuda.FloatTensor" if name == "torch.FloatTensor" else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for torch.cuda.Stream and torch.cuda.Event: CPU ops complete in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NoStream()

    def record(self, *args):
        pass

    def wait(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def enable_cpu() -> None:
    """Redirects Megatron-core's CUDA-only calls to CPU; does nothing when CUDA is available."""
    global _MODE
    if torch.cuda.is_available() or _MODE is not None:
        return
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    # The autograd engine runs custom backwards outside the mode (its stack is not carried into them), and
    # Megatron's sequence-parallel linear layers allocate on torch.cuda.current_device() there.
    run_backward = torch.autograd.function.BackwardCFunction.apply

    def run_backward_on_cpu(self, *args):
        with _CudaToCpu():
            return run_backward(self, *args)

    torch.autograd.function.BackwardCFunction.apply = run_backward_on_cpu
