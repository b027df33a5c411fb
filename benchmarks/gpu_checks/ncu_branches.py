"""Each NSA branch's kernels once, between cudaProfilerStart and Stop, for Nsight Compute (issue 11).

Builds tools/bench_kernels.py's inputs (bf16, B=1, paper config, phi mean), runs every branch forward
and backward twice outside the profiled region (compiles and autotuning), then once inside it. Run
under `ncu --profile-from-start off` (benchmarks/gpu_checks/ncu_branches.sh does); alone it just runs.

    python3 benchmarks/gpu_checks/ncu_branches.py --seq 131072 --q-heads 64 --kv-heads 4 --head-dim 128
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.bench_kernels import PAPER, Inputs  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--q-heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    return p.parse_args()


def main():
    a = parse_args()
    from kernels.compression.naive import mean_compress
    from kernels.nsa import branch_ops

    ops = branch_ops("triton")
    l, s, ls, n, w = (PAPER[k] for k in ("block_size", "stride", "selection_block", "num_selected", "window"))
    inp = Inputs(a.seq, a.q_heads, a.kv_heads, a.head_dim)
    q, (k, v) = inp.q, inp.kv[1]
    with torch.no_grad():
        k_cmp = mean_compress(k, l, s).requires_grad_()
        v_cmp = mean_compress(v, l, s).requires_grad_()
        _, lse = ops.compressed(q, k_cmp, v_cmp, l, s)
        blocks = ops.select(q, k_cmp, lse, l, s, ls, n)
    branches = {
        "compressed": (lambda: ops.compressed(q, k_cmp, v_cmp, l, s)[0], [q, k_cmp, v_cmp]),
        "selected": (lambda: ops.selected(q, k, v, blocks, ls)[0], [q, k, v]),
        "window": (lambda: ops.window(q, k, v, w)[0], [q, k, v]),
    }
    grad = torch.randn_like(q)

    def run_all():
        with torch.no_grad():
            ops.select(q, k_cmp, lse, l, s, ls, n)
        for forward, leaves in branches.values():
            torch.autograd.grad(forward(), leaves, grad)

    for _ in range(2):
        run_all()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    run_all()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled T={a.seq} HQ={a.q_heads} HK={a.kv_heads} D={a.head_dim}: top-n, then each of "
          f"{', '.join(branches)} forward and backward", flush=True)


if __name__ == "__main__":
    main()
