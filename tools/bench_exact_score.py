"""Top-n's exact score (nsa.selection_score: exact) at the proof model's shapes, on one GPU: the time of
select_blocks_triton(score="exact") per layer call, median of triton.testing.do_bench, for one 32K document
and for 8 packed documents of 8K (16 query heads on 1 KV head of 64, bf16, the proof's l' = 64 and n = 16).

Kernels with both ways to the score (EXACT_ONE_PASS) time both, alternated three times: one pass
(_topn_exact_one_pass_kernel) and two (range_attention_lse, each query head's log-sum-exp, then
_topn_exact_kernel), with their ratio and the share of picks they agree on. Each shape also times the
first of the two passes alone, so the second is the difference. --kernels-root DIR imports `kernels` from another checkout
(`git archive <commit> kernels`, unpacked in DIR), to time an earlier version on the same machine; --picks
FILE saves the picks, and --against FILE reports the share of (token, pick) entries equal to a saved run's.
--launches times other launch parameters of _topn_exact_kernel (JSON objects set as
LAUNCH["topn_exact"]), each checked for the default's picks.

    python3 tools/bench_exact_score.py --out benchmarks/exact-score.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.bench_kernels import git_commit, gpu_kernels  # noqa: E402

SHAPES = {"1x32768": (32768, 1), "8x8192": (65536, 8)}  # tokens, documents


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels-root", help="import `kernels` from this directory instead of the repository")
    p.add_argument("--commit", help="git commit of the kernels (default: git rev-parse HEAD)")
    p.add_argument("--picks", help="save the picks of every shape to this file (torch.save)")
    p.add_argument("--against", help="picks saved by an earlier run (--picks): report the share that agrees")
    p.add_argument("--launches", nargs="*", default=[],
                   help='launch parameters to time besides the default, e.g. \'{"BLOCK_T": 8, "num_warps": 4}\'')
    p.add_argument("--out", help="JSON path (default: print only)")
    a = p.parse_args()
    a.launches = [launch_arg(p, text) for text in a.launches]
    return a


def launch_arg(parser, text: str) -> dict:
    """One --launches value as a dict, or a parser error naming it and the form it must take."""
    try:
        launch = json.loads(text)
    except json.JSONDecodeError as err:
        parser.error(f"--launches {text!r} is not JSON ({err}); give objects such as '{{\"BLOCK_T\": 8, \"num_warps\": 4}}'")
    if not isinstance(launch, dict) or not launch:
        parser.error(f"--launches {text!r} is not a JSON object of launch parameters; give objects such as "
                     "'{\"BLOCK_T\": 8, \"num_warps\": 4}'")
    return launch


def main():
    a = parse_args()
    gpu_kernels("tools/bench_exact_score.py", a.kernels_root)
    import triton
    from kernels.block_selection import triton as block_selection

    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "commit": git_commit(a.commit),
              "kernels": a.kernels_root or "repository", "rows": []}
    picks, earlier = {}, torch.load(a.against) if a.against else None
    launches = [None] + a.launches
    # the lse pass alone needs kernels from 9cb0637 on (an older --kernels-root times the whole only)
    lse_alone = hasattr(block_selection, "exact_ranges") and hasattr(block_selection, "range_attention_lse")
    # kernels with both ways (EXACT_ONE_PASS) time both, alternated; older ones the one they have
    ways = ["one pass", "two passes"] if hasattr(block_selection, "EXACT_ONE_PASS") else ["as built"]
    for name, (tokens, documents) in SHAPES.items():
        torch.manual_seed(0)
        q = torch.randn(1, tokens, 16, 64, device="cuda", dtype=torch.bfloat16)
        keys = torch.randn(1, tokens, 1, 64, device="cuda", dtype=torch.bfloat16)
        cu = torch.arange(0, tokens + 1, tokens // documents, dtype=torch.int32, device="cuda")
        cu_seqlens = cu if documents > 1 else None

        def run():
            return block_selection.select_blocks_triton(q, None, None, 16, 8, 64, 16, None, cu_seqlens=cu_seqlens,
                                                        score="exact", keys=keys)

        lse_ms = None
        if lse_alone:
            lo, hi = block_selection.exact_ranges(tokens, 0, cu_seqlens, q.device)
            lse_ms = median_of_3(triton, lambda: block_selection.range_attention_lse(q, keys, lo, hi, 64 ** -0.5))
        for launch in launches:
            block_selection.LAUNCH.pop("topn_exact", None)
            if launch is not None:
                block_selection.LAUNCH["topn_exact"] = launch
            picked, ms = {}, {way: [] for way in ways}
            for way in ways:
                set_way(block_selection, way)
                picked[way] = run().cpu()
            for _ in range(3):  # the ways alternated, three timings each
                for way in ways:
                    set_way(block_selection, way)
                    ms[way].append(triton.testing.do_bench(run, warmup=5, rep=50))
            for way in ways:
                row = {"shape": name, "launch": launch or "default", "way": way, "ms_runs": ms[way],
                       "ms": sorted(ms[way])[1]}
                if way != "one pass":
                    row |= {"lse_pass_ms": lse_ms, "topn_ms": None if lse_ms is None else row["ms"] - lse_ms}
                if way != ways[0]:  # this way's time over the first way's, and the picks they agree on
                    first = ways[0].replace(" ", "_")
                    row[f"time_vs_{first}"] = row["ms"] / sorted(ms[ways[0]])[1]
                    row[f"picks_agree_{first}"] = (picked[ways[0]] == picked[way]).float().mean().item()
                if launch is None and way == ways[0]:
                    picks[name] = picked[way]
                    if earlier is not None:
                        row["picks_agree"] = (earlier[name] == picked[way]).float().mean().item()
                elif launch is not None:
                    row["picks_agree_default"] = (picks[name] == picked[way]).float().mean().item()
                report["rows"].append(row)
                extra = {key: value for key, value in row.items() if key.startswith(("time_vs", "picks_agree"))}
                parts = (f"; lse pass {lse_ms:.3f}, top-n {row['topn_ms']:.3f}"
                         if row.get("topn_ms") is not None else "")
                print(f"{name} {json.dumps(row['launch'])} {way}: {row['ms']:.3f} ms (runs "
                      f"{', '.join(f'{m:.3f}' for m in ms[way])}{parts})"
                      + "".join(f", {key} {value:.4f}" for key, value in extra.items()), flush=True)
            set_way(block_selection, ways[0])
        block_selection.LAUNCH.pop("topn_exact", None)
    if a.picks:
        torch.save(picks, a.picks)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))


def set_way(block_selection, way: str):
    """Selects the exact score's way in kernels that have both (EXACT_ONE_PASS)."""
    if way != "as built":
        block_selection.EXACT_ONE_PASS = way == "one pass"


def median_of_3(triton, fn) -> float:
    return sorted(triton.testing.do_bench(fn, warmup=5, rep=50) for _ in range(3))[1]


if __name__ == "__main__":
    main()
