"""What the range-attention experiments (kernels-exp-range-bwd.py, kernels-exp-range-tma.py) share: their
inputs per branch and length, an fp32 reference run, error measures and bounds, and timing. Import it after
the caller has set TRITON_INTERPRET where there is no GPU (kernels read it when they are defined)."""

import json
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import triton

import kernels.range_attention as ra
from kernels.common import default_scale
from kernels.compressed_attention.triton import compressed_ranges
from kernels.compression.naive import compressed_cu_seqlens, num_compressed_blocks
from kernels.window_attention.triton import window_ranges
from tools.bench_kernels import median_ms

BLOCK, STRIDE = 32, 16  # paper config compression block l and stride d
# fp32 reference run: one fixed launch config per kernel, no autotuning (fp32 dots run on the FMA
# units, seconds per backward at 128K, and every trial would cost that); 32 x 32 tiles at 8 warps
# spill 144-604 bytes in an offline sm_90a compile, larger tiles or 4 warps 1.1-6 KB
FP32_CONFIG = ra._config(32, 32, 8, 1)


def range_inputs(branch: str, seq: int, window: int, doc_len: int, q_heads: int, kv_heads: int, head_dim: int,
                 device: torch.device) -> dict:
    """One sequence of `seq` tokens (packed documents of doc_len tokens, the last shorter, or one document
    if 0): the branch's key count and ranges (compressed: the paper's l and d; window: `window` keys),
    fp32 q, k, v and an upstream gradient do, seeded by seq, and the default scale."""
    cu = torch.arange(0, seq + doc_len, doc_len, device=device).clamp(max=seq).to(torch.int32) if doc_len else None
    if branch == "compressed":
        num_keys = num_compressed_blocks(seq, BLOCK, STRIDE) if cu is None else \
            int(compressed_cu_seqlens(cu, BLOCK, STRIDE)[-1])
        ranges = compressed_ranges(seq, num_keys, BLOCK, STRIDE, 0, cu, device)
    else:
        num_keys = seq
        ranges = window_ranges(seq, seq, window, 0, 0, cu, device)
    gen = torch.Generator(device=device).manual_seed(seq)
    q, k, v = (torch.randn(1, n, h, head_dim, device=device, generator=gen)
               for n, h in ((seq, q_heads), (num_keys, kv_heads), (num_keys, kv_heads)))
    do = torch.randn(1, seq, q_heads, head_dim, device=device, generator=gen)
    return dict(num_keys=num_keys, ranges=ranges, q=q, k=k, v=v, do=do, scale=default_scale(head_dim, None))


@contextmanager
def fixed_fp32_configs():
    """Every range kernel on FP32_CONFIG alone while inside."""
    saved = ra._TUNED
    ra._TUNED = {name: triton.autotune([FP32_CONFIG], key=["T_BUCKET", "TK_BUCKET", "G", "DK", "DV"])(kernel)
                 for name, kernel in ra._KERNELS.items()}
    try:
        yield
    finally:
        ra._TUNED = saved


def errors(outputs, ref, names) -> dict:
    """Per output (named by `names`): max abs and RMS-relative error against its fp32 reference."""
    out = {}
    for name, x, r in zip(names, outputs, ref):
        diff = (x.float() - r).double()
        out[name] = {"max_abs": diff.abs().max().item(),
                     "rms_rel": (diff.pow(2).mean().sqrt() / r.double().pow(2).mean().sqrt()).item()}
    return out


def within_bound(err: dict, bound: dict) -> bool:
    """Every error within 2x the bound's (another way's own error), + 1e-3 on the RMS-relative one."""
    return all(err[t]["max_abs"] <= 2 * bound[t]["max_abs"] and err[t]["rms_rel"] <= 2 * bound[t]["rms_rel"] + 1e-3
               for t in err)


def shape_arguments(p, seqs: list[int]) -> None:
    """The options every range experiment takes: the window, packed documents, lengths (default `seqs`), head
    shape, dtype, timed runs and the JSON file. Check the parsed ones with check_shape_arguments."""
    p.add_argument("--window", type=int, default=512, help="window branch: keys a query sees")
    p.add_argument("--doc-len", type=int, default=0, help="packed documents of this many tokens; 0: one")
    p.add_argument("--seqs", type=int, nargs="+", default=seqs)
    p.add_argument("--q-heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="of the timed runs (the interpreter computes bf16 wrongly: float16 there)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per figure (at least)")
    p.add_argument("--out", required=True, help="JSON file to write")


def check_shape_arguments(p, args) -> None:
    if args.doc_len < 0:
        p.error(f"--doc-len {args.doc_len}: give a document length in tokens, or 0 for one document a sequence")


def timed(fn, reps: int) -> float:
    """Median ms of fn over >= reps timed runs on the GPU; NaN under the interpreter."""
    return median_ms(fn, reps)["ms"] if torch.cuda.is_available() else float("nan")


def alternated(runs: dict, baseline: str, reps: int, label: str) -> tuple[dict, dict]:
    """Each of `runs` (name -> function) timed again twice, all of them in turn each round, so that their ratios
    do not carry the drift between timings made a while apart: ({name: [ms, ms]}, {name: the baseline's ms / its
    ms}); prints the timings on one line after `label`."""
    times = {name: [] for name in runs}
    for _ in range(2):
        for name, fn in runs.items():
            times[name].append(timed(fn, reps))
    print(f"{label} alternated: " + ", ".join(f"{name} {ms}" for name, ms in times.items()), flush=True)
    return times, {name: sum(times[baseline]) / sum(ms) for name, ms in times.items()}


def run_facts(repo: Path) -> dict:
    """The command, commit ($COMMIT where the device scripts set it: the GPU machine's copy of the tree
    may hold a stale .git), device and versions, for the head of a report."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    return {"command": " ".join(["python3", *sys.argv]), "commit": os.environ.get("COMMIT") or commit,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.node(),
            "triton": triton.__version__, "torch": torch.__version__}


def write(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
