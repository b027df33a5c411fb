"""Does block selection find the needle? Layer by layer, for the NIAH samples of a trained NSA model.

    python tools/needle_selection.py --config configs/proof_100m.yaml \
        --checkpoint runs/proof_100m/checkpoints/step_00001450 --length 32768

The model answers the evaluation's NIAH samples (eval.niah_task, the same seeds as the grid) at --length
tokens, one sample at a time, as the NIAH evaluation reads answers (the prompt and the true answer in
one forward pass, the argmax at each answer position). At those answer positions it reports, per
depth and layer:
- hit: the share of (answer position, KV head) rows whose top-n picks include a selection block that holds
  the needle (a copy of the answer's tokens in the prompt); forced blocks count, as they do in attention;
- the mean gates (cmp, slc, win) there;
- where the needle ranks in top-n's order (1 = first; forced blocks first), by the score selection uses
  (nsa.selection_score: the compressed-attention probabilities summed over the KV head's group of query
  heads, or their largest), by the best single query head's own probabilities, and by the "max" score
  (the group's largest head probability per block), as medians; head_hit: the share of rows where some
  query head alone would have picked it, and max_score_hit: where top-n by the "max" score would have;
and per depth the exact-match accuracy and whether the needle is inside the sliding window (then the
window branch can read it without selection). A model that misses the needle beyond its window with a
low hit has a selection (compressed attention) problem: with a high head_hit, one head finds the needle
and the group's sum loses it (max_score_hit says whether nsa.selection_score "max" would keep it); with a
low one, no head's compressed attention finds it. With a high hit,
the selected branch or its gate does not use what it picked.

With the "exact" or "bound" score the layers also hand top-n their raw keys, and the report then ranks the
needle by three scores of the same query rows side by side (rank_by, hit_by): "sum" (the paper's, from
compressed attention, which the layer still computes), "exact" (the group's attention mass on the raw
keys) and "bound" (a block's largest possible q.k from its keys' channel-wise minimum and maximum, as
Quest scores pages; per head a softmax over the whole blocks, summed over the group), and with a learned
indexer (nsa.indexer_heads) a fourth, "indexer" (the exact mass over its few learned query heads): how far a
cheaper score is from the exact one in a model that selects by one of them.

--oracle answers the same samples with the needle's selection blocks put into every layer's picks at
the answer positions (each missing one takes the place of the free pick that top-n's score ranks last),
so that top-n cannot lose it: exact match with --oracle against without says how much of the misses top-n
explains. A model that still answers wrong has picked what it needs and does not use it.
--oracle-layers L ... forces the needle in those layers only (1 = the first). --oracle-sweep adds one
pass per layer with the oracle in that layer alone, and reports each pass's exact match and picks: which
layer's choice the answers hang on. One process, one model load; writes --out (JSON) and prints the
tables.
"""

