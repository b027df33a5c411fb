"""Where one NSA layer's GPU time goes, kernel by kernel: the paper configuration of tools/bench_kernels.py
(same inputs) under torch.profiler, forward and forward+backward.

bench_kernels.py's breakdown times each branch alone; this counts every kernel the whole layer launches,
torch's own included (copies, concatenations, zeroed buffers, gradient sums), so that time outside the
branch kernels shows. Each kernel's backward time is its forward+backward time less its forward time
(bench_kernels.py's backward is the same difference). Times are CUDA kernel times summed per kernel name,
per layer call (averaged over --reps calls after a warm-up call); gaps between kernels are not counted,
so the sum is a little under bench_kernels.py's wall time, and the table prints both.

    python3 tools/profile_layer.py --seq 65536 --commit $(git rev-parse --short HEAD)

--kernels-root DIR imports `kernels` from another checkout (e.g. `git archive <commit> kernels` unpacked
in DIR), to profile an earlier version of the kernels on the same machine.
"""

import argparse
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.bench_kernels import Inputs, git_commit, gpu_kernels, median_ms, ours_paper  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=65536, help="tokens T")
    p.add_argument("--group", type=int, default=16, help="query heads per KV head")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--phi", choices=["mean", "mlp"], default="mean")
    p.add_argument("--reps", type=int, default=3, help="profiled layer calls per pass (after one warm-up)")
    p.add_argument("--top", type=int, default=25, help="kernels printed, by forward+backward time")
    p.add_argument("--kernels-root", help="import `kernels` from this directory instead of the repository")
    p.add_argument("--commit", help="git commit of the kernels (default: git rev-parse HEAD)")
    p.add_argument("--out", help="JSON path (default: print only)")
    return p.parse_args()


def kernel_ms(run, reps: int) -> dict[str, dict]:
    """{kernel name: {"ms": CUDA time per call of `run`, "launches": per call}} over `reps` calls."""
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    totals = defaultdict(lambda: {"ms": 0.0, "launches": 0.0})
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0:
            totals[event.key]["ms"] += event.self_device_time_total / 1e3 / reps
            totals[event.key]["launches"] += event.count / reps
    return dict(totals)


def short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def main():
    a = parse_args()
    nsa_mod = gpu_kernels("tools/profile_layer.py", a.kernels_root)

    inp = Inputs(a.seq, a.group * a.kv_heads, a.kv_heads, a.head_dim)
    forward, leaves = ours_paper(nsa_mod.native_sparse_attention, inp, a.phi)
    grad_out = torch.randn_like(forward())

    def forward_only():
        with torch.no_grad():
            forward()

    def step():
        torch.autograd.grad(forward(), leaves, grad_out)

    wall = {"fwd_ms": median_ms(forward_only, a.reps)["ms"], "fwd_bwd_ms": median_ms(step, a.reps)["ms"]}
    fwd, both = kernel_ms(forward_only, a.reps), kernel_ms(step, a.reps)
    rows = []
    for name in both.keys() | fwd.keys():
        f, fb = fwd.get(name, {"ms": 0.0, "launches": 0.0}), both.get(name, {"ms": 0.0, "launches": 0.0})
        rows.append({"kernel": name, "fwd_ms": f["ms"], "bwd_ms": fb["ms"] - f["ms"], "fwd_bwd_ms": fb["ms"],
                     "launches_fwd": f["launches"], "launches_fwd_bwd": fb["launches"]})
    rows.sort(key=lambda r: -r["fwd_bwd_ms"])
    sums = {k: sum(r[k] for r in rows) for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")}

    print(f"{torch.cuda.get_device_name()}, T={a.seq} G={a.group} HK={a.kv_heads} D={a.head_dim} phi {a.phi}, "
          f"kernels from {Path(nsa_mod.__file__).parent}; kernel ms per layer call, mean of {a.reps}")
    print(f"{'kernel':70s} {'fwd':>8} {'bwd':>8} {'fwd+bwd':>8} {'launches':>9}")
    for r in rows[: a.top]:
        print(f"{short(r['kernel']):70s} {r['fwd_ms']:8.2f} {r['bwd_ms']:8.2f} {r['fwd_bwd_ms']:8.2f} "
              f"{r['launches_fwd_bwd']:9.0f}")
    rest = rows[a.top:]
    if rest:
        print(f"{f'({len(rest)} more kernels)':70s} {sum(r['fwd_ms'] for r in rest):8.2f} "
              f"{sum(r['bwd_ms'] for r in rest):8.2f} {sum(r['fwd_bwd_ms'] for r in rest):8.2f}")
    print(f"{'sum of kernel times':70s} {sums['fwd_ms']:8.2f} {sums['bwd_ms']:8.2f} {sums['fwd_bwd_ms']:8.2f} "
          f"{sum(r['launches_fwd_bwd'] for r in rows):9.0f}")
    print(f"{'wall time (do_bench median)':70s} {wall['fwd_ms']:8.2f} "
          f"{wall['fwd_bwd_ms'] - wall['fwd_ms']:8.2f} {wall['fwd_bwd_ms']:8.2f}")
    if a.out:
        report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "host": platform.node(),
                  "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(a.commit),
                  "kernels": str(Path(nsa_mod.__file__).parent), "args": vars(a), "wall": wall, "kernel_sums": sums, "by_kernel": rows}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
