"""Evaluation of a checkpoint: does the model use its long context?

- a NIAH grid: for each context length x needle depth, `eval.niah_samples` prompts of the needle task
  (nsa_dist/tasks.py, from seeds no training sequence uses), scored by exact match of the greedy answer
  and, graded, by its answer prefix (answer_prefix); the exact match drawn as a heatmap PNG;
- the validation loss (and perplexity) on data.source's held-out sequences at the stage's seq_len, and
  the loss by position bucket: a model that uses its context predicts tokens far into it better;
- for an NSA model, its gates on those sequences: the mean gate of each branch (compressed, selected,
  window) per layer and query head, which says which branches the model has come to rely on;
- the wall time of each part (loading the model, the NIAH grid, the validation loss), rank 0's.

`evaluate_checkpoint` runs in every process of a torch.distributed job (`nsa-dist eval`, or the trainer
after a stage when eval.at_stage_end): the checkpoint is loaded, resharded, into one model per process
(TP = PP = CP = 1), and the processes share the grid's cells and the validation sequences. Rank 0 writes
`eval.json` and `niah.png` into `<checkpoint>/eval/` (atomically) and returns the report; the launchers
log it to the run's MLflow runs (nsa_dist/tracking.py).
"""

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from matplotlib.figure import Figure

from nsa_dist.checkpoint import Checkpoint, check_same_model, load_checkpoint, write_json_atomically
from nsa_dist.config import Config, Stage
from nsa_dist.data import document_eod, packed_seq_params, stage_sequences
from nsa_dist.tasks import TaskSample, generate
from nsa_dist.tokenizer import load_tokenizer

# NIAH prompts are the needle task's samples from this index on: training draws tasks at indices below it
NIAH_FIRST_INDEX = 1 << 41

Cell = tuple[int, float]  # (context length, needle depth)


# ------------------------------------------------------------------------------------ NIAH


def niah_cells(task: str, tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int,
               seed: int) -> dict[Cell, list[TaskSample]]:
    """The grid's prompts: `samples` of them per (length, depth), each exactly `length` tokens long."""
    cells = {}
    for length in lengths:
        for depth in depths:
            cells[(length, depth)] = [generate(task, tokenizer, length, seed, NIAH_FIRST_INDEX + k, depth)
                                      for k in range(samples)]
    return cells


def answer_niah(cells: dict[Cell, list[TaskSample]],
                predict: Callable[[list[TaskSample]], list[str]]) -> dict[Cell, list[str]]:
    """The predicted answer texts of every cell's samples."""
    return {cell: list(predict(samples)) for cell, samples in cells.items()}


def answer_prefix(expected: str, predicted: str) -> float:
    """The fraction of the answer (whitespace stripped) that is right before its first wrong character:
    1 for an exact answer, 0 when the first character is wrong. Exact match's graded counterpart: it tells
    a model that finds the needle and miscopies a digit from one that does not find it."""
    expected, predicted = expected.strip(), predicted.strip()
    right = next((i for i, (want, got) in enumerate(zip(expected, predicted)) if want != got),
                 min(len(expected), len(predicted)))
    return right / len(expected)


def niah_grid(lengths: Sequence[int], depths: Sequence[float], cells: dict[Cell, list[TaskSample]],
              answers: dict[Cell, list[str]], examples: int = 2) -> dict:
    """The grid as JSON: accuracy[depth row][length column] in 0..1, each answer compared (whitespace
    stripped) with its sample's; answer_prefix likewise, the mean of answer_prefix over a cell's samples;
    and, per cell, the first `examples` expected and predicted answers, which tell a model that retrieves
    the wrong digits from one that answers with filler."""
    def grid(score: Callable[[str, str], float]) -> list[list[float]]:
        return [[sum(score(sample.answer_text, answer) for sample, answer in zip(cells[(length, depth)],
                                                                                 answers[(length, depth)]))
                 / len(cells[(length, depth)]) for length in lengths] for depth in depths]

    def mean(values: list[list[float]]) -> float:
        return sum(map(sum, values)) / (len(lengths) * len(depths))

    accuracy = grid(lambda expected, predicted: float(predicted.strip() == expected))
    prefix = grid(answer_prefix)
    shown = [[[{"expected": sample.answer_text, "predicted": answer}
               for sample, answer in list(zip(cells[(length, depth)], answers[(length, depth)]))[:examples]]
              for length in lengths] for depth in depths]
    return {"lengths": list(lengths), "depths": list(depths), "samples_per_cell": len(next(iter(cells.values()))),
            "accuracy": accuracy, "mean_accuracy": mean(accuracy),
            "answer_prefix": prefix, "mean_answer_prefix": mean(prefix), "examples": shown}


