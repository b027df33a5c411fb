"""Side-by-side report of training runs, from their MLflow stores and stage-end evaluations.

    python tools/compare_runs.py runs/proof_100m runs/proof_100m_dense --out docs/proof

For each run directory (trained with tracking on and `eval.at_stage_end`), per stage: the training loss
curve, steps, mean tokens/s (the stage's first step, which compiles and warms up, left out), training
seconds (the sum of step times), and the stage-end evaluation (validation loss, NIAH accuracy and its
heatmap; accuracy and worst depth at the stage's own length when the grid also holds others), and one
row per run to set versions of a configuration side by side (answer loss at each stage's end, NIAH after
each stage and at the short lengths after the last, validation loss, wall seconds), and where stages mixed
in task samples, one more: the answer loss at each stage's start and end (--course STAGE adds that
stage's answer loss per 25 steps), and the training loss on the steps that held no task samples (the
same text for runs of one data seed), and for NSA runs each layer's mean gate per branch at each stage's
end. Where a job's time outside its steps went: each stage-end evaluation's seconds by part, and each
checkpoint save's seconds (the `checkpoint/save_s` metric, logged since 2026-12-06). --against
RUN:BASELINE (names from --names) adds each RUN's validation loss, its first position bucket's and its
loss without tasks as percentages above or below BASELINE's, per stage. Writes to --out: `loss.png`
(one panel per stage, one line per run), `niah_<run>_<stage>.png` (each stage's heatmap, drawn from its
eval.json), `report.md` (the tables, ready for the README) and `report.json`; where stages mixed in task
samples, `answers.png`: the loss on the answers' tokens alone, which falls when a model learns to
retrieve (logged since commit 7a21946).

When an evaluation covers more than one length (`eval.niah_lengths`), report.md also has a table of NIAH
accuracy by length, one row per run and checkpoint. --evals adds evaluations made after training
(`nsa-dist eval ... --out DIR`, e.g. a checkpoint evaluated at other lengths) to that table (each eval.json
names its checkpoint, so its run).

    python tools/compare_runs.py runs/proof_100m runs/proof_100m_dense --out docs/proof \
        --evals short/nsa_800/eval.json short/dense_800/eval.json

A run directory may have been copied from the machine that trained it (its MLflow store, tracking.json and
each checkpoint's eval/ folder suffice), and renamed: paths recorded there are found again under it. An archived store,
`mlflow.db.gz` in place of `mlflow.db`, is read from a decompressed temporary copy.
"""

import argparse
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa_dist.evaluation import save_heatmap  # noqa: E402
from nsa_dist.tracking import read_run_ids  # noqa: E402


def relocated(recorded: str, run_dir: Path, trained_as: str | None = None) -> Path:
    """A path recorded in the MLflow store, found under run_dir when it is there: the run directory may
    have been moved, copied or renamed, so its part after the run directory's name (e.g.
    checkpoints/step_00000100) is looked up under run_dir first. trained_as: the directory's name when it
    was trained, if it has been renamed since."""
    path = Path(recorded)
    parts = path.parts
    for name in (run_dir.name, trained_as):
        if name and name in parts:
            inside = run_dir.joinpath(*parts[len(parts) - parts[::-1].index(name):])
            if inside.exists():
                return inside
    return path


def stage_summary(client, run_id: str, run_dir: Path, trained_as: str | None = None) -> dict:
    """One stage's figures from its MLflow run and its final checkpoint's eval.json."""
    run = client.get_run(run_id)

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    loss, speed, times = history("loss"), history("tokens_per_s"), history("step_time_s")
    timed = [value for _, value in speed[1:]] or [value for _, value in speed]
    summary = {"loss": loss, "answer_loss": history("answer_loss"), "steps": len(loss), "tokens_per_s": sum(timed) / len(timed) if timed else None,
               "train_seconds": sum(value for _, value in times), "val_loss": run.data.metrics.get("eval/val_loss"),
               "niah_accuracy": run.data.metrics.get("eval/niah_accuracy"), "niah_worst_depth": None, "heatmap": None,
               "eval": None, "eval_step": None,
               "save_seconds": [value for _, value in history("checkpoint/save_s")]}
    checkpoint = run.data.tags.get("checkpoint.latest")
    checkpoint = relocated(checkpoint, run_dir, trained_as) if checkpoint else None
    if checkpoint and (checkpoint / "eval" / "eval.json").exists():
        report = json.loads((checkpoint / "eval" / "eval.json").read_text())
        summary["eval"] = {"seq_len": report["seq_len"], "niah": report["niah"], "validation": report["validation"],
                           "loss_by_position": report["loss_by_position"], "gates": report.get("gates"),
                           "seconds": report.get("seconds")}  # evaluations since 2026-12-04 time their parts
        summary["eval_step"] = report["step"]
        summary["heatmap"] = str(checkpoint / "eval" / "niah.png")
        # at the stage's own length when the grid has it (eval.niah_stage_length), else over the whole grid
        niah = report["niah"]
        if report["seq_len"] in niah["lengths"]:
            column = niah["lengths"].index(report["seq_len"])
            cells = [row[column] for row in niah["accuracy"]]
        else:
            cells = [cell for row in niah["accuracy"] for cell in row]
        summary["niah_accuracy"] = sum(cells) / len(cells)
        summary["niah_worst_depth"] = min(cells)
    return summary


