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
and per depth the exact-match accuracy and whether the needle is inside the sliding window (then the
window branch can read it without selection). A model that misses the needle beyond its window with a
low hit has a selection (compressed attention) problem; with a high hit, the selected branch or its gate
does not use what it picked. One process; writes --out (JSON) and prints a table.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
warnings.filterwarnings("ignore", category=FutureWarning, message=".*(load_state_dict. is deprecated|DTensor instead)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa_dist.checkpoint import CheckpointError  # noqa: E402
from nsa_dist.config import ConfigError, load_config  # noqa: E402
from nsa_dist.evaluation import niah_cells  # noqa: E402
from nsa_dist.probe import (add_model_arguments, checkpoint_and_stage, loaded_model,  # noqa: E402
                            recorded_nsa_layers, require_nsa, start_one_process)
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


def run_samples(config, stage, checkpoint, samples: list[TaskSample], device: torch.device) -> list[dict]:
    """Per sample: each NSA layer's block_idx and gates at the answer rows, and the answer's exact match."""
    keep = lambda args, result: (result.block_idx.detach(), args[4].detach())  # noqa: E731 (picks, gates)
    with recorded_nsa_layers(keep) as layers, loaded_model(config, stage, checkpoint, device) as gpt:
        pad_to = config.nsa.selection_block
        results = []
        with torch.no_grad():
            for sample in samples:
                tokens = torch.tensor([sample.prompt + sample.answer[:-1]], dtype=torch.int64, device=device)
                tokens = torch.nn.functional.pad(tokens, (0, -tokens.shape[1] % pad_to))
                layers.clear()
                logits = gpt(tokens, None, None)
                rows = answer_rows(sample)
                predicted = logits[0, rows].argmax(-1).tolist()
                results.append({"correct": predicted == sample.answer,
                                "layers": [(picks, gates[0, rows].float()) for picks, gates in layers]})
        return results


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
            per_layer.append({"hit": sum(hits) / len(hits), "gates": dict(zip(("cmp", "slc", "win"), gates))})
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
    checkpoint, stage = checkpoint_and_stage(config, a.checkpoint, a.stage)
    length = a.length or stage.seq_len
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.eod_token)
    try:
        cells = niah_cells(config.eval.niah_task, tokenizer, [length], depths, samples, config.data.seed)
    except TaskTooLong as exc:
        raise ConfigError(f"--length {length}: {exc}; give a longer --length") from None
    cells = {depth: cells[(length, depth)] for depth in depths}
    device = start_one_process(config, port=29513)

    ordered = [s for depth in depths for s in cells[depth]]
    outcomes = run_samples(config, stage, checkpoint, ordered, device)
    results = {depth: outcomes[i * samples : (i + 1) * samples] for i, depth in enumerate(depths)}
    by_depth = report_for(config, depths, cells, results)
    report = {"config": a.config, "checkpoint": a.checkpoint, "stage": stage.name, "length": length,
              "rotary_base": stage.rotary_base, "task": config.eval.niah_task, "samples_per_depth": samples,
              "device": str(device), "nsa": {"selection_block": config.nsa.selection_block,
                                             "num_selected": config.nsa.num_selected, "window": config.nsa.window,
                                             "compression_rope": config.nsa.compression_rope},
              "depths": by_depth}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))

    print(f"needle in the top-n picks at the answer positions ({config.eval.niah_task}, {length} tokens, "
          f"{samples} samples a depth; n={config.nsa.num_selected} blocks of {config.nsa.selection_block})")
    layers = len(next(iter(by_depth.values()))["layers"])
    print(f"{'depth':>6} {'exact':>6} {'window':>7} " + " ".join(f"{'L' + str(i + 1):>5}" for i in range(layers))
          + "   gates cmp/slc/win (mean over layers)")
    for depth, row in by_depth.items():
        gates = [sum(layer["gates"][b] for layer in row["layers"]) / layers for b in ("cmp", "slc", "win")]
        print(f"{float(depth):>6.2f} {row['accuracy']:>6.0%} {row['needle_in_window']:>7.0%} "
              + " ".join(f"{layer['hit']:>5.0%}" for layer in row["layers"])
              + "   " + "/".join(f"{g:.2f}" for g in gates))
    return report


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError) as exc:
        sys.exit(f"error: {exc}")
