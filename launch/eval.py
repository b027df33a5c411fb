"""Evaluates a checkpoint (nsa_dist/evaluation.py): the NIAH grid with its heatmap, the validation loss
and the loss by position bucket; writes eval.json and niah.png into <checkpoint>/eval/ (or --out) and
logs them to the run's MLflow run of the checkpoint's stage when the run directory is tracked.

    python -m launch.eval --config configs/quickstart.yaml                 # run.dir's newest checkpoint
    python -m launch.eval --config CONFIG --checkpoint runs/x/checkpoints/step_00000020 --stage short

Starts --nproc processes on this machine (default 1; each holds the whole model and they share the
grid), or runs as one rank under torchrun. `nsa-dist eval` is the same command.
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
warnings.filterwarnings("ignore", category=FutureWarning, message=".*(load_state_dict. is deprecated|DTensor instead)")

from launch.train import free_port  # noqa: E402
from nsa_dist.checkpoint import CheckpointError, check_same_model, newest_checkpoint, read_checkpoint  # noqa: E402
from nsa_dist.config import Config, ConfigError, Stage, load_config  # noqa: E402
from nsa_dist.data import check_data  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="a step_<N> checkpoint directory (default: the "
                        "newest complete one of the config's run.dir)")
    parser.add_argument("--stage", default=None, help="the stage whose seq_len, RoPE base and data to evaluate "
                        "with (default: the stage that saved the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set eval.niah_lengths=[256,512] (repeatable)")
    parser.add_argument("--nproc", type=int, default=1, help="processes to share the evaluation (default 1)")
    parser.add_argument("--out", default=None, help="directory for eval.json and niah.png (default <checkpoint>/eval)")


def resolve(config: Config, checkpoint: str | None, stage_name: str | None):
    """The checkpoint and stage to evaluate, checked (ConfigError/CheckpointError) before any process starts."""
    if checkpoint is None:
        found = newest_checkpoint(config.run.dir)
        if found is None:
            raise CheckpointError(f"run.dir {config.run.dir} holds no complete checkpoint: train first, or pass "
                                  "--checkpoint PATH")
    else:
        found = read_checkpoint(checkpoint)
    check_same_model(found, config)
    stages = {stage.name: stage for stage in config.resolved_stages()}
    name = stage_name or found.state.stage
    if name not in stages:
        raise ConfigError(f"stage {name!r} is not in the config (stages: {', '.join(stages)}): pass --stage "
                          "with one of them")
    stage = stages[name]
    check_data(config, [stage.seq_len], evaluate=True)
    return found, stage


def run_rank(config: Config, checkpoint_path: str, stage: Stage, out: str | None) -> dict:
    from nsa_dist.evaluation import evaluate_checkpoint

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["WORLD_SIZE"])))
    report = evaluate_checkpoint(config, read_checkpoint(checkpoint_path), stage, None if out is None else Path(out))
    if os.environ["RANK"] == "0":
        from nsa_dist.tracking import log_evaluation_to_run

        report["mlflow_run"] = log_evaluation_to_run(config.run.dir, stage.name, report) if config.tracking.enabled else ""
        print_report(Console(soft_wrap=True), report)
    dist.barrier()
    dist.destroy_process_group()
    return report


def worker(rank: int, config: Config, world_size: int, port: int, checkpoint: str, stage: Stage,
           out: str | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    run_rank(config, checkpoint, stage, out)


def print_report(console: Console, report: dict) -> None:
    niah = report["niah"]
    table = Table(title=f"{niah['task']} exact match, {report['checkpoint']} ({report['stage']})",
                  title_justify="left")
    table.add_column("depth \\ length")
    for length in niah["lengths"]:
        table.add_column(str(length), justify="right")
    for depth, row, prefix in zip(niah["depths"], niah["accuracy"], niah["answer_prefix"]):
        table.add_row(f"{depth:.0%}", *(f"{value:.0%} ({part:.0%})" for value, part in zip(row, prefix)))
    console.print(table)
    console.print("in brackets: the answer prefix, the mean fraction of an answer right before its first wrong "
                  "digit")
    buckets = report["loss_by_position"]
    console.print(f"validation loss {report['validation']['loss']:.4f} (perplexity "
                  f"{report['validation']['perplexity']:.2f}) over {report['validation']['tokens']} tokens; by "
                  "position: " + ", ".join(f"{a}-{b}: {loss:.3f}" for a, b, loss in
                                            zip(buckets["starts"], buckets["ends"], buckets["loss"])))
    console.print(f"wrote {', '.join(report['files'])}" +
                  (f"; logged to MLflow run {report['mlflow_run']}" if report.get("mlflow_run") else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the YAML config the checkpoint was trained with")
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return evaluate(args.config, args)


def evaluate(config_path: str, args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    try:
        config = load_config(config_path, args.overrides)
        if args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc} must be at least 1")
        checkpoint, stage = resolve(config, args.checkpoint, args.stage)
    except (ConfigError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if "RANK" in os.environ:  # started by torchrun: this process is one rank
        run_rank(config, str(checkpoint.path), stage, args.out)
        return 0
    try:
        mp.start_processes(worker, args=(config, args.nproc, free_port(), str(checkpoint.path), stage, args.out),
                           nprocs=args.nproc, start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        detail = exc.msg if isinstance(exc, mp.ProcessRaisedException) else f"exit code {exc.exit_code}"
        console.print(f"[red]evaluation stopped:[/red] rank {exc.error_index} failed ({detail})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
