"""Issue 11: the range attention's one-pass backward (atomic dQ) against its split backward (dQ and
dK/dV kernels), compressed or window branch (--branch), in one process on one GPU.

At each T of --seqs (B=1, HQ=64, HK=4, D=128, bf16 (--dtype); compressed branch: paper config l=32,
d=16, TK = (T - 32) // 16 + 1 compressed keys, ranges from compressed_ranges; window branch: TK = T
keys, window --window, ranges from window_ranges; --doc-len packs documents of that length):
- forward ms (one kernel, shared by both paths), backward ms of each path (range_attention_bwd:
  delta, kernels, buffers, casts), medians of triton.testing.do_bench over >= --reps timed runs; then
  both timed again in alternating order (ABAB), so that their ratio does not carry the drift between
  timings made a while apart;
- each path's dq, dk, dv against an fp32 run of the split path: max abs and RMS-relative error; a
  path passes if both are within 2x the split bf16 path's own error (+ 1e-3 on the RMS-relative one);
- each path's run-to-run max abs difference (0 for the split path; the one-pass path's fp32 atomics
  add in any order) and the peak memory of each backward above what was allocated before it;
- at the last T, the one-pass backward at other chunk counts (range_attention.ONEPASS_CHUNKING).
Prints a table last and writes JSON to --out (after each T too). From the repository root, on one
H200 (about a minute a branch at two lengths, most of it compiling and autotuning; the proof model's
heads: --q-heads 16 --kv-heads 1 --head-dim 64, with --doc-len 2048 or 8192 for its stages' documents):

    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-range-bwd.py --out $OUT/range-bwd.json
    PYTHONUNBUFFERED=1 python3 benchmarks/kernels-exp-range-bwd.py --branch window --seqs 16384 131072 \
        --chunking --out $OUT/range-bwd-window.json

The branches' choice of path (ONE_PASS_BACKWARD in kernels/compressed_attention/triton.py and
kernels/window_attention/triton.py) rests on these figures (benchmarks/range-bwd-*.json).

Without CUDA it runs under Triton's interpreter (TRITON_INTERPRET=1) on small sizes, without timings,
to check the script: --seqs 1200 --q-heads 4 --kv-heads 2 --head-dim 32 --dtype float16 --chunking 1
(with --branch window --window 200 too).
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


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import kernels.range_attention as ra  # noqa: E402
from range_experiments import (check_shape_arguments, errors, fixed_fp32_configs, range_inputs,  # noqa: E402
                               run_facts, shape_arguments, timed, within_bound, write)

PATHS = {"split": False, "onepass": True}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--branch", default="compressed", choices=["compressed", "window"])
    shape_arguments(p, seqs=[65536, 131072])
    p.add_argument("--chunking", type=int, nargs="*", default=[1, 16],
                   help="ONEPASS_CHUNKING values timed at the last T besides the default")
    args = p.parse_args()
    check_shape_arguments(p, args)
    return args


@contextmanager
def chunking_set(chunking: int):
    saved = ra.ONEPASS_CHUNKING
    ra.ONEPASS_CHUNKING = chunking
    try:
        yield
    finally:
        ra.ONEPASS_CHUNKING = saved


def peak_gib(fn) -> float:
    """Peak memory of one call above what was allocated before it (GiB); NaN without CUDA."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def one_length(seq: int, args, device):
    """This length's figures, and its bf16 inputs with a backward(q, k, v, o, lse, do) for more timings."""
    t0 = time.time()
    inputs = range_inputs(args.branch, seq, args.window, args.doc_len, args.q_heads, args.kv_heads, args.head_dim,
                          device)
    num_keys, ranges, scale = inputs["num_keys"], inputs["ranges"], inputs["scale"]
    q, k, v, do = (inputs[name] for name in ("q", "k", "v", "do"))
    res = {"T": seq, "TK": num_keys, "HQ": args.q_heads, "HK": args.kv_heads, "D": args.head_dim}

    def backward(q, k, v, o, lse, do, one_pass):
        return ra.range_attention_bwd(q, k, v, lse, do, ra.attention_delta(o, do, None)[0], *ranges, scale, one_pass)

    with fixed_fp32_configs():
        o32, lse32 = ra.range_attention_fwd(q, k, v, *ranges[:2], scale)
        ref = backward(q, k, v, o32, lse32, do, False)
    del o32, lse32
    res["fp32_reference_s"] = time.time() - t0
    print(f"T={seq} TK={num_keys}: fp32 reference {res['fp32_reference_s']:.1f} s", flush=True)

    q, k, v, do = (x.to(getattr(torch, args.dtype)) for x in (q, k, v, do))
    o, lse = ra.range_attention_fwd(q, k, v, *ranges[:2], scale)
    res["fwd_ms"] = timed(lambda: ra.range_attention_fwd(q, k, v, *ranges[:2], scale), args.reps)
    for name, one_pass in PATHS.items():
        t1 = time.time()
        grads = backward(q, k, v, o, lse, do, one_pass)  # compiles and autotunes
        line = {"first_call_s": time.time() - t1, "errors": errors(grads, ref, ("dq", "dk", "dv"))}
        line["bwd_ms"] = timed(lambda: backward(q, k, v, o, lse, do, one_pass), args.reps)
        line["peak_gib"] = peak_gib(lambda: backward(q, k, v, o, lse, do, one_pass))
        again = backward(q, k, v, o, lse, do, one_pass)
        line["rerun_max_abs_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads, again))
        line["config"] = str(ra._TUNED["onepass" if one_pass else "dkv"].best_config) \
            if torch.cuda.is_available() else "interpreter"
        del grads, again
        res[name] = line
        print(f"  {name}: bwd {line['bwd_ms']:.2f} ms, first call {line['first_call_s']:.1f} s, "
              f"errors {json.dumps(line['errors'])}", flush=True)
    res["onepass"]["within_bound"] = within_bound(res["onepass"]["errors"], res["split"]["errors"])
    abab = {name: [] for name in PATHS}
    for _ in range(2):
        for name, one_pass in PATHS.items():
            abab[name].append(timed(lambda: backward(q, k, v, o, lse, do, one_pass), args.reps))
    res["abab_ms"] = abab
    res["onepass_speedup_abab"] = sum(abab["split"]) / sum(abab["onepass"])
    print(f"  ABAB: split {abab['split']} one pass {abab['onepass']} ms: one pass "
          f"{res['onepass_speedup_abab']:.3f}x split", flush=True)
    return res, (q, k, v, o, lse, do, backward)


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {**run_facts(REPO), "branch": args.branch, "window": args.window, "doc_len": args.doc_len,
              "lengths": []}
    for seq in args.seqs:
        res, last = one_length(seq, args, device)
        report["lengths"].append(res)
        write(report, args.out)
    q, k, v, o, lse, do, backward = last
    sweep = {}
    for chunking in args.chunking:
        with chunking_set(chunking):
            sweep[chunking] = timed(lambda: backward(q, k, v, o, lse, do, True), args.reps)
        print(f"  onepass, ONEPASS_CHUNKING={chunking}: {sweep[chunking]:.2f} ms", flush=True)
    report["chunking_sweep_ms"] = {"T": args.seqs[-1], "default": ra.ONEPASS_CHUNKING, **sweep}
    write(report, args.out)

    print(f"\nrange attention backward, {args.branch} branch (HQ={args.q_heads}, HK={args.kv_heads}, "
          f"D={args.head_dim}, {args.dtype}), commit {report['commit'][:10]}")
    print("max abs error against fp32, one-pass / split (the bound is 2x split); ok: within the bound; "
          "speedup: split ms / one-pass ms, then the same in the ABAB timings")
    print(f"{'T':>7} {'TK':>6} {'fwd ms':>7} {'split ms':>9} {'onepass ms':>10} {'speedup':>7} {'ABAB':>6}  "
          + "  ".join(f"{t + ' err':>17}" for t in ("dq", "dk", "dv")) + "  ok")
    for r in report["lengths"]:
        split, one = r["split"], r["onepass"]
        errs = "  ".join(f"{one['errors'][t]['max_abs']:>8.1e}/{split['errors'][t]['max_abs']:<8.1e}"
                         for t in ("dq", "dk", "dv"))
        print(f"{r['T']:>7} {r['TK']:>6} {r['fwd_ms']:>7.2f} {split['bwd_ms']:>9.2f} {one['bwd_ms']:>10.2f} "
              f"{split['bwd_ms'] / one['bwd_ms']:>6.2f}x {r['onepass_speedup_abab']:>5.2f}x  {errs}  "
              f"{one['within_bound']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
