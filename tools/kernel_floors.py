"""How fast each NSA branch could be at best, from its work and rates measured in the same benchmark run,
and the ratio to cuDNN that those floors allow against issue 11's targets.

Reads a JSON of tools/bench_kernels.py (no GPU needed) and, at each length that has a cuDNN row, takes the
layer at the benchmark's shapes (B = 1, one document of T tokens, HQ = G * HK query heads, head dim D, the
paper configuration l, d, l', n, w of that JSON). The work of each branch, counted token by token:

- compressed attention: token t sees the compressed blocks that have ended, (t - l + 1) // d + 1 of them.
  Forward 4 D flops a (query head, key) pair (QK^T and PV), backward 10 D (the scores again, dP, dV, dQ, dK).
- top-n: QK^T over the same pairs again (2 D a pair), for the tokens that have a choice (more than n
  selection blocks seen). It needs each head's final log-sum-exp, so it cannot share the forward's pass.
- window attention: min(t + 1, w) keys; 4 D / 10 D.
- selected attention: min(n, t // l' + 1) blocks of l' keys. The one-token forward and dQ read every pick's
  K and V block (l' * 2 D * 2 bytes) through L2 once per (token, KV head); their floor is the larger of
  those bytes at the L2 rate and their flops (4 D, 6 D) at the tensor rate. dK/dV reads each pick's group
  of queries and output gradients (G * 2 D * 2 bytes) and does 8 D flops a pair (S, dP, dV, dK). Groups
  of at most 4 heads run the forward and dQ by key blocks on a GPU (each K/V block read once): there only
  their flops count.
- phi and the gate combine are not modelled (memory-bound; 4 and 5 ms at 128K in e364bce's breakdown, phi
  there the MLP): they count 0, so the sum stays a lower bound; their measured times are printed beside it.

Rates: tensor work at the rate cuDNN's causal SDPA reached in the same run (4 D flops a pair forward, 10 D
backward, over T (T + 1) / 2 pairs a head), so a floor is what the branch would take if it ran as
efficiently as cuDNN's dense kernel; L2 at --l2-tbs, 8.9 TB/s by default: on the H100 Nsight Compute
counted the selected forward's 14.6 GB through L2 in 1,881 us, 7.8 TB/s at 86.9% of the L2's peak
(benchmarks/gpu_checks/ncu/ncu-8k-79b11ce.txt.gz). --tensor-tflops F puts every kernel at F instead
(what-if: the FlashAttention-3 paper reports about 740 on an H100's forward). --tile-tokens K --union-ratio R models
selected attention over tiles of K tokens whose picks' union is R times one token's (LAUNCH TOKENS): R / K
of the bytes, R times the flops. --long-seq T --ranks N: one layer at a length the run did not time, at the
rates of its longest one, shared evenly by N context-parallel ranks with no communication (the 1M target
on 4 GPUs).

    python3 tools/kernel_floors.py benchmarks/kernels-2026-12-04-fla-g4-e364bce.json
    python3 tools/kernel_floors.py benchmarks/kernels-2026-12-06-79afaf3-g16.json --long-seq 1048576 --ranks 4
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_kernels import SPEED_TARGETS, find, git_commit  # noqa: E402  (beside this file in tools/)
from kernels.selected_attention.triton import BY_BLOCKS_UP_TO_GROUP  # noqa: E402

BF16_BYTES = 2
L2_TBS = 8.9
TARGET_GROUP = 16


def cudnn_targets() -> dict:
    """Issue 11's cuDNN targets as bench_kernels.py holds them (at G = 16): T -> {pass: minimum ratio}."""
    targets = {}
    for _, (base, seq, part), minimum in SPEED_TARGETS:
        if base == "cudnn":
            targets.setdefault(seq, {})[part] = minimum
    return targets


TARGETS = cudnn_targets()
# issue 11: one layer at 1M tokens on 4 GPUs (CP = 4): (T, ranks) -> {pass: most ms}
TARGETS_CP = {(1048576, 4): {"fwd_bwd": 2500.0}}


