"""One NSA layer against dense attention and against fla's NSA, timed in one process on the same inputs.

Lines, each forward and forward+backward, median of triton.testing.do_bench (>= --reps timed runs):
- ours, paper config (l=32 d=16 l'=64 n=16 w=512, separate K/V per branch), phi mean and phi mlp;
- torch SDPA, causal, GQA: cuDNN backend and flash backend (one K/V pair of the same shape);
- fla's config (l=d=l'=64, n=16, w=0, shared K/V, phi mean): ours and fla-core's `parallel_nsa`
  (G=16 only: fla needs a power-of-two group of at least 16).
At every T of --seqs, for each G of --groups (HQ = G * HK, HK fixed); at --long-seqs only ours (paper,
phi mean). Per-branch breakdown at --breakdown-seqs (G = the first of --groups). Peak memory of one
forward+backward. Ratios are baseline ms / ours ms. Issue 11's targets are checked against the ratios
of this run and written as `targets_met`.

    python3 tools/bench_kernels.py --seqs 8192 16384 32768 65536 131072 --commit $(git rev-parse HEAD)

--kernels-root DIR imports `kernels` from another checkout (e.g. `git archive <commit> kernels`
unpacked in DIR) with --lines ours, to time an earlier version of the kernels in the same call.
"""

