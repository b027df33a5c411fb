"""What the opt-in selection options cost one NSA layer, in the proof model's shapes, timed in one process
on the same inputs: the layer's forward+backward as configured (the paper's "sum" score, no loss); with the
selection alignment loss (nsa.selection_loss) at several row strides (nsa.selection_loss_stride); with
other selection scores (--scores, nsa.selection_score: the layer, and top-n alone against the "sum" score's
top-n, given compressed attention's log-sum-exp; "indexer": the learned indexer with --indexer-heads heads
a group at its start weights, its layer line with its loss on every --indexer-loss-stride-th row, and its
loss alone, forward+backward, on one document a sequence and on packed ones: through its kernels (--impl
triton) and through PyTorch, and an earlier version's with --indexer-baseline); and dense causal
attention (torch SDPA, cuDNN or flash on the GPU) on the same q, k, v.

Shapes: configs/proof_100m.yaml's layer (16 query heads, 1 KV head, head dim 64, l=16 d=8 l'=64 n=16,
512-token window, phi the mean, shared K/V) on each curriculum stage's tokens a step: 16 x 2K, 8 x 8K and
1 x 32K (--shapes BxT ...). Inputs are random; top-n picks from them as in training. Medians of >= --reps
timed runs after one untimed; each line's ratio is its time over the configured layer's (top-n alone: over
the "sum" top-n's). With
--profile, the device operators of one forward+backward at the first shape and stride 4, the largest
first: where the loss's time goes.

    python3 tools/bench_selection_loss.py --out benchmarks/selection-loss-$(date +%F).json
    python3 tools/bench_selection_loss.py --strides --scores exact bound --out benchmarks/selection-score-$(date +%F).json
    python3 tools/bench_selection_loss.py --strides --scores exact indexer --out benchmarks/indexer-$(date +%F).json
    git show f679137:kernels/block_selection/indexer.py > /tmp/indexer_f679137.py
    python3 tools/bench_selection_loss.py --strides --scores indexer --no-dense \
        --indexer-baseline /tmp/indexer_f679137.py --out benchmarks/indexer-loss-$(date +%F).json

On CPU (--impl reference, small --shapes) it runs the same lines slowly: a check that it works, not a
measurement.
"""

import argparse
import functools
import importlib.util
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from kernels.block_selection import indexer as indexer_module
from kernels.block_selection.indexer import indexer_init
from kernels.block_selection.naive import SELECTION_SCORES
from kernels.compression.naive import mean_compress
from kernels.nsa import branch_ops, native_sparse_attention

