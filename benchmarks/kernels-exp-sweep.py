"""Issue 11: launch-config sweep (tile sizes, num_warps, num_stages) of the NSA kernels whose launch
parameters are fixed in code, not autotuned, in one process on one GPU.

Kernels, each set through its module's LAUNCH dict (kernels.triton_utils.launch_params):
- top-n selection, kernels/block_selection/triton.py "topn": BLOCK_T x num_warps x num_stages x SPLITS
  (key splits a query tile; until session 29 also a group-rows kernel: 0.42-0.68x at 128K, G=16, so
  removed), and today's launch with SORTED_MERGE=False (topk's merge) as the first candidate;
- selected attention, kernels/selected_attention/triton.py: forward "fwd" and "dq" (BLOCK_K too: keys
  of a selection block per loop step; at G < 16 TOKENS too: tokens a program; and today's launch with
  TMA: K/V parts copied through TMA descriptors; --tma-only: those alone; --by-blocks: the kernels by key
  blocks alone, BY_BLOCKS; --keys-m: the kernels with the keys as their dots' M alone, KEYS_M; --tokens:
  token tiles alone, at any group), backward
  "dkv" (BLOCK_M too, and KEYS_M: the keys as the dots' M, BLOCK_N rows of whole tokens a step; --dkv-keys-m:
  those alone)
  and "reduce" (--selected-parts picks among the four);
- gate combine, kernels/gate_combine/triton.py "sum" (the gated sum of three outputs, forward):
  BLOCK_R x num_warps (until 2026-12-06 also "gate_bwd", one branch's gate backward, now in the branches'
  delta pass; until 2026-12-04 a forward kernel per gate, "gate_fwd", then the sum; until 2026-12-01 one
  combine kernel of the three, "fwd" and "bwd").
Not swept: compressed and window attention (kernels/range_attention.py, autotuned), phi (PyTorch, no
Triton kernel), and the backwards' delta kernel (range_attention.attention_delta: fixed, ~1 ms).

Each kernel is timed through the public function that launches it, so a figure is what training pays:
top-n is select_blocks_triton; selected forward, selected_attention_triton; the three selected backward
kernels, the whole backward (autograd.grad with retain_graph: delta, dQ, inverted index, dK/dV,
reduce; only the swept kernel's launch changes); gate combine, its forward. The
baseline is the code path as used (LAUNCH empty), timed in the same run before the candidates; the
list of candidates includes today's config (marked *), so its ms against the baseline's shows the
noise. Medians of triton.testing.do_bench over >= --reps timed runs (tools/bench_kernels.median_ms).

A candidate passes if its outputs equal the baseline's bitwise, or else (attention, combine) if each
output is within 2x the baseline's own error against an fp32 run of the same function, + 1e-3 (max abs,
and RMS-relative); top-n passes if >= 0.999 of its rows pick the same blocks as the baseline (ties
may break differently). A candidate that fails to compile or launch is reported and skipped.

Shapes: paper config l=32 d=16 l'=64 n=16, B=1, HK=4, D=128, bf16, inputs as tools/bench_kernels.py's
(q, k, v random; k_cmp, v_cmp = mean_compress; lse from compressed_attention_triton; selected blocks
from top-n as used). The first shape (first of --groups, first of --seqs: G=16, T=128K) runs every
candidate; later shapes (64K; G=4 = 16 query heads over 4 KV heads) only today's config and the
--confirm-top fastest passing candidates of the first shape. New work stops once --budget-s have
passed; what is left is reported as skipped. Prints a table last (with the best passing config per
kernel and shape); writes JSON to --out after every kernel, so a stopped run keeps its rows.

From the repository root, on one H200:

    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-sweep.py --out $OUT/sweep.json

Expected run time 3.5-4.5 minutes, bounded by --budget-s 270 plus one candidate and the table: ~80
configs compile at the first shape (~1-2 s each, offline sm_90a compiles took 0.7-1.9 s), each
timed in ~0.1-1 s; the later shapes recompile ~30 (G=4) and time ~100 candidates.

Without CUDA it runs under Triton's interpreter (TRITON_INTERPRET=1) with wall-clock times of one
call, to check the script (float16: the interpreter computes bf16 dots wrongly):

    timeout 600 python3 benchmarks/kernels-exp-sweep.py --out /tmp/sweep.json --seqs 128 --groups 2 \\
        --kv-heads 1 --head-dim 32 --dtype float16 --max-candidates 2

(~100 s on two CPU cores, most of it in selected attention's programs; --kernels picks families.)
"""

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

