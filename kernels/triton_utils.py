"""Host-side helpers shared by the Triton branches: tile sizes, dot precision, output buffers, checks."""

import os

import torch
import triton


# Integer arguments that follow the packed documents (the compressed tokens' count, the key blocks', the
# inverted index's sizes) change from batch to batch. Triton specializes an int argument on being divisible
# by 16 or equal to 1 and compiles the kernel again when that changes, so a batch whose count happens to be
# a multiple of 16 costs every such kernel (and every autotune candidate of it) a new compile, about a
# second each. The kernels name those arguments in `do_not_specialize`; none of them sets an alignment
# the kernel relies on (addresses are multiples of the head dim, a constexpr).


def pow2(x: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(x, minimum): tl.arange needs powers of two, tl.dot needs >= 16. Integer
    arithmetic, not triton.next_power_of_2: that is a constexpr function, whose wrapper costs microseconds of
    host time a call, and the kernels' wrappers ask about 30 times a layer."""
    return 1 << (max(x, minimum, 1) - 1).bit_length()


def launch_params(overrides: dict[str, dict], kernel: str, **defaults) -> dict:
    """A kernel's launch parameters (tile sizes, num_warps, num_stages): `defaults`, with the entries of
    overrides[kernel] set over them. Each Triton module with fixed launch configs keeps such overrides in
    its LAUNCH dict, empty in use; benchmarks/kernels-exp-sweep.py fills it to time other configs."""
    return {**defaults, **overrides.get(kernel, {})}


def tma_unfit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, whole_groups: bool) -> str | None:
    """Why these inputs cannot take a kernel's TMA path (None: they can, and Triton has the allocator its
    descriptors need): descriptor tiles are the head dims wide, so those must be powers of two from 16;
    with whole_groups a row tile holds whole GQA groups, so the group size must be a power of two; and
    the device needs the TMA unit (compute capability 9 or later; the interpreter emulates it)."""
    dk, dv, group = q.shape[-1], v.shape[-1], q.shape[2] // k.shape[2]
    if any(d != pow2(d) for d in (dk, dv)):
        return f"head dims that are powers of two from 16 (got Dk={dk}, Dv={dv})"
    if whole_groups and group & (group - 1):
        return f"a group size that is a power of two (got G={group})"
    if q.device.type == "cuda":
        if torch.cuda.get_device_capability(q.device)[0] < 9:
            return "a GPU with the TMA unit (Hopper or later)"
        _tma_allocator()
    return None


def _tma_allocator() -> None:
    """Gives Triton the allocator its kernels need for tensor descriptors made on the device
    (tl.make_tensor_descriptor: 128 bytes of global scratch a program). Triton keeps it in a context
    variable, which a thread does not inherit: autograd runs CUDA backwards on a thread of its own, where
    an allocator set once in the main thread is missing (the first GPU run failed there). So it is set on
    every call, in the thread that launches; a context variable's set is a few hundred nanoseconds."""
    triton.set_allocator(_device_scratch)


def _device_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for a launch (alignment: torch's caching allocator hands out 512-byte aligned blocks)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def programs_wanted(device: torch.device) -> int:
    """Programs that keep every multiprocessor busy with several at once (one alone leaves it
    latency-bound): what the kernels that choose their own work split aim for. On CPU (interpreter) a
    few, so that the tests exercise the split too."""
    if device.type == "cpu":
        return 4
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots (the GPU default, tf32, would cost them ~3e-4 relative error);
    fp16/bf16 inputs use the tensor cores with fp32 accumulation and ignore this setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Set to "1" by tests/conftest.py and tools/gpu_check.py: see poisoned().
POISON_ENV = "NSA_DIST_POISON_OUTPUTS"


def poisoned(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel that writes every position of it. Under the tests and the GPU check
    (NSA_DIST_POISON_OUTPUTS=1) it is filled with NaN (floats) or -2 (ints), so that a position a kernel
    forgot to write fails them instead of passing on stale memory; elsewhere the fill is skipped (about a
    dozen per NSA layer and step; on the H200 all fills of the proof's 2K step, these among them, took 3.6
    of its 183 ms: benchmarks/kernels-notes.md, session 19)."""
    setting = os.environ.get(POISON_ENV, "0")
    if setting not in ("0", "1"):
        raise ValueError(f"{POISON_ENV}={setting!r}: set it to 1 (pre-fill kernel outputs with NaN, for tests) "
                         "or 0 / unset (no fill)")
    if setting == "0":
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -2
    return torch.full(shape, fill, dtype=dtype, device=device)


def check_attention_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes and dtypes the kernels support; raises a ValueError naming the offending argument."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        raise ValueError(f"{name}: q, k, v must be [B, T, H, D]; got {shapes}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one dtype among fp32/fp16/bf16; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{name}: query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    group = q.shape[2] // k.shape[2]
    if group > 32:
        raise ValueError(f"{name}: GQA group size {group} > 32 is not supported; use more KV heads")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise ValueError(f"{name}: head dims up to 256 are supported; got Dk={q.shape[-1]}, Dv={v.shape[-1]}")


def gate_input(name: str, q: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor | None:
    """A branch's gate ([B, T, HQ], one per query row; None: no gate) laid out densely for its kernels;
    raises a ValueError when its shape is not q's without the head dim."""
    if gate is None:
        return None
    if gate.shape != q.shape[:-1]:
        raise ValueError(f"{name}: gate {tuple(gate.shape)} must be q's shape {tuple(q.shape)} without its last "
                         "dimension (one gate a query row)")
    if not gate.is_floating_point():
        raise ValueError(f"{name}: gate must be a float tensor; got {gate.dtype}")
    return gate.contiguous()


def check_packed(name: str, batch: int, cu_seqlens: torch.Tensor | None) -> None:
    if cu_seqlens is None:
        return
    if batch != 1:
        raise ValueError(f"{name}: packed sequences (cu_seqlens) need batch size 1; got {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: cu_seqlens must be an int32 tensor [num_docs + 1]; got {cu_seqlens}")


def interpreter_bulk_reductions() -> None:
    """Gives Triton's interpreter the tensor-descriptor reductions (`desc.atomic_add`) that a GPU runs as TMA
    bulk reductions and that Triton 3.6's interpreter lacks: a tile's elements inside the descriptor's shape
    are added one by one, as atomic adds, which is what the bulk reduction does. So the CPU tests run the
    kernels' reduction paths (range_attention.TMA_DQ_REDUCE) too. Only ADD on floats is supported, the one
    kind the kernels use; a no-op where the interpreter has its own."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    if hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD or not value.dtype.scalar.is_floating():
            raise NotImplementedError(f"descriptor reduction {kind} on {value.dtype} in the interpreter")
        ptrs, inside = desc.materialize_pointers(indices)
        return self.create_atomic_rmw(ir.ATOMIC_OP.FADD, ptrs, value, TensorHandle(inside, tl.int1),
                                      ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce
