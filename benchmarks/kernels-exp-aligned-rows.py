"""Issue 11: the range attention's split backward with its dK/dV kernel's rows in order against in the
aligned order (range_attention._range_attn_bwd_dkv, ALIGNED_ROWS), window branch by default, in one
process on one GPU.

At each T of --seqs (B=1, HQ=64, HK=4, D=128, bf16; window --window keys, or --branch compressed: the paper
config; --doc-len packs documents of that length), for rows in order and aligned, each with the autotuner's
dK/dV tiles, and aligned with each dK/dV config of --dkv-configs (BLOCK_M,BLOCK_N,warps,stages, taken through
range_attention.LAUNCH instead of the pick):
- backward ms (range_attention_bwd, split path: delta, dQ and dK/dV kernels), medians of
  triton.testing.do_bench over >= --reps timed runs, then all of them again alternated twice, so that their
  ratios do not carry the drift between timings made a while apart;
- dq, dk, dv against an fp32 run (rows in order): max abs and RMS-relative error; each variant passes if
  within 2x the in-order bf16 error (+ 1e-3 on the RMS-relative one). dq is the same kernel in every variant.
Prints a table and writes JSON to --out. From the repository root, on one GPU:

    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-aligned-rows.py --seqs 16384 65536 131072 \
        --out $OUT/aligned-rows.json
    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-aligned-rows.py --seqs 131072 \
        --dkv-configs 64,64,8,3 64,128,8,3 64,32,4,2 --out $OUT/aligned-rows-dkv.json

Without CUDA it runs under Triton's interpreter on small sizes, without timings, to check the script:
--seqs 1200 --q-heads 4 --kv-heads 2 --head-dim 32 --dtype float16 --window 200
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton and the kernels are imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import kernels.range_attention as ra  # noqa: E402
from range_experiments import (alternated, check_shape_arguments, errors, fixed_fp32_configs,  # noqa: E402
                               range_inputs, run_facts, shape_arguments, timed, within_bound, write)


def dkv_config(text: str):
    """BLOCK_M,BLOCK_N,warps,stages -> a triton.Config for range_attention.LAUNCH["dkv"]."""
    try:
        block_m, block_n, warps, stages = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--dkv-configs {text!r}: give BLOCK_M,BLOCK_N,warps,stages, e.g. 64,64,8,3") from None
    return ra._config(block_m, block_n, warps, stages)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--branch", default="window", choices=["window", "compressed"])
    shape_arguments(p, seqs=[16384, 65536, 131072])
    p.add_argument("--dkv-configs", type=dkv_config, nargs="*", default=[],
                   help="dK/dV configs BLOCK_M,BLOCK_N,warps,stages timed with aligned rows against the pick")
    args = p.parse_args()
    check_shape_arguments(p, args)
    return args


def one_length(seq: int, args, device) -> dict:
    inputs = range_inputs(args.branch, seq, args.window, args.doc_len, args.q_heads, args.kv_heads, args.head_dim,
                          device)
    ranges, scale = inputs["ranges"], inputs["scale"]
    q, k, v, do = (inputs[name] for name in ("q", "k", "v", "do"))
    res = {"T": seq, "TK": inputs["num_keys"], "HQ": args.q_heads, "HK": args.kv_heads, "D": args.head_dim}

    def backward(q, k, v, o, lse, do, aligned):
        delta = ra.attention_delta(o, do, None)[0]
        return ra.range_attention_bwd(q, k, v, lse, do, delta, *ranges, scale, False, aligned)

    with fixed_fp32_configs():
        o32, lse32 = ra.range_attention_fwd(q, k, v, *ranges[:2], scale)
        ref = backward(q, k, v, o32, lse32, do, False)
    del o32, lse32

    q, k, v, do = (x.to(getattr(torch, args.dtype)) for x in (q, k, v, do))
    o, lse = ra.range_attention_fwd(q, k, v, *ranges[:2], scale)
    variants = {"in_order": (False, None), "aligned": (True, None)}
    for config in args.dkv_configs:
        kw = config.kwargs
        variants[f"aligned {kw['BLOCK_M']}x{kw['BLOCK_N']} w{config.num_warps} s{config.num_stages}"] = (True, config)

    def run(variant):
        aligned, config = variants[variant]
        if config is not None:
            ra.LAUNCH["dkv"] = config
        try:
            return backward(q, k, v, o, lse, do, aligned)
        finally:
            ra.LAUNCH.pop("dkv", None)

    for name, (aligned, config) in variants.items():
        grads = run(name)  # compiles (and autotunes)
        line = {"errors": errors(grads, ref, ("dq", "dk", "dv"))}
        line["bwd_ms"] = timed(lambda: run(name), args.reps)
        if torch.cuda.is_available():
            line["config"] = str(ra._TUNED["dkv"].best_config if config is None else config)
        else:
            line["config"] = "interpreter"  # its fixed tiles, whatever --dkv-configs says
        line["within_bound"] = within_bound(line["errors"], res["in_order"]["errors"]) if res.get("in_order") else True
        res[name] = line
        print(f"T={seq} {name}: bwd {line['bwd_ms']:.2f} ms, config {line['config']}, errors {line['errors']}",
              flush=True)
    res["alternated_ms"], res["speedup_vs_in_order"] = alternated(
        {name: lambda name=name: run(name) for name in variants}, "in_order", args.reps, f"T={seq}")
    return res


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {**run_facts(REPO), "branch": args.branch, "window": args.window, "doc_len": args.doc_len,
              "lengths": []}
    for seq in args.seqs:
        report["lengths"].append(one_length(seq, args, device))
        write(report, args.out)

    print(f"\nsplit backward, {args.branch} branch (HQ={args.q_heads}, HK={args.kv_heads}, D={args.head_dim}, "
          f"{args.dtype}), commit {report['commit'][:10]}: dK/dV rows in order against aligned")
    print("x: in order's ms / the variant's, from the alternated timings")
    print(f"{'T':>7} {'variant':<26} {'ms':>8} {'x':>6}  within bound  dK/dV config")
    for r in report["lengths"]:
        for name, x in r["speedup_vs_in_order"].items():
            line = r[name]
            print(f"{r['T']:>7} {name:<26} {line['bwd_ms']:>8.2f} {x:>5.2f}x  {str(line['within_bound']):<12}  "
                  f"{line['config']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
