"""nsa-dist: train GPT models with Native Sparse Attention through a context-extension curriculum, on Ray
(a local Ray by default), tracked in MLflow.

  nsa-dist train CONFIG [--set KEY=VALUE]... [--address ADDR] [--workers N] [--print-config]
  nsa-dist status [RUN_DIR ...]
  nsa-dist ui [RUN_DIR] [--port PORT]
  nsa-dist eval CONFIG [--checkpoint PATH] [--stage NAME] [--set KEY=VALUE]... [--nproc N] [--out DIR]

`python -m launch` is the same command. On machines without Ray (e.g. a GPU box reached through
torchrun), `torchrun --nproc_per_node N -m launch.train --config CONFIG` runs one rank per process.
"""

import argparse
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import yaml
from rich.console import Console

# Megatron-core says so at import on machines without TransformerEngine and apex, then uses torch's
# norms and optimizers, which is what we want. Set before the imports that trigger it.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")

from nsa_dist.checkpoint import CheckpointError, newest_checkpoint  # noqa: E402
from nsa_dist.config import Config, ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def presets() -> str:
    return ", ".join(str(path.relative_to(ROOT)) for path in sorted((ROOT / "configs").glob("*.yaml")))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nsa-dist", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,status,ui,eval}")

    train = commands.add_parser(
        "train", help="train a config's curriculum on Ray (resumes from the run directory's checkpoints)",
        description=f"Trains CONFIG's stages on Ray. Presets: {presets()}. Every field of a config is listed, "
                    "with its default and meaning, by --print-config and in nsa_dist/config.py.")
    train.add_argument("config", metavar="CONFIG", help=f"YAML config, e.g. one of the presets: {presets()}")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one field, e.g. --set nsa.window=128 or --set stages.1.steps=50 (repeatable)")
    train.add_argument("--address", default=None,
                       help="Ray cluster to join (HEAD:6379); default: $RAY_ADDRESS, else a local Ray on 127.0.0.1")
    train.add_argument("--workers", type=int, default=None,
                       help="workers at most (default: every GPU of the cluster, or every CPU when it has none)")
    train.add_argument("--max-failures", type=int, default=3,
                       help="restarts of a worker group after a worker dies, each from the newest checkpoint")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")

    status = commands.add_parser("status", help="list runs: their stages, newest checkpoints and MLflow run ids")
    status.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories (default: every one in runs/)")

    ui = commands.add_parser("ui", help="open a run's MLflow store in the MLflow UI on 127.0.0.1")
    ui.add_argument("run_dir", nargs="?", default="runs/quickstart", metavar="RUN_DIR")
    ui.add_argument("--port", type=int, default=5000)

    from launch.eval import add_arguments

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint: NIAH grid and heatmap, validation loss by position (local processes)",
        description="Evaluates a checkpoint of CONFIG's run (default: run.dir's newest) with the config's eval: "
                    "section; writes <checkpoint>/eval/eval.json and niah.png and logs them to the run's MLflow runs.")
    evaluate.add_argument("config", metavar="CONFIG", help="the YAML config the checkpoint was trained with")
    add_arguments(evaluate)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(soft_wrap=True)  # whole lines when there is no terminal (CI, ray job logs)
    try:
        if args.command == "train":
            return train(args, console)
        if args.command == "status":
            return status(args, console)
        if args.command == "eval":
            from launch.eval import evaluate

            return evaluate(args.config, args)
        return ui(args, console)
    except (ConfigError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


# ------------------------------------------------------------------------------------ train


def train(args: argparse.Namespace, console: Console) -> int:
    if not (args.address or os.environ.get("RAY_ADDRESS")) and "ray" not in sys.modules:
        # A local Ray binds its services to the machine's address unless told it is not a cluster node,
        # which Ray reads when it is first imported: then they listen on 127.0.0.1 only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from launch.console import ConsoleReporter
    from launch.ray_job import LaunchError, cluster_slots, connect, run, worker_groups
    from nsa_dist.data import check_data
    from nsa_dist.trainer import check_layouts, stages_to_run

    # 1. everything that can be checked without a cluster, before one starts
    config = load_config(args.config, args.overrides)
    # workers run in directories of Ray's own: paths are resolved here, where the user gave them
    config.run.dir = str(Path(config.run.dir).resolve())
    if config.checkpoint.init_from:
        config.checkpoint.init_from = str(Path(config.checkpoint.init_from).resolve())
    for name in ("path", "tokenizer"):  # the dataset prefix and tokenizer.json, likewise
        if getattr(config.data, name):
            setattr(config.data, name, str(Path(getattr(config.data, name)).resolve()))
    if args.print_config:
        console.print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="", markup=False, highlight=False)
        return 0
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be at least 1")
    resume = newest_checkpoint(config.run.dir)
    stages = stages_to_run(config, resume)
    check_data(config, [stage.seq_len for stage in stages])  # dataset files, tokenizer, task lengths
    if not stages:
        console.print(f"nothing to train: all {len(config.stages)} stages of {config.run.dir} are done "
                      f"(newest checkpoint {resume.path}); choose another run.dir to train again")
        return 0

    # 2. the cluster, and how many workers each stage runs on
    try:
        started_local = connect(args.address)
    except LaunchError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    import ray
    import torch

    try:
        slots, use_gpu = cluster_slots(config)
        if args.workers is not None:
            slots = min(slots, args.workers)
        groups = worker_groups(stages, slots, "GPUs" if use_gpu else "CPUs")
        for group in groups:
            check_layouts(config, group.workers, group.stages, torch.device("cuda" if use_gpu else "cpu"))
        _print_plan(console, config, groups, resume, use_gpu, started_local)

        # 3. train, group after group
        command = "nsa-dist " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
        reporter = ConsoleReporter(console)
        try:
            driver = run(config, groups, use_gpu, command=command, max_failures=args.max_failures, reporter=reporter)
        except LaunchError as exc:
            console.print(f"[red]training stopped:[/red] {exc}")
            console.print(_summary(config))
            return 1
        console.print(_summary(config))
        if driver.ui_hint:
            console.print(f"results in MLflow: {driver.ui_hint}")
        return 0
    finally:
        if started_local:
            ray.shutdown()