import argparse
import datetime
import functools
import inspect
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
PAPER = dict(block_size=32, stride=16, selection_block=64, num_selected=16, window=512)
FLA_CONFIG = dict(block_size=64, stride=64, selection_block=64, num_selected=16, window=0)
LINES = ("ours", "dense", "fla")
# Issue 11: (name, what, minimum ratio); ratios are baseline ms / ours ms
SPEED_TARGETS = [
    ("cudnn_fwd_128k", ("cudnn", 131072, "fwd"), 8.0),
    ("cudnn_bwd_128k", ("cudnn", 131072, "bwd"), 8.0),
    ("cudnn_fwd_64k", ("cudnn", 65536, "fwd"), 6.0),
    ("cudnn_bwd_64k", ("cudnn", 65536, "bwd"), 5.0),
    ("cudnn_fwd_bwd_16k", ("cudnn", 16384, "fwd_bwd"), 1.5),
    ("cudnn_fwd_bwd_8k", ("cudnn", 8192, "fwd_bwd"), 1.0),
    ("fla_fwd_64k", ("fla", 65536, "fwd"), 2.0),
    ("fla_bwd_64k", ("fla", 65536, "bwd"), 2.0),
    ("fla_fwd_128k", ("fla", 131072, "fwd"), 2.0),
    ("fla_bwd_128k", ("fla", 131072, "bwd"), 2.0),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--long-seqs", type=int, nargs="*", default=[], help="ours alone (paper, phi mean)")
    p.add_argument("--groups", type=int, nargs="+", default=[16, 4], help="query heads per KV head")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--breakdown-seqs", type=int, nargs="*", default=[131072])
    p.add_argument("--lines", nargs="+", default=list(LINES), choices=LINES)
    p.add_argument("--phis", nargs="+", default=["mean", "mlp"], choices=["mean", "mlp"], help="ours, paper config")
    p.add_argument("--reps", type=int, default=3, help="timed runs per figure (at least)")
    p.add_argument("--kernels-root", help="import `kernels` from this directory instead of the repository")
    p.add_argument("--commit", help="git commit of the kernels timed (default: git rev-parse HEAD)")
    p.add_argument("--out", default=f"benchmarks/kernels-{datetime.date.today().isoformat()}.json")
    return p.parse_args()


def median_ms(fn, reps: int) -> dict:
    """Median ms of fn over at least `reps` timed runs of triton.testing.do_bench (after compiling)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end)
    # do_bench runs int(rep / its own estimate) times: half a run of slack keeps that >= reps
    times = triton.testing.do_bench(fn, warmup=estimate, rep=estimate * (reps + 0.5), return_mode="all")
    return {"ms": statistics.median(times), "runs": len(times)}


def fwd_bwd(forward, leaves, reps: int) -> dict:
    """Forward (no autograd), forward+backward, backward = their difference, and the peak memory of one
    forward+backward above what was allocated before it."""
    out = forward()
    grad_out = torch.randn_like(out)
    del out

    def step():
        out = forward()
        torch.autograd.grad(out, leaves, grad_out)

    with torch.no_grad():
        fwd = median_ms(forward, reps)
    total = median_ms(step, reps)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return {"fwd_ms": fwd["ms"], "fwd_bwd_ms": total["ms"], "bwd_ms": total["ms"] - fwd["ms"],
            "runs": min(fwd["runs"], total["runs"]),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_above_inputs_gib": (torch.cuda.max_memory_allocated() - before) / 2**30}


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()


def mlp_phi_params(l: int, d: int) -> dict:
    with torch.no_grad():
        p = {"pos_emb": randn(l, d) * 0.1, "w1": randn(d, l * d) * (l * d) ** -0.5, "b1": randn(d) * 0,
             "w2": randn(d, d) * d**-0.5, "b2": randn(d) * 0}
    return {k: v.requires_grad_() for k, v in p.items()}


class Inputs:
    """Random bf16 q, three K/V pairs and gates of one shape; every line reads these same tensors."""

    def __init__(self, T, hq, hk, d):
        torch.manual_seed(0)
        self.q = randn(1, T, hq, d)
        self.kv = [(randn(1, T, hk, d), randn(1, T, hk, d)) for _ in range(3)]
        with torch.no_grad():
            self.gates = torch.rand(1, T, hq, 3, device="cuda", dtype=torch.bfloat16).requires_grad_()


def ours_paper(nsa, inp: Inputs, phi: str):
    from kernels.compression.naive import mean_compress, mlp_compress

    l, d = PAPER["block_size"], PAPER["stride"]
    if phi == "mean":
        phis, params = [functools.partial(mean_compress, block_size=l, stride=d)] * 2, []
    else:
        ps = [mlp_phi_params(l, inp.q.shape[-1]) for _ in range(2)]
        phis = [functools.partial(mlp_compress, block_size=l, stride=d, **p) for p in ps]
        params = [t for p in ps for t in p.values()]
    leaves = [inp.q, *(t for pair in inp.kv for t in pair), inp.gates, *params]
    return (lambda: nsa(inp.q, *inp.kv, inp.gates, *phis, **PAPER, impl="triton").output), leaves


def ours_fla_config(nsa, inp: Inputs):
    from kernels.compression.naive import mean_compress

    phi = functools.partial(mean_compress, block_size=FLA_CONFIG["block_size"], stride=FLA_CONFIG["stride"])
    kv = inp.kv[0]
    leaves = [inp.q, *kv, inp.gates]
    return (lambda: nsa(inp.q, kv, kv, kv, inp.gates, phi, phi, **FLA_CONFIG, impl="triton").output), leaves


def fla_line(inp: Inputs):
    from fla.ops.nsa import parallel_nsa

    k, v = inp.kv[0]
    g_cmp, g_slc = inp.gates[..., 0], inp.gates[..., 1]
    leaves = [inp.q, k, v, inp.gates]
    return (lambda: parallel_nsa(inp.q, k, v, g_cmp, g_slc, block_counts=FLA_CONFIG["num_selected"],
                                 block_size=FLA_CONFIG["selection_block"], window_size=0)), leaves


def sdpa_line(inp: Inputs, backend):
    k, v = inp.kv[1]

    def forward():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(inp.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True)
    return forward, [inp.q, k, v]


def time_line(name, make, reps, rows, **where):
    """Times one line, appends its row (an error or an out-of-memory becomes the row's "error")."""
    row = {"line": name, **where}
    try:
        forward, leaves = make()
        row.update(fwd_bwd(forward, leaves, reps))
        print(f"  {name:18s} " + " ".join(f"{k}={v}" for k, v in where.items())
              + f"  fwd {row['fwd_ms']:9.2f} ms  bwd {row['bwd_ms']:9.2f} ms  peak {row['peak_gib']:6.1f} GiB",
              flush=True)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        print(f"  {name:18s} {where}: out of memory", flush=True)
    torch.cuda.empty_cache()
    rows.append(row)


def gate_combine(ops):
    """The gate combine of `ops`: the gated sum alone, where the branches' backward applies the gates (no
    BranchOps.gate, since 2026-12-06: its backward passes the gradient on and gives the gates none, so the
    line times the forward kernel and that hand-over); each output through its gate node, then the gated
    sum (BranchOps.gate and .sum, with the gates since 2026-12-04; before, each gate wrote its product and
    .sum added them); one combine kernel (BranchOps.combine, before 2026-12-01); or, for kernels older still
    (an earlier --kernels-root), torch's arithmetic."""
    if not hasattr(ops, "gate") and not hasattr(ops, "combine"):
        return lambda o_cmp, o_slc, o_win, gates: ops.sum(o_cmp, o_slc, o_win, *gates.unbind(-1))
    if hasattr(ops, "gate") and "g_cmp" in inspect.signature(ops.sum).parameters:
        def gated(o_cmp, o_slc, o_win, gates):
            g = gates.unbind(-1)
            return ops.sum(*(ops.gate(o, g[i]) for i, o in enumerate((o_cmp, o_slc, o_win))), *g)
        return gated
    if hasattr(ops, "gate"):
        return lambda o_cmp, o_slc, o_win, gates: ops.sum(*(ops.gate(o, gates[..., i])
                                                            for i, o in enumerate((o_cmp, o_slc, o_win))))
    if hasattr(ops, "combine"):
        return ops.combine

    def inline(o_cmp, o_slc, o_win, gates):
        g = gates.float().unsqueeze(-1)
        total = g[..., 0, :] * o_cmp.float() + g[..., 1, :] * o_slc.float() + g[..., 2, :] * o_win.float()
        return total.to(o_cmp.dtype)
    return inline


def breakdown(nsa_mod, T, hq, hk, d, reps) -> list[dict]:
    """Each branch of the paper config alone, forward and forward+backward, at one T."""
    from kernels.compression.naive import mean_compress, mlp_compress

    ops = nsa_mod.branch_ops("triton")
    l, s, ls, n, w = (PAPER[k] for k in ("block_size", "stride", "selection_block", "num_selected", "window"))
    inp = Inputs(T, hq, hk, d)
    q, (k, v), gates = inp.q, inp.kv[1], inp.gates
    with torch.no_grad():
        k_cmp = mean_compress(k, l, s).requires_grad_()
        v_cmp = mean_compress(v, l, s).requires_grad_()
        o_cmp, lse = ops.compressed(q, k_cmp, v_cmp, l, s)
        blocks = ops.select(q, k_cmp, lse, l, s, ls, n)
        o_slc, _ = ops.selected(q, k, v, blocks, ls)
        o_win, _ = ops.window(q, k, v, w)
    phi = [mlp_phi_params(l, d) for _ in range(2)]
    branch_outs = [x.detach().requires_grad_() for x in (o_cmp, o_slc, o_win)]
    combine = gate_combine(ops)
    rows = []
    parts = {
        "phi mlp (k and v)": (lambda: torch.cat([mlp_compress(k, l, s, **phi[0]), mlp_compress(v, l, s, **phi[1])]),
                              [k, v]),
        "compressed attention": (lambda: ops.compressed(q, k_cmp, v_cmp, l, s)[0], [q, k_cmp, v_cmp]),
        "selected attention": (lambda: ops.selected(q, k, v, blocks, ls)[0], [q, k, v]),
        "window attention": (lambda: ops.window(q, k, v, w)[0], [q, k, v]),
        # with the gates applied in the branches' backward (no BranchOps.gate) the sum gives them no gradient
        "gate combine": (lambda: combine(*branch_outs, gates),
                         branch_outs if not hasattr(ops, "gate") else [*branch_outs, gates]),
    }
    for name, (forward, leaves) in parts.items():
        time_line(name, lambda: (forward, leaves), reps, rows, T=T)
    # nsa.selection_score "max" where the kernels have it (not those before it, under --kernels-root)
    scores = ("sum", "max") if "score" in inspect.signature(ops.select).parameters else ("sum",)
    for score in scores:
        line = "top-n selection" + (", max score" if score == "max" else "")
        with torch.no_grad():
            top = median_ms(lambda: ops.select(q, k_cmp, lse, l, s, ls, n, score=score), reps)
        rows.append({"line": line, "T": T, "fwd_ms": top["ms"], "runs": top["runs"]})
        print(f"  {line:18s} T={T}  fwd {top['ms']:9.2f} ms", flush=True)
    del inp
    return rows


def find(rows, line, G, T):
    for r in rows:
        if r["line"] == line and r.get("G") == G and r.get("T") == T and "error" not in r:
            return r
    return None


def ratios(rows, G, T) -> dict:
    """Baseline ms / ours ms for one (G, T): cuDNN and flash against ours (paper, phi mean), fla against
    ours on fla's config."""
    out = {}
    for base, ours in (("cudnn", "ours paper mean"), ("flash", "ours paper mean"), ("fla", "ours fla-config")):
        b, o = find(rows, base, G, T), find(rows, ours, G, T)
        if b and o:
            out[base] = {m: b[f"{m}_ms"] / o[f"{m}_ms"] for m in ("fwd", "bwd", "fwd_bwd")}
    return out


def targets(rows, groups) -> dict:
    """Issue 11's targets against this run's measurements (None where a figure was not measured)."""
    G = groups[0]
    met = {}
    for name, (base, T, measure), minimum in SPEED_TARGETS:
        r = ratios(rows, G, T).get(base, {}).get(measure)
        met[name] = {"target": f">= {minimum}x", "ratio": r, "met": None if r is None else r >= minimum}
    # G=4 within 1.5x of G=16 per query head (ours, paper, phi mean, forward+backward), at the longest T
    if 4 in groups and 16 in groups:
        common = sorted({r["T"] for r in rows if find(rows, "ours paper mean", 4, r.get("T"))
                         and find(rows, "ours paper mean", 16, r.get("T"))})
        if common:
            T = common[-1]
            g4, g16 = find(rows, "ours paper mean", 4, T), find(rows, "ours paper mean", 16, T)
            per_head = (g4["fwd_bwd_ms"] / (4 * g4["HK"])) / (g16["fwd_bwd_ms"] / (16 * g16["HK"]))
            met["g4_per_head_vs_g16"] = {"target": "<= 1.5x", "T": T, "ratio": per_head, "met": per_head <= 1.5}
    for ours in ("ours fla-config", "ours paper mean"):
        o, f = find(rows, ours, G, 131072), find(rows, "fla", G, 131072)
        r = o["peak_gib"] / f["peak_gib"] if o and f else None
        key = "memory_128k_vs_fla" + ("" if ours == "ours fla-config" else "_paper_config")
        met[key] = {"target": "<= 1.2x fla's peak", "ratio": r, "met": None if r is None else r <= 1.2}
    met["memory_1m_cp4"] = {"target": "<= 40 GB per GPU", "met": None, "note": "needs 4 GPUs: not measured here"}
    met["time_1m_cp4"] = {"target": "<= 2.5 s", "met": None, "note": "needs 4 GPUs: not measured here"}
    return met


def git_commit(arg):
    if arg:
        return arg
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def print_tables(report):
    rows = report["rows"]
    print(f"\n{report['gpu']}, torch {report['torch']}, triton {report['triton']}, fla {report['fla']}; "
          f"bf16, B=1, HK={report['args']['kv_heads']}, D={report['args']['head_dim']}, causal; "
          f"median ms of >= {report['args']['reps']} runs; ratio = baseline / ours")
    head = (f"{'G':>2} {'T':>7} | {'ours mean':>17} | {'ours mlp':>17} | {'cuDNN':>17} | {'flash':>17} | "
            f"{'x cuDNN':>11} | {'ours fla-cfg':>17} | {'fla':>17} | {'x fla':>11}")
    print(head + "\n" + "-" * len(head))

    def cell(r, width=17):
        return f"{r['fwd_ms']:8.1f}/{r['bwd_ms']:8.1f}" if r else f"{'-':>{width}}"

    def ratio_cell(rs, base):
        return f"{rs[base]['fwd']:5.2f}/{rs[base]['bwd']:5.2f}" if base in rs else f"{'-':>11}"

    for G in report["args"]["groups"]:
        for T in sorted({r["T"] for r in rows if r.get("G") == G}):
            rs = ratios(rows, G, T)
            print(f"{G:>2} {T:>7} | {cell(find(rows, 'ours paper mean', G, T))} | "
                  f"{cell(find(rows, 'ours paper mlp', G, T))} | {cell(find(rows, 'cudnn', G, T))} | "
                  f"{cell(find(rows, 'flash', G, T))} | {ratio_cell(rs, 'cudnn')} | "
                  f"{cell(find(rows, 'ours fla-config', G, T))} | {cell(find(rows, 'fla', G, T))} | "
                  f"{ratio_cell(rs, 'fla')}")
    peaks = [r for r in rows if "peak_gib" in r and r.get("T") == 131072]
    if peaks:
        print("peak GiB at 128K: " + ", ".join(f"{r['line']} G={r['G']} {r['peak_gib']:.1f}" for r in peaks))
    if report["breakdown"]:
        print(f"\n{'branch':22s} {'T':>7} {'fwd ms':>9} {'bwd ms':>9}")
        for r in report["breakdown"]:
            if "error" in r:
                print(f"{r['line']:22s} {r['T']:>7} {r['error']}")
            else:
                print(f"{r['line']:22s} {r['T']:>7} {r['fwd_ms']:9.2f} {r.get('bwd_ms', float('nan')):9.2f}")
    print("\ntargets:")
    for name, t in report["targets_met"].items():
        r = t.get("ratio")
        print(f"  {name:32s} {t['target']:22s} {'-' if r is None else f'{r:.2f}':>6}  met={t['met']}")


def gpu_kernels(tool: str, kernels_root: str | None):
    """kernels.nsa for a GPU tool: from the repository, or from another checkout (kernels_root); exits with
    a message naming `tool` where torch sees no GPU."""
    if not torch.cuda.is_available():
        sys.exit(f"{tool} times the NSA kernels on an NVIDIA GPU, and this machine has none that torch can use: "
                 "run it on a GPU machine (README, 'On a GPU machine')")
    if kernels_root:
        sys.path.insert(0, str(Path(kernels_root).resolve()))
    sys.path.insert(1 if kernels_root else 0, str(REPO))
    import kernels.nsa as nsa_mod

    return nsa_mod


def main():
    a = parse_args()
    nsa_mod = gpu_kernels("tools/bench_kernels.py", a.kernels_root)

    fla_version = None
    if "fla" in a.lines:
        import fla
        fla_version = fla.__version__
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "host": platform.node(),
              "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version,
              "commit": git_commit(a.commit), "kernels": str(Path(nsa_mod.__file__).parent), "args": vars(a),
              "paper_config": PAPER, "fla_config": FLA_CONFIG, "rows": [], "breakdown": []}
    rows, hk, d = report["rows"], a.kv_heads, a.head_dim
    nsa = nsa_mod.native_sparse_attention

    def save():
        """Written after every shape, so that a run stopped at its time limit keeps what it measured."""
        report["ratios"] = {f"G={G} T={T}": ratios(rows, G, T) for G in a.groups for T in sorted(a.seqs)}
        report["targets_met"] = targets(rows, a.groups)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1))

    if "ours" in a.lines:
        for T in a.breakdown_seqs:
            print(f"\n== breakdown G={a.groups[0]} T={T}", flush=True)
            report["breakdown"] += breakdown(nsa_mod, T, a.groups[0] * hk, hk, d, a.reps)
            save()
    for G in a.groups:
        for T in sorted(a.seqs):
            print(f"\n== G={G} T={T}", flush=True)
            inp = Inputs(T, G * hk, hk, d)
            where = dict(G=G, T=T, HK=hk)
            if "ours" in a.lines:
                for phi in a.phis:
                    time_line(f"ours paper {phi}", lambda: ours_paper(nsa, inp, phi), a.reps, rows, **where)
            if "dense" in a.lines:
                time_line("cudnn", lambda: sdpa_line(inp, SDPBackend.CUDNN_ATTENTION), a.reps, rows, **where)
                time_line("flash", lambda: sdpa_line(inp, SDPBackend.FLASH_ATTENTION), a.reps, rows, **where)
            if G == 16:
                if "ours" in a.lines:
                    time_line("ours fla-config", lambda: ours_fla_config(nsa, inp), a.reps, rows, **where)
                if "fla" in a.lines:
                    time_line("fla", lambda: fla_line(inp), a.reps, rows, **where)
            del inp
            save()
    if "ours" in a.lines:
        for T in a.long_seqs:
            print(f"\n== G={a.groups[0]} T={T} (ours alone)", flush=True)
            inp = Inputs(T, a.groups[0] * hk, hk, d)
            time_line("ours paper mean", lambda: ours_paper(nsa, inp, "mean"), a.reps, rows, G=a.groups[0], T=T, HK=hk)
            del inp
            save()
    save()
    print_tables(report)


if __name__ == "__main__":
    main()
