"""Issue 11: the range attention's forward, split-backward dQ or dK/dV, or one-pass backward kernel on launch configs
outside the autotuner's list (kernels/range_attention.py _CONFIGS), against the autotuner's pick, in one process on
one GPU.

At each T of --seqs (B=1, HQ=64, HK=4, D=128, bf16; --branch window (default: --window keys) or compressed, the
paper config; --doc-len packs documents of that length), --kernel fwd times range_attention_fwd, --kernel dq and dkv
the split backward (range_attention_bwd: delta, dQ and dK/dV kernels; only the named kernel's launch changes) and
--kernel onepass the one-pass backward, each with the autotuner's pick and with every config of --configs
(BLOCK_M,BLOCK_N,warps,stages, and ",r" for the dK/dV and one-pass kernels with K and V in registers, KV_REGS;
taken through range_attention.LAUNCH):
- ms, medians of triton.testing.do_bench over >= --reps timed runs, then every variant again alternated twice,
  so that the ratios do not carry the drift between timings made a while apart;
- the outputs (o and lse, or dq, dk, dv) against an fp32 run: max abs and RMS-relative error; a config passes if
  within 2x the pick's own error (+ 1e-3 on the RMS-relative one).
A config the GPU rejects (too much shared memory) is reported and skipped. Prints a table and writes JSON to
--out. From the repository root, on one GPU (candidates that an offline sm_90a compile shows without spills at
D = 128; the autotuner tries 128,64,8,3 and 64,64,4,2 for both kernels):

    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-range-configs.py --kernel fwd \\
        --configs 128,64,8,2 128,128,8,2 64,64,4,3 64,32,4,3 --out $OUT/range-configs-window-fwd.json

Without CUDA it runs under Triton's interpreter on small sizes, without timings, to check the script:
--seqs 1200 --q-heads 4 --kv-heads 2 --head-dim 32 --dtype float16 --window 200 --configs 64,32,4,2
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

OUTPUTS = {"fwd": ("o", "lse"), "dq": ("dq", "dk", "dv"), "dkv": ("dq", "dk", "dv"), "onepass": ("dq", "dk", "dv")}


def launch_config(text: str):
    """BLOCK_M,BLOCK_N,warps,stages[,r] -> a triton.Config for range_attention.LAUNCH (r: KV_REGS)."""
    fields = text.split(",")
    kv_regs = fields[-1] == "r"
    try:
        block_m, block_n, warps, stages = (int(x) for x in fields[:4 if kv_regs else None])
        if kv_regs and len(fields) != 5:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--configs {text!r}: give BLOCK_M,BLOCK_N,warps,stages, e.g. 128,64,8,2, or 32,64,4,2,r for K and V "
            "in registers") from None
    return ra._config(block_m, block_n, warps, stages, kv_regs)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--branch", default="window", choices=["window", "compressed"])
    p.add_argument("--kernel", default="fwd", choices=sorted(OUTPUTS))
    shape_arguments(p, seqs=[16384, 131072])
    p.add_argument("--configs", type=launch_config, nargs="+", required=True,
                   help="configs BLOCK_M,BLOCK_N,warps,stages[,r] timed against the autotuner's pick")
    args = p.parse_args()
    check_shape_arguments(p, args)
    if args.kernel in ("fwd", "dq") and any(c.kwargs.get("KV_REGS") for c in args.configs):
        p.error(f"--configs ...,r (K and V in registers) is for --kernel dkv or onepass, not --kernel {args.kernel}: "
                "drop the ,r")
    return args


def config_name(config) -> str:
    kw = config.kwargs
    regs = " kv-regs" if kw.get("KV_REGS") else ""
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{config.num_warps} s{config.num_stages}{regs}"


def one_length(seq: int, args, device) -> dict:
    inputs = range_inputs(args.branch, seq, args.window, args.doc_len, args.q_heads, args.kv_heads, args.head_dim,
                          device)
    ranges, scale = inputs["ranges"], inputs["scale"]
    q, k, v, do = (inputs[name] for name in ("q", "k", "v", "do"))
    res = {"T": seq, "TK": inputs["num_keys"], "HQ": args.q_heads, "HK": args.kv_heads, "D": args.head_dim}

    def forward(q, k, v):
        return ra.range_attention_fwd(q, k, v, *ranges[:2], scale)

    def backward(q, k, v, o, lse, do):
        delta = ra.attention_delta(o, do, None)[0]
        # the window branch's dK/dV rows aligned, as training runs them (ALIGNED_ROWS in kernels/window_attention)
        return ra.range_attention_bwd(q, k, v, lse, do, delta, *ranges, scale, args.kernel == "onepass",
                                      args.branch == "window")

    with fixed_fp32_configs():
        o32, lse32 = forward(q, k, v)
        ref = (o32, lse32) if args.kernel == "fwd" else backward(q, k, v, o32, lse32, do)
    if args.kernel == "fwd":  # rows that see no key have lse -inf in both: compared as 0
        ref = (ref[0], torch.where(torch.isfinite(ref[1]), ref[1], 0.0))
    q, k, v, do = (x.to(getattr(torch, args.dtype)) for x in (q, k, v, do))
    o, lse = forward(q, k, v)

    def run(config):
        if config is not None:
            ra.LAUNCH[args.kernel] = config
        try:
            if args.kernel != "fwd":
                return backward(q, k, v, o, lse, do)
            out, out_lse = forward(q, k, v)
            return out, torch.where(torch.isfinite(out_lse), out_lse, 0.0)
        finally:
            ra.LAUNCH.pop(args.kernel, None)

    variants = {"pick": None, **{config_name(c): c for c in args.configs}}
    for name, config in list(variants.items()):
        try:
            outputs = run(config)  # compiles (and, for the pick, autotunes)
        except Exception as error:  # e.g. out of shared memory on this GPU
            print(f"T={seq} {name}: failed: {str(error).splitlines()[0][:200]}", flush=True)
            res[name] = {"failed": str(error)[:500]}
            del variants[name]
            continue
        line = {"errors": errors(outputs, ref, OUTPUTS[args.kernel]), "ms": timed(lambda: run(config), args.reps)}
        if config is None:
            line["config"] = str(ra._TUNED[args.kernel].best_config) if torch.cuda.is_available() else "interpreter"
        else:
            line["config"] = name
        line["within_bound"] = within_bound(line["errors"], res["pick"]["errors"]) if "pick" in res else True
        res[name] = line
        print(f"T={seq} {name}: {line['ms']:.3f} ms, config {line['config']}, errors {line['errors']}", flush=True)
    res["alternated_ms"], res["speedup_vs_pick"] = alternated(
        {name: lambda config=config: run(config) for name, config in variants.items()}, "pick", args.reps, f"T={seq}")
    return res


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {**run_facts(REPO), "branch": args.branch, "kernel": args.kernel, "window": args.window,
              "doc_len": args.doc_len, "lengths": []}
    for seq in args.seqs:
        report["lengths"].append(one_length(seq, args, device))
        write(report, args.out)

    timed_part = {"fwd": "forward", "dq": "split backward (dQ's launch varied)",
                  "dkv": "split backward (dK/dV's launch varied)", "onepass": "one-pass backward"}[args.kernel]
    print(f"\n{timed_part}, {args.branch} branch (HQ={args.q_heads}, HK={args.kv_heads}, D={args.head_dim}, "
          f"{args.dtype}), commit {report['commit'][:10]}: configs against the autotuner's pick")
    print("x: the pick's ms / the variant's, from the alternated timings")
    print(f"{'T':>7} {'variant':<18} {'ms':>8} {'x':>6}  within bound  config")
    for r in report["lengths"]:
        for name, x in r["speedup_vs_pick"].items():
            line = r[name]
            print(f"{r['T']:>7} {name:<18} {line['ms']:>8.3f} {x:>5.2f}x  {str(line['within_bound']):<12}  "
                  f"{line['config']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
