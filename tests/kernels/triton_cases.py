"""Shared by the Triton-vs-reference tests: random inputs and RMS-relative comparisons of outputs,
log-sum-exps and gradients."""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# RMS-relative error allowed: fp32 differs from the reference by summation order only; fp16 kernels
# round p to fp16 before the P @ V product (as flash attention does) and round their outputs.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16]
# checked against fp32 by compare_to_fp32; bf16 on a GPU only (Triton's interpreter computes bf16 wrongly)
LOW_PRECISION = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def require_backend() -> None:
    """Fails with a sentence when the kernels cannot run here, instead of an obscure Triton error."""
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: tests/kernels/conftest.py sets it; "
                    "run the kernel tests with pytest from the repository root")


def randn(*shape, dtype=torch.float32, grad=True, generator=None) -> torch.Tensor:
    x = torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)
    return x.requires_grad_(grad)


def rms_rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: {int((~torch.isfinite(x)).sum())} non-finite values (a missed write?)"
    err = rms_rel(x, ref)
    assert err < TOLERANCE[dtype], f"{name}: RMS-relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def assert_lse_close(name: str, lse: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """-inf exactly where the reference has it (a query that sees nothing), close elsewhere."""
    empty = ref == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), f"{name}: -inf at other positions than the reference"
    assert_close(name, lse[~empty], ref[~empty], dtype)


def _forward_backward(fn, inputs: dict, kwargs: dict, upstream: list, generator: torch.Generator) -> list:
    """fn(**inputs, **kwargs) -> (o, lse); returns [o, lse, each input's gradient] under one random upstream
    gradient on o and on lse (lse's -inf rows get none), drawn from `generator` into `upstream` on the
    first call and reused by the calls after it, so every run gets the same one."""
    o, lse = fn(**inputs, **kwargs)
    if not upstream:
        upstream += [randn(*o.shape, grad=False, generator=generator),
                     randn(*lse.shape, grad=False, generator=generator)]
    finite_lse = lse.masked_fill(lse == float("-inf"), 0.0)
    loss = (o.float() * upstream[0]).sum() + (finite_lse * upstream[1]).sum()
    return [o.detach(), lse.detach(), *torch.autograd.grad(loss, list(inputs.values()))]


def compare_attention(kernel, reference, leaves: dict, dtype: torch.dtype, **kwargs) -> None:
    """Runs kernel(**leaves, **kwargs) and reference(...) -> (o, lse); compares o, lse and the gradients of
    every leaf under one random upstream gradient on o and on lse."""
    require_backend()
    grad_gen = torch.Generator().manual_seed(1)
    upstream = []
    o, lse, *grads = _forward_backward(kernel, leaves, kwargs, upstream, grad_gen)
    o_ref, lse_ref, *grads_ref = _forward_backward(reference, leaves, kwargs, upstream, grad_gen)
    assert o.dtype == o_ref.dtype and lse.dtype == torch.float32
    assert_close("o", o, o_ref, dtype)
    assert_lse_close("lse", lse, lse_ref, dtype)
    for leaf, g, g_ref in zip(leaves, grads, grads_ref):
        assert g.dtype == g_ref.dtype, f"d{leaf}: dtype {g.dtype} != {g_ref.dtype}"
        assert_close(f"d{leaf}", g, g_ref, dtype)


def compare_to_fp32(kernel, reference, leaves: dict, dtype: torch.dtype, eps: float = 1e-5, **kwargs) -> None:
    """The kernel at `dtype` against the reference in fp32 on the same inputs (rounded to `dtype`): o, lse
    and every leaf's gradient may be off by at most twice what the reference computed at `dtype` is off,
    plus eps (RMS-relative), so the allowance is the dtype's own rounding and not a flat tolerance."""
    require_backend()
    rounded = {name: x.detach().to(dtype) for name, x in leaves.items()}
    grad_gen = torch.Generator().manual_seed(1)
    upstream = []
    runs = []
    for fn, run_dtype in ((reference, torch.float32), (reference, dtype), (kernel, dtype)):
        inputs = {name: x.to(run_dtype).requires_grad_() for name, x in rounded.items()}
        runs.append(_forward_backward(fn, inputs, kwargs, upstream, grad_gen))
    names = ["o", "lse", *(f"d{leaf}" for leaf in leaves)]
    for name, exact, ref, got in zip(names, *runs):
        assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != the reference's {ref.dtype}"
        seen = exact != float("-inf")  # lse: rows that see nothing are -inf in every run
        assert torch.equal(got != float("-inf"), seen), f"{name}: -inf at other positions than the reference"
        ref_err, err = rms_rel(ref[seen], exact[seen]), rms_rel(got[seen], exact[seen])
        assert err <= 2 * ref_err + eps, (f"{name} at {dtype}: RMS-relative error {err:.2e} against fp32, more than "
                                          f"twice the reference's own at {dtype} ({ref_err:.2e}) + {eps:.0e}")


# numpy's warning about Triton's interpreter turning a one-element array into a loop bound: noise
INTERPRETER_WARNINGS = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