_TEMPORARY = []  # decompressed stores, deleted when the process exits


def gunzipped(archive: Path) -> Path:
    """A decompressed copy of a gzipped MLflow store, in a temporary folder that lives as long as the process."""
    folder = tempfile.TemporaryDirectory(prefix="compare_runs-")
    _TEMPORARY.append(folder)
    database = Path(folder.name) / archive.stem
    with gzip.open(archive, "rb") as source, open(database, "wb") as target:
        shutil.copyfileobj(source, target)
    return database


def store_file(recorded: str, run_dir: Path) -> Path:
    """The sqlite file of a run's MLflow store: under run_dir (as it is, or gzipped as archived runs are;
    in a renamed run directory, by its file name), else where the run recorded it. Never a path that does
    not exist: sqlite would create an empty store."""
    for candidate in (recorded, recorded + ".gz"):
        path = relocated(candidate, run_dir).resolve()
        if path.exists() and run_dir.resolve() in path.parents:
            return gunzipped(path) if path.suffix == ".gz" else path
    for path in (run_dir / Path(recorded).name, run_dir / (Path(recorded).name + ".gz")):
        if path.exists():
            return gunzipped(path) if path.suffix == ".gz" else path
    if Path(recorded).exists():
        return Path(recorded)
    sys.exit(f"error: {run_dir} has no MLflow store: neither {run_dir / Path(recorded).name} (or .gz) nor {recorded}, "
             "where the run recorded it, exists; copy the run's mlflow.db into its run directory")


def read_run(run_dir: Path) -> dict:
    ids = read_run_ids(run_dir)
    if ids is None:
        sys.exit(f"error: {run_dir} has no tracking.json: train it with tracking.enabled=true (the default)")
    from mlflow import MlflowClient

    uri = ids["tracking_uri"]
    trained_as = None
    if uri.startswith("sqlite:///"):
        recorded = Path(uri.removeprefix("sqlite:///"))
        # a store kept in its run directory, now found in one of another name: the directory was renamed
        if recorded.parent.name != run_dir.name and any(
                (run_dir / name).exists() for name in (recorded.name, recorded.name + ".gz")):
            trained_as = recorded.parent.name
        uri = f"sqlite:///{store_file(str(recorded), run_dir)}"
    client = MlflowClient(uri)
    parent = client.get_run(ids["parent"]).info
    stages = {stage: stage_summary(client, run_id, run_dir, trained_as) for stage, run_id in ids["stages"].items()}
    # the parent run spans the job: start-up, compilation, every stage, checkpoints and evaluations
    wall = (parent.end_time - parent.start_time) / 1000 if parent.end_time else None
    return {"wall_seconds": wall, "stages": stages, "trained_as": trained_as}


