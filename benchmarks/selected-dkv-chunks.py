"""Issue 11: selected attention's dK/dV with the inverted index's lists cut by token chunks (atomic fp32
additions; kernels/selected_attention/triton.py, DKV_TOKEN_CHUNK) against whole lists (a partial a segment,
summed in order), in one process on one GPU.

At each T of --seqs (B=1, HQ=64, HK=4, D=128, bf16; the picks top-n's on the random inputs, as
tools/bench_kernels.py's breakdown makes them): the selected branch's whole backward (delta, dQ, inverted
index, dK/dV) per chunk size of --chunks (0: whole lists), medians of triton.testing.do_bench over >= --reps
timed runs, the sizes timed in turn twice (ABAB...), and each size's dk, dv against the whole lists' (max
abs and RMS-relative difference: the additions' order only). Prints a table and writes JSON to --out.

    PYTHONUNBUFFERED=1 python3 benchmarks/selected-dkv-chunks.py --out $OUT/selected-dkv-chunks.json
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kernels.selected_attention.triton as selected  # noqa: E402
from kernels.block_selection.triton import select_blocks_triton  # noqa: E402
from kernels.compressed_attention.triton import compressed_attention_triton  # noqa: E402
from kernels.compression.naive import mean_compress  # noqa: E402
from tools.bench_kernels import PAPER, git_commit, median_ms  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 65536, 131072])
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 2048, 4096, 8192])
    p.add_argument("--q-heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--commit")
    p.add_argument("--out")
    return p.parse_args()


def main():
    a = parse_args()
    l, s, ls, n = (PAPER[k] for k in ("block_size", "stride", "selection_block", "num_selected"))
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "host": platform.node(),
              "torch": torch.__version__, "commit": git_commit(a.commit), "args": vars(a), "rows": []}
    for T in a.seqs:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, T, h, a.head_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
                   for h in (a.q_heads, a.kv_heads, a.kv_heads))
        with torch.no_grad():
            k_cmp = mean_compress(k, l, s)
            _, lse = compressed_attention_triton(q, k_cmp, mean_compress(v, l, s), l, s)
            blocks = select_blocks_triton(q, k_cmp, lse, l, s, ls, n)
        o, _ = selected.selected_attention_triton(q, k, v, blocks, ls)
        grad = torch.randn_like(o)

        def backward():
            return torch.autograd.grad(o, [q, k, v], grad, retain_graph=True)

        results, grads = {}, {}
        for rnd in range(2):
            for chunk in a.chunks:
                selected.DKV_TOKEN_CHUNK = chunk
                results.setdefault(chunk, []).append(median_ms(backward, a.reps)["ms"])
                if rnd == 0:
                    grads[chunk] = [g.float() for g in backward()[1:]]
        selected.DKV_TOKEN_CHUNK = 0
        base = min(results[a.chunks[0]])
        for chunk in a.chunks:
            diff = {name: {"max_abs": (g - g0).abs().max().item(),
                           "rms_rel": ((g - g0).pow(2).mean().sqrt() / g0.pow(2).mean().sqrt()).item()}
                    for name, g, g0 in zip(("dk", "dv"), grads[chunk], grads[a.chunks[0]])}
            row = {"T": T, "chunk": chunk, "bwd_ms": results[chunk], "x_whole": base / min(results[chunk]),
                   "diff_to_whole": diff}
            report["rows"].append(row)
            print(f"T={T:7d} chunk={chunk:5d}  bwd ms {' / '.join(f'{t:7.2f}' for t in results[chunk])}  "
                  f"x whole {row['x_whole']:.3f}  dk rms-rel {diff['dk']['rms_rel']:.1e}  "
                  f"dv rms-rel {diff['dv']['rms_rel']:.1e}", flush=True)
        del q, k, v, o, grad, grads
        torch.cuda.empty_cache()
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
