"""Issue 11: where top-n's time goes. Times the top-n kernel as used beside variants of it that each drop
or change one part, in one process on one GPU, so the differences attribute its milliseconds:

- "as used": kernels/block_selection/triton.select_blocks_triton;
- "no merge": the running top-k merge (tl.topk over 2 x ST int64 keys per row, once per ST selection
  blocks) replaced by an elementwise max, which keeps the scores live but sorts nothing;
- "one head": the loop over the G query heads of the group runs for one head only (one q reload and one
  QK^T dot per compressed tile instead of G);
- "no merge, one head": both, leaving the compressed-key loads, the overlap matmul and the loop;
- "ST=32": the kernel as used with a 32-block tile (half the merges, each over twice the keys).

The variants are the production kernel's own source with one line replaced (so they follow it as it
changes): the replaced lines must be found, or the script stops and says which. Only "as used" and
"ST=32" compute the selection; their picks are compared (share of identical rows). Medians of
triton.testing.do_bench over >= --reps timed runs (tools/bench_kernels.median_ms).

Shapes as tools/bench_kernels.py: paper config l=32 d=16 l'=64 n=16, B=1, HK=4, D=128, bf16; q and k
random, k_cmp = mean_compress(k), lse from the Triton compressed attention. From the repository root,
on one H200 (about a minute at 128K, G=16):

    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-topn-parts.py --out $OUT/topn-parts.json

Without CUDA it runs under Triton's interpreter (one call each, wall clock), to check the script:

    timeout 600 python3 benchmarks/kernels-exp-topn-parts.py --seqs 256 --groups 2 --kv-heads 1 \\
        --head-dim 32 --dtype float16 --out /tmp/topn-parts.json
"""

import argparse
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton and the kernels are imported

import triton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kernels.block_selection.triton as block_selection  # noqa: E402
from kernels.common import default_scale  # noqa: E402
from kernels.compressed_attention.triton import compressed_attention_triton  # noqa: E402
from kernels.compression.naive import mean_compress  # noqa: E402
from kernels.range_attention import LOG2E  # noqa: E402
from kernels.triton_utils import dot_precision, pow2  # noqa: E402
from tools.bench_kernels import PAPER, median_ms  # noqa: E402

CUDA = torch.cuda.is_available()
MERGE = "running = tl.topk(tl.reshape(tl.join(running, key), [BLOCK_T, 2 * ST]), ST)"
HEADS = "for g in range(G):"
VARIANTS = {  # name: (replacements in the kernel's source, ST override)
    "as used": ([], None),
    "no merge": ([(MERGE, "running = tl.maximum(running, key)")], None),
    "one head": ([(HEADS, "for g in range(1):")], None),
    "no merge, one head": ([(MERGE, "running = tl.maximum(running, key)"), (HEADS, "for g in range(1):")], None),
    "ST=32": ([], 32),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[131072])
    p.add_argument("--groups", type=int, nargs="+", default=[16, 4], help="query heads per KV head")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="the interpreter computes bf16 wrongly: float16 there")
    p.add_argument("--reps", type=int, default=3, help="timed runs per figure (at least)")
    p.add_argument("--out", required=True, help="JSON file to write")
    return p.parse_args()


def variant_kernel(replacements: list[tuple[str, str]], scratch: Path):
    """The production _topn_kernel with `replacements` applied, compiled from a module of its own (Triton
    reads a kernel's source from its file)."""
    source = inspect.getsource(block_selection._topn_kernel.fn)  # the Python function under the JIT wrapper
    for old, new in replacements:
        if source.count(old) != 1:
            sys.exit(f"kernels-exp-topn-parts: {old!r} is not exactly once in _topn_kernel's source; update "
                     "this script's VARIANTS to the kernel as it is now")
        source = source.replace(old, new)
    path = scratch / f"topn_variant_{abs(hash(source))}.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n" + source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._topn_kernel