def greedy_predictor(gpt, tokenizer, device: torch.device, pad_to: int) -> Callable[[list[TaskSample]], list[str]]:
    """Answers samples as greedy decoding would, in one forward pass per batch instead of one per answer
    token: the prompt and the true answer run together, and at each answer position the model's argmax
    given the true tokens before it is read off. Greedy decoding agrees with these argmaxes up to its first
    wrong token, so the answer is exact (token for token) when every argmax is the true token, and a wrong
    answer is returned up to and including its first wrong token, which is what greedy decoding emits up to
    there. The input is padded on the right to a multiple of `pad_to` tokens (the attention takes whole
    blocks): attention is causal, so the padding changes no logit before it."""

    @torch.no_grad()
    def predict(samples: list[TaskSample]) -> list[str]:
        answers = [""] * len(samples)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, sample in enumerate(samples):
            by_shape.setdefault((len(sample.prompt), len(sample.answer)), []).append(i)
        for (prompt, new), indices in by_shape.items():
            rows = [samples[i].prompt + samples[i].answer[:-1] for i in indices]
            tokens = torch.tensor(rows, dtype=torch.int64, device=device)
            padded = torch.nn.functional.pad(tokens, (0, -tokens.shape[1] % pad_to))
            logits = gpt(padded, None, None)  # [B, T, vocab]
            argmax = logits[:, prompt - 1 : prompt - 1 + new].argmax(-1).tolist()
            for row, i in enumerate(indices):
                truth = samples[i].answer
                wrong = next((k for k in range(new) if argmax[row][k] != truth[k]), None)
                answers[i] = tokenizer.decode(truth if wrong is None else truth[:wrong] + [argmax[row][wrong]])
        return answers

    return predict


def depth_label(depth: float) -> str:
    """A needle depth as a percentage with the digits it needs: 0.005 -> "0.5%", not "0%"."""
    return f"{depth * 100:.4g}%"


