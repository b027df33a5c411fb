"""Compiling the Triton kernels a step will launch before it runs, in parallel.

On a machine whose Triton cache is empty, the first step of a run compiles each kernel it launches, one
after another, the moment the launch needs it: for each, Triton lowers the source to a cubin (ptxas
included) and builds and loads a small C launcher for its signature. The proof model's first 2K step
spent about 20 s doing this where later steps take 0.12 s. compile_ahead(run, device) takes that work
off the critical path in two passes:

1. A dry pass: `run()` (for the trainer, one micro-batch's forward and backward) is called with Triton's
   jit_cache_hook set, so that every launch of a kernel not yet compiled is recorded (its specialization:
   argument types, the divisibility of its integers and pointers, constexprs, warps, stages) and then
   skipped: neither compiled nor launched. Autotuned launches record every candidate config instead of
   searching (kernels.range_attention._launch asks recording()). The skipped kernels' outputs keep
   whatever their buffers held, so `run` must not read them on the host; NSA's Triton path never does
   (no host syncs), and torch operators on the garbage only produce garbage.
2. Each recorded specialization is compiled on a thread pool (JITFunction.preload, Triton's own replay of a
   specialization), then its launcher built and its binary loaded onto the device. Triton's compiler
   releases the GIL in its MLIR and LLVM passes and ptxas and the launcher's C compiler are processes of
   their own, so the threads overlap.

The next real launch of each kernel then finds it in Triton's in-memory cache. Autotuned kernels still time
their candidates on their first real launch; only their compiling moves here. On a CPU (the interpreter)
nothing is compiled and compile_ahead does nothing.
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton

# Process-wide, as Triton's hook is: a CUDA backward runs on autograd's device thread, not the caller's.
_RECORDING = {"on": False}


def recording() -> bool:
    """Whether a dry pass is recording launches (they must then not run)."""
    return _RECORDING["on"]


@dataclass
class CompileAheadReport:
    kernels: int  # specializations compiled (with their launchers)
    failed: int  # specializations that did not build here (left for their launch: _build)
    dry_pass_s: float  # the recording run
    wall_s: float  # compiling them on the pool
    busy_s: float  # the threads' seconds added up (each slower than alone: the threads share the cores)
    workers: int

    def line(self) -> str:
        failed = f", {self.failed} left to their launch" if self.failed else ""
        return (f"compiled {self.kernels} Triton kernels ahead of the step in {self.wall_s:.1f} s on "
                f"{self.workers} threads ({self.busy_s:.1f} s of compiling{failed}; dry pass {self.dry_pass_s:.1f} s)")


@contextmanager
def _recorded(found: dict):
    """Within: each launch that would compile a kernel is recorded in `found` and skipped."""

    def hook(*, key, fn, compile, **_):
        # key is the launch's specialization, unique within one kernel; the JITFunction is fn.jit_function
        found.setdefault((id(fn.jit_function), str(key)), (fn.jit_function, compile["specialization_data"]))
        return True  # handled: Triton neither compiles nor launches

    runtime = triton.knobs.runtime
    if runtime.jit_cache_hook is not None:
        raise RuntimeError("compile_ahead: Triton's jit_cache_hook is already set by someone else")
    runtime.jit_cache_hook = hook
    _RECORDING["on"] = True
    try:
        yield
    finally:
        runtime.jit_cache_hook = None
        _RECORDING["on"] = False


def _build(jit_function, specialization_data: str) -> tuple[float, bool]:
    """Compiles one recorded specialization into the kernel's cache, builds its launcher and loads it:
    (seconds, whether it built). A failure is left for the real launch, which meets it again as it would
    have without compiling ahead: an autotuning candidate this GPU cannot hold (too much shared memory, a
    ptxas error) is then timed as infinitely slow, and any other kernel raises there."""
    start = time.perf_counter()
    try:
        kernel = jit_function.preload(specialization_data)
        kernel._init_handles()  # what the first launch would do: the launcher's C build and the module load
    except Exception:
        return time.perf_counter() - start, False
    return time.perf_counter() - start, True


def compile_ahead(run, device: torch.device, workers: int | None = None) -> CompileAheadReport | None:
    """Records the kernels `run()` launches (a dry pass: none of them runs), then compiles them in parallel
    (module docstring). None on a CPU, where the interpreter compiles nothing. `run` is called once."""
    if device.type != "cuda":
        return None
    found: dict = {}
    start = time.perf_counter()
    with _recorded(found):
        run()
    torch.cuda.synchronize(device)
    dry_pass = time.perf_counter() - start
    workers = max(1, min(len(found), workers or os.cpu_count() or 1))
    index = device.index if device.index is not None else torch.cuda.current_device()
    start = time.perf_counter()
    # each thread's current device is the step's, for the cache the kernel lands in and the module load
    with ThreadPoolExecutor(workers, initializer=torch.cuda.set_device, initargs=(index,)) as pool:
        builds = list(pool.map(lambda item: _build(*item), found.values()))
    return CompileAheadReport(kernels=sum(built for _, built in builds), failed=sum(not built for _, built in builds),
                              dry_pass_s=dry_pass, wall_s=time.perf_counter() - start,
                              busy_s=sum(seconds for seconds, _ in builds), workers=workers)