import argparse
import contextlib
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
warnings.filterwarnings("ignore", category=FutureWarning, message=".*(load_state_dict. is deprecated|DTensor instead)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa_dist.checkpoint import CheckpointError  # noqa: E402
from nsa_dist.config import ConfigError, load_config  # noqa: E402
from nsa_dist.evaluation import niah_cells  # noqa: E402
from kernels.block_selection.indexer import indexer_inputs  # noqa: E402
from kernels.block_selection.naive import (group_score, head_block_bounds, head_block_mass,  # noqa: E402
                                           head_block_scores, num_selection_blocks, overlap_weights)
from nsa_dist.probe import (SelectionInputs, add_model_arguments, checkpoint_and_stage,  # noqa: E402
                            loaded_model, recorded_nsa_layers, recorded_selection_inputs, require_nsa,
                            start_one_process, wrapped_selection)
from nsa_dist.tasks import TaskSample, TaskTooLong  # noqa: E402
from nsa_dist.tokenizer import load_tokenizer  # noqa: E402


def needle_positions(sample: TaskSample) -> list[int]:
    """Prompt positions of every copy of the answer's tokens (the needle; a passkey sample states its key
    twice)."""
    prompt, answer = sample.prompt, sample.answer
    width = len(answer)
    return [p + k for p in range(len(prompt) - width + 1) if prompt[p : p + width] == answer for k in range(width)]


def answer_rows(sample: TaskSample) -> list[int]:
    """The positions whose logits predict the answer's tokens."""
    return [len(sample.prompt) - 1 + k for k in range(len(sample.answer))]


def needle_hit(block_idx: torch.Tensor, rows: list[int], needle: list[int], selection_block: int) -> float:
    """block_idx [1, T, HK, n] (-1: none) -> the share of (row, KV head) whose picks hold a needle block."""
    blocks = torch.tensor(sorted({p // selection_block for p in needle}), device=block_idx.device)
    picks = block_idx[0, rows]  # [rows, HK, n]
    return float(torch.isin(picks, blocks).any(-1).double().mean())


def rank_in_topn_order(scores: torch.Tensor, positions: torch.Tensor, blocks: list[int],
                       selection_block: int) -> torch.Tensor:
    """scores [R, S], the rows' positions [R] -> [R]: where the best of `blocks` stands in top-n's order
    (kernels/block_selection/naive.py: block 0 and the two local blocks first, then by score among the
    blocks a row may pick), 1 = first. Ties count in the blocks' favour."""
    block = torch.arange(scores.shape[-1], device=scores.device)
    current = (positions // selection_block)[:, None]
    forced = (block == 0) | (block == current) | (block == current - 1)
    ranked = scores.masked_fill(forced, float("inf")).masked_fill(block > current, float("-inf"))
    best = ranked[:, blocks].max(-1, keepdim=True).values
    return 1 + (ranked > best).sum(-1)


def answer_block_scores(inputs: SelectionInputs, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query head's block scores at the answer rows, as top-n saw them (consecutive rows of one
    document): [C, HK, G, S] float32, and the rows' global positions [C]."""
    first, last = rows[0], rows[-1] + 1  # answer rows are consecutive
    start = inputs.q_start + first
    if inputs.score in ("exact", "bound", "indexer"):
        by_keys = head_block_bounds if inputs.score == "bound" else head_block_mass
        q = inputs.q[:, first:last]
        if inputs.score == "indexer":  # the exact mass over the indexer's queries
            q = indexer_inputs("needle_selection", q, inputs.keys, inputs.indexer)
        per_head = by_keys(q, inputs.keys, inputs.selection_block, inputs.scale, start)[0]
        return per_head, torch.arange(start, start + per_head.shape[0], device=per_head.device)
    num_blocks = num_selection_blocks(inputs.q_start + last, inputs.selection_block)
    weights = overlap_weights(inputs.k_cmp.shape[1], num_blocks, inputs.block_size, inputs.stride,
                              inputs.selection_block).to(inputs.q.device)
    per_head = head_block_scores(inputs.q[:, first:last], inputs.k_cmp, inputs.lse_cmp[:, first:last],
                                 inputs.block_size, inputs.stride, weights, inputs.scale, start)[0]
    return per_head, torch.arange(start, start + per_head.shape[0], device=per_head.device)


# ranked side by side where the raw keys were recorded, and "indexer" after them where the layer has one
COMPARED_SCORES = ("sum", "exact", "bound")


def compared_ranks(inputs: SelectionInputs, rows: list[int], needle: list[int]) -> dict[str, torch.Tensor]:
    """The needle's rank in top-n's order by each of COMPARED_SCORES at each (answer row, KV head), from
    one layer's recorded inputs (which hold raw keys with the "exact" and "bound" scores only; else {})."""
    if inputs.keys is None:
        return {}
    blocks = sorted({p // inputs.selection_block for p in needle})
    ranks = {}
    for score in COMPARED_SCORES + (("indexer",) if inputs.indexer is not None else ()):
        per_head, positions = answer_block_scores(inputs._replace(score=score), rows)
        c, hk, _, s = per_head.shape
        ranks[score] = rank_in_topn_order(per_head.sum(2).reshape(c * hk, s), positions.repeat_interleave(hk),
                                          blocks, inputs.selection_block)
    return ranks


def needle_ranks(inputs: SelectionInputs, rows: list[int], needle: list[int]) -> tuple[torch.Tensor, ...]:
    """The needle's rank in top-n's order at each (answer row, KV head): by the group's score as selection
    combined it (inputs.score), by the best single query head's score, and by the "max" score (the largest
    head's per block). Three [rows * HK] tensors."""
    per_head, positions = answer_block_scores(inputs, rows)  # [C, HK, G, S]
    c, hk, g, s = per_head.shape
    blocks = sorted({p // inputs.selection_block for p in needle})
    group, by_max = (rank_in_topn_order(group_score(score)(per_head[None])[0].reshape(c * hk, s),
                                        positions.repeat_interleave(hk), blocks, inputs.selection_block)
                     for score in (inputs.score, "max"))
    heads = rank_in_topn_order(per_head.reshape(c * hk * g, s), positions.repeat_interleave(hk * g), blocks,
                               inputs.selection_block)
    return group, heads.reshape(c * hk, g).min(-1).values, by_max


def with_needle_blocks(block_idx: torch.Tensor, scores: torch.Tensor, rows: list[int], positions: torch.Tensor,
                       needle_blocks: list[int], selection_block: int) -> torch.Tensor:
    """The oracle's picks: block_idx [1, T, HK, n] (ascending, -1 after the valid ids) with every needle
    block at or before each answer row taken at that row, for every KV head. A missing needle block takes
    an empty slot, else the place of the free pick (not block 0 or a local block, not a needle block) with
    the lowest score; scores [C, HK, S] are the group's at the rows, positions [C] their global positions."""
    out = block_idx.clone()
    for i, row in enumerate(rows):
        current = int(positions[i]) // selection_block
        forced = {0, current, current - 1}
        for head in range(out.shape[2]):
            picks = [b for b in out[0, row, head].tolist() if b >= 0]
            missing = [b for b in needle_blocks if b <= current and b not in picks]
            free = sorted((b for b in picks if b not in forced and b not in needle_blocks),
                          key=lambda b: float(scores[i, head, b]))
            for block in missing:
                if len(picks) < out.shape[-1]:
                    picks.append(block)
                elif free:
                    picks[picks.index(free.pop(0))] = block
            picks = sorted(picks) + [-1] * (out.shape[-1] - len(picks))
            out[0, row, head] = torch.tensor(picks, dtype=out.dtype, device=out.device)
    return out


@contextlib.contextmanager
def needle_oracle():
    """While active, NSA layers' top-n take the needle's blocks at the answer rows (with_needle_blocks) of
    the sample named by the yielded dict. Before each forward pass set its "sample" (None: picks left
    alone), its "layers" (the 1-based layers to force; None: every layer) and its "call" to 0: the layers
    select in order, one call each. Enter it inside recorded_selection_inputs, so that what is recorded is
    what top-n scored."""
    target: dict = {"sample": None, "layers": None, "call": 0}

    def force(select, q, k_cmp, lse_cmp, block_size, stride, selection_block, num_selected, scale=None, *,
              q_start=0, cu_seqlens=None, score="sum", keys=None, indexer=None):
        picks = select(q, k_cmp, lse_cmp, block_size, stride, selection_block, num_selected, scale,
                       q_start=q_start, cu_seqlens=cu_seqlens, score=score, keys=keys, indexer=indexer)
        sample, layers = target["sample"], target["layers"]
        target["call"] += 1
        if sample is None or (layers is not None and target["call"] not in layers):
            return picks
        rows = answer_rows(sample)
        if q_start != 0 or rows[-1] >= picks.shape[1]:  # one process scores the whole sample in one span
            raise RuntimeError(f"the oracle needs the whole sample in one query span; got rows from {q_start} "
                               f"to {q_start + picks.shape[1] - 1} for answer rows {rows[0]}-{rows[-1]}")
        inputs = SelectionInputs(q, k_cmp, lse_cmp, block_size, stride, selection_block, scale, q_start, score, keys,
                                 indexer)
        per_head, positions = answer_block_scores(inputs, rows)
        needle_blocks = sorted({p // selection_block for p in needle_positions(sample)})
        return with_needle_blocks(picks, group_score(score)(per_head[None])[0], rows, positions, needle_blocks,
                                  selection_block)

    with wrapped_selection(force):
        yield target


def run_samples(config, stage, checkpoint, samples: list[TaskSample], device: torch.device,
                passes: list) -> list[list[dict]]:
    """For each pass, per sample: each NSA layer's block_idx, gates and the needle's ranks at the answer
    rows, and the answer's exact match. A pass is None (top-n's own picks) or the set of 1-based layers whose
    picks take the needle's blocks at the answer rows."""
    keep = lambda args, result: (result.block_idx.detach(), args[4].detach())  # noqa: E731 (picks, gates)
    with (recorded_nsa_layers(keep) as layers, recorded_selection_inputs() as selections,
          needle_oracle() as target, loaded_model(config, stage, checkpoint, device) as gpt):
        pad_to = config.nsa.selection_block
        by_pass = []
        with torch.no_grad():
            for oracle in passes:
                results = []
                for sample in samples:
                    tokens = torch.tensor([sample.prompt + sample.answer[:-1]], dtype=torch.int64, device=device)
                    tokens = torch.nn.functional.pad(tokens, (0, -tokens.shape[1] % pad_to))
                    target.update(sample=None if oracle is None else sample, layers=oracle, call=0)
                    layers.clear()
                    selections.clear()
                    logits = gpt(tokens, None, None)
                    rows = answer_rows(sample)
                    predicted = logits[0, rows].argmax(-1).tolist()
                    needle = needle_positions(sample)
                    ranks = [(*needle_ranks(inputs, rows, needle), compared_ranks(inputs, rows, needle))
                             for inputs in selections]
                    results.append({"correct": predicted == sample.answer,
                                    "layers": [(picks, gates[0, rows].float(), rank)
                                               for (picks, gates), rank in zip(layers, ranks, strict=True)]})
                by_pass.append(results)
        return by_pass


def report_for(config, depths: list[float], cells: dict, results: dict) -> dict:
    """The JSON report: per depth, accuracy, window reach and each layer's hit and mean gates."""
    n = config.nsa
    by_depth = {}
    for depth in depths:
        samples, outcomes = cells[depth], results[depth]
        layers = len(outcomes[0]["layers"])
        per_layer = []
        for layer in range(layers):
            hits = [needle_hit(o["layers"][layer][0], answer_rows(s), needle_positions(s), n.selection_block)
                    for s, o in zip(samples, outcomes)]
            gates = torch.stack([o["layers"][layer][1].mean(dim=(0, 1)) for o in outcomes]).mean(0).tolist()
            group = torch.cat([o["layers"][layer][2][0] for o in outcomes]).float()
            best_head = torch.cat([o["layers"][layer][2][1] for o in outcomes]).float()
            by_max = torch.cat([o["layers"][layer][2][2] for o in outcomes]).float()
            per_layer.append({"hit": sum(hits) / len(hits), "gates": dict(zip(("cmp", "slc", "win"), gates)),
                              "rank_group": group.median().item(), "rank_best_head": best_head.median().item(),
                              "rank_max_score": by_max.median().item(),
                              "head_hit": (best_head <= n.num_selected).double().mean().item(),
                              "max_score_hit": (by_max <= n.num_selected).double().mean().item(),
                              # the share of rows that the group's rank says top-n picks: hit again, computed
                              # from the scores (a check that the ranks reproduce the selection)
                              "group_hit": (group <= n.num_selected).double().mean().item()})
            compared = [o["layers"][layer][2][3] for o in outcomes]
            if all(compared):  # the raw keys were recorded ("exact"): every compared score's rank and hit
                by_score = {name: torch.cat([c[name] for c in compared]).float() for name in compared[0]}
                per_layer[-1]["rank_by"] = {name: r.median().item() for name, r in by_score.items()}
                per_layer[-1]["hit_by"] = {name: (r <= n.num_selected).double().mean().item()
                                           for name, r in by_score.items()}
        in_window = [min(answer_rows(s)) - max(needle_positions(s)) < n.window for s in samples]
        by_depth[str(depth)] = {"accuracy": sum(o["correct"] for o in outcomes) / len(outcomes),
                                "needle_in_window": sum(in_window) / len(in_window), "layers": per_layer}
    return by_depth


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: the stage's seq_len)")
    p.add_argument("--depths", type=float, nargs="+", default=None, help="default: eval.niah_depths")
    p.add_argument("--samples", type=int, default=None, help="samples per depth (default: eval.niah_samples)")
    p.add_argument("--oracle", action="store_true",
                   help="put the needle's blocks into every layer's picks at the answer positions")
    p.add_argument("--oracle-layers", type=int, nargs="+", default=None, metavar="L",
                   help="the oracle in these layers only (1 = the first; implies --oracle)")
    p.add_argument("--oracle-sweep", action="store_true",
                   help="also one pass per layer with the oracle in that layer alone")
    p.add_argument("--out", default="benchmarks/needle_selection.json")
    a = p.parse_args(argv)
    config = load_config(a.config, a.overrides)
    require_nsa(config, a.config, "needle selection")
    depths = a.depths if a.depths is not None else list(config.eval.niah_depths)
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"--depths {' '.join(map(str, depths))}: every depth must lie in [0, 1]")
    samples = a.samples if a.samples is not None else config.eval.niah_samples
    if samples < 1:
        raise ConfigError(f"--samples {samples} must be at least 1")
    num_layers = config.model.num_layers
    if a.oracle_layers is not None and not all(1 <= layer <= num_layers for layer in a.oracle_layers):
        raise ConfigError(f"--oracle-layers {' '.join(map(str, a.oracle_layers))}: layers are numbered 1 to "
                          f"{num_layers} (model.num_layers)")
    checkpoint, stage = checkpoint_and_stage(config, a.checkpoint, a.stage)
    # the stage's n and score (stages may set their own): the model runs with them, the report counts by them
    config = replace(config, nsa=replace(config.nsa, num_selected=stage.num_selected,
                                         selection_score=stage.selection_score))
    length = a.length or stage.seq_len
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.eod_token)
    try:
        cells = niah_cells(config.eval.niah_task, tokenizer, [length], depths, samples, config.data.seed)
    except TaskTooLong as exc:
        raise ConfigError(f"--length {length}: {exc}; give a longer --length") from None
    cells = {depth: cells[(length, depth)] for depth in depths}
    device = start_one_process(config, port=29513)

    ordered = [s for depth in depths for s in cells[depth]]
    every_layer = set(range(1, num_layers + 1))
    main_pass = set(a.oracle_layers) if a.oracle_layers is not None else every_layer if a.oracle else None
    sweep = sorted(every_layer) if a.oracle_sweep else []
    passes = run_samples(config, stage, checkpoint, ordered, device, [main_pass] + [{layer} for layer in sweep])
    by_pass = [report_for(config, depths, cells, {depth: outcomes[i * samples : (i + 1) * samples]
                                                  for i, depth in enumerate(depths)})
               for outcomes in passes]
    by_depth = by_pass[0]
    report = {"config": a.config, "checkpoint": a.checkpoint, "stage": stage.name, "length": length,
              "rotary_base": stage.rotary_base, "task": config.eval.niah_task, "samples_per_depth": samples,
              "oracle": main_pass is not None,
              "oracle_layers": sorted(main_pass) if main_pass is not None else None,
              "device": str(device), "nsa": {"selection_block": config.nsa.selection_block,
                                             "num_selected": config.nsa.num_selected, "window": config.nsa.window,
                                             "compression_rope": config.nsa.compression_rope,
                                             "selection_score": config.nsa.selection_score},
              "depths": by_depth}
    if sweep:
        # each pass: the oracle in one layer; its exact match and every layer's share of rows holding the needle
        report["oracle_sweep"] = {str(layer): {depth: {"accuracy": row["accuracy"],
                                                       "hits": [entry["hit"] for entry in row["layers"]]}
                                               for depth, row in one.items()}
                                  for layer, one in zip(sweep, by_pass[1:], strict=True)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))

    print(f"needle in the top-n picks at the answer positions ({config.eval.niah_task}, {length} tokens, "
          f"{samples} samples a depth; n={config.nsa.num_selected} blocks of {config.nsa.selection_block})"
          + ("" if main_pass is None else ": oracle, the needle's blocks put into the picks"
             + ("" if main_pass == every_layer else f" of layers {', '.join(map(str, sorted(main_pass)))} only")))
    layers = len(next(iter(by_depth.values()))["layers"])
    print(f"{'depth':>6} {'exact':>6} {'window':>7} " + " ".join(f"{'L' + str(i + 1):>5}" for i in range(layers))
          + "   gates cmp/slc/win (mean over layers)")
    for depth, row in by_depth.items():
        gates = [sum(layer["gates"][b] for layer in row["layers"]) / layers for b in ("cmp", "slc", "win")]
        print(f"{float(depth):>6.2f} {row['accuracy']:>6.0%} {row['needle_in_window']:>7.0%} "
              + " ".join(f"{layer['hit']:>5.0%}" for layer in row["layers"])
              + "   " + "/".join(f"{g:.2f}" for g in gates))
    print(f"the needle's rank in top-n's order (median; picked when <= {config.nsa.num_selected}): the best single "
          f"query head's / the group's score ({config.nsa.selection_score}) / the \"max\" score's")
    print(f"{'depth':>6} " + " ".join(f"{'L' + str(i + 1):>13}" for i in range(layers)))
    for depth, row in by_depth.items():
        print(f"{float(depth):>6.2f} " + " ".join(
            f"{layer['rank_best_head']:.0f}/{layer['rank_group']:.0f}/{layer['rank_max_score']:.0f}".rjust(13)
            for layer in row["layers"]))
    if "rank_by" in next(iter(by_depth.values()))["layers"][0]:
        names = list(next(iter(by_depth.values()))["layers"][0]["hit_by"])
        print("the share of rows whose top-n would pick the needle, by score: " + " / ".join(names))
        width = 7 * len(names) - 2  # "100% / " a score
        print(f"{'depth':>6} " + " ".join(f"{'L' + str(i + 1):>{width}}" for i in range(layers)))
        for depth, row in by_depth.items():
            print(f"{float(depth):>6.2f} " + " ".join(
                " / ".join(f"{layer['hit_by'][name]:.0%}" for name in names).rjust(width)
                for layer in row["layers"]))
    if sweep:
        print("exact match with the oracle in one layer alone (the needle's blocks put into that layer's picks)")
        print(f"{'depth':>6} " + " ".join(f"{'L' + str(layer):>5}" for layer in sweep))
        for depth in by_depth:
            print(f"{float(depth):>6.2f} " + " ".join(
                f"{report['oracle_sweep'][str(layer)][depth]['accuracy']:>5.0%}" for layer in sweep))
    return report


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError) as exc:
        sys.exit(f"error: {exc}")
