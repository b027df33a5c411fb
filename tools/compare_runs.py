"""Side-by-side report of training runs, from their MLflow stores and stage-end evaluations.

    python tools/compare_runs.py runs/proof_100m runs/proof_100m_dense --out docs/proof

For each run directory (trained with tracking on and `eval.at_stage_end`), per stage: the training loss
curve, steps, mean tokens/s (the stage's first step, which compiles and warms up, left out), training
seconds (the sum of step times), and the stage-end evaluation (validation loss, NIAH accuracy and its
heatmap). Writes to --out: `loss.png` (one panel per stage, one line per run), `niah_<run>_<stage>.png`
(each stage's heatmap), `report.md` (the tables, ready for the README) and `report.json`.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa_dist.tracking import read_run_ids  # noqa: E402


def stage_summary(client, run_id: str) -> dict:
    """One stage's figures from its MLflow run and its final checkpoint's eval.json."""
    run = client.get_run(run_id)

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    loss, speed, times = history("loss"), history("tokens_per_s"), history("step_time_s")
    timed = [value for _, value in speed[1:]] or [value for _, value in speed]
    summary = {"loss": loss, "steps": len(loss), "tokens_per_s": sum(timed) / len(timed) if timed else None,
               "train_seconds": sum(value for _, value in times), "val_loss": run.data.metrics.get("eval/val_loss"),
               "niah_accuracy": run.data.metrics.get("eval/niah_accuracy"), "heatmap": None, "eval": None}
    checkpoint = run.data.tags.get("checkpoint.latest")
    if checkpoint and (Path(checkpoint) / "eval" / "eval.json").exists():
        report = json.loads((Path(checkpoint) / "eval" / "eval.json").read_text())
        summary["eval"] = {"seq_len": report["seq_len"], "niah": report["niah"], "validation": report["validation"],
                           "loss_by_position": report["loss_by_position"]}
        summary["heatmap"] = str(Path(checkpoint) / "eval" / "niah.png")
    return summary


def read_run(run_dir: Path) -> dict:
    ids = read_run_ids(run_dir)
    if ids is None:
        sys.exit(f"error: {run_dir} has no tracking.json: train it with tracking.enabled=true (the default)")
    from mlflow import MlflowClient

    client = MlflowClient(ids["tracking_uri"])
    return {stage: stage_summary(client, run_id) for stage, run_id in ids["stages"].items()}


def plot_losses(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(stage for stages in runs.values() for stage in stages))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for name, stages_of_run in runs.items():
            if stage in stages_of_run and stages_of_run[stage]["loss"]:
                steps, values = zip(*stages_of_run[stage]["loss"])
                ax.plot(steps, values, label=name)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(runs: dict) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| run | stage | steps | tokens/s | train s | final loss | val loss | NIAH exact match |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, stages in runs.items():
        for stage, s in stages.items():
            final = s["loss"][-1][1] if s["loss"] else None
            lines.append(f"| {name} | {stage} | {s['steps']} | {cell(s['tokens_per_s'], ',.0f')} | "
                         f"{cell(s['train_seconds'], '.1f')} | {cell(final, '.4f')} | {cell(s['val_loss'], '.4f')} | "
                         f"{cell(None if s['niah_accuracy'] is None else 100 * s['niah_accuracy'], '.0f')}% |")
    totals = {name: sum(s["train_seconds"] for s in stages.values()) for name, stages in runs.items()}
    lines += ["", "Training seconds in all: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in totals.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (run.dir of each training run)")
    p.add_argument("--names", nargs="*", help="a label per run (default: the directory names)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    names = a.names or [run.name for run in a.runs]
    if len(names) != len(a.runs):
        sys.exit(f"error: --names gives {len(names)} labels for {len(a.runs)} runs: give one per run")
    runs = {name: read_run(run) for name, run in zip(names, a.runs)}
    a.out.mkdir(parents=True, exist_ok=True)
    plot_losses(runs, a.out / "loss.png")
    for name, stages in runs.items():
        for stage, s in stages.items():
            if s["heatmap"]:
                shutil.copyfile(s["heatmap"], a.out / f"niah_{name}_{stage}.png")
    table = markdown(runs)
    (a.out / "report.md").write_text(table)
    (a.out / "report.json").write_text(json.dumps(runs, indent=1))
    print(table)
    return runs


if __name__ == "__main__":
    main()