def launch(kernel, q, k_cmp, lse, st: int | None):
    """select_blocks_triton's launch of `kernel` (packed documents left out), with ST set to `st`."""
    l, d, ls, n = (PAPER[k] for k in ("block_size", "stride", "selection_block", "num_selected"))
    batch, seq, hq, head_dim = q.shape
    hk = k_cmp.shape[2]
    top = st or pow2(n)
    warps = 4 if head_dim <= 128 else 8
    tiles = block_selection.query_tiles(seq, k_cmp.shape[1], l, d, 0, None, block_selection.BLOCK_T, q.device)
    out = torch.full((batch, seq, hk, n), -1, dtype=torch.int32, device=q.device)
    kernel[(tiles.shape[0], batch * hk)](
        q, k_cmp, lse, tiles, out, seq, k_cmp.shape[1], hq, hk, n, 0, default_scale(head_dim, None) * LOG2E,
        G=hq // hk, L=l, STRIDE=d, SEL=ls, DK=head_dim, BLOCK_DK=pow2(head_dim), BLOCK_C=pow2(top * ls // d),
        ST=top, PRECISION=dot_precision(q.dtype), BLOCK_T=block_selection.BLOCK_T, num_warps=warps, num_stages=3,
    )
    return out


def time_call(fn, reps: int) -> tuple[torch.Tensor, dict]:
    t0 = time.perf_counter()
    out = fn()
    if CUDA:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    timing = median_ms(fn, reps) if CUDA else {"ms": first * 1e3, "runs": 1, "note": "interpreter, one call"}
    return out, {"first_call_s": first, **timing}


def one_shape(seq: int, group: int, args, kernels: dict, device, dtype) -> list[dict]:
    """Rows of every variant at one (T, G), timed on the same inputs."""
    torch.manual_seed(0)
    l, d = PAPER["block_size"], PAPER["stride"]
    q = torch.randn(1, seq, group * args.kv_heads, args.head_dim, device=device, dtype=dtype)
    k = torch.randn(1, seq, args.kv_heads, args.head_dim, device=device, dtype=dtype)
    k_cmp = mean_compress(k, l, d).contiguous()
    with torch.no_grad():
        lse = compressed_attention_triton(q, k_cmp, k_cmp, l, d)[1].float().contiguous()
        picks, timing = time_call(lambda: block_selection.select_blocks_triton(
            q, k_cmp, lse, l, d, PAPER["selection_block"], PAPER["num_selected"]), args.reps)
    rows = [{"variant": "select_blocks_triton", "T": seq, "G": group, **timing}]
    for name, (_, st) in VARIANTS.items():
        with torch.no_grad():
            out, timing = time_call(lambda: launch(kernels[name], q, k_cmp, lse, st), args.reps)
        row = {"variant": name, "T": seq, "G": group, **timing}
        if name in ("as used", "ST=32"):
            row["identical_rows"] = (out == picks).all(-1).float().mean().item()
        rows.append(row)
        print(f"T={seq} G={group} {name:20s} {timing['ms']:9.2f} ms"
              + (f"  rows identical {row['identical_rows']:.4f}" if "identical_rows" in row else ""), flush=True)
    for row in rows:
        row["vs_as_used"] = row["ms"] / rows[1]["ms"]
    return rows


def git(*cmd) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    args = parse_args()
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = getattr(torch, args.dtype)
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name() if CUDA else "none (interpreter)",
              "host": platform.node(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": git("rev-parse", "--short", "HEAD"), "args": vars(args), "rows": []}
    scratch = Path(tempfile.mkdtemp(prefix="topn-parts-"))
    kernels = {name: variant_kernel(replacements, scratch) for name, (replacements, _) in VARIANTS.items()}
    for seq in args.seqs:
        for group in args.groups:
            report["rows"] += one_shape(seq, group, args, kernels, device, dtype)
            if CUDA:
                torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{report['gpu']}, torch {report['torch']}, triton {report['triton']}, {args.dtype}, HK={args.kv_heads} "
          f"D={args.head_dim}; median ms of >= {args.reps} runs")
    print(f"{'T':>7} {'G':>3} {'variant':22s} {'ms':>9} {'x as used':>10}")
    for row in report["rows"]:
        print(f"{row['T']:>7} {row['G']:>3} {row['variant']:22s} {row['ms']:9.2f} {row['vs_as_used']:10.2f}")


if __name__ == "__main__":
    main()
