"""Which one-pass backward config stalls on the GPU (issue 11)? The window test's case (B=2, T=131,
G=1, Dk=32, Dv=16, window 24) run once per (dtype, config, chunking), each in its own process
bounded by a timeout, gradients checked against the split backward.

    python benchmarks/gpu_checks/onepass_stall.py            # the table
    python benchmarks/gpu_checks/onepass_stall.py --one ...  # one case (what the table runs)
"""

import argparse
import subprocess
import sys
import time

CONFIGS = [(64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 1)]


def one_case(dtype_name, group, tiles, max_chunks):
    import torch

    import kernels.range_attention as ra
    import kernels.window_attention.triton as window_triton
    from kernels.window_attention.triton import window_attention_triton

    block_m, block_n, warps, stages = tiles

    def launch(name, device, grid, *args, **consts):
        if name != "onepass":
            return ra._TUNED[name][grid](*args, **consts)
        chosen = dict(BLOCK_M=block_m, BLOCK_N=block_n)
        ra._KERNELS[name][grid(chosen)](*args, **consts, **chosen, num_warps=warps, num_stages=stages)

    ra._launch = launch
    ra._MAX_CHUNKS = max_chunks
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(group)
    heads = 1 if group == 16 else 2
    leaves = [torch.randn(2, 131, group * heads, 32), torch.randn(2, 131, heads, 32), torch.randn(2, 131, heads, 16)]
    leaves = [x.to("cuda", dtype).requires_grad_() for x in leaves]
    o, lse = window_attention_triton(*leaves, window=24)
    do = torch.randn_like(o)
    grads = {}
    for one_pass in (False, True):
        window_triton.ONE_PASS_BACKWARD = one_pass
        start = time.perf_counter()
        grads[one_pass] = torch.autograd.grad(o, leaves, do, retain_graph=True)
        torch.cuda.synchronize()
        took = time.perf_counter() - start
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads[True], grads[False]))
    print(f"ok {took * 1e3:.1f} ms, max |one pass - split| {err:.2e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=7)
    parser.add_argument("--timeout", type=float, default=25)
    args = parser.parse_args()
    if args.one:
        dtype, group, *rest = args.one
        one_case(dtype, int(group), tuple(int(x) for x in rest[:4]), int(rest[4]))
        return
    print(f"{'dtype':>9} {'G':>3} {'tiles':>16} {'chunks':>6}  result")
    cases = [("float32", 1, tiles, chunks) for tiles in CONFIGS for chunks in (64, 1)]
    cases += [("bfloat16", 1, tiles, 64) for tiles in CONFIGS]
    for dtype, group, tiles, chunks in cases:
        cmd = [sys.executable, __file__, "--one", dtype, str(group), *map(str, tiles), str(chunks)]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = (done.stdout + done.stderr).strip().splitlines()
            result = lines[-1] if lines else f"rc={done.returncode}"
        except subprocess.TimeoutExpired:
            result = f"STALL (killed after {args.timeout:.0f} s)"
        print(f"{dtype:>9} {group:>3} {str(tiles):>16} {chunks:>6}  {result}"
              f"  [{time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
