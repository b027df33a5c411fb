"""Issue 11: the range attention's split backward with its dK/dV kernel's rows in order against in the
aligned order (range_attention._range_attn_bwd_dkv, ALIGNED_ROWS), window branch by default, in one
process on one GPU.

At each T of --seqs (B=1, HQ=64, HK=4, D=128, bf16; window --window keys, or --branch compressed: the paper
config; --doc-len packs documents of that length), for rows in order and aligned:
- backward ms (range_attention_bwd, split path: delta, dQ and dK/dV kernels), medians of
  triton.testing.do_bench over >= --reps timed runs, then both again alternated twice (ABAB), so that their
  ratio does not carry the drift between timings made a while apart;
- dq, dk, dv against an fp32 run (rows in order): max abs and RMS-relative error; the aligned order passes
  if within 2x the in-order bf16 error (+ 1e-3 on the RMS-relative one). dq is the same kernel both ways.
Prints a table and writes JSON to --out. From the repository root, on one GPU:

    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-aligned-rows.py --seqs 16384 65536 131072 \
        --out $OUT/aligned-rows.json

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
from range_experiments import (check_shape_arguments, errors, fixed_fp32_configs, range_inputs,  # noqa: E402
                               run_facts, shape_arguments, timed, within_bound, write)

ORDERS = {"in_order": False, "aligned": True}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--branch", default="window", choices=["window", "compressed"])
    shape_arguments(p, seqs=[16384, 65536, 131072])
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
    for name, aligned in ORDERS.items():
        grads = backward(q, k, v, o, lse, do, aligned)  # compiles and autotunes
        line = {"errors": errors(grads, ref, ("dq", "dk", "dv"))}
        line["bwd_ms"] = timed(lambda: backward(q, k, v, o, lse, do, aligned), args.reps)
        line["config"] = str(ra._TUNED["dkv"].best_config) if torch.cuda.is_available() else "interpreter"
        res[name] = line
        print(f"T={seq} {name}: bwd {line['bwd_ms']:.2f} ms, config {line['config']}, errors {line['errors']}",
              flush=True)
    res["aligned"]["within_bound"] = within_bound(res["aligned"]["errors"], res["in_order"]["errors"])
    abab = {name: [] for name in ORDERS}
    for _ in range(2):
        for name, aligned in ORDERS.items():
            abab[name].append(timed(lambda: backward(q, k, v, o, lse, do, aligned), args.reps))
    res["abab_ms"] = abab
    res["speedup_abab"] = sum(abab["in_order"]) / sum(abab["aligned"])
    print(f"T={seq} ABAB: in order {abab['in_order']}, aligned {abab['aligned']} ms: "
          f"{res['speedup_abab']:.3f}x", flush=True)
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
    print(f"{'T':>7} {'in order ms':>11} {'aligned ms':>10} {'x':>6} {'ABAB x':>7}  within bound")
    for r in report["lengths"]:
        before, after = r["in_order"]["bwd_ms"], r["aligned"]["bwd_ms"]
        print(f"{r['T']:>7} {before:>11.2f} {after:>10.2f} {before / after:>5.2f}x {r['speedup_abab']:>6.2f}x  "
              f"{r['aligned']['within_bound']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
