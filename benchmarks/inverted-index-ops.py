"""Host work of selected attention's inverted index, on the dev machine: the PyTorch operators it
dispatches and the Triton launches it makes, at a commit's version against this checkout's, for the
proof's 2K shape (T = 2048, one KV head, n = 16, 32 key blocks), and whether both build the same index.
Each dispatched operator costs the host some microseconds on a GPU, a launch some tens.

    python benchmarks/inverted-index-ops.py 30e6401     # the torch-operator version, before the kernels

Measured in benchmarks/kernels-notes.md, Session 23.
"""
import collections
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch
import triton.runtime.interpreter as interp
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.selected_attention.triton as current

STATE = {"paused": 0}
LAUNCHES = collections.Counter()


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not STATE["paused"]:  # the interpreter's own operators inside a kernel are not the host's
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


original_run = interp.InterpretedFunction.run


def counted_run(self, *args, grid, warmup, **kwargs):
    LAUNCHES[self.fn.__name__] += 1
    STATE["paused"] += 1
    try:
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
    finally:
        STATE["paused"] -= 1


def module_at(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:kernels/selected_attention/triton.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "selected_at_commit.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("selected_at_commit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(commit: str) -> None:
    interp.InterpretedFunction.run = counted_run
    torch.manual_seed(0)
    seq, kv_heads, num_selected, num_blocks = 2048, 1, 16, 32
    blocks = torch.stack([torch.randperm(num_blocks)[:num_selected] for _ in range(seq * kv_heads)])
    blocks = blocks.reshape(1, seq, kv_heads, num_selected).int()
    base = torch.zeros(seq, dtype=torch.int32)
    results = {}
    for name, module in ((commit, module_at(commit)), ("this checkout", current)):
        module.inverted_index(blocks, base, num_blocks)  # first call: caches
        LAUNCHES.clear()
        with Count() as count:
            results[name] = module.inverted_index(blocks, base, num_blocks)
        print(f"{name}: {sum(count.ops.values())} operators dispatched, {sum(LAUNCHES.values())} Triton launches "
              f"({dict(count.ops)})")
    before, after = results.values()
    real = int(after[5].sum())  # padding segments past the real ones may differ (both empty)
    same = all(torch.equal(a, b) for a, b in zip(after[:1] + after[4:], before[:1] + before[4:]))
    same &= all(torch.equal(a[:real], b[:real]) for a, b in zip(after[1:4], before[1:4]))
    print("same index" if same else "THE INDEXES DIFFER")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "30e6401")