PROOF = dict(block_size=16, stride=8, selection_block=64, num_selected=16, window=512)  # configs/proof_100m.yaml


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["16x2048", "8x8192", "1x32768"], help="BxT: sequences x tokens")
    p.add_argument("--strides", type=int, nargs="*", default=[1, 4, 16],
                   help="nsa.selection_loss_stride values (none: no loss lines)")
    p.add_argument("--scores", nargs="*", default=[], choices=[s for s in SELECTION_SCORES if s != "sum"],
                   help="nsa.selection_score values to time against the paper's 'sum'")
    p.add_argument("--no-dense", action="store_true", help="leave out the dense SDPA line")
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--indexer-heads", type=int, default=4, help="the 'indexer' score's heads a group (nsa.indexer_heads)")
    p.add_argument("--indexer-loss-stride", type=int, default=128,
                   help="the 'indexer' layer line's loss rows (nsa.indexer_loss_stride; 0: no loss)")
    p.add_argument("--indexer-baseline", type=Path,
                   help="an earlier copy of kernels/block_selection/indexer.py: its loss timed beside the current one")
    p.add_argument("--impl", default="triton", choices=["triton", "reference"])
    p.add_argument("--reps", type=int, default=5, help="timed runs per figure (at least 3)")
    p.add_argument("--profile", action="store_true", help="device operators of the first shape at stride 4")
    p.add_argument("--commit", help="git commit timed (default: git rev-parse HEAD)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()
    if args.reps < 3:
        p.error(f"--reps={args.reps}: give at least 3 timed runs per figure")
    group = args.q_heads // args.kv_heads
    if "indexer" in args.scores and (args.indexer_heads < 1 or group % args.indexer_heads):
        p.error(f"--indexer-heads {args.indexer_heads}: must divide the {group} query heads of a KV head")
    if args.indexer_baseline is not None and ("indexer" not in args.scores or not args.indexer_baseline.is_file()):
        p.error(f"--indexer-baseline {args.indexer_baseline}: needs --scores indexer and an existing file (e.g. "
                "git show f679137:kernels/block_selection/indexer.py > /tmp/indexer_f679137.py)")
    for shape in args.shapes:
        parts = shape.split("x")
        if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
            p.error(f"--shapes {shape!r}: give sequences x tokens, e.g. 16x2048")
    return args


def layer_inputs(batch: int, seq: int, args, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_()

    gates = torch.rand(batch, seq, args.q_heads, 3, generator=gen, device=device, dtype=dtype)
    indexer = indexer_init(args.indexer_heads, args.q_heads // args.kv_heads, args.head_dim) if "indexer" in args.scores else None
    return {"q": leaf(batch, seq, args.q_heads, args.head_dim), "k": leaf(batch, seq, args.kv_heads, args.head_dim),
            "v": leaf(batch, seq, args.kv_heads, args.head_dim), "gates": gates.requires_grad_(),
            "indexer": None if indexer is None else indexer.to(device=device, dtype=dtype).requires_grad_(),
            "indexer_loss": args.indexer_loss_stride}


def layer_step(inputs: dict, impl: str, stride: int, score: str = "sum"):
    """One forward+backward of the layer; with stride > 0 the loss (weight 1, mean over its rows) joins
    the output's gradient, as nsa_dist/attention.py adds it; with the "indexer" score, the indexer's loss
    likewise (on every inputs["indexer_loss"]-th row)."""
    phi = {"block_size": PROOF["block_size"], "stride": PROOF["stride"]}
    kv = (inputs["k"], inputs["v"])
    indexer_loss = inputs["indexer_loss"] if score == "indexer" else 0
    result = native_sparse_attention(
        inputs["q"], kv, kv, kv, inputs["gates"], lambda x: mean_compress(x, **phi), lambda x: mean_compress(x, **phi),
        impl=impl, selection_loss=stride, selection_score=score, indexer=inputs["indexer"], indexer_loss=indexer_loss,
        **PROOF)
    loss = result.output.float().square().mean()
    for terms in (result.selection_terms, result.indexer_terms):
        if terms is not None:  # (summed KL, rows, ...)
            loss = loss + terms[0] / terms[1].clamp_min(1)
    loss.backward()


def topn_step(inputs: dict, impl: str, score: str):
    """Top-n alone, as the layer calls it: from compressed attention's log-sum-exp (computed once, kept in
    inputs) for "sum" and "max", from the raw keys for "exact" and "bound" (the bound's own compressed pass
    included: it is part of that score's top-n)."""
    ops = branch_ops(impl)
    q, k = inputs["q"].detach(), inputs["k"].detach()
    if "k_cmp" not in inputs:
        inputs["k_cmp"] = mean_compress(k, PROOF["block_size"], PROOF["stride"])
        inputs["lse_cmp"] = ops.compressed(q, inputs["k_cmp"], inputs["k_cmp"], PROOF["block_size"],
                                           PROOF["stride"])[1]
    ops.select(q, inputs["k_cmp"], inputs["lse_cmp"], PROOF["block_size"], PROOF["stride"], PROOF["selection_block"],
               PROOF["num_selected"], score=score, keys=k, indexer=inputs["indexer"])


def packed_documents(batch: int, seq: int, packed: bool, device: torch.device) -> torch.Tensor:
    """cu_seqlens over the batch's sequences laid end to end: one document a sequence, or each sequence
    packed with documents of 1/8, 1/4 and 5/8 of it."""
    cuts = [seq // 8, 3 * seq // 8] if packed else []
    bounds = [b * seq + c for b in range(batch) for c in [0, *cuts]] + [batch * seq]
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def indexer_loss_step(inputs: dict, loss_terms, cu_seqlens: torch.Tensor):
    """The indexer's loss alone (loss_terms: indexer_loss_terms of some version), forward+backward, on the
    layer's q and k laid end to end as one packed batch."""
    q, k = (inputs[name].detach().flatten(0, 1)[None] for name in ("q", "k"))
    terms = loss_terms(q, inputs["indexer"], k, selection_block=PROOF["selection_block"],
                       num_selected=PROOF["num_selected"], cu_seqlens=cu_seqlens, row_stride=inputs["indexer_loss"])
    (terms.kl / terms.rows.clamp_min(1)).backward()


def load_indexer(path: Path):
    """indexer_loss_terms from a copy of kernels/block_selection/indexer.py at `path`."""
    spec = importlib.util.spec_from_file_location("indexer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.indexer_loss_terms


def dense_step(inputs: dict):
    """Dense causal attention's forward+backward on the same q, k, v (torch SDPA, GQA)."""
    q, k, v = (inputs[name].transpose(1, 2) for name in ("q", "k", "v"))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.float().square().mean().backward()


def median_s(fn, reps: int, device: torch.device) -> tuple[float, int]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # compiles the kernels
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def profile(inputs: dict, impl: str, device: torch.device) -> list[dict]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        layer_step(inputs, impl, 4)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:20]
    return [{"op": e.key, "ms": getattr(e, key) / 1e3, "calls": e.count} for e in events]


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    rows, profiled = [], None
    for shape in args.shapes:
        batch, seq = (int(x) for x in shape.split("x"))
        inputs = layer_inputs(batch, seq, args, device)
        base, runs = median_s(lambda: layer_step(inputs, args.impl, 0), args.reps, device)
        rows.append({"B": batch, "T": seq, "stride": None, "ms": base * 1e3, "runs": runs, "ratio": 1.0})
        print(f"{batch:>3} x {seq:>6}  layer            {base * 1e3:9.2f} ms", flush=True)
        for stride in args.strides:
            took, runs = median_s(lambda: layer_step(inputs, args.impl, stride), args.reps, device)
            rows.append({"B": batch, "T": seq, "stride": stride, "ms": took * 1e3, "runs": runs, "ratio": took / base})
            print(f"{batch:>3} x {seq:>6}  + loss, stride {stride:<2} {took * 1e3:9.2f} ms  {took / base:5.2f}x",
                  flush=True)
        if args.scores:
            topn_sum, runs = median_s(lambda: topn_step(inputs, args.impl, "sum"), args.reps, device)
            rows.append({"B": batch, "T": seq, "topn": "sum", "ms": topn_sum * 1e3, "runs": runs, "ratio": 1.0})
            print(f"{batch:>3} x {seq:>6}  top-n, sum        {topn_sum * 1e3:9.2f} ms", flush=True)
        for score in args.scores:
            took, runs = median_s(lambda: layer_step(inputs, args.impl, 0, score), args.reps, device)
            rows.append({"B": batch, "T": seq, "score": score, "ms": took * 1e3, "runs": runs, "ratio": took / base})
            print(f"{batch:>3} x {seq:>6}  layer, {score:<10} {took * 1e3:9.2f} ms  {took / base:5.2f}x", flush=True)
            took, runs = median_s(lambda: topn_step(inputs, args.impl, score), args.reps, device)
            rows.append({"B": batch, "T": seq, "topn": score, "ms": took * 1e3, "runs": runs,
                         "ratio": took / topn_sum})
            print(f"{batch:>3} x {seq:>6}  top-n, {score:<10} {took * 1e3:9.2f} ms  {took / topn_sum:5.2f}x",
                  flush=True)
        if "indexer" in args.scores and args.indexer_loss_stride:
            # the loss through the kernels (with --impl triton), through PyTorch, and an earlier version's
            versions = {"pytorch": indexer_module.indexer_loss_terms}
            if args.impl == "triton":
                versions = {"kernels": functools.partial(indexer_module.indexer_loss_terms, impl="triton"),
                            **versions}
            if args.indexer_baseline is not None:
                versions["baseline"] = load_indexer(args.indexer_baseline)
            for packed in (False, True):
                documents = packed_documents(batch, seq, packed, device)
                times = {}
                for version, loss_terms in versions.items():
                    times[version], runs = median_s(lambda: indexer_loss_step(inputs, loss_terms, documents),
                                                    args.reps, device)
                    rows.append({"B": batch, "T": seq, "indexer_loss": version, "packed": packed,
                                 "ms": times[version] * 1e3, "runs": runs, "ratio": times[version] / base})
                    print(f"{batch:>3} x {seq:>6}  indexer loss, {version:<8} {'packed' if packed else 'one doc':<7} "
                          f"{times[version] * 1e3:9.2f} ms  {times[version] / base:5.2f}x of the layer", flush=True)
        if not args.no_dense:
            took, runs = median_s(lambda: dense_step(inputs), args.reps, device)
            rows.append({"B": batch, "T": seq, "dense": "sdpa", "ms": took * 1e3, "runs": runs, "ratio": took / base})
            print(f"{batch:>3} x {seq:>6}  dense SDPA       {took * 1e3:9.2f} ms  {took / base:5.2f}x", flush=True)
        if args.profile and profiled is None:
            profiled = profile(inputs, args.impl, device)
            for event in profiled:
                print(f"    {event['ms']:9.2f} ms  {event['calls']:>5}  {event['op'][:90]}")
    report = {"command": "tools/bench_selection_loss.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items()
                  if v not in (None, False) and k not in ("profile", "no_dense") and (v != [] or k == "strides"))
              + (" --profile" if args.profile else "") + (" --no-dense" if args.no_dense else ""),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "commit": commit, "impl": args.impl, "nsa": PROOF,
              "heads": {"q": args.q_heads, "kv": args.kv_heads, "dim": args.head_dim},
              "indexer_baseline": None if args.indexer_baseline is None else str(args.indexer_baseline),
              "rows": rows, "profile_stride_4": profiled}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
