"""GPU check of the Triton NSA kernels: bf16 against the PyTorch reference, one NSA layer at 1M tokens,
and forward/backward milliseconds at 64K against torch SDPA (cuDNN backend), timed in the same run.

1. Correctness: each branch's Triton kernel on bf16 inputs against its reference on the same values in
   fp32 (fp32 leaves, so that the reference's per-chunk gradients do not accumulate in bf16):
   RMS-relative error of o, lse and every gradient, each at most 2x the reference's own error on the
   bf16 inputs (bf16 leaves: its outputs rounded, its gradients accumulated in bf16) plus EPSILON;
   the gate combine likewise; top-n selections compared as the
   fraction of identical rows (bf16 near-ties may rank differently); under
   torch.use_deterministic_algorithms, dQ/dK/dV computed twice must be bitwise equal and within the same
   bounds (by default the compressed and window backward add dQ atomically: fast, not bitwise
   repeatable). The paper's sizes at T = 4K..64K, plus at 4K other
   group sizes / head dims (Dk != Dv, non-powers of two), packed documents and a chunk at an offset.
   The dense baseline over packed documents (torch's varlen flash attention) likewise, against one SDPA
   call per document; and whole NSA on documents shorter than its window with only the window (or only
   the selection) gate open, which must equal that dense attention.
2. One NSA layer (native_sparse_attention, impl="triton", phi = MLP) forward + backward at 1M tokens.
3. Timing at 64K: each branch and the whole layer, forward and forward + backward, beside cuDNN SDPA
   (causal, GQA) on the same q/k/v shapes.

    python3 tools/gpu_check.py --out benchmarks/kernels_h200.json
"""

import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.compression.naive import compress_documents, mean_compress, mlp_compress  # noqa: E402
from kernels.nsa import branch_ops, native_sparse_attention  # noqa: E402
from kernels.triton_utils import POISON_ENV  # noqa: E402
from nsa_dist.parallel.dense_cp import causal_sdpa, dense_documents  # noqa: E402

REF, TRI = branch_ops("reference"), branch_ops("triton")
# A kernel's RMS-relative error (bf16 in and out, fp32 accumulation, p rounded to bf16 before P @ V as
# flash attention does) may be at most 2x the reference's own error on the same bf16 inputs (its fp32
# result rounded to bf16), plus EPSILON.
EPSILON = 1e-3
PAPER = dict(block_size=32, stride=16, selection_block=64, num_selected=16, window=512)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check-seqs", type=int, nargs="*", default=[4096, 16384, 65536])
    p.add_argument("--variety-seq", type=int, default=4096, help="0: skip the other shapes")
    p.add_argument("--layer-seq", type=int, default=1 << 20, help="0: skip the 1M-token layer")
    p.add_argument("--bench-seq", type=int, default=65536, help="0: skip timing")
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", default="benchmarks/kernels_h200.json")
    return p.parse_args()