def plot_losses(runs: dict, path: Path, key: str = "loss", label: str = "training loss") -> None:
    """One panel per stage (that has `key`'s history), one line per run: "loss", or "answer_loss" (the
    loss on task answers' tokens, where the stage mixes in tasks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(stage for run in runs.values() for stage, s in run["stages"].items() if s[key]))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for name, run in runs.items():
            stages_of_run = run["stages"]
            if stage in stages_of_run and stages_of_run[stage][key]:
                steps, values = zip(*stages_of_run[stage][key])
                # each step's loss faint, and its running mean over a twentieth of the stage: at long
                # lengths a step holds few sequences, so one synthetic task sequence swings the loss
                window = max(1, len(values) // 20)
                smooth = [sum(values[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(values))]
                line, = ax.plot(steps, smooth, label=f"{name} (mean of {window})" if window > 1 else name)
                ax.plot(steps, values, color=line.get_color(), alpha=0.25, linewidth=0.6)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown(runs: dict) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| run | stage | steps | tokens/s | train s | final loss | val loss | NIAH mean | NIAH worst depth |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        for stage, s in run["stages"].items():
            final = s["loss"][-1][1] if s["loss"] else None
            lines.append(f"| {name} | {stage} | {s['steps']} | {cell(s['tokens_per_s'], ',.0f')} | "
                         f"{cell(s['train_seconds'], '.1f')} | {cell(final, '.4f')} | {cell(s['val_loss'], '.4f')} | "
                         f"{percent(s['niah_accuracy'])} | {percent(s['niah_worst_depth'])} |")
    lines += ["", "| run | training s (sum of steps) | wall s (the job: start-up, compilation, checkpoints, "
              "evaluations) |", "| --- | --- | --- |"]
    for name, run in runs.items():
        train_seconds = sum(s["train_seconds"] for s in run["stages"].values())
        lines.append(f"| {name} | {train_seconds:.1f} | {cell(run['wall_seconds'], '.1f')} |")
    return "\n".join(lines) + "\n"


def onset_step(answer_loss: list[tuple[int, float]], threshold: float = 0.1, window: int = 20) -> int | None:
    """The step at which the mean answer loss of the last `window` steps with task answers first falls
    below `threshold`: when a run learned the lookup (its answer loss falls from ~2 nats a digit to near
    0 within a few hundred steps, at a step that varies from run to run). None if it never did."""
    for end in range(window, len(answer_loss) + 1):
        if sum(value for _, value in answer_loss[end - window:end]) / window < threshold:
            return answer_loss[end - 1][0]
    return None


def one_row_each(runs: dict, last: int = 10) -> str:
    """One row per run, to set versions of a configuration side by side: per stage, the mean answer loss
    over its last `last` steps (whether the lookup was learned) and NIAH at the stage's own length after
    it; the step the lookup was learned at (`onset_step` over the whole run); NIAH by depth at the last stage's length (which depths it reaches; in brackets the mean answer
    prefix, how much of the answers is right before the first wrong digit); NIAH at the other lengths of the
    last stage's evaluation (whether the short lookups were kept); the last stage's validation loss; the
    job's wall seconds."""
    def mean(values):
        return sum(values) / len(values)

    lines = [f"| run | answer loss, each stage's last {last} steps with task answers | answer loss < 0.1 from step "
             "(mean of 20) | NIAH at each stage's length after it | NIAH by depth at the last stage's length | "
             "NIAH at the other lengths after the last stage | val loss, last stage | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        stages = list(run["stages"].values())
        answers = " / ".join(f"{mean([v for _, v in s['answer_loss'][-last:]]):.2f}" if s["answer_loss"] else "-"
                             for s in stages)
        onset = onset_step([point for s in stages for point in s["answer_loss"]])
        niah = " / ".join(percent(s["niah_accuracy"]) for s in stages)
        final = stages[-1]["eval"]
        by_depth = others = "-"
        if final:
            grid = final["niah"]
            if final["seq_len"] in grid["lengths"]:
                column = grid["lengths"].index(final["seq_len"])
                # with the answer prefix in brackets where the evaluation recorded it (since 2026-12-01)
                prefix = grid.get("answer_prefix") or [None] * len(grid["depths"])
                by_depth = " / ".join(f"{depth:g}: {percent(row[column])}"
                                      + ("" if part is None else f" ({percent(part[column])})")
                                      for depth, row, part in zip(grid["depths"], grid["accuracy"], prefix))
            others = " / ".join(
                f"{n:,}: {percent(mean([row[i] for row in grid['accuracy']]))}"
                for i, n in enumerate(grid["lengths"]) if n != final["seq_len"]) or "-"
        val = stages[-1]["val_loss"]
        wall = run["wall_seconds"]
        lines.append(f"| {name} | {answers} | {'-' if onset is None else onset} | {niah} | {by_depth} | {others} | {'-' if val is None else f'{val:.4f}'} | "
                     f"{'-' if wall is None else f'{wall:.0f}'} |")
    return "\n".join(lines) + "\n"


def per_stage_table(runs: dict, heading: Callable[[str], str], cell: Callable[[dict], str]) -> str:
    """One row per run, one column per stage (of any run): heading(stage) heads a column, cell(the run's
    stage summary, {} where the run lacks the stage) fills it."""
    stages = list(dict.fromkeys(stage for run in runs.values() for stage in run["stages"]))
    lines = ["| run | " + " | ".join(heading(stage) for stage in stages) + " |",
             "| --- | " + " | ".join("---" for _ in stages) + " |"]
    for name, run in runs.items():
        lines.append(f"| {name} | " + " | ".join(cell(run["stages"].get(stage, {})) for stage in stages) + " |")
    return "\n".join(lines) + "\n"


def answer_loss_course(runs: dict, span: int = 10) -> str:
    """One row per run: per stage that mixed in task samples, the mean answer loss over its first and its
    last `span` steps with task answers. The first shows what the stages before carried over to this
    stage's lengths (a lookup learned at 2K that also works in longer samples starts the 8K stage low);
    the pair, whether the stage itself taught it."""
    def cell(s: dict) -> str:
        values = [value for _, value in s.get("answer_loss", [])]
        if not values:
            return "-"
        first, last = values[:span], values[-span:]
        return f"{sum(first) / len(first):.2f} -> {sum(last) / len(last):.2f}"

    return per_stage_table(runs, lambda stage: f"{stage}: first -> last {span}", cell)


def source_loss(runs: dict) -> str:
    """One row per run: per stage, the mean training loss over the second half of its steps that held no
    task answers (every sequence of the step source text: in the proof's 32k stage, of one sequence a
    step, its code steps), and in brackets how many steps that mean is over. Runs with the same data seed
    draw the same sequences at every step whatever their attention, so this sets their language modelling
    side by side on the same training text, apart from the tasks."""
    def cell(s: dict) -> str:
        half = source_half(s)
        return f"{sum(half) / len(half):.3f} ({len(half)})" if half else "-"

    return per_stage_table(runs, lambda stage: f"{stage}: loss on steps without tasks, second half", cell)


def evaluation_seconds(runs: dict) -> str:
    """One row per run: per stage, its stage-end evaluation's wall seconds, loading the model / the NIAH grid /
    the validation loss (eval.json's `seconds`; "-" where the stage had no evaluation or it predates them)."""
    def cell(s: dict) -> str:
        seconds = (s.get("eval") or {}).get("seconds")
        return "-" if not seconds else " / ".join(f"{seconds[part]:.1f}" for part in ("model", "niah", "validation"))

    return per_stage_table(runs, lambda stage: f"{stage}: evaluation s, model / NIAH / validation", cell)


def save_seconds(runs: dict) -> str:
    """One row per run: per stage, each of its checkpoint saves' seconds in step order (the `checkpoint/save_s`
    metric; "-" where the stage logged none, as runs before 2026-12-06 did)."""
    def cell(s: dict) -> str:
        return " / ".join(f"{seconds:.1f}" for seconds in s.get("save_seconds") or []) or "-"

    return per_stage_table(runs, lambda stage: f"{stage}: checkpoint saves s", cell)


def source_half(s: dict) -> list[float]:
    """The training losses of the second half of a stage's steps without task answers (source_loss)."""
    with_tasks = {step for step, _ in s.get("answer_loss", [])}
    values = [value for step, value in s.get("loss", []) if step not in with_tasks]
    return values[len(values) // 2:]


def source_half_mean(s: dict) -> float | None:
    half = source_half(s)
    return sum(half) / len(half) if half else None


def against(runs: dict, pairs: list[tuple[str, str]]) -> str:
    """One row per (run, baseline) pair: per stage both have, the run's validation loss against the
    baseline's, over all positions and in the first position bucket, and the training loss on the steps
    without task samples (source_half_mean) where both have such steps, each as a percentage above (+)
    or below (-) the baseline's."""
    def relative(value, base) -> str:
        return "-" if value is None or not base else f"{100 * (value / base - 1):+.1f}%"

    stages = list(dict.fromkeys(stage for run in runs.values() for stage in run["stages"]))
    lines = ["| run | against | " + " | ".join(f"{stage}: val loss / first bucket / loss without tasks"
                                              for stage in stages) + " |",
             "| --- | --- | " + " | ".join("---" for _ in stages) + " |"]
    for name, base in pairs:
        cells = []
        for stage in stages:
            s, b = runs[name]["stages"].get(stage), runs[base]["stages"].get(stage)
            if not s or not b or not s["eval"] or not b["eval"]:
                cells.append("-")
                continue
            first = [run["eval"]["loss_by_position"]["loss"][0] for run in (s, b)]
            cells.append(" / ".join([relative(s["eval"]["validation"]["loss"], b["eval"]["validation"]["loss"]),
                                     relative(*first), relative(source_half_mean(s), source_half_mean(b))]))
        lines.append(f"| {name} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gates_by_layer(runs: dict) -> str:
    """One row per run and stage evaluated with gates (NSA models, since the evaluation records them): each
    layer's mean gate of the compressed, selected and window branch on the validation sequences, as
    c/s/w."""
    rows = [(name, stage, s["eval"]["gates"]["mean_by_layer"]) for name, run in runs.items()
            for stage, s in run["stages"].items() if s["eval"] and s["eval"].get("gates")]
    if not rows:
        return ""
    layers = max(len(means) for _, _, means in rows)
    lines = ["| run | stage | " + " | ".join(f"L{i + 1} c/s/w" for i in range(layers)) + " |",
             "| --- | --- | " + " | ".join("---" for _ in range(layers)) + " |"]
    for name, stage, means in rows:
        cells = ["/".join(f"{gate:.2f}" for gate in layer) for layer in means]
        lines.append(f"| {name} | {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def answer_loss_by_span(runs: dict, stage: str, width: int = 25) -> str:
    """One row per run: the mean answer loss over each `width` steps of `stage`, counted from the stage's
    first step (steps 1-width, width+1-2*width, ...; the steps with task answers among them), to follow how
    fast a stage learns its lookup where runs start and end alike. A span without answers is "-"."""
    spans = {}
    for name, run in runs.items():
        s = run["stages"].get(stage)
        if not s or not s["loss"]:
            continue
        first = s["loss"][0][0]
        for step, value in s["answer_loss"]:
            spans.setdefault(name, {}).setdefault((step - first) // width, []).append(value)
    if not spans:
        return f"(no run has answer losses in a stage called {stage})\n"
    count = 1 + max(i for by_span in spans.values() for i in by_span)
    lines = [f"| run | {stage}: steps " + " | ".join(f"{i * width + 1}-{(i + 1) * width}" for i in range(count)) + " |",
             "| --- | " + " | ".join("---" for _ in range(count)) + " |"]
    for name in runs:
        by_span = spans.get(name, {})
        cells = [f"{sum(by_span[i]) / len(by_span[i]):.2f}" if i in by_span else "-" for i in range(count)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def attach_evals(runs: dict, run_dirs: dict[str, Path], paths: list[Path]) -> None:
    """Adds each eval.json (or a folder holding one) to its run's "evals" list: the run whose directory
    name is part of the checkpoint path the evaluation recorded."""
    for name, run in runs.items():
        run["evals"] = [{"step": s["eval_step"], "stage": stage, "niah": s["eval"]["niah"], "file": None}
                        for stage, s in run["stages"].items() if s["eval"]]
    for path in paths:
        path = path / "eval.json" if path.is_dir() else path
        if not path.exists():
            sys.exit(f"error: --evals {path}: no such file; give eval.json files (or folders holding one) that "
                     "`nsa-dist eval --out DIR` wrote")
        report = json.loads(path.read_text())
        owners = [name for name, run_dir in run_dirs.items()
                  if {run_dir.name, runs[name]["trained_as"]} & set(Path(report["checkpoint"]).parts)]
        if len(owners) != 1:
            sys.exit(f"error: --evals {path}: its checkpoint {report['checkpoint']} is under "
                     f"{'none' if not owners else 'more than one'} of the run directories "
                     f"({', '.join(str(d) for d in run_dirs.values())}): evaluate a checkpoint of one of them")
        runs[owners[0]]["evals"].append({"step": report["step"], "stage": report["stage"], "niah": report["niah"],
                                          "file": str(path)})


def niah_by_length(runs: dict) -> str:
    """One row per run and checkpoint: NIAH accuracy at every length it was evaluated at, as the mean over
    depths and, in brackets, the worst and best depth."""
    lengths = sorted({n for run in runs.values() for e in run["evals"] for n in e["niah"]["lengths"]})
    lines = ["| run | after stage | step | " + " | ".join(f"NIAH at {n:,}" for n in lengths) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in lengths) + " |"]
    for name, run in runs.items():
        by_step: dict[int, dict] = {}
        for e in sorted(run["evals"], key=lambda e: e["step"]):
            row = by_step.setdefault(e["step"], {"stage": e["stage"], "cells": {}})
            grid = e["niah"]
            for i, n in enumerate(grid["lengths"]):
                column = [depth_row[i] for depth_row in grid["accuracy"]]
                row["cells"][n] = (f"{100 * sum(column) / len(column):.0f}% "
                                   f"({100 * min(column):.0f}-{100 * max(column):.0f}%)")
        for step, row in by_step.items():
            cells = " | ".join(row["cells"].get(n, "") for n in lengths)
            lines.append(f"| {name} | {row['stage']} | {step} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (run.dir of each training run)")
    p.add_argument("--names", nargs="*", help="a label per run (default: the directory names)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--evals", nargs="*", type=Path, default=[],
                   help="eval.json files (or folders) of later evaluations of these runs' checkpoints")
    p.add_argument("--course", metavar="STAGE", help="add a table of STAGE's answer loss, per --course-width steps")
    p.add_argument("--course-width", type=int, default=25, help="steps a column of the --course table (25)")
    p.add_argument("--against", nargs="*", default=[], metavar="RUN:BASELINE",
                   help="pairs of --names (e.g. nsa:dense): a table of each RUN's losses relative to its BASELINE's")
    a = p.parse_args(argv)
    names = a.names or [run.name for run in a.runs]
    pairs = [tuple(pair.split(":")) for pair in a.against]
    for pair, given in zip(pairs, a.against):
        if len(pair) != 2 or not set(pair) <= set(names):
            sys.exit(f"error: --against {given}: give RUN:BASELINE, two of the run names ({', '.join(names)})")
    if a.course_width < 1:
        sys.exit(f"error: --course-width {a.course_width}: give a number of steps, 1 or more")
    if len(names) != len(a.runs):
        sys.exit(f"error: --names gives {len(names)} labels for {len(a.runs)} runs: give one per run")
    runs = {name: read_run(run) for name, run in zip(names, a.runs)}
    stages = list(dict.fromkeys(stage for run in runs.values() for stage in run["stages"]))
    if a.course is not None and a.course not in stages:
        sys.exit(f"error: --course {a.course}: no run has a stage called that; give one of {', '.join(stages)}")
    a.out.mkdir(parents=True, exist_ok=True)
    plot_losses(runs, a.out / "loss.png")
    if any(s["answer_loss"] for run in runs.values() for s in run["stages"].values()):
        plot_losses(runs, a.out / "answers.png", "answer_loss", "loss on task answers")
    for name, run in runs.items():
        for stage, s in run["stages"].items():
            if s["eval"]:
                grid = s["eval"]["niah"]
                save_heatmap(grid, f"{name}, stage {stage}\n{grid['task']} retrieval", a.out / f"niah_{name}_{stage}.png")
    table = markdown(runs) + "\n" + one_row_each(runs)
    if any(s["answer_loss"] for run in runs.values() for s in run["stages"].values()):
        table += "\n" + answer_loss_course(runs)
    table += "\n" + source_loss(runs)
    if any((s["eval"] or {}).get("seconds") for run in runs.values() for s in run["stages"].values()):
        table += "\n" + evaluation_seconds(runs)
    if any(s.get("save_seconds") for run in runs.values() for s in run["stages"].values()):
        table += "\n" + save_seconds(runs)
    if pairs:
        table += "\n" + against(runs, pairs)
    gates = gates_by_layer(runs)
    if gates:
        table += "\n" + gates
    if a.course:
        table += "\n" + answer_loss_by_span(runs, a.course, a.course_width)
    attach_evals(runs, dict(zip(names, a.runs)), a.evals)
    if any(len(e["niah"]["lengths"]) > 1 for run in runs.values() for e in run["evals"]):
        table += "\n" + niah_by_length(runs)
    (a.out / "report.md").write_text(table)
    (a.out / "report.json").write_text(json.dumps(runs, indent=1))
    print(table)
    return runs


if __name__ == "__main__":
    main()