START = time.time()
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton and the kernels are imported

import triton  # noqa: E402
from triton.backends.nvidia.compiler import CUDAOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kernels.block_selection.triton as block_selection  # noqa: E402
import kernels.gate_combine.triton as gate_combine  # noqa: E402
import kernels.selected_attention.triton as selected  # noqa: E402
from kernels.compressed_attention.triton import compressed_attention_triton  # noqa: E402
from kernels.compression.naive import mean_compress  # noqa: E402
from tools.bench_kernels import PAPER, median_ms  # noqa: E402

CUDA = torch.cuda.is_available()
FAMILIES = ("top-n", "selected", "combine")
SELECTED_PARTS = ("fwd", "dq", "dkv", "reduce")  # selected attention's kernels, by their LAUNCH keys
TOPN_AGREEMENT = 0.999  # share of (token, KV head) rows whose picks must equal the baseline's
DEFAULT_STAGES = CUDAOptions.num_stages  # Triton's, when a launch does not set it
# The fp32 reference runs the selected kernels as CUDA-core dots; the launch configs of the bf16
# path could exceed the shared memory there, so it runs with small, unpipelined ones.
FP32_SELECTED = {"fwd": dict(num_warps=8, num_stages=1), "dq": dict(num_warps=8, num_stages=1),
                 "dkv": dict(BLOCK_M=32, num_warps=8, num_stages=1)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[131072, 65536], help="the first gets every candidate")
    p.add_argument("--groups", type=int, nargs="+", default=[16, 4], help="query heads per KV head")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="of the timed runs (the interpreter computes bf16 wrongly: float16 there)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per figure (at least)")
    p.add_argument("--budget-s", type=float, default=270, help="no new candidate starts after this")
    p.add_argument("--confirm-top", type=int, default=3,
                   help="fastest passing candidates of the first shape timed again at the later shapes")
    p.add_argument("--max-candidates", type=int, default=None if CUDA else 2,
                   help="per kernel, today's config first (default: all; 2 without CUDA)")
    p.add_argument("--kernels", nargs="+", default=list(FAMILIES), choices=FAMILIES, help="which to sweep")
    p.add_argument("--selected-parts", nargs="+", default=list(SELECTED_PARTS), choices=SELECTED_PARTS,
                   help="which of selected attention's kernels to sweep (with --kernels selected)")
    p.add_argument("--tma-only", action="store_true",
                   help="selected forward and dQ: today's config and its TMA variants only (K/V through TMA)")
    p.add_argument("--by-blocks", action="store_true",
                   help="selected forward and dQ: today's config and the kernels by key blocks only (BY_BLOCKS)")
    p.add_argument("--tokens", action="store_true",
                   help="selected forward and dQ: today's config and token tiles (TOKENS 2 and 4) only, at any group")
    p.add_argument("--keys-m", action="store_true",
                   help="selected forward and dQ: today's config and the kernels with the keys as their dots' M only "
                        "(KEYS_M)")
    p.add_argument("--dkv-keys-m", action="store_true",
                   help="selected dK/dV: today's config and the kernel with the keys as the dots' M (KEYS_M) only")
    p.add_argument("--out", required=True, help="JSON file to write")
    return p.parse_args()


def configs(current: dict, **axes) -> list[dict]:
    """today's config, then every combination of the axes' values (in order, today's left out)."""
    grid = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    return [current] + [c for c in grid if c != current]


def label(config: dict) -> str:
    short = {"num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short[k]}{v}" if k in short else f"{k}={v}" for k, v in config.items())


@dataclass
class Sweep:
    """One kernel's launch configs, timed through `run` (returns the outputs to check)."""

    name: str
    module: ModuleType  # holds LAUNCH
    key: str  # the kernel's entry in module.LAUNCH
    current: dict  # today's launch parameters, as the module launches them
    candidates: list[dict]
    run: Callable[[], tuple]
    reference: tuple | None  # the outputs of an fp32 run (None: none ran, or top-n)
    by_picks: bool = False  # top-n: compared by the blocks picked per row


@dataclass
class Shape:
    T: int
    G: int
    first: bool  # every candidate; otherwise today's and the first shape's fastest


