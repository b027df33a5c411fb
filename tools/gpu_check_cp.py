"""GPU check: sequence-sharded NSA and the dense baseline in bf16 against one rank, over NCCL.

    torchrun --standalone --nproc_per_node 2 tools/gpu_check_cp.py --seq-len 131072

Every rank builds the same full-sequence inputs. The reference is one rank's NSA in fp32 (the PyTorch
reference implementation); the
single-rank bf16 run sets the error budget (the kernels' own bf16-vs-fp32 error), and the CP run in bf16
must stay within 2x that budget (plus a small epsilon) for the output and every gradient (q, gates, each
branch's K/V, phi's weights). The dense baseline (cuDNN, all-gathered K/V, no mask) is checked the same
way against one rank's cuDNN SDPA. With --documents N the sequence is N packed documents of random
lengths (cu_seqlens) for every run. Prints a table; exits non-zero if a tensor is out of budget.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.common import remember_bounds  # noqa: E402
from kernels.nsa import native_sparse_attention  # noqa: E402
from nsa_dist.attention import Compression  # noqa: E402
from nsa_dist.parallel import dense_context_parallel, nsa_context_parallel, split_zigzag  # noqa: E402
from nsa_dist.parallel.dense_cp import dense_documents  # noqa: E402
from nsa_dist.parallel.groups import twin_groups  # noqa: E402

PAPER = dict(block_size=32, stride=16, selection_block=64, num_selected=16, window=512)
EPS = 1e-3  # relative error a tensor may always have (bf16 has 8 bits of mantissa: 4e-3 per rounding)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """RMS of the difference over RMS of the reference."""
    return ((got.float() - want.float()).pow(2).mean().sqrt() / want.float().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(seq_len, hq, hk, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = {"q": torch.randn(1, seq_len, hq, d, device="cuda", generator=g),
         "gates": torch.rand(1, seq_len, hq, 3, device="cuda", generator=g)}
    for b in ("cmp", "slc", "win"):
        x[f"k_{b}"] = torch.randn(1, seq_len, hk, d, device="cuda", generator=g)
        x[f"v_{b}"] = torch.randn(1, seq_len, hk, d, device="cuda", generator=g)
    x["upstream"] = torch.randn(1, seq_len, hq, d, device="cuda", generator=g)
    return x


def document_bounds(seq_len: int, count: int, seed: int = 0) -> torch.Tensor | None:
    """cu_seqlens of `count` packed documents of random lengths over seq_len tokens (None for 0)."""
    if count == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(seq_len - 1, generator=g)[: count - 1].add(1).tolist())
    bounds = [0, *cuts, seq_len]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    remember_bounds(cu_seqlens, bounds)
    return cu_seqlens


def phis(d, dtype):
    torch.manual_seed(0)
    return [Compression("mlp", PAPER["block_size"], PAPER["stride"], d).cuda().to(dtype) for _ in range(2)]


def run_nsa(x, dtype, rank=0, world=1, group=None, gather_group=None, impl="triton", cu_seqlens=None):
    """Output and gradients (local shard when world > 1; phi's gradients summed over ranks)."""
    d = x["q"].shape[-1]
    phi_k, phi_v = phis(d, dtype)
    leaves = {k: (split_zigzag(v, rank, world) if world > 1 else v).detach().to(dtype).clone().requires_grad_()
              for k, v in x.items() if k != "upstream"}
    kv = [(leaves[f"k_{b}"], leaves[f"v_{b}"]) for b in ("cmp", "slc", "win")]
    if world > 1:
        out = nsa_context_parallel(leaves["q"], *kv, leaves["gates"], phi_k, phi_v, group=group,
                                   gather_group=gather_group, impl=impl, cu_seqlens=cu_seqlens, **PAPER).output
        upstream = split_zigzag(x["upstream"], rank, world)
    else:
        out = native_sparse_attention(leaves["q"], *kv, leaves["gates"], phi_k, phi_v, impl=impl,
                                      cu_seqlens=cu_seqlens, **PAPER).output
        upstream = x["upstream"]
    out.backward(upstream.to(dtype))
    grads = {f"d{k}": v.grad for k, v in leaves.items()}
    for name, module in (("phi_k", phi_k), ("phi_v", phi_v)):
        flat = torch.cat([p.grad.float().flatten() for p in module.parameters()])
        if world > 1:
            dist.all_reduce(flat)
        grads[f"d{name}"] = flat
    return {"out": out.detach(), **grads}


def run_dense(x, dtype, rank=0, world=1, group=None, cu_seqlens=None):
    leaves = {k: (split_zigzag(x[k], rank, world) if world > 1 else x[k]).detach().to(dtype).clone().requires_grad_()
              for k in ("q", "k_slc", "v_slc")}
    if world > 1:
        out = dense_context_parallel(leaves["q"], leaves["k_slc"], leaves["v_slc"], group=group, cu_seqlens=cu_seqlens)
        upstream = split_zigzag(x["upstream"], rank, world)
    elif cu_seqlens is not None:  # bf16: one varlen flash launch; fp32: SDPA per document
        longest = int(cu_seqlens.diff().max())
        out = dense_documents(leaves["q"], leaves["k_slc"], leaves["v_slc"], cu_seqlens, longest, None)
        upstream = x["upstream"]
    else:
        q, k, v = (leaves[k].transpose(1, 2) for k in ("q", "k_slc", "v_slc"))
        if dtype == torch.float32:  # no fused fp32 kernel takes GQA: K/V repeated per query head
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
        upstream = x["upstream"]
    out.backward(upstream.to(dtype))
    return {"out": out.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}


def compare(name, rank, world, ref, single, sharded):
    """Rows of (tensor, single-rank bf16 error, CP bf16 error, ok) against the fp32 reference."""
    rows = []
    for key in ref:
        want = ref[key]
        local = lambda t: t if key.startswith("dphi") or world == 1 else split_zigzag(t, rank, world)  # noqa: E731
        budget = rel_err(local(single[key]), local(want))
        got = rel_err(sharded[key], local(want))
        rows.append((f"{name} {key}", budget, got, got <= 2 * budget + EPS))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--documents", type=int, default=0, help="packed documents of random lengths (0: one sequence)")
    a = p.parse_args()
    local_gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(local_gpu)
    dist.init_process_group("nccl", device_id=local_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    twin = twin_groups(dist.group.WORLD)
    x = make_inputs(a.seq_len, a.q_heads, a.kv_heads, a.head_dim)
    cu = document_bounds(a.seq_len, a.documents)
    began = time.perf_counter()

    def progress(what):
        if rank == 0:
            print(f"{time.perf_counter() - began:6.1f} s: {what}", flush=True)

    ref = run_nsa(x, torch.float32, impl="reference", cu_seqlens=cu)  # the PyTorch reference: exact fp32 math
    progress("NSA, one rank, fp32")
    single = run_nsa(x, torch.bfloat16, cu_seqlens=cu)
    progress("NSA, one rank, bf16")
    rows = compare("nsa", rank, world, ref, single,
                   run_nsa(x, torch.bfloat16, rank, world, dist.group.WORLD, twin, cu_seqlens=cu))
    progress("NSA, CP, bf16")
    rows += compare("nsa (gather on the CP group)", rank, world, ref, single,
                    run_nsa(x, torch.bfloat16, rank, world, dist.group.WORLD, None, cu_seqlens=cu))
    progress("NSA, CP, bf16, gather on the CP group")
    del ref, single
    torch.cuda.empty_cache()
    ref, single = run_dense(x, torch.float32, cu_seqlens=cu), run_dense(x, torch.bfloat16, cu_seqlens=cu)
    rows += compare("dense", rank, world, ref, single,
                    run_dense(x, torch.bfloat16, rank, world, dist.group.WORLD, cu_seqlens=cu))
    progress("dense")
    failed = torch.tensor([sum(not ok for *_, ok in rows)], device="cuda")
    dist.all_reduce(failed)
    if rank == world - 1:
        shape = f", {a.documents} packed documents" if a.documents else ""
        print(f"\nT={a.seq_len}{shape} CP={world} rank {rank}: relative RMS error against one rank's fp32")
        print(f"{'tensor':<40} {'1 rank bf16':>12} {'CP bf16':>10} {'ok':>4}")
        for name, budget, got, ok in rows:
            print(f"{name:<40} {budget:>12.2e} {got:>10.2e} {'yes' if ok else 'NO':>4}")
    if twin is not None:
        dist.destroy_process_group(twin)
    dist.destroy_process_group()
    sys.exit(1 if failed.item() else 0)


if __name__ == "__main__":
    main()
