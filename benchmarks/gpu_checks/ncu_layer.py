"""One NSA layer's kernels, forward and backward, for Nsight Compute (issue 11: what the kernels wait on).

Runs the paper config's branches as tools/bench_kernels.py's breakdown does (bf16, B = 1, HK = 4, D = 128,
random inputs, top-n by the sum score), three times: twice to compile and autotune, then once inside
cudaProfilerStart/Stop, so `ncu --profile-from-start off` sees each kernel of one warm pass once.
benchmarks/gpu_checks/ncu_layer.sh runs it under ncu and prints each kernel's duration, its share of
the peak of compute and of memory, its occupancy and its warps' largest stall reasons.

    PYTHONPATH=$PWD python3 benchmarks/gpu_checks/ncu_layer.py --seq 8192 --group 16
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from bench_kernels import PAPER, Inputs  # noqa: E402
from kernels import nsa  # noqa: E402
from kernels.compression.naive import mean_compress  # noqa: E402


def one_pass(ops, inp: Inputs):
    l, s, ls, n, w = (PAPER[k] for k in ("block_size", "stride", "selection_block", "num_selected", "window"))
    q, (k, v) = inp.q, inp.kv[1]
    k_cmp = mean_compress(k, l, s).detach().requires_grad_()
    v_cmp = mean_compress(v, l, s).detach().requires_grad_()
    o_cmp, lse = ops.compressed(q, k_cmp, v_cmp, l, s)
    with torch.no_grad():
        blocks = ops.select(q, k_cmp, lse.detach(), l, s, ls, n)
    o_slc, _ = ops.selected(q, k, v, blocks, ls)
    o_win, _ = ops.window(q, k, v, w)
    for o in (o_cmp, o_slc, o_win):
        o.backward(torch.ones_like(o))
    torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    a = p.parse_args()
    ops = nsa.branch_ops("triton")
    inp = Inputs(a.seq, a.group * a.kv_heads, a.kv_heads, 128)
    for _ in range(2):
        one_pass(ops, inp)
    torch.cuda.cudart().cudaProfilerStart()
    one_pass(ops, inp)
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled one pass", flush=True)


if __name__ == "__main__":
    main()