def tma_variants(now: dict, sel: int) -> list[dict]:
    """today's selected forward or dQ launch with its K/V parts copied through TMA descriptors, at its
    stages and deeper pipelines, and in half blocks."""
    return [{**now, "TMA": True}, {**now, "TMA": True, "num_stages": 3}, {**now, "TMA": True, "num_stages": 4},
            {**now, "TMA": True, "BLOCK_K": sel // 2}, {**now, "TMA": True, "BLOCK_K": sel // 2, "num_stages": 3}]


def by_blocks_variants(q, k) -> list[dict]:
    """Selected attention's forward or dQ by key blocks (selected._forward_by_blocks, _dq_by_blocks): rows a
    dot, warps and stages, the
    first as launched by default, in chunks of tokens whose partials fit selected.PARTIALS_BYTES (1 GiB);
    last, chunks 4x as long (longer key-block lists: each block's K/V read once for more rows)."""
    batch, _, num_q_heads, _ = q.shape
    per_token = batch * num_q_heads * PAPER["num_selected"] * (triton.next_power_of_2(q.shape[-1]) + 2) * 4
    variants = [dict(BY_BLOCKS=True, BLOCK_M=m, num_warps=w, num_stages=st)
                for m, w, st in ((64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2), (32, 4, 2))]
    return variants + [dict(variants[0], CHUNK=4 * selected.PARTIALS_BYTES // per_token)]


def keys_m_variants(sel: int) -> list[dict]:
    """The one-token forward or dQ with the key part as its dots' first operand (KEYS_M: scores [keys, rows],
    so M is the keys and the head dim; an sm_90a compile takes Hopper's warpgroup MMA for every dot at whole
    64-key blocks and 4 or 8 warps, and the older warp MMA beside it for 32-key parts), through TMA, and once
    through pointers. The baseline (the code path as used) is timed first as always."""
    return [*(dict(KEYS_M=True, TMA=True, num_warps=w, num_stages=st, BLOCK_K=bk)
              for w, st, bk in ((4, 2, sel), (4, 3, sel), (8, 2, sel), (4, 3, sel // 2))),
            dict(KEYS_M=True, num_warps=4, num_stages=2, BLOCK_K=sel)]


def token_tile_variants(sel: int) -> list[dict]:
    """Tiles of TOKENS consecutive tokens walking the union of their picks once (selected._token_tile): at
    G = 16 a tile of 4 is 64 rows, and each distinct block's K/V is read once for the tile where the
    one-token kernels read it once per token that picked it (at 8K those re-reads are ~15 GB through L2, and
    the one-token forward runs at 87% of L2's throughput: kernels-notes, session 50)."""
    return [dict(TOKENS=tt, num_warps=w, num_stages=st, BLOCK_K=bk)
            for tt, w, st, bk in ((2, 4, 2, sel), (4, 4, 2, sel), (4, 4, 3, sel), (4, 8, 2, sel), (2, 4, 3, sel),
                                  (4, 4, 2, sel // 2), (8, 8, 2, sel // 2))]


def keys_m_dkv_variants() -> list[dict]:
    """The dK/dV kernel with the keys as M: 16 rows (one token at G = 16; at 3 stages the GPU default there,
    DKV_KEYS_M_LAUNCH) at 3, 2 and 4 stages, 32 and 64 rows, and 8 warps (0.5-0.6x at 16 rows, 2929fbc)."""
    return [dict(KEYS_M=True, BLOCK_N=n, num_warps=w, num_stages=st)
            for n, w, st in ((16, 4, 3), (16, 4, 2), (16, 4, 4), (32, 4, 3), (32, 4, 2), (32, 4, 4), (64, 4, 3),
                             (64, 8, 3))]


def selected_sweeps(q, k, v, do, blocks, tma_only: bool = False, by_blocks: bool = False,
                    keys_m: bool = False, tokens: bool = False, dkv_keys_m: bool = False) -> list[Sweep]:
    sel = PAPER["selection_block"]
    fwd_now = {"num_stages": DEFAULT_STAGES, **selected._forward_launch(q, v), "BLOCK_K": sel}  # as launched
    dq_now = {"num_stages": DEFAULT_STAGES, **selected._dq_launch(q, v), "BLOCK_K": sel}
    dkv_rows = dict(BLOCK_M=selected.ROWS_PER_TILE, num_warps=4, num_stages=2)  # the 64-row kernel
    dkv_now = selected._dkv_launch(q.shape[2] // k.shape[2], q.is_cuda)  # as launched
    reduce_now = dict(num_warps=4, num_stages=DEFAULT_STAGES)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o, _ = selected.selected_attention_triton(*leaves, blocks, sel)  # the forward as used, for every backward

    def forward():
        with torch.no_grad():
            return selected.selected_attention_triton(q, k, v, blocks, sel)

    def backward():
        return torch.autograd.grad(o, leaves, do, retain_graph=True)

    reference = fp32_selected(q, k, v, do, blocks) or (None, None)
    # BLOCK_K: keys of a selection block per loop step (smaller K/V tiles, more programs a multiprocessor)
    grid_fs = dict(num_warps=(2, 4, 8), num_stages=(1, 2, 3, 4), BLOCK_K=(sel, sel // 2, sel // 4))
    group = q.shape[2] // k.shape[2]
    if group < 16:  # TOKENS: consecutive tokens a program, filling the 16 rows a token's group pads to
        fill = 16 // triton.next_power_of_2(group)
        grid_fs = dict(num_warps=(2, 4), num_stages=(2, 3), BLOCK_K=(sel, sel // 4), TOKENS=(1, fill, 2 * fill))
        fwd_now["TOKENS"] = dq_now["TOKENS"] = 1
    only = tma_only or by_blocks or keys_m or tokens  # today's config and one family of variants
    fwd_list = [fwd_now] if only else configs(fwd_now, **grid_fs)
    dq_list = [dq_now] if only else configs(dq_now, **grid_fs)
    # one family of variants beside today's config (default: the one-token kernels through TMA)
    for family in (fwd_list, dq_list):
        if by_blocks:
            family += by_blocks_variants(q, k)
        elif keys_m:
            family += keys_m_variants(sel)
        elif tokens:
            family += token_tile_variants(sel)
        else:
            family += tma_variants(family[0], sel)
    # dK/dV: today's launch (_dkv_launch), the 64-row kernel, its row tiles (BLOCK_M 16 and 32 leave its two fp32
    # accumulators room: no spills offline, selected-dkv-offline.py), and the kernel with the keys as the dots'
    # M at 16 to 64 rows a step (offline at D = 128, 4 warps: no spill up to 32 rows)
    row_tiles = [] if dkv_keys_m else configs(dkv_rows, BLOCK_M=(16, 32, 64, 128), num_warps=(4, 8),
                                              num_stages=(1, 2, 3))[1:]
    return [
        Sweep("selected fwd", selected, "fwd", fwd_now, fwd_list, forward, reference[0]),
        Sweep("selected bwd: dq", selected, "dq", dq_now, dq_list, backward, reference[1]),
        Sweep("selected bwd: dkv", selected, "dkv", dkv_now,
              [dkv_now] + [c for c in [dkv_rows, *row_tiles, *keys_m_dkv_variants()] if c != dkv_now],
              backward, reference[1]),
        Sweep("selected bwd: reduce", selected, "reduce", reduce_now,
              [reduce_now, dict(num_warps=2, num_stages=3), dict(num_warps=8, num_stages=3),
               dict(num_warps=4, num_stages=1), dict(num_warps=8, num_stages=1)], backward, reference[1]),
    ]


def fp32_selected(q, k, v, do, blocks) -> tuple | None:
    """((o, lse), (dq, dk, dv)) of selected attention on fp32 copies of the inputs; None if it cannot run."""
    selected.LAUNCH.update(FP32_SELECTED)
    try:
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
        o, lse = selected.selected_attention_triton(*leaves, blocks, PAPER["selection_block"])
        grads = torch.autograd.grad(o, leaves, do.float())
        return (o.detach(), lse.detach()), grads
    except Exception as e:  # noqa: BLE001 - the sweep then accepts only bitwise equal outputs
        log(f"  fp32 reference of selected attention failed ({short_error(e)}): "
            "candidates must equal the baseline")
        return None
    finally:
        selected.LAUNCH.clear()


def combine_sweeps(T, hq, d, dtype, device) -> list[Sweep]:
    gen = torch.Generator(device=device).manual_seed(T)
    outs = [torch.randn(1, T, hq, d, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    gates = [torch.rand(1, T, hq, device=device, generator=gen).to(dtype) for _ in range(3)]

    def forward():
        with torch.no_grad():
            return (gate_combine.gated_sum_triton(*outs, *gates),)

    sum32 = gate_combine.gated_sum_triton(*(x.float() for x in outs), *(g.float() for g in gates))
    now = dict(BLOCK_R=gate_combine.BLOCK_R, num_warps=4)
    grid = [c for c in configs(now, BLOCK_R=(16, 32, 64, 128), num_warps=(2, 4, 8))
            if (c["BLOCK_R"], c["num_warps"]) not in ((16, 8), (128, 2))]
    return [Sweep("gated sum fwd", gate_combine, "sum", now, grid, forward, (sum32,))]


def topn_sweep(q, k_cmp, lse) -> Sweep:
    args = (PAPER["block_size"], PAPER["stride"], PAPER["selection_block"], PAPER["num_selected"])

    def run():
        with torch.no_grad():
            return (block_selection.select_blocks_triton(q, k_cmp, lse, *args),)

    # today's launch as select_blocks_triton picks it (4 warps at head dim <= 128; 8 above; its key splits)
    splits = block_selection.topn_splits(q, k_cmp.shape[2], PAPER["selection_block"], PAPER["num_selected"], 0, None,
                                         "sum")
    now = dict(BLOCK_T=block_selection.BLOCK_T, num_warps=4 if q.shape[-1] <= 128 else 8, num_stages=3,
               SPLITS=splits, SORTED_MERGE=True)
    grid = configs(now, BLOCK_T=(64, 128), num_warps=(4, 8), num_stages=(3,), SPLITS=(1, 2, 4, 8, 16),
                   SORTED_MERGE=(True,))
    grid += [dict(BLOCK_T=32, num_warps=4, num_stages=3, SPLITS=4, SORTED_MERGE=True),
             dict(BLOCK_T=64, num_warps=4, num_stages=2, SPLITS=4, SORTED_MERGE=True)]
    # today's launch with topk's merge second (--max-candidates 2 times the merges alone)
    grid.insert(1, dict(now, SORTED_MERGE=False))
    return Sweep("top-n", block_selection, "topn", now, grid, run, None, by_picks=True)


def over_budget(args) -> bool:
    return time.time() - START > args.budget_s


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f} s] {msg}", flush=True)


def short_error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def call_and_time(fn, reps: int) -> tuple[tuple, dict]:
    """fn's outputs, and the seconds of that first call (compile included) with its median ms; under the
    interpreter the first call's wall clock is the figure."""
    t0 = time.perf_counter()
    outs = fn()
    if CUDA:
        torch.cuda.synchronize()  # a kernel's fault surfaces here, in this candidate's row
    first = time.perf_counter() - t0
    timing = median_ms(fn, reps) if CUDA else {"ms": first * 1e3, "runs": 1, "note": "interpreter, one call"}
    return outs, {"first_call_s": first, **timing}


def errors(outs, ref) -> list[dict]:
    """Per output: max abs and RMS-relative error against the reference where it is finite (lse is -inf
    where nothing is visible; the output must be too), NaN anywhere else it is not."""
    found = []
    for x, r in zip(outs, ref):
        finite = torch.isfinite(r)
        if not torch.equal(torch.isfinite(x), finite):
            found.append({"max_abs": float("nan"), "rms_rel": float("nan")})
            continue
        if not finite.all():  # a copy of the finite part only where needed: these are GBs at 128K
            x, r = x[finite], r[finite]
        diff = x.float() - r.float()
        found.append({"max_abs": diff.abs().max().item() if diff.numel() else 0.0,
                      "rms_rel": (diff.norm() / r.float().norm().clamp_min(1e-30)).item()})
    return found


def check(sweep: Sweep, outs, base, base_errors) -> dict:
    """Whether a candidate's outputs may replace the baseline's (see the module docstring)."""
    if sweep.by_picks:
        agree = (outs[0] == base[0]).all(-1).float().mean().item()
        return {"ok": agree >= TOPN_AGREEMENT, "rows_agree": agree}
    if all(torch.equal(x, b) for x, b in zip(outs, base)):
        return {"ok": True, "equal": True}
    if base_errors is None:
        return {"ok": False, "equal": False, "note": "differs from the baseline and no fp32 reference ran"}
    errs = errors(outs, sweep.reference)
    # + 1e-3 on both, as tools/gpu_check.py: an fp32 reference with the baseline's own tiling can match it
    # exactly (lse in fp16 on CPU), and a candidate that only reorders the sum would fail a bound of 0
    ok = all(e["max_abs"] <= 2 * b["max_abs"] + 1e-3 and e["rms_rel"] <= 2 * b["rms_rel"] + 1e-3
             for e, b in zip(errs, base_errors))
    return {"ok": ok, "equal": False, "errors": errs, "baseline_errors": base_errors}


def run_sweep(sweep: Sweep, shape: Shape, candidates: list[dict], args, report) -> None:
    """Times the baseline, then each candidate; appends a row each to report["rows"]."""
    where = {"kernel": sweep.name, "T": shape.T, "G": shape.G}
    sweep.module.LAUNCH.clear()
    base, base_time = call_and_time(sweep.run, args.reps)
    base_errors = errors(base, sweep.reference) if sweep.reference is not None else None
    report["rows"].append({**where, "config": "baseline (as used)", "launch": None, "current": True,
                           **base_time, "speedup": 1.0, "ok": True, "baseline_errors": base_errors})
    log(f"{sweep.name} T={shape.T} G={shape.G}: baseline {base_time['ms']:.3f} ms")
    for config in candidates:
        row = {**where, "config": label(config), "launch": config, "current": config == sweep.current}
        if over_budget(args):
            row.update(ok=False, error="skipped: time budget spent")
            report["rows"].append(row)
            continue
        sweep.module.LAUNCH[sweep.key] = config
        try:
            outs, timing = call_and_time(sweep.run, args.reps)
            row.update(check(sweep, outs, base, base_errors), **timing, speedup=base_time["ms"] / timing["ms"])
            del outs
        except Exception as e:  # noqa: BLE001 - a config that does not compile or launch is a row, not a crash
            row.update(ok=False, error=short_error(e))
            if any(lost in row["error"] for lost in ("CUDA error", "Triton Error [CUDA]", "illegal")):
                report["rows"].append(row)
                write(report, args.out)
                sys.exit(f"{sweep.name} {row['config']}: {row['error']}; the CUDA context is lost, stopping here "
                         f"(rows so far in {args.out})")
        finally:
            sweep.module.LAUNCH.clear()
        report["rows"].append(row)
        if "error" in row:
            log(f"  {row['config']:28s} {row['error']}")
        else:
            log(f"  {row['config']:28s} {row['ms']:9.3f} ms  {row['speedup']:5.2f}x  ok={row['ok']}  "
                f"(first call {row['first_call_s']:.1f} s)")
    # the baseline again after the candidates: its drift over the sweep is the noise a speedup must beat
    # (at 6571f5a the 128K forward's baseline took 34.9 ms and today's config, the same launch, 39.2)
    if not over_budget(args):
        _, again = call_and_time(sweep.run, args.reps)
        report["rows"].append({**where, "config": "baseline (as used), again", "launch": None, "current": True,
                               **again, "speedup": base_time["ms"] / again["ms"], "ok": True})
        log(f"  {'baseline again':28s} {again['ms']:9.3f} ms  {base_time['ms'] / again['ms']:5.2f}x")


def confirm_list(sweep: Sweep, report, first: Shape, top: int) -> list[dict]:
    """Today's config and the fastest passing candidates of the first shape."""
    rows = [r for r in report["rows"] if r["kernel"] == sweep.name and r["T"] == first.T and r["G"] == first.G
            and r["launch"] and r["ok"] and "ms" in r and not r["current"]]
    best = [r["launch"] for r in sorted(rows, key=lambda r: r["ms"])[:top]]
    return [sweep.current] + best


def one_shape(shape: Shape, first: Shape, args, report, device, dtype) -> None:
    hk, d = args.kv_heads, args.head_dim
    hq = shape.G * hk
    log(f"== T={shape.T} G={shape.G} (HQ={hq}, HK={hk}, D={d})")

    def sweep_all(sweeps: list[Sweep]) -> None:
        for sweep in sweeps:
            if over_budget(args):
                log(f"{sweep.name} T={shape.T} G={shape.G}: not run, time budget spent")
                continue
            candidates = sweep.candidates if shape.first else confirm_list(sweep, report, first, args.confirm_top)
            run_sweep(sweep, shape, candidates[: args.max_candidates], args, report)
            write(report, args.out)

    # selected attention reads the blocks top-n picks
    if {"top-n", "selected"} & set(args.kernels) and not over_budget(args):
        gen = torch.Generator(device=device).manual_seed(shape.T + shape.G)
        q, k, v, do = (torch.randn(1, shape.T, h, d, device=device, dtype=dtype, generator=gen)
                       for h in (hq, hk, hk, hq))
        l, s = PAPER["block_size"], PAPER["stride"]
        k_cmp, v_cmp = mean_compress(k, l, s), mean_compress(v, l, s)
        with torch.no_grad():
            _, lse = compressed_attention_triton(q, k_cmp, v_cmp, l, s)
        topn = topn_sweep(q, k_cmp, lse)
        if "top-n" in args.kernels:
            sweep_all([topn])
        if "selected" in args.kernels and not over_budget(args):
            sweeps = selected_sweeps(q, k, v, do, topn.run()[0], args.tma_only, args.by_blocks, args.keys_m,
                                     args.tokens, args.dkv_keys_m)
            sweep_all([sw for sw in sweeps if sw.key in args.selected_parts])
        del q, k, v, do, k_cmp, v_cmp, lse, topn
        empty_cache()
    if "combine" in args.kernels and not over_budget(args):
        sweep_all(combine_sweeps(shape.T, hq, d, dtype, device))
        empty_cache()


def empty_cache() -> None:
    if CUDA:
        torch.cuda.empty_cache()


def best_rows(rows) -> list[dict]:
    """Per (kernel, T, G): the fastest passing candidate, with today's config beside it."""
    best = []
    for key in dict.fromkeys((r["kernel"], r["T"], r["G"]) for r in rows):
        mine = [r for r in rows if (r["kernel"], r["T"], r["G"]) == key and r["launch"] and r["ok"] and "ms" in r]
        if mine:
            top = min(mine, key=lambda r: r["ms"])
            now = next((r for r in mine if r["current"]), None)
            best.append({"kernel": key[0], "T": key[1], "G": key[2], "config": top["config"],
                         "launch": top["launch"], "ms": top["ms"], "speedup": top["speedup"],
                         "current_ms": now["ms"] if now else None})
    return best


def git(*cmd) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write(report: dict, path: str) -> None:
    report["best"] = best_rows(report["rows"])
    report["elapsed_s"] = time.time() - START
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))


def print_table(report: dict) -> None:
    a = report["args"]
    print(f"\n{report['gpu']}, torch {report['torch']}, triton {report['triton']}, commit {report['commit']}; "
          f"HK={a['kv_heads']}, D={a['head_dim']}, {a['dtype']}, paper config; median ms of >= {a['reps']} runs; "
          f"speedup = baseline ms / ms; * = today's config")
    head = f"{'kernel':22s} {'T':>7} {'G':>3}  {'config':28s} {'ms':>9} {'speedup':>7}  ok"
    print(head + "\n" + "-" * len(head))
    for r in report["rows"]:
        name = ("* " if r["current"] and r["launch"] else "  ") + r["config"]
        where = f"{r['kernel']:22s} {r['T']:>7} {r['G']:>3}  {name:28s}"
        print(f"{where} {r['ms']:9.3f} {r['speedup']:6.2f}x  {r['ok']}" if "ms" in r else f"{where} {r['error']}")
    print(f"\nbest passing config per kernel and shape (elapsed {report['elapsed_s']:.0f} s):")
    for b in report["best"]:
        now = f"{b['current_ms']:.3f}" if b["current_ms"] is not None else "-"
        print(f"{b['kernel']:22s} {b['T']:>7} {b['G']:>3}  {b['config']:28s} {b['ms']:9.3f} ms "
              f"{b['speedup']:5.2f}x (today's config {now} ms)")


def main():
    args = parse_args()
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = getattr(torch, args.dtype)
    # the GPU machine's copy of the tree may hold a stale .git: the device scripts pass COMMIT
    commit = os.environ.get("COMMIT") or git("rev-parse", "HEAD")
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name() if CUDA else "interpreter",
              "host": platform.node(), "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
              "dirty": bool(git("status", "--porcelain", "--", "kernels", "benchmarks")) if commit else None,
              "args": vars(args), "paper_config": PAPER, "rows": []}
    shapes = [Shape(T, G, first=(G, T) == (args.groups[0], args.seqs[0]))
              for G in args.groups for T in args.seqs]
    for shape in shapes:
        if over_budget(args):
            log(f"T={shape.T} G={shape.G}: not run, time budget spent")
            continue
        one_shape(shape, shapes[0], args, report, device, dtype)
    write(report, args.out)
    print_table(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
