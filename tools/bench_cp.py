"""NSA's core attention under context parallelism against the dense baseline: across GPUs, or one rank's
share on one GPU.

Across GPUs (torchrun, NCCL): every rank runs nsa_context_parallel (its zigzag shard, phi as an MLP,
separate K/V) and the dense baseline (dense_context_parallel: all-gathered K/V, cuDNN, no mask), and the
script reports the slowest rank's forward and forward+backward, the peak memory, and bytes and exposed
seconds per collective (CommStats), with the selection gather on its own process group and, for
comparison, on the CP group itself:

    torchrun --standalone --nproc_per_node 2 tools/bench_cp.py --distributed --seq-lens 262144 \
        --out benchmarks/cp_nccl_2gpu.json

One GPU, per rank (the original mode, below):

For each sequence length T and CP size P, every timed rank r runs exactly the compute it would run in
nsa_context_parallel: compress its two zigzag chunks (with halos), compressed attention and top-n of its
queries against all T/d compressed tokens, selected attention against the whole (gathered) raw K/V, and
window attention over halo + chunk. The baseline, timed in the same run, is the same rank's share of
dense causal attention (cuDNN SDPA over the keys up to its chunks), i.e. what ring attention computes.
Beside the times: bytes sent per layer per rank (forward + backward) by ours and by ring attention.

    python3 tools/bench_cp.py --seq-lens 262144 1048576 --cp 1 2 4 8 --out benchmarks/cp_h200.json
"""

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.compression import mlp_compress  # noqa: E402
from kernels.nsa import branch_ops  # noqa: E402
from nsa_dist.attention import Compression  # noqa: E402
from nsa_dist.parallel import (CommStats, ZigzagLayout, dense_context_parallel, nsa_context_parallel,  # noqa: E402
                               nsa_cp_bytes, ring_attention_bytes, split_zigzag)
from nsa_dist.parallel.groups import twin_groups  # noqa: E402
from nsa_dist.parallel.layout import halo_len  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[262144, 1048576])
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--selection-block", type=int, default=64)
    p.add_argument("--num-selected", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--impl", default="triton", choices=["triton", "reference"])
    p.add_argument("--device", default="cuda", help="cpu only for a quick smoke run of this script")
    p.add_argument("--iters", type=int, default=2, help="timed runs per measurement (after one warmup)")
    p.add_argument("--all-ranks", action="store_true", help="time every rank, not only the first and last")
    p.add_argument("--out", default="benchmarks/cp_h200.json")
    p.add_argument("--distributed", action="store_true", help="run across GPUs under torchrun (see above)")
    p.add_argument("--dense-max-seq-len", type=int, default=1 << 20, help="longest T the dense baseline runs at")
    return p.parse_args()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over iters runs after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def nsa_rank_share(a, ops, full: dict, layout: ZigzagLayout):
    """Forward + backward of rank `layout.cp_rank`'s queries against what it would hold after the gathers."""
    c, halo = layout.chunk_len, halo_len(a.block_size, a.stride, a.window)
    sizes = (a.block_size, a.stride)
    phi_k = functools.partial(mlp_compress, block_size=a.block_size, stride=a.stride, **full["phi_k"])
    phi_v = functools.partial(mlp_compress, block_size=a.block_size, stride=a.stride, **full["phi_v"])
    total = 0.0
    for start in layout.chunk_starts:
        # phi on the blocks ending in this chunk; the attention below reads every rank's (gathered) blocks
        span = slice(max(0, start - (a.block_size - a.stride)), start + c)
        total = total + phi_k(full["k_cmp"][:, span]).float().sum() + phi_v(full["v_cmp"][:, span]).float().sum()
    k_cmp, v_cmp = full["k_cmp_all"], full["v_cmp_all"]
    for i, start in enumerate(layout.chunk_starts):
        q = full["q"][:, start : start + c]
        gates = full["gates"][:, start : start + c]
        o_cmp, lse = ops.compressed(q, k_cmp, v_cmp, *sizes, q_start=start)
        blocks = ops.select(q.detach(), k_cmp.detach(), lse.detach(), *sizes, a.selection_block, a.num_selected,
                            q_start=start)
        o_slc, _ = ops.selected(q, full["k_slc"], full["v_slc"], blocks, a.selection_block, q_start=start)
        k_start = max(0, start - halo)
        o_win, _ = ops.window(q, full["k_win"][:, k_start : start + c], full["v_win"][:, k_start : start + c],
                              a.window, q_start=start, k_start=k_start)
        g = gates.float().unsqueeze(-1)
        out = g[..., 0, :] * o_cmp.float() + g[..., 1, :] * o_slc.float() + g[..., 2, :] * o_win.float()
        total = total + (out * full["grad"][:, : out.shape[1]]).sum()
    total.backward()


def dense_rank_share(full: dict, layout: ZigzagLayout):
    """Ring attention's compute for this rank: each local chunk against every earlier token (no mask) and
    against itself (causal). Ring attention merges the two partial results by their lse, which costs
    little next to them, so the two cuDNN calls are what is timed."""
    c = layout.chunk_len
    total = 0.0

    def attend(q, k, v, causal):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal, enable_gqa=True)
        return out.float().sum()

    for start in layout.chunk_starts:
        q = full["q"][:, start : start + c]
        total = total + attend(q, full["k_slc"][:, start : start + c], full["v_slc"][:, start : start + c], True)
        if start:
            total = total + attend(q, full["k_slc"][:, :start], full["v_slc"][:, :start], False)
    total.backward()


