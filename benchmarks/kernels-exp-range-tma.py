"""Issue 11: the range attention's kernels copying their streamed tiles through TMA tensor descriptors
(kernels/range_attention.py TMA_LOADS) against the pointer loads, in one process on one GPU.

For each branch of --branches (compressed: paper config l=32, d=16, TK = (T - 32) // 16 + 1 compressed
keys; window: TK = T keys, window --window) and each T of --seqs (B=1, HQ=--q-heads, HK=--kv-heads,
D=--head-dim, bf16; --doc-len packs documents of that length):
- the forward and the backward on the path the branch takes at that length (the window branch split;
  the compressed one the one pass by compressed_attention's ONE_PASS_MIN_WORK; --one-pass overrides), five ways (WAYS):
  pointer loads; TMA in the forward and dQ kernels (K/V tiles); TMA in every kernel (q/dO row tiles
  of the dK/dV and one-pass kernels too); the one pass's dQ added by TMA bulk reductions
  (range_attention.TMA_DQ_REDUCE) with pointer loads; and that with TMA in the forward. Each against an
  fp32 run with pointer loads (max abs and RMS-relative error of o, dq, dk, dv), passing if within 2x the
  pointer way's own error (+ 1e-3 on the RMS-relative one);
- medians of triton.testing.do_bench over >= --reps timed runs, then every way again in turn (twice),
  whose sums give the ratios (pointer ms / TMA ms), free of the drift between timings made a while apart.
Prints a table last and writes JSON to --out (after each shape too). From the repository root, on one
H200 (the paper's heads at 16K and 128K, then the proof model's: 16 query heads sharing one KV head of 64):

    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-range-tma.py --seqs 16384 131072 --out $OUT/tma.json
    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-range-tma.py --seqs 32768 --q-heads 16 --kv-heads 1 \\
        --head-dim 64 --doc-len 8192 --out $OUT/tma-proof.json

Without CUDA it runs under Triton's interpreter (TRITON_INTERPRET=1) on small sizes, without timings, to
check the script: --seqs 600 --q-heads 4 --kv-heads 2 --head-dim 32 --window 100 --dtype float16.
"""

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton and the kernels are imported

import triton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import kernels.compressed_attention.triton as compressed_triton  # noqa: E402
import kernels.range_attention as ra  # noqa: E402
from range_experiments import (check_shape_arguments, errors, fixed_fp32_configs, range_inputs,  # noqa: E402
                               run_facts, shape_arguments, timed, within_bound, write)

# way: (TMA_LOADS, TMA_DQ_REDUCE); the dQ reduction only changes the one-pass backward
WAYS = {"pointers": ((), False), "tma-kv": (("fwd", "dq"), False), "tma-all": (("fwd", "dq", "dkv", "onepass"), False),
        "dq-reduce": ((), True), "tma-fwd+dq-reduce": (("fwd",), True)}
OUTPUTS = ("o", "dq", "dk", "dv")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--branches", nargs="+", default=["compressed", "window"], choices=["compressed", "window"])
    shape_arguments(p, seqs=[16384, 131072])
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS),
                   help="the ways timed (pointers always, first)")
    p.add_argument("--one-pass", default="auto", choices=["auto", "on", "off"],
                   help="backward path (auto: the branch's rule, kernels/*/triton.py ONE_PASS_BACKWARD)")
    args = p.parse_args()
    check_shape_arguments(p, args)
    args.ways = ["pointers"] + [way for way in args.ways if way != "pointers"]
    if args.head_dim != triton.next_power_of_2(args.head_dim) or args.head_dim < 16:
        p.error(f"--head-dim {args.head_dim}: TMA tiles are the head dim wide; give a power of two from 16")
    return args


@contextmanager
def tma_loads(way: tuple[tuple[str, ...], bool]):
    saved = ra.TMA_LOADS, ra.TMA_DQ_REDUCE
    ra.TMA_LOADS, ra.TMA_DQ_REDUCE = way
    try:
        yield
    finally:
        ra.TMA_LOADS, ra.TMA_DQ_REDUCE = saved


