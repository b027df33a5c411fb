"""kernels/compile_ahead.py on the GPU: after the dry pass and the parallel compile, a real NSA forward and
backward compiles nothing more and matches the reference. Each case runs in a new process with an empty
Triton cache, so that every kernel starts uncompiled. There is nothing to compile under the interpreter."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# One NSA layer, proof-like heads (G = 16, head dim 64), bf16, forward and backward, exact top-n score (the
# range kernel's lse pass, autotuned, included); prints a JSON line: the report, the compiles the real step
# made, and each tensor's RMS error against the reference relative to the reference's RMS.
SCRIPT = """
import json
from functools import partial
import torch
import triton
from kernels.compile_ahead import compile_ahead
from kernels.compression.naive import mean_compress
from kernels.nsa import native_sparse_attention

torch.manual_seed(0)
dev = torch.device("cuda")
T, G, HK, D = 1024, 16, 2, 64
def randn(*shape):
    return torch.randn(*shape, device=dev, dtype=torch.bfloat16).requires_grad_()
q = randn(1, T, G * HK, D)
kv = [(randn(1, T, HK, D), randn(1, T, HK, D)) for _ in range(3)]
gates = torch.rand(1, T, G * HK, 3, device=dev, dtype=torch.bfloat16).requires_grad_()
leaves = [q, *kv[0], *kv[1], *kv[2], gates]
upstream = torch.randn(1, T, G * HK, D, device=dev, dtype=torch.bfloat16)
phi = partial(mean_compress, block_size=32, stride=16)
sizes = dict(block_size=32, stride=16, selection_block=64, num_selected=4, window=128, selection_score="exact")

def step(impl, inputs):
    out = native_sparse_attention(inputs[0], *zip(inputs[1:7:2], inputs[2:7:2]), inputs[7], phi, phi, **sizes,
                                  impl=impl).output
    return [out.detach(), *torch.autograd.grad(out, inputs, upstream.to(out.dtype))]

report = compile_ahead(lambda: step("triton", leaves), dev)
compiles = []
triton.knobs.compilation.listener = lambda *, src, cache_hit, **_: compiles.append(
    getattr(src, "name", "?")) if not cache_hit else None
ours = step("triton", leaves)
triton.knobs.compilation.listener = None
exact = [x.detach().float().requires_grad_() for x in leaves]
reference = step("reference", exact)
errors = [((a.float() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item() for a, b in zip(ours, reference)]
print(json.dumps({"kernels": report.kernels, "failed": report.failed, "wall_s": report.wall_s, "busy_s": report.busy_s,
                  "dry_pass_s": report.dry_pass_s, "workers": report.workers, "compiles_after": compiles,
                  "errors": errors}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling ahead needs a GPU (the interpreter compiles nothing)")
def test_compile_ahead_leaves_nothing_to_compile():
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        env.pop("TRITON_INTERPRET", None)
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    # compressed, lse, top-n, selected, window, gates, their backward kernels and the range kernels' candidates
    assert result["kernels"] >= 10 and result["failed"] == 0
    assert result["compiles_after"] == [], f"the real step compiled {result['compiles_after']}: the dry pass missed them"
    assert max(result["errors"]) < 3e-2, result["errors"]


def test_compile_ahead_does_nothing_on_a_cpu():
    """No dry pass on a CPU: `run` is not called at all (the interpreter has nothing to compile)."""
    from kernels.compile_ahead import compile_ahead

    calls = []
    assert compile_ahead(lambda: calls.append(1), torch.device("cpu")) is None
    assert calls == []