def save_heatmap(grid: dict, title: str, path: Path) -> None:
    """The grid as a PNG: depth down, context length across, each cell's accuracy written in it."""
    width = max(4.0, 1.6 + 1.1 * len(grid["lengths"]))  # room for the title with a single length
    figure = Figure(figsize=(width, 1.6 + 0.5 * len(grid["depths"])), layout="tight")
    axes = figure.add_subplot()
    image = axes.imshow(grid["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
    axes.set_yticks(range(len(grid["depths"])), [depth_label(d) for d in grid["depths"]])
    axes.set(xlabel="context length (tokens)", ylabel="needle depth")
    axes.set_title(title, fontsize=9)
    for row, values in enumerate(grid["accuracy"]):
        for column, value in enumerate(values):
            axes.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, label="exact match")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ validation loss


def bucket_losses(loss_sum: torch.Tensor, count: torch.Tensor, buckets: int) -> dict:
    """Mean loss per equal-width bucket of positions, from per-position sums and counts [S]."""
    seq = loss_sum.numel()
    edges = [round(i * seq / buckets) for i in range(buckets + 1)]
    return {"starts": edges[:-1], "ends": edges[1:],
            "loss": [float(loss_sum[a:b].sum() / count[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]}


# ------------------------------------------------------------------------------------ a checkpoint


def niah_lengths(config: Config, stage: Stage) -> list[int]:
    """The NIAH grid's context lengths for `stage`, ascending: eval.niah_lengths, with the stage's seq_len
    when that list is empty or eval.niah_stage_length is set."""
    lengths = set(config.eval.niah_lengths)
    if not lengths or config.eval.niah_stage_length:
        lengths.add(stage.seq_len)
    return sorted(lengths)


def evaluate_checkpoint(config: Config, checkpoint: Checkpoint, stage: Stage, out_dir: Path | None = None) -> dict:
    """Evaluates `checkpoint`'s weights with `stage`'s RoPE base and seq_len (see the module docstring);
    every rank calls it, outside any stage's parallel state. Rank 0 writes eval.json and niah.png into
    `out_dir` (default <checkpoint>/eval) and every rank returns the report."""
    from nsa_dist.probe import recorded_nsa_layers
    from nsa_dist.trainer import _build, _start_processes, parallel_layout

    started = time.perf_counter()
    device = _start_processes(config)
    check_same_model(checkpoint, config)
    rank, world = dist.get_rank(), dist.get_world_size()
    ev, data = config.eval, config.data
    tokenizer = load_tokenizer(data.tokenizer, data.eod_token)
    lengths = niah_lengths(config, stage)
    single = replace(stage, tensor=1, pipeline=1, context=1)
    with parallel_layout(single) as gather_group:
        model, optimizer = _build(config, single, device, gather_group)
        load_checkpoint(checkpoint, model, optimizer, with_optimizer=False)
        gpt = model.module
        gpt.eval()
        loaded = time.perf_counter()

        # NIAH: the cells are shared out over the ranks
        cells = niah_cells(ev.niah_task, tokenizer, lengths, ev.niah_depths, ev.niah_samples, data.seed)
        mine = {cell: samples for i, (cell, samples) in enumerate(cells.items()) if i % world == rank}
        answers = answer_niah(mine, greedy_predictor(gpt, tokenizer, device, config.nsa.selection_block))
        gathered = [None] * world
        dist.all_gather_object(gathered, answers)
        answers = {cell: texts for part in gathered for cell, texts in part.items()}
        grid = niah_grid(lengths, ev.niah_depths, cells, answers)
        answered = time.perf_counter()  # after all_gather_object, which waits for every rank's answers

        # validation loss by position, over this rank's share of the held-out sequences
        sequences = stage_sequences(config, stage.seq_len, stage.mix, "valid")
        eod = document_eod(config)
        loss_sum = torch.zeros(stage.seq_len, dtype=torch.float64, device=device)
        count = torch.zeros(stage.seq_len, dtype=torch.float64, device=device)
        # each NSA layer's gates (args[4] of its nsa_context_parallel call, [B, S, HQ, 3]) summed over tokens
        model_config = config.model
        is_nsa = model_config.attention == "nsa"
        gate_sum = torch.zeros(model_config.num_layers, model_config.num_query_heads, 3, dtype=torch.float64,
                               device=device) if is_nsa else None
        with torch.no_grad(), recorded_nsa_layers(lambda args, _: args[4].double().sum(dim=(0, 1))) as gates:
            for index in range(rank, ev.validation_sequences, world):
                row = sequences(index).to(device)[None]
                tokens, labels = row[:, :-1], row[:, 1:]
                documents = packed_seq_params(tokens, eod) if eod is not None else None
                per_token = gpt(tokens, None, None, labels=labels, packed_seq_params=documents)  # [1, S]
                loss_sum += per_token[0].double()
                count += 1
                if gates:  # one record per layer, in layer order
                    gate_sum += torch.stack(gates)
                    gates.clear()
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
        if is_nsa:
            dist.all_reduce(gate_sum)

    loss = float(loss_sum.sum() / count.sum())  # a read to the host: the validation passes are done
    finished = time.perf_counter()
    report = {
        "checkpoint": str(checkpoint.path), "step": checkpoint.state.step, "stage": stage.name,
        "seq_len": stage.seq_len, "rotary_base": stage.rotary_base, "data": data.path or data.source,
        "validation": {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "sequences": ev.validation_sequences,
                       "tokens": ev.validation_sequences * stage.seq_len},
        "loss_by_position": bucket_losses(loss_sum, count, ev.position_buckets),
        "niah": {"task": ev.niah_task, **grid},
        "seconds": {"model": loaded - started, "niah": answered - loaded, "validation": finished - answered},
    }
    if is_nsa:
        by_head = gate_sum / count.sum()  # count.sum(): the validation tokens, each seen once by every layer
        report["gates"] = {"branches": ["compressed", "selected", "window"],
                           "mean_by_layer": by_head.mean(dim=1).tolist(), "mean_by_layer_and_head": by_head.tolist()}
    out_dir = Path(out_dir) if out_dir is not None else Path(checkpoint.path) / "eval"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_heatmap(grid, f"{ev.niah_task} retrieval\n{checkpoint.path.name} ({stage.name})", out_dir / "niah.png")
        write_json_atomically(out_dir / "eval.json", report)
    report["files"] = [str(out_dir / "eval.json"), str(out_dir / "niah.png")]
    return report