def compressed_keys(seq: int, block_size: int, stride: int) -> np.ndarray:
    """[seq] compressed blocks each token sees (those that have ended: i * d + l - 1 <= t)."""
    t = np.arange(seq, dtype=np.int64)
    return np.where(t >= block_size - 1, (t - block_size + 1) // stride + 1, 0)


def window_keys(seq: int, window: int) -> np.ndarray:
    """[seq] keys each token sees in the sliding window (t - w < s <= t)."""
    return np.minimum(np.arange(seq, dtype=np.int64) + 1, window)


def selected_blocks(seq: int, selection_block: int, num_selected: int) -> np.ndarray:
    """[seq] selection blocks each token attends (every block it has seen, at most n)."""
    return np.minimum(np.arange(seq, dtype=np.int64) // selection_block + 1, num_selected)


def has_choice(seq: int, selection_block: int, num_selected: int) -> np.ndarray:
    """[seq] bool: the token has seen more than n selection blocks, so top-n ranks them."""
    return np.arange(seq, dtype=np.int64) // selection_block + 1 > num_selected


def branch_work(seq: int, q_heads: int, kv_heads: int, head_dim: int, config: dict,
                tile_tokens: int = 1, union_ratio: float = 1.0) -> dict:
    """{(branch, pass): [(kernel, flops, bytes through L2 that bound it, or 0), ...]} of one layer over one
    document; a branch's floor in a pass is the sum of its kernels' floors."""
    l, d, sel, n, w = (config[k] for k in ("block_size", "stride", "selection_block", "num_selected", "window"))
    group = q_heads // kv_heads
    D = head_dim
    cmp_pairs = q_heads * int(compressed_keys(seq, l, d).sum())
    topn_pairs = q_heads * int(compressed_keys(seq, l, d)[has_choice(seq, sel, n)].sum())
    win_pairs = q_heads * int(window_keys(seq, w).sum())
    picks = kv_heads * int(selected_blocks(seq, sel, n).sum())  # (token, KV head, pick) triples
    sel_pairs = picks * group * sel
    # one token a program reads each pick's K/V block; by key blocks (small groups, on a GPU) each block's
    # K/V is read once for all the tokens that picked it: its bytes are not modelled (a lower bound still)
    one_token = group > BY_BLOCKS_UP_TO_GROUP
    kv_bytes = picks * sel * 2 * D * BF16_BYTES * union_ratio / tile_tokens if one_token else 0
    q_do_bytes = picks * group * 2 * D * BF16_BYTES
    return {
        ("compressed attention", "fwd"): [("forward", 4 * D * cmp_pairs, 0)],
        ("compressed attention", "bwd"): [("backward", 10 * D * cmp_pairs, 0)],
        ("top-n selection", "fwd"): [("scores", 2 * D * topn_pairs, 0)],
        ("window attention", "fwd"): [("forward", 4 * D * win_pairs, 0)],
        ("window attention", "bwd"): [("backward", 10 * D * win_pairs, 0)],
        ("selected attention", "fwd"): [("forward", 4 * D * sel_pairs * union_ratio, kv_bytes)],
        ("selected attention", "bwd"): [("dQ", 6 * D * sel_pairs * union_ratio, kv_bytes),
                                        ("dK/dV", 8 * D * sel_pairs, q_do_bytes)],
    }


def dense_flops(seq: int, q_heads: int, head_dim: int) -> dict:
    """Causal attention's flops, forward and backward, over T (T + 1) / 2 pairs a head."""
    pairs = q_heads * seq * (seq + 1) // 2
    return {"fwd": 4 * head_dim * pairs, "bwd": 10 * head_dim * pairs}


def pass_floor(branches: list[dict], part: str) -> float:
    """The floors of one pass ("fwd", "bwd" or both, "fwd_bwd") summed over the branches, ms."""
    passes = ("fwd", "bwd") if part == "fwd_bwd" else (part,)
    return sum(b["floor_ms"] for b in branches if b["pass"] in passes)


def branch_floors(seq: int, q_heads: int, kv_heads: int, head_dim: int, config: dict, rate: dict, l2_tbs: float,
                  tile_tokens: int = 1, union_ratio: float = 1.0) -> list[dict]:
    """Each (branch, pass)'s floor in ms: its kernels' flops at rate[pass] (flop/s) or their bytes at l2_tbs,
    whichever takes longer, summed over its kernels."""
    branches = []
    for (name, part), kernels in branch_work(seq, q_heads, kv_heads, head_dim, config, tile_tokens,
                                             union_ratio).items():
        parts = []
        for kernel, flops, nbytes in kernels:
            tensor_ms, l2_ms = flops / rate[part] * 1e3, nbytes / (l2_tbs * 1e12) * 1e3
            parts.append({"kernel": kernel, "tflop": flops / 1e12, "l2_gb": nbytes / 1e9,
                          "floor_ms": max(tensor_ms, l2_ms), "bound": "L2" if l2_ms > tensor_ms else "tensor"})
        branches.append({"branch": name, "pass": part, "kernels": parts,
                         "floor_ms": sum(k["floor_ms"] for k in parts),
                         "bound": "+".join(dict.fromkeys(k["bound"] for k in parts))})
    return branches


def long_floors(entries: list[dict], report: dict, group: int, seq: int, ranks: int, l2_tbs: float,
                tile_tokens: int = 1, union_ratio: float = 1.0) -> dict:
    """Floors of one layer at a length the run did not time with cuDNN, at the rates of its longest length
    that it did, shared evenly by `ranks` context-parallel ranks with no communication: what one rank
    cannot go under."""
    longest = entries[-1]
    rate = {p: longest["rate_tflops"][p] * 1e12 for p in ("fwd", "bwd")}
    kv_heads, head_dim = report["args"]["kv_heads"], report["args"]["head_dim"]
    branches = branch_floors(seq, group * kv_heads, kv_heads, head_dim, report["paper_config"], rate, l2_tbs,
                             tile_tokens, union_ratio)
    for b in branches:
        b["floor_ms"] /= ranks
    out = {"T": seq, "G": group, "ranks": ranks, "rates_of_T": longest["T"], "branches": branches}
    for part in ("fwd", "bwd", "fwd_bwd"):
        out[part] = {"floor_ms": pass_floor(branches, part),
                     "target_ms": TARGETS_CP.get((seq, ranks), {}).get(part) if group == TARGET_GROUP else None}
    return out


def floors(report: dict, group: int, l2_tbs: float, tile_tokens: int, union_ratio: float,
           tensor_tflops: float | None = None) -> list[dict]:
    """One entry a length with a cuDNN row at `group`: rates, each branch's floor and measured time, sums.
    tensor_tflops: the tensor rate of every kernel, both passes, instead of cuDNN's in the run."""
    kv_heads, head_dim = report["args"]["kv_heads"], report["args"]["head_dim"]
    q_heads = group * kv_heads
    out = []
    for seq in sorted({r["T"] for r in report["rows"] if r.get("G") == group}):
        cudnn, ours = find(report["rows"], "cudnn", group, seq), find(report["rows"], "ours paper mean", group, seq)
        if cudnn is None:
            continue
        dense = dense_flops(seq, q_heads, head_dim)
        rate = {p: tensor_tflops * 1e12 if tensor_tflops is not None else dense[p] / (cudnn[f"{p}_ms"] / 1e3)
                for p in ("fwd", "bwd")}  # flop/s
        # the breakdown runs at the JSON's first group only
        measured = {r["line"]: r for r in report.get("breakdown", []) if r.get("T") == seq and "error" not in r
                    and group == report["args"]["groups"][0]}
        branches = branch_floors(seq, q_heads, kv_heads, head_dim, report["paper_config"], rate, l2_tbs,
                                 tile_tokens, union_ratio)
        for b in branches:
            b["measured_ms"] = measured.get(b["branch"], {}).get(f"{b['pass']}_ms")
        unmodelled = [{"branch": line, "pass": part, "measured_ms": measured[line][f"{part}_ms"]}
                      for line in measured for part in ("fwd", "bwd")
                      if line not in {b["branch"] for b in branches} and "max score" not in line
                      and measured[line].get(f"{part}_ms") is not None]
        entry = {"T": seq, "G": group, "rate_tflops": {p: v / 1e12 for p, v in rate.items()}, "branches": branches,
                 "not_modelled": unmodelled}
        for part in ("fwd", "bwd", "fwd_bwd"):
            floor = pass_floor(branches, part)
            ours_ms = ours[f"{part}_ms"] if ours else None
            entry[part] = {"floor_ms": floor, "cudnn_ms": cudnn[f"{part}_ms"], "ours_ms": ours_ms,
                           "ratio_allowed": cudnn[f"{part}_ms"] / floor,
                           "ratio_measured": cudnn[f"{part}_ms"] / ours_ms if ours_ms else None,
                           "target": TARGETS.get(seq, {}).get(part) if group == TARGET_GROUP else None}
        out.append(entry)
    return out


def print_tables(entries: list[dict], source: str):
    print(f"floors from {source}; tensor work at the rates below, selected K/V at the L2 rate")
    for e in entries:
        print(f"\nT={e['T']} G={e['G']}: tensor rate {e['rate_tflops']['fwd']:.0f} / "
              f"{e['rate_tflops']['bwd']:.0f} TFLOP/s (forward / backward)")
        print(f"  {'branch':28s} {'pass':4s} {'floor ms':>9s} {'bound':>13s} {'measured':>9s} {'x floor':>8s}")
        for b in e["branches"]:
            ms = b["measured_ms"]
            measured, over = ("-", "-") if ms is None else (f"{ms:.2f}", f"{ms / b['floor_ms']:.2f}")
            print(f"  {b['branch']:28s} {b['pass']:4s} {b['floor_ms']:9.2f} {b['bound']:>13s} {measured:>9s} "
                  f"{over:>8s}")
        for b in e["not_modelled"]:
            print(f"  {b['branch']:28s} {b['pass']:4s} {'-':>9s} {'not modelled':>13s} {b['measured_ms']:9.2f}")
        for part in ("fwd", "bwd", "fwd_bwd"):
            p = e[part]
            measured = "-" if p["ours_ms"] is None else f"{p['ours_ms']:.1f} ms, {p['ratio_measured']:.2f}x"
            target = "-" if p["target"] is None else f"{p['target']:.1f}x"
            print(f"  {part}: floors sum {p['floor_ms']:.1f} ms -> at best {p['ratio_allowed']:.2f}x cuDNN "
                  f"({p['cudnn_ms']:.1f} ms); measured {measured}; target {target}")


def print_long(entry: dict):
    print(f"\nT={entry['T']} G={entry['G']} over {entry['ranks']} ranks (the rates of T={entry['rates_of_T']}; "
          "even shares, no communication), per rank:")
    for b in entry["branches"]:
        print(f"  {b['branch']:28s} {b['pass']:4s} {b['floor_ms']:9.1f} ms {b['bound']:>13s}")
    for part in ("fwd", "bwd", "fwd_bwd"):
        target = entry[part]["target_ms"]
        print(f"  {part}: floors sum {entry[part]['floor_ms']:.1f} ms"
              + ("" if target is None else f"; target at most {target:.0f} ms"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a JSON written by tools/bench_kernels.py")
    p.add_argument("--group", type=int, default=16, help="query heads per KV head (a G the JSON measured)")
    p.add_argument("--l2-tbs", type=float, default=L2_TBS, help="L2 throughput, TB/s")
    p.add_argument("--tensor-tflops", type=float,
                   help="every kernel's tensor rate, TFLOP/s (default: cuDNN's in the run, each pass)")
    p.add_argument("--tile-tokens", type=int, default=1, help="selected attention: tokens a program")
    p.add_argument("--union-ratio", type=float, default=1.0,
                   help="selected attention: blocks a tile's tokens picked over one token's")
    p.add_argument("--long-seq", type=int, action="append", default=[],
                   help="also a length the run did not time, at its longest length's rates (repeatable)")
    p.add_argument("--ranks", type=int, default=1, help="context-parallel ranks that share --long-seq")
    p.add_argument("--out", help="write the floors as JSON here")
    a = p.parse_args(argv)
    path = Path(a.json)
    if not path.is_file():
        sys.exit(f"{a.json} does not exist: give a JSON written by tools/bench_kernels.py "
                 "(benchmarks/kernels-*.json)")
    report = json.loads(path.read_text())
    rows = report.get("rows")
    if not ("paper_config" in report and "args" in report and isinstance(rows, list)
            and all(isinstance(r, dict) and "line" in r for r in rows)):
        sys.exit(f"{a.json} is not a JSON of tools/bench_kernels.py (no `paper_config`, `args`, or rows with a "
                 "`line`): give one of benchmarks/kernels-*.json that it wrote")
    for name, value in (("--l2-tbs", a.l2_tbs), ("--tensor-tflops", a.tensor_tflops), ("--ranks", a.ranks),
                        *(("--long-seq", seq) for seq in a.long_seq)):
        if value is not None and value <= 0:
            sys.exit(f"{name} {value}: give a positive number (a rate, a count of ranks or a length in tokens)")
    if a.tile_tokens < 1 or not 1.0 <= a.union_ratio <= a.tile_tokens:
        sys.exit(f"--tile-tokens {a.tile_tokens} --union-ratio {a.union_ratio}: the union of K tokens' picks is "
                 "between 1 and K times one token's; give K >= 1 and 1 <= R <= K")
    entries = floors(report, a.group, a.l2_tbs, a.tile_tokens, a.union_ratio, a.tensor_tflops)
    if not entries:
        groups = sorted({r["G"] for r in report["rows"] if r["line"] == "cudnn" and "error" not in r})
        sys.exit(f"{a.json} has no cuDNN row at G={a.group} (cuDNN rows at G: {groups or 'none'}): pass --group "
                 f"with one of those, or run tools/bench_kernels.py with --lines dense --groups {a.group}")
    print_tables(entries, a.json)
    long = [long_floors(entries, report, a.group, seq, a.ranks, a.l2_tbs, a.tile_tokens, a.union_ratio)
            for seq in a.long_seq]
    for entry in long:
        print_long(entry)
    result = {"command": " ".join(["tools/kernel_floors.py"] + (argv if argv is not None else sys.argv[1:])),
              "commit": git_commit(None), "source": a.json, "source_commit": report.get("commit"),
              "gpu": report.get("gpu"),
              "l2_tbs": a.l2_tbs, "tensor_tflops": a.tensor_tflops, "tile_tokens": a.tile_tokens,
              "union_ratio": a.union_ratio, "floors": entries, "long_floors": long}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