def make_full(a, seq_len: int) -> dict:
    dev, dt = a.device, torch.bfloat16 if a.device == "cuda" else torch.float32
    hq, hk, d = a.q_heads, a.kv_heads, a.head_dim

    def randn(*shape, grad=True):
        return torch.randn(*shape, device=dev, dtype=dt).requires_grad_(grad)

    full = {"q": randn(1, seq_len, hq, d), "gates": torch.rand(1, seq_len, hq, 3, device=dev, dtype=dt).requires_grad_()}
    for b in ("cmp", "slc", "win"):
        full[f"k_{b}"], full[f"v_{b}"] = randn(1, seq_len, hk, d), randn(1, seq_len, hk, d)
    for name in ("phi_k", "phi_v"):
        full[name] = {"pos_emb": randn(a.block_size, d), "w1": randn(d, a.block_size * d) * 0.01,
                      "b1": randn(d), "w2": randn(d, d) * 0.05, "b2": randn(d)}
        full[name] = {k: v.detach().requires_grad_() for k, v in full[name].items()}
    with torch.no_grad():
        full["k_cmp_all"] = mlp_compress(full["k_cmp"], a.block_size, a.stride, **full["phi_k"]).requires_grad_()
        full["v_cmp_all"] = mlp_compress(full["v_cmp"], a.block_size, a.stride, **full["phi_v"]).requires_grad_()
    full["grad"] = torch.randn(1, seq_len // 2, hq, d, device=dev)  # upstream gradient of a chunk's output
    return full


def cuda_timed(fn, iters: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over iters runs (after warmup), the slowest rank's for each run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        elapsed = torch.tensor([(time.perf_counter() - start) * 1e3], device="cuda")
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return sorted(times)[len(times) // 2]


def local_inputs(a, seq_len: int, rank: int, world: int) -> dict:
    """This rank's zigzag shard of one layer's bf16 inputs (the same full tensors on every rank)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hq, hk, d = a.q_heads, a.kv_heads, a.head_dim

    def shard(*shape, rand=torch.randn):
        full = rand(1, seq_len, *shape, device="cuda", generator=g, dtype=torch.bfloat16)
        return (split_zigzag(full, rank, world) if world > 1 else full).contiguous()

    x = {"q": shard(hq, d), "gates": shard(hq, 3, rand=torch.rand), "upstream": shard(hq, d)}
    for b in ("cmp", "slc", "win"):
        x[f"k_{b}"], x[f"v_{b}"] = shard(hk, d), shard(hk, d)
    return x


def distributed_main(a) -> None:
    local_gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(local_gpu)
    dist.init_process_group("nccl", device_id=local_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    twin = twin_groups(group)
    torch.manual_seed(0)
    phi = [Compression("mlp", a.block_size, a.stride, a.head_dim).cuda().bfloat16() for _ in range(2)]
    sizes = dict(block_size=a.block_size, stride=a.stride, selection_block=a.selection_block,
                 num_selected=a.num_selected, window=a.window, impl=a.impl)
    rows = []
    for seq_len in a.seq_lens:
        x = local_inputs(a, seq_len, rank, world)
        leaves = {k: v.requires_grad_() for k, v in x.items() if k != "upstream"}

        def nsa(gather_group, stats=None):
            kv = [(leaves[f"k_{b}"], leaves[f"v_{b}"]) for b in ("cmp", "slc", "win")]
            return nsa_context_parallel(leaves["q"], *kv, leaves["gates"], *phi, group=group,
                                        gather_group=gather_group, stats=stats, **sizes).output

        def dense(stats=None):
            return dense_context_parallel(leaves["q"], leaves["k_slc"], leaves["v_slc"], group=group, stats=stats)

        variants = {"nsa": lambda stats=None: nsa(twin, stats)}
        if world > 1:
            variants["nsa, gather on the CP group"] = lambda stats=None: nsa(None, stats)
        if seq_len <= a.dense_max_seq_len:
            variants["dense"] = dense
        for name, run in variants.items():
            def forward():
                with torch.no_grad():
                    run()

            def forward_backward():
                run().backward(x["upstream"])
                for leaf in leaves.values():
                    leaf.grad = None

            torch.cuda.reset_peak_memory_stats()
            fwd_ms = cuda_timed(forward, a.iters)
            fwd_bwd_ms = cuda_timed(forward_backward, a.iters)
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            stats = CommStats()  # one more forward+backward, instrumented
            dist.barrier()
            run(stats).backward(x["upstream"])
            for leaf in leaves.values():
                leaf.grad = None
            exposed = stats.exposed_seconds()
            per_op = {}
            for op in sorted(set(stats.sent) | set(exposed)):
                worst = torch.tensor([exposed.get(op, 0.0)], device="cuda")
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                per_op[op] = {"sent_bytes": stats.sent.get(op, 0), "exposed_ms": worst.item() * 1e3}
            rows.append({"seq_len": seq_len, "gpus": world, "variant": name, "fwd_ms": fwd_ms,
                         "fwd_bwd_ms": fwd_bwd_ms, "peak_gib": peak.item(), "collectives": per_op})
            if rank == 0:
                print(f"T={seq_len} P={world} {name}: fwd {fwd_ms:.1f} ms, fwd+bwd {fwd_bwd_ms:.1f} ms, "
                      f"peak {peak.item():.1f} GiB", flush=True)
        x = leaves = None  # this length's tensors go before the next length's arrive
        torch.cuda.empty_cache()
    if rank == 0:
        result = {"command": f"torchrun --nproc_per_node {world} " + " ".join(sys.argv),
                  "machine": f"{world} x {torch.cuda.get_device_name()}", "torch": torch.__version__,
                  "args": vars(a), "rows": rows}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"\n{'T':>8} {'GPUs':>4} {'variant':<30} {'fwd ms':>8} {'f+b ms':>8} {'peak GiB':>8} "
              f"{'sel. gather exposed ms':>22} {'= % of fwd+bwd':>14}")
        for r in rows:
            sel = r["collectives"].get("selection_kv", {}).get("exposed_ms", 0.0)
            print(f"{r['seq_len']:>8} {r['gpus']:>4} {r['variant']:<30} {r['fwd_ms']:>8.1f} {r['fwd_bwd_ms']:>8.1f} "
                  f"{r['peak_gib']:>8.1f} {sel:>22.2f} {100 * sel / r['fwd_bwd_ms']:>13.1f}%")
        for r in rows:
            print(f"{r['seq_len']} P={r['gpus']} {r['variant']}: " + ", ".join(
                f"{op} {v['sent_bytes'] / 2**20:.0f} MiB / {v['exposed_ms']:.2f} ms" for op, v in r["collectives"].items()))
    if twin is not None:
        dist.destroy_process_group(twin)
    dist.destroy_process_group()


def main():
    a = parse_args()
    if a.distributed:
        return distributed_main(a)
    ops = branch_ops(a.impl)
    rows = []
    for seq_len in a.seq_lens:
        full = make_full(a, seq_len)
        for cp in a.cp:
            ranks = range(cp) if a.all_ranks else sorted({0, cp - 1})
            for rank in ranks:
                layout = ZigzagLayout(seq_len, cp, rank)
                if a.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                nsa_ms = timed(lambda: nsa_rank_share(a, ops, full, layout), a.iters)
                peak = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else float("nan")
                dense_ms = timed(lambda: dense_rank_share(full, layout), a.iters)
                ours = nsa_cp_bytes(seq_len=seq_len, cp_size=cp, cp_rank=rank, batch=1, num_kv_heads=a.kv_heads,
                                    dk=a.head_dim, dv=a.head_dim, block_size=a.block_size, stride=a.stride,
                                    window=a.window, kv="separate", element_size=2)
                ring = ring_attention_bytes(seq_len=seq_len, cp_size=cp, batch=1, num_kv_heads=a.kv_heads,
                                            dk=a.head_dim, dv=a.head_dim, element_size=2)
                rows.append({"seq_len": seq_len, "cp": cp, "rank": rank, "nsa_ms": nsa_ms, "dense_ms": dense_ms,
                             "nsa_over_dense": nsa_ms / dense_ms, "peak_gib": peak,
                             "nsa_bytes": sum(ours.values()), "ring_bytes": sum(ring.values()),
                             "nsa_bytes_by_op": ours})
                r = rows[-1]
                print(f"T={seq_len:>8} P={cp} r={rank}: nsa {nsa_ms:9.1f} ms  dense {dense_ms:9.1f} ms  "
                      f"ratio {r['nsa_over_dense']:.3f}  bytes ours {r['nsa_bytes'] / 2**20:8.1f} MiB  "
                      f"ring {r['ring_bytes'] / 2**20:8.1f} MiB", flush=True)
        full = None  # this length's tensors go before the next length's arrive
        if a.device == "cuda":
            torch.cuda.empty_cache()
    machine = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu"
    result = {"command": "python3 " + " ".join(sys.argv), "machine": machine, "torch": torch.__version__,
              "host": platform.node(), "args": vars(a), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'T':>8} {'P':>2} {'rank':>4} {'nsa ms':>9} {'dense ms':>9} {'nsa/dense':>9} {'peak GiB':>8} "
          f"{'ours MiB':>9} {'ring MiB':>9} {'ours/ring':>9}")
    for r in rows:
        ratio = r["nsa_bytes"] / r["ring_bytes"] if r["ring_bytes"] else float("nan")
        print(f"{r['seq_len']:>8} {r['cp']:>2} {r['rank']:>4} {r['nsa_ms']:>9.1f} {r['dense_ms']:>9.1f} "
              f"{r['nsa_over_dense']:>9.3f} {r['peak_gib']:>8.1f} {r['nsa_bytes'] / 2**20:>9.1f} "
              f"{r['ring_bytes'] / 2**20:>9.1f} {ratio:>9.2f}")


if __name__ == "__main__":
    main()