def rms_rel(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def randn(*shape, grad=True):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


def run_branch(fn, leaves: dict, upstream, **kwargs):
    """(o, lse, grads of the leaves) under upstream gradients on o and (finite) lse."""
    o, lse = fn(**leaves, **kwargs)
    loss = (o.float() * upstream[0]).sum() + (lse.masked_fill(lse == float("-inf"), 0) * upstream[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), lse.detach(), dict(zip(leaves, grads))


def branch_errors(result, ref, leaves) -> dict:
    """RMS-relative error of o, lse (where finite) and each leaf's gradient against the fp32 reference."""
    empty = ref[1] == float("-inf")
    errors = {"o": rms_rel(result[0], ref[0]), "lse": rms_rel(result[1][~empty], ref[1][~empty])}
    errors.update({f"d{k}": rms_rel(result[2][k], ref[2][k]) for k in leaves})
    return errors


def compare_branch(name, kernel, reference, leaves, **kwargs) -> dict:
    o, lse = kernel(**leaves, **kwargs)
    # bf16-representable upstream gradient: the kernel's do (bf16, like o) then equals the reference's
    upstream = (torch.randn_like(o, dtype=torch.float32).bfloat16().float(), torch.randn_like(lse))
    del o, lse
    got = run_branch(kernel, leaves, upstream, **kwargs)
    # determinism is promised under torch.use_deterministic_algorithms (the range kernels' one-pass backward
    # adds dQ atomically and runs only outside it): two runs there must be bitwise equal
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, again = (run_branch(kernel, leaves, upstream, **kwargs) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    ref = run_branch(reference, {k: x.detach().float().requires_grad_() for k, x in leaves.items()}, upstream, **kwargs)
    ref_bf16 = run_branch(reference, {k: x.detach().requires_grad_() for k, x in leaves.items()}, upstream, **kwargs)
    errors = branch_errors(got, ref, leaves)
    bounds = {k: 2 * e + EPSILON for k, e in branch_errors(ref_bf16, ref, leaves).items()}
    finite = all(torch.isfinite(t).all() for t in (got[0], *got[2].values()))
    finite = finite and torch.equal(got[1] == float("-inf"), ref[1] == float("-inf"))
    deterministic = all(torch.equal(first[2][k], again[2][k]) for k in leaves) and torch.equal(first[0], again[0])
    ok = (finite and deterministic and all(errors[k] <= bounds[k] for k in errors)
          and all(e <= bounds[k] for k, e in branch_errors(first, ref, leaves).items()))
    return {"branch": name, "errors": errors, "bounds": bounds, "finite": bool(finite),
            "deterministic": bool(deterministic), "ok": bool(ok)}


def compare_combine(o_cmp, o_slc, o_win, gates) -> dict:
    """The gated sum's forward (Triton) against its reference, in the same terms as compare_branch. Its
    backward hands the gradient on as it is: the branches' backward applies the gates (their gate=
    argument), which the whole-layer kernel tests check (tests/kernels/test_triton_nsa.py)."""
    leaves = dict(o_cmp=o_cmp, o_slc=o_slc, o_win=o_win, gates=gates)

    def run(ops, inputs):
        with torch.no_grad():
            return (ops.sum(inputs["o_cmp"], inputs["o_slc"], inputs["o_win"], *inputs["gates"].unbind(-1)),)

    got, again = run(TRI, leaves), run(TRI, leaves)
    ref = run(REF, {k: x.detach().float() for k, x in leaves.items()})
    ref_bf16 = run(REF, leaves)

    def errors(result):
        return {"out": rms_rel(result[0], ref[0])}

    errs = errors(got)
    bounds = {k: 2 * e + EPSILON for k, e in errors(ref_bf16).items()}
    finite = bool(torch.isfinite(got[0]).all())
    deterministic = torch.equal(got[0], again[0])
    return {"branch": "combine", "errors": errs, "bounds": bounds, "finite": bool(finite),
            "deterministic": bool(deterministic), "ok": bool(finite and deterministic and
                                                             all(errs[k] <= bounds[k] for k in errs))}


def check_case(case: dict) -> list[dict]:
    """Every branch on one shape: case has T, hq, hk, dk, dv, q_start, docs (document lengths or None)."""
    torch.manual_seed(0)
    T, hq, hk, dk, dv, q_start = case["T"], case["hq"], case["hk"], case["dk"], case["dv"], case["q_start"]
    l, d, ls, n, w = (PAPER[k] for k in ("block_size", "stride", "selection_block", "num_selected", "window"))
    cu = None
    if case["docs"]:
        cu = torch.tensor([0, *torch.tensor(case["docs"]).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    packed = dict(cu_seqlens=cu)
    q = randn(1, T - q_start, hq, dk)
    k, v = randn(1, T, hk, dk), randn(1, T, hk, dv)
    phi = functools.partial(mean_compress, block_size=l, stride=d)
    k_cmp = compress_documents(phi, k.detach(), cu, l, d).requires_grad_()
    v_cmp = compress_documents(phi, v.detach(), cu, l, d).requires_grad_()
    rows = []

    rows.append(compare_branch("compressed", TRI.compressed, REF.compressed, dict(q=q, k_cmp=k_cmp, v_cmp=v_cmp),
                               block_size=l, stride=d, q_start=q_start, **packed))
    with torch.no_grad():
        _, lse = REF.compressed(q, k_cmp, v_cmp, l, d, q_start=q_start, **packed)
        args = (q, k_cmp, lse, l, d, ls, n)
        ref_blocks = REF.select(*args, q_start=q_start, **packed)
        got_blocks = TRI.select(*args, q_start=q_start, **packed)
    same_rows = (got_blocks == ref_blocks).all(-1).float().mean().item()
    shared = ((got_blocks[..., :, None] == ref_blocks[..., None, :]) & (ref_blocks[..., None, :] >= 0)).any(-1)
    same_ids = (shared.sum() / (ref_blocks >= 0).sum()).item()  # picks the reference also made
    rows.append({"branch": "select", "identical_rows": same_rows, "shared_picks": same_ids,
                 "ok": bool(same_rows > 0.99)})
    rows.append(compare_branch("selected", TRI.selected, REF.selected, dict(q=q, k=k, v=v), block_idx=ref_blocks,
                               selection_block=ls, q_start=q_start, **packed))
    rows.append(compare_combine(*(randn(*q.shape[:3], dv) for _ in range(3)),
                                torch.rand(*q.shape[:3], 3, device="cuda", dtype=torch.bfloat16).requires_grad_()))
    k_start = max(0, q_start - w)
    rows.append(compare_branch("window", TRI.window, REF.window, dict(q=q, k=k[:, k_start:].detach().requires_grad_(),
                               v=v[:, k_start:].detach().requires_grad_()), window=w, q_start=q_start, k_start=k_start,
                               **packed))
    for r in rows:
        r["case"] = case
    return rows


def check_short_documents_equal_dense(T=32768, hq=16, hk=1, d=64) -> list:
    """Whole NSA (Triton, bf16, one K/V for all branches) on packed documents no longer than the window,
    with one branch's gate 1 and the others 0, against the dense baseline's causal attention per document:
    the window branch (every document fits in it), and the selection branch (every block of a document fits
    in its n picks) must each equal dense attention, output and dQ/dK/dV, within 2x the dense bf16 error
    plus EPSILON. This is the proof's 2K stage (passkey samples of 256 tokens, code documents) on the path
    training takes: top-n, selected and window kernels, the gate combine, packed-document masking."""
    torch.manual_seed(0)
    lengths = []  # passkey samples' 256 tokens, alternating with other lengths up to the window's 512
    while sum(lengths) < T - 512:
        lengths.append(256 if len(lengths) % 2 else int(torch.randint(1, 513, ())))
    lengths.append(T - sum(lengths))  # 1..512 tokens
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    leaves = dict(q=randn(1, T, hq, d), k=randn(1, T, hk, d), v=randn(1, T, hk, d))
    upstream = torch.randn(1, T, hq, d, device="cuda").bfloat16().float()
    phi = functools.partial(mean_compress, block_size=PAPER["block_size"], stride=PAPER["stride"])

    def run(fn, inputs):
        out = fn(**inputs)
        return out.detach(), torch.autograd.grad((out.float() * upstream).sum(), list(inputs.values()))

    def loop(q, k, v):
        bounds = cu.tolist()
        return torch.cat([causal_sdpa(q[:, a:b], k[:, a:b], v[:, a:b], None) for a, b in zip(bounds, bounds[1:])], 1)

    ref = run(loop, {k: x.detach().float().requires_grad_() for k, x in leaves.items()})
    ref_bf16 = run(lambda **x: dense_documents(**x, cu_seqlens=cu, longest=max(lengths), scale=None), leaves)
    names = ["o", "dq", "dk", "dv"]
    bounds = dict(zip(names, (2 * rms_rel(a, b) + EPSILON for a, b in zip((ref_bf16[0], *ref_bf16[1]),
                                                                           (ref[0], *ref[1])))))
    rows = []
    for branch in ("slc", "win"):
        gates = torch.zeros(1, T, hq, 3, device="cuda", dtype=torch.bfloat16)
        gates[..., ("cmp", "slc", "win").index(branch)] = 1

        def nsa(q, k, v):
            return native_sparse_attention(q, (k, v), (k, v), (k, v), gates, phi, phi, impl="triton",
                                           cu_seqlens=cu, **PAPER).output

        got = run(nsa, leaves)
        errors = dict(zip(names, (rms_rel(a, b) for a, b in zip((got[0], *got[1]), (ref[0], *ref[1])))))
        row = {"branch": branch, "T": T, "documents": len(lengths), "longest": max(lengths), "errors": errors,
               "bounds": bounds, "ok": all(errors[k] <= bounds[k] for k in names)}
        print(f"  NSA {branch} gate only, {len(lengths)} documents of <= {max(lengths)} tokens in T={T}: "
              f"{'ok ' if row['ok'] else 'BAD'} worst err/bound {max(errors[k] / bounds[k] for k in names):.2f} "
              f"({', '.join(f'{k} {errors[k]:.1e}' for k in names)})", flush=True)
        rows.append(row)
    return rows


def check_dense_documents(T=16384, hq=16, hk=1, d=64) -> dict:
    """The dense baseline over packed documents (one varlen flash launch) in bf16 against one fp32 SDPA
    call per document, within the same bound as the kernels; also timed against that loop."""
    torch.manual_seed(0)
    lengths = [1, 37, 500, 2048, 129, 4000]
    lengths.append(T - sum(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    leaves = dict(q=randn(1, T, hq, d), k=randn(1, T, hk, d), v=randn(1, T, hk, d))
    upstream = torch.randn(1, T, hq, d, device="cuda").bfloat16().float()

    def loop(q, k, v):
        bounds = cu.tolist()
        return torch.cat([causal_sdpa(q[:, a:b], k[:, a:b], v[:, a:b], None) for a, b in zip(bounds, bounds[1:])], 1)

    def run(fn, inputs):
        out = fn(**inputs)
        return out.detach(), torch.autograd.grad((out.float() * upstream).sum(), list(inputs.values()))

    got = run(lambda **x: dense_documents(**x, cu_seqlens=cu, longest=max(lengths), scale=None), leaves)
    ref = run(loop, {k: x.detach().float().requires_grad_() for k, x in leaves.items()})
    ref_bf16 = run(loop, {k: x.detach().requires_grad_() for k, x in leaves.items()})
    names = ["o", "dq", "dk", "dv"]
    errors = dict(zip(names, (rms_rel(a, b) for a, b in zip((got[0], *got[1]), (ref[0], *ref[1])))))
    bounds = dict(zip(names, (2 * rms_rel(a, b) + EPSILON for a, b in zip((ref_bf16[0], *ref_bf16[1]),
                                                                           (ref[0], *ref[1])))))
    times = {name: triton.testing.do_bench(lambda: run(fn, leaves), rep=200)
             for name, fn in (("varlen_ms", lambda **x: dense_documents(**x, cu_seqlens=cu, longest=max(lengths),
                                                                        scale=None)), ("loop_ms", loop))}
    row = {"T": T, "documents": lengths, "errors": errors, "bounds": bounds,
           "ok": all(errors[k] <= bounds[k] for k in names), **times}
    print(f"  dense documents T={T}: {'ok ' if row['ok'] else 'BAD'} worst err/bound "
          f"{max(errors[k] / bounds[k] for k in names):.2f}; fwd+bwd {times['varlen_ms']:.2f} ms varlen, "
          f"{times['loop_ms']:.2f} ms per-document loop", flush=True)
    return row


def layer_inputs(T, hq, hk, d, l):
    torch.manual_seed(0)
    q = randn(1, T, hq, d)
    kv = [(randn(1, T, hk, d), randn(1, T, hk, d)) for _ in range(3)]
    gates = torch.rand(1, T, hq, 3, device="cuda", dtype=torch.bfloat16).requires_grad_()

    def mlp_params():
        p = {"pos_emb": randn(l, d, grad=False), "w1": randn(d, l * d, grad=False) * (l * d) ** -0.5,
             "b1": randn(d, grad=False) * 0, "w2": randn(d, d, grad=False) * d**-0.5, "b2": randn(d, grad=False) * 0}
        return {k: v.requires_grad_() for k, v in p.items()}

    phis = [functools.partial(mlp_compress, block_size=l, stride=PAPER["stride"], **mlp_params()) for _ in range(2)]
    return q, kv, gates, phis


def nsa_layer(q, kv, gates, phis, impl="triton"):
    return native_sparse_attention(q, *kv, gates, *phis, **PAPER, impl=impl).output


def run_layer(T, hq, hk, d) -> dict:
    q, kv, gates, phis = layer_inputs(T, hq, hk, d, PAPER["block_size"])
    leaves = [q, *(t for pair in kv for t in pair), gates]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = nsa_layer(q, kv, gates, phis)
    torch.cuda.synchronize()
    fwd_s = time.perf_counter() - start
    grads = torch.autograd.grad(out.float().pow(2).mean(), leaves)
    torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    return {"T": T, "fwd_s": fwd_s, "fwd_bwd_s": total_s, "finite": finite,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "ok": finite}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")


def fwd_and_bwd(make_out, leaves) -> tuple[float, float]:
    """Median ms of the forward, and of forward + backward (upstream gradient of ones)."""
    def step():
        out = make_out()
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    with torch.no_grad():
        fwd = bench(make_out)
    return fwd, bench(step)


def run_bench(T, hq, hk, d) -> list[dict]:
    l, s, ls, n, w = (PAPER[k] for k in ("block_size", "stride", "selection_block", "num_selected", "window"))
    q, kv, gates, phis = layer_inputs(T, hq, hk, d, l)
    (k, v) = kv[1]
    with torch.no_grad():
        k_cmp, v_cmp = mean_compress(k, l, s).requires_grad_(), mean_compress(v, l, s).requires_grad_()
        _, lse = TRI.compressed(q, k_cmp, v_cmp, l, s)
        blocks = TRI.select(q, k_cmp, lse, l, s, ls, n)
    rows = []

    def add(name, make_out, leaves, backward=True):
        if backward:
            fwd, total = fwd_and_bwd(make_out, leaves)
        else:
            with torch.no_grad():
                fwd, total = bench(make_out), float("nan")
        rows.append({"op": name, "fwd_ms": fwd, "bwd_ms": total - fwd, "fwd_bwd_ms": total})
        print(f"  {name:28s} fwd {fwd:9.2f} ms   fwd+bwd {total:9.2f} ms", flush=True)

    add("phi mlp (k and v)", lambda: phis[0](kv[0][0]).float().sum() + phis[1](kv[0][1]).float().sum(),
        [kv[0][0], kv[0][1]])
    add("compressed attention", lambda: TRI.compressed(q, k_cmp, v_cmp, l, s)[0], [q, k_cmp, v_cmp])
    add("top-n selection", lambda: TRI.select(q, k_cmp, lse, l, s, ls, n), [], backward=False)
    add("selected attention", lambda: TRI.selected(q, k, v, blocks, ls)[0], [q, k, v])
    add("window attention", lambda: TRI.window(q, k, v, w)[0], [q, k, v])
    leaves = [q, *(t for pair in kv for t in pair), gates]
    add("NSA layer (all of the above)", lambda: nsa_layer(q, kv, gates, phis), leaves)

    def sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True)
    add("SDPA cuDNN causal (baseline)", sdpa, [q, k, v])
    return rows


def section(name, fn, report):
    """Runs one section; an exception is reported and the next section still runs."""
    print(f"\n== {name}", flush=True)
    try:
        report[name] = fn()
    except Exception:
        report[name] = {"error": traceback.format_exc()}
        print(report[name]["error"], flush=True)


def main():
    a = parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/gpu_check.py checks and times the Triton kernels in bf16 on an NVIDIA GPU, and this machine has none that torch can use: run it on a GPU machine "
                 "(README, 'On a GPU machine')")
    hq, hk, d = a.q_heads, a.kv_heads, a.head_dim
    paper_shape = dict(hq=hq, hk=hk, dk=d, dv=d, q_start=0, docs=None)
    cases = [dict(T=T, **paper_shape) for T in a.check_seqs]
    if a.variety_seq:
        T = a.variety_seq
        cases += [
            dict(T=T, hq=4, hk=4, dk=64, dv=64, q_start=0, docs=None),  # G = 1
            dict(T=T, hq=6, hk=2, dk=192, dv=128, q_start=0, docs=None),  # G = 3, Dk != Dv, not powers of 2
            dict(T=T, hq=32, hk=1, dk=64, dv=64, q_start=0, docs=None),  # G = 32
            dict(T=T, hq=8, hk=4, dk=256, dv=32, q_start=0, docs=None),  # G = 2, largest Dk
            dict(T=T, hq=16, hk=1, dk=128, dv=128, q_start=1024, docs=None),  # a chunk at an offset
            dict(T=T, hq=16, hk=1, dk=128, dv=128, q_start=512, docs=[1000, 20, 1, 1500, T - 2521]),  # packed
        ]
    report = {"command": " ".join(sys.argv), "machine": torch.cuda.get_device_name(), "host": platform.node(),
              "torch": torch.__version__, "triton": triton.__version__, "args": vars(a),
              "tolerance": f"RMS-relative error <= 2 x the bf16 reference's + {EPSILON}"}

    def correctness():
        rows = []
        for case in cases:
            case_rows = check_case(case)
            for r in case_rows:
                detail = (f"rows identical {r['identical_rows']:.4f}, picks shared {r['shared_picks']:.4f}"
                          if r["branch"] == "select" else
                          f"max err {max(r['errors'].values()):.1e}, worst err/bound "
                          f"{max(r['errors'][k] / r['bounds'][k] for k in r['errors']):.2f}, det {r['deterministic']}")
                print(f"  T={case['T']:>6} hq={case['hq']:>2} hk={case['hk']} dk={case['dk']:>3} dv={case['dv']:>3} "
                      f"q0={case['q_start']:>4} docs={'y' if case['docs'] else 'n'} {r['branch']:10s} "
                      f"{'ok ' if r['ok'] else 'BAD'} {detail}", flush=True)
            rows += case_rows
            torch.cuda.empty_cache()
        return rows

    # the checks with the kernels' output buffers pre-filled with NaN (a position a kernel forgets to write
    # fails them); the timing and the 1M-token layer without, as in training
    os.environ[POISON_ENV] = "1"
    section("correctness", correctness, report)
    section("dense documents", check_dense_documents, report)
    section("short documents: one NSA branch equals dense", check_short_documents_equal_dense, report)
    del os.environ[POISON_ENV]
    if a.bench_seq:
        section("timing", lambda: run_bench(a.bench_seq, hq, hk, d), report)
    if a.layer_seq:
        section("layer", lambda: run_layer(a.layer_seq, hq, hk, d), report)

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"\n{report['machine']}, torch {report['torch']}, triton {report['triton']}; bf16, HQ={hq} HK={hk} D={d}, "
          f"l={PAPER['block_size']} d={PAPER['stride']} l'={PAPER['selection_block']} n={PAPER['num_selected']} "
          f"w={PAPER['window']}")
    if isinstance(report["correctness"], list) and report["correctness"]:
        bad = [r for r in report["correctness"] if not r["ok"]]
        worst = max(max(r["errors"].values()) for r in report["correctness"] if "errors" in r)
        sel = min(r["identical_rows"] for r in report["correctness"] if r["branch"] == "select")
        print(f"correctness: {len(report['correctness']) - len(bad)}/{len(report['correctness'])} ok; worst RMS-rel "
              f"error {worst:.1e} ({report['tolerance']}); top-n identical rows >= {sel:.4f}")
    if isinstance(report.get("timing"), list):
        print(f"{'op (T=' + str(a.bench_seq) + ')':30s} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd':>9}")
        for r in report["timing"]:
            print(f"{r['op']:30s} {r['fwd_ms']:9.2f} {r['bwd_ms']:9.2f} {r['fwd_bwd_ms']:9.2f}")
    if isinstance(report.get("layer"), dict) and "T" in report["layer"]:
        r = report["layer"]
        print(f"NSA layer T={r['T']}: fwd {r['fwd_s']:.2f} s, fwd+bwd {r['fwd_bwd_s']:.2f} s (first call, compile "
              f"included), finite {r['finite']}, peak {r['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