def _print_plan(console, config: Config, groups, resume, use_gpu: bool, started_local: bool) -> None:
    m, n = config.model, config.nsa
    where = "a local Ray on 127.0.0.1" if started_local else "the Ray cluster"
    console.print(f"GPT {m.num_layers} layers, hidden {m.hidden_size}, {m.attention} attention (HQ="
                  f"{m.num_query_heads} HK={m.num_kv_heads}; l={n.compress_block} d={n.stride} l'={n.selection_block} "
                  f"n={n.num_selected} w={n.window}) on {where}, {'GPUs' if use_gpu else 'CPUs'}; run directory "
                  f"{config.run.dir}")
    if resume is not None:
        console.print(f"resuming from {resume.path} (step {resume.state.step}, stage {resume.state.stage})")


def _summary(config: Config) -> str:
    from nsa_dist.trainer import stages_to_run

    newest = newest_checkpoint(config.run.dir)
    saved = f"newest checkpoint: {newest.path}" if newest else "no checkpoint saved"
    left = stages_to_run(config, newest)
    done = "all stages done" if not left else f"stages left: {', '.join(stage.name for stage in left)}"
    return f"{done}; {saved}"


# ------------------------------------------------------------------------------------ status and ui


def _run_dirs(given: list[str]) -> list[Path]:
    if given:
        return [Path(path) for path in given]
    root = Path("runs")
    return sorted(path for path in root.iterdir() if (path / "checkpoints").is_dir()) if root.is_dir() else []


def _run_ids(run_dir: Path) -> dict | None:
    """The run's MLflow run ids (None when it was not tracked); a damaged tracking.json is a ConfigError."""
    from nsa_dist.tracking import read_run_ids

    try:
        return read_run_ids(run_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def status(args: argparse.Namespace, console: Console) -> int:
    runs = _run_dirs(args.run_dirs)
    if not runs:
        console.print("no runs found under runs/: train one with `nsa-dist train configs/quickstart.yaml`")
        return 0
    for run_dir in runs:
        if not run_dir.is_dir():
            raise ConfigError(f"run directory {run_dir} does not exist: give a run.dir of an earlier "
                              "`nsa-dist train`, or none to list runs/")
        newest = newest_checkpoint(run_dir)
        ids = _run_ids(run_dir) or {}
        stage_ids = ids.get("stages", {})
        if newest is None:
            stages, checkpoint = "not started", "-"
        else:
            names = [stage["name"] for stage in newest.config["stages"]]
            current = names.index(newest.state.stage)
            marks = [("done" if i < current or (i == current and newest.state.stage_done) else
                      f"step {newest.state.stage_step}" if i == current else "next") for i in range(len(names))]
            stages = ", ".join(f"{name} ({mark})" for name, mark in zip(names, marks))
            checkpoint = f"{newest.path} (step {newest.state.step})"
        mlflow_ids = "not tracked" if not ids else f"parent {ids.get('parent')}, " + ", ".join(
            f"{name} {run_id}" for name, run_id in stage_ids.items())
        console.print(f"[bold]{run_dir}[/bold]\n  stages: {stages}\n  newest checkpoint: {checkpoint}\n"
                      f"  MLflow runs: {mlflow_ids}")
    return 0


def ui(args: argparse.Namespace, console: Console) -> int:
    run_dir = Path(args.run_dir)
    ids = _run_ids(run_dir)
    if ids is None:
        raise ConfigError(f"{run_dir} holds no tracked run (no tracking.json): give the run.dir of a run trained "
                          "with tracking.enabled")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ids["tracking_uri"],
               "--host", "127.0.0.1", "--port", str(args.port)]
    console.print(f"MLflow UI for {run_dir} on http://127.0.0.1:{args.port} (Ctrl-C stops it)")
    return subprocess.call(command)
