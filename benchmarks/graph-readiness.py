"""What stands between NSA's layer and a CUDA graph: which of its launches and operators change from one
micro-batch to the next when only the packed documents' boundaries change.

A CUDA graph replays the kernels it captured with the grids, scalar arguments and buffer sizes of the
capture. NSA's first proof stage is host-bound (benchmarks/kernels-notes.md, sessions 47-48), and a graph
of the step would take the host's queueing away, but only if every launch of the step is the same for
every micro-batch, with whatever varies held in device buffers of fixed size. This script runs one NSA
layer (native_sparse_attention, the Triton path, forward and backward) on two micro-batches of the proof's
first-stage kind, the same length and sizes, different document boundaries, and records, in order, each
Triton launch (kernel, grid, scalar arguments, tensor shapes) and each PyTorch operator's output shapes.
It prints the launches and operators that differ between the two, by the repository function that made
them. The kernels do not run (their launches are recorded and skipped: only the host's decisions
matter here), so it takes seconds on CPU.

    python benchmarks/graph-readiness.py            # T = 2 x 2048, documents as the proof's 2K stage packs them
    python benchmarks/graph-readiness.py --seq 8192 --score exact
    python benchmarks/graph-readiness.py --pad-documents 64   # cu_seqlens padded to a fixed count first
"""
import argparse
import collections
import os
import random
import sys
from functools import partial
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from kernels.common import remember_bounds  # noqa: E402
from kernels.compression.naive import mean_compress  # noqa: E402
from kernels.nsa import native_sparse_attention  # noqa: E402

RECORD = []  # (kind, site, description) in issue order, for the micro-batch being run
PREFIX = str(ROOT) + os.sep


def site() -> str:
    """file:function of the innermost frame of this repository's code below this script."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PREFIX) and not name.startswith((PREFIX + "benchmarks/", PREFIX + ".venv/")):
            return f"{name[len(PREFIX):]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "(outside: autograd, torch)"


def describe(value):
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{list(value.shape)}".replace("torch.", "")
    if isinstance(value, (int, float, bool)) or value is None:
        return repr(value)
    return type(value).__name__


def record_launch(self, *args, grid, warmup, **kwargs):
    """Replaces the interpreter's launch: records it, runs nothing."""
    if not warmup:
        resolved = grid(kwargs) if callable(grid) else grid
        RECORD.append(("launch", site(), f"{self.fn.__name__} grid={tuple(resolved)} "
                       + " ".join(describe(a) for a in args)))


class RecordOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [describe(o) for o in (out if isinstance(out, (tuple, list)) else [out])]
        RECORD.append(("op", site(), f"{func.overloadpacket.__name__} -> {' '.join(shapes)}"))
        return out


def proof_documents(seq: int, sequences: int, rng: random.Random) -> list[int]:
    """Boundaries of `sequences` packed sequences of `seq` tokens, as the proof's first stage mixes them:
    7 in 8 hold 256-token task samples, the rest one code document cut at a random point into two."""
    bounds = [0]
    for s in range(sequences):
        start = s * seq
        if rng.random() < 0.875:
            bounds += [start + i for i in range(256, seq, 256)]
        else:
            bounds.append(start + rng.randrange(64, seq - 64))
        bounds.append(start + seq)
    return sorted(set(bounds))


def padded(bounds: list[int], count: int) -> list[int]:
    """bounds with zero-length documents after the last, `count` + 1 boundaries in all: the fixed-count
    cu_seqlens a packer would write for a CUDA graph (tests/kernels/test_triton_nsa.py checks that such
    documents change no result)."""
    if len(bounds) > count + 1:
        sys.exit(f"--pad-documents {count}: a micro-batch holds {len(bounds) - 1} documents; give at least that many")
    return bounds + [bounds[-1]] * (count + 1 - len(bounds))


def run_layer(seq: int, sequences: int, bounds: list[int], score: str) -> list:
    torch.manual_seed(0)
    heads, dim = 16, 16
    total = seq * sequences
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    remember_bounds(cu_seqlens, bounds)  # as the data loader does: no read back
    q = torch.randn(1, total, heads, dim, requires_grad=True)
    k = torch.randn(1, total, 1, dim, requires_grad=True)
    v = torch.randn(1, total, 1, dim, requires_grad=True)
    gates = torch.rand(1, total, heads, 3, requires_grad=True)
    phi = partial(mean_compress, block_size=16, stride=8)
    RECORD.clear()
    with RecordOps():
        out = native_sparse_attention(q, (k, v), (k, v), (k, v), gates, phi, phi, block_size=16, stride=8,
                                      selection_block=64, num_selected=16, window=512, impl="triton",
                                      cu_seqlens=cu_seqlens, selection_score=score)
        out.output.sum().backward()
    return list(RECORD)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048, help="tokens a sequence (default 2048, the first stage)")
    p.add_argument("--sequences", type=int, default=2, help="sequences packed into the micro-batch")
    p.add_argument("--score", default="sum", choices=["sum", "exact"], help="top-n's score (the proof: sum at 2K)")
    p.add_argument("--pad-documents", type=int, default=0, metavar="N",
                   help="pad both micro-batches' cu_seqlens to N documents with empty ones (what remains then)")
    a = p.parse_args()
    if a.pad_documents < 0:
        sys.exit(f"--pad-documents {a.pad_documents}: give a number of documents, or 0 (the default) for no padding")
    if a.seq < 512 or a.sequences < 1:
        sys.exit(f"--seq {a.seq} --sequences {a.sequences}: give at least 512 tokens and one sequence")
    interp.InterpretedFunction.run = record_launch
    documents = [proof_documents(a.seq, a.sequences, random.Random(seed)) for seed in (1, 2)]
    if a.pad_documents:
        documents = [padded(bounds, a.pad_documents) for bounds in documents]
    runs = [run_layer(a.seq, a.sequences, bounds, a.score) for bounds in documents]
    for n, run in enumerate(runs, 1):
        kinds = collections.Counter(kind for kind, _, _ in run)
        print(f"micro-batch {n}: {kinds['launch']} Triton launches, {kinds['op']} PyTorch operators")
    # the i-th call of a function in one micro-batch against its i-th call in the other
    by_site = [collections.defaultdict(list) for _ in runs]
    for run, sites in zip(runs, by_site):
        for kind, where, text in run:
            sites[(kind, where)].append(text)
    rows, same_total, total = [], 0, 0
    for key in sorted(set(by_site[0]) | set(by_site[1])):
        one, two = by_site[0].get(key, []), by_site[1].get(key, [])
        same = sum(x == y for x, y in zip(one, two))
        same_total, total = same_total + same, total + max(len(one), len(two))
        if same < max(len(one), len(two)):
            example = next(((x, y) for x, y in zip(one, two) if x != y),
                           (one[-1] if one else "(no call)", two[-1] if two else "(no call)"))
            rows.append((key, len(one), len(two), same, example))
    print(f"calls that are the same in both micro-batches (per issuing function, in order): {same_total} of {total}")
    print("functions whose calls differ (kind, function: calls in each, the same, an example):")
    for (kind, where), n1, n2, same, (x, y) in sorted(rows, key=lambda r: -(max(r[1], r[2]) - r[3])):
        print(f"  {kind:6s} {where}: {n1} / {n2} calls, {same} the same\n      {x[:140]}\n  vs  {y[:140]}")

if __name__ == "__main__":
    main()