def one_shape(branch: str, seq: int, args, device) -> dict:
    t0 = time.time()
    inputs = range_inputs(branch, seq, args.window, args.doc_len, args.q_heads, args.kv_heads, args.head_dim, device)
    num_keys, ranges, scale = inputs["num_keys"], inputs["ranges"], inputs["scale"]
    q, k, v, do = (inputs[name] for name in ("q", "k", "v", "do"))

    def forward(q, k, v):
        return ra.range_attention_fwd(q, k, v, *ranges[:2], scale)

    if args.one_pass == "auto":  # the branches' rule (compressed: longest document x HQ x D >= ONE_PASS_MIN_WORK)
        longest = args.doc_len or seq
        work = longest * q.shape[2] * q.shape[3]
        one_pass = branch == "compressed" and work >= compressed_triton.ONE_PASS_MIN_WORK and \
            compressed_triton.ONE_PASS_BACKWARD
    else:
        one_pass = args.one_pass == "on"

    def backward(q, k, v, o, lse, do):
        return ra.range_attention_bwd(q, k, v, lse, do, ra.attention_delta(o, do, None)[0], *ranges, scale, one_pass)

    with fixed_fp32_configs(), tma_loads(WAYS["pointers"]):
        o32, lse32 = forward(q, k, v)
        ref = (o32, *backward(q, k, v, o32, lse32, do))
    res = {"branch": branch, "T": seq, "TK": num_keys, "HQ": args.q_heads, "HK": args.kv_heads, "D": args.head_dim,
           "doc_len": args.doc_len, "one_pass": one_pass, "fp32_reference_s": time.time() - t0}
    q, k, v, do = (x.to(getattr(torch, args.dtype)) for x in (q, k, v, do))
    kept = {}
    for way in args.ways:
        with tma_loads(WAYS[way]):
            t1 = time.time()
            o, lse = forward(q, k, v)
            grads = backward(q, k, v, o, lse, do)  # compiles and autotunes
            line = {"first_call_s": time.time() - t1, "errors": errors((o, *grads), ref, OUTPUTS),
                    "tma_taken": [name for name in ra._KERNELS if ra.use_tma(name, q, k, v)],
                    "dq_reduce_taken": one_pass and ra.use_dq_reduce(q, k, v)}
            line["fwd_ms"] = timed(lambda: forward(q, k, v), args.reps)
            line["bwd_ms"] = timed(lambda: backward(q, k, v, o, lse, do), args.reps)
            if torch.cuda.is_available():
                line["configs"] = {name: str(tuned.best_config) for name, tuned in ra._TUNED.items()
                                   if getattr(tuned, "best_config", None)}
        kept[way] = (o, lse)
        res[way] = line
        print(f"  {branch} T={seq} {way}: fwd {line['fwd_ms']:.2f} ms, bwd {line['bwd_ms']:.2f} ms, "
              f"first call {line['first_call_s']:.1f} s", flush=True)
    for way in args.ways:
        res[way]["within_bound"] = within_bound(res[way]["errors"], res["pointers"]["errors"])
    abab = {f"{way}_{part}": [] for way in args.ways for part in ("fwd", "bwd")}
    for _ in range(2):
        for way in args.ways:
            o, lse = kept[way]
            with tma_loads(WAYS[way]):
                abab[f"{way}_fwd"].append(timed(lambda: forward(q, k, v), args.reps))
                abab[f"{way}_bwd"].append(timed(lambda: backward(q, k, v, o, lse, do), args.reps))
    res["abab_ms"] = abab
    for way in args.ways[1:]:
        for part in ("fwd", "bwd"):
            res[f"{way}_speedup_{part}_abab"] = sum(abab[f"pointers_{part}"]) / sum(abab[f"{way}_{part}"])
    print(f"  ABAB: {json.dumps(abab)}", flush=True)
    return res


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {**run_facts(REPO), "window": args.window, "ways": {way: WAYS[way] for way in args.ways}, "shapes": []}
    for branch in args.branches:
        for seq in args.seqs:
            report["shapes"].append(one_shape(branch, seq, args, device))
            write(report, args.out)

    print(f"\nrange attention, TMA copies against pointer loads (HQ={args.q_heads}, HK={args.kv_heads}, "
          f"D={args.head_dim}, {args.dtype}), commit {report['commit'][:10]}")
    print(f"ms in the ways {' / '.join(args.ways)}; x: forward/backward, pointer ms / the way's ms over the "
          "alternating timings; ok: errors against fp32 within 2x the pointer way's, and TMA taken")
    print(f"{'branch':>10} {'T':>7} {'bwd path':>8} {'fwd ms':>34} {'bwd ms':>39}  "
          + " ".join(f"{way + ' x':>18}" for way in args.ways[1:]) + "  ok")
    for r in report["shapes"]:
        lines = [r[way] for way in args.ways]
        fwd = "/".join(f"{line['fwd_ms']:.2f}" for line in lines)
        bwd = "/".join(f"{line['bwd_ms']:.2f}" for line in lines)
        ratios = [f"{r[f'{way}_speedup_fwd_abab']:.2f}/{r[f'{way}_speedup_bwd_abab']:.2f}" for way in args.ways[1:]]
        ok = all(r[way]["within_bound"] and (r[way]["tma_taken"] or not WAYS[way][0]) for way in args.ways[1:])
        print(f"{r['branch']:>10} {r['T']:>7} {'one pass' if r['one_pass'] else 'split':>8} {fwd:>34} {bwd:>39}  "
              + " ".join(f"{ratio:>18}" for ratio in ratios) + f"  {ok}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
