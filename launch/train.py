"""Trains a config's GPT model (Megatron-core, NSA) through its curriculum without Ray: for torchrun on
GPU machines, and for single machines without a Ray install. `nsa-dist train` is the Ray launcher.

Starts one process per rank on this machine (default: the largest TP x PP x CP of the stages, so the
widest stage runs with DP=1 and narrower ones add data parallelism), or, when started by torchrun (RANK
is set), runs as that one rank. Checkpoints go to run.dir; the same command run again resumes from the
newest complete one, and never reruns a finished stage.
"""

import argparse
import faulthandler
import logging
import os
import shlex
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console

# Megatron-core says so at import on machines without TransformerEngine and apex, then uses torch's
# norms and optimizers, which is what we want. Set before the imports that trigger it.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
# Megatron-core 0.16's checkpoint loader still calls torch's deprecated DCP entry points; nothing to act on.
warnings.filterwarnings("ignore", category=FutureWarning, message=".*(load_state_dict. is deprecated|DTensor instead)")

from nsa_dist.checkpoint import CheckpointError, newest_checkpoint  # noqa: E402
from nsa_dist.config import Config, ConfigError, load_config  # noqa: E402
from launch.console import ConsoleReporter, clock  # noqa: E402
from nsa_dist.tracking import train_tracked  # noqa: E402
from nsa_dist.trainer import plan, stages_to_run, train  # noqa: E402


SLOW_TEARDOWN_S = 5.0  # a job's teardown slower than this is reported with its time


def _selection(config: Config, stage) -> str:
    """A stage's top-n settings where they differ from nsa:'s (NSA only; a stage may set its own)."""
    n = config.nsa
    if config.model.attention != "nsa":
        return ""
    changed = []
    if stage.num_selected != n.num_selected:
        changed.append(f", n={stage.num_selected}")
    if stage.selection_score != n.selection_score:
        changed.append(f", top-n {stage.selection_score}")
    return "".join(changed)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set nsa.window=128 (repeatable)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes to start (default: the largest TP x PP x CP of the stages; more "
                             "processes add data parallelism)")
    return parser.parse_args(argv)


def worker(local_rank: int, config: Config, world_size: int, port: int, command: str) -> None:
    """One rank of a local job: torchrun's environment, then the trainer."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_rank(config, command)


def run_rank(config: Config, command: str) -> None:
    """One rank: the trainer; rank 0 prints progress (and tracks the run in MLflow)."""
    rank0 = os.environ["RANK"] == "0"
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    if not torch.cuda.is_available():
        # processes share the cores: one thread each unless there are cores to spare
        torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["WORLD_SIZE"])))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    try:
        if rank0:
            _, ui_hint = train_tracked(config, [ConsoleReporter()], command=command,
                                       hardware=f"{os.environ['WORLD_SIZE']} processes, {device}")
            if ui_hint:
                print(f"results in MLflow: {ui_hint}", flush=True)
        else:
            train(config)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    # tear down together while the interpreter is alive: a rank that exits while a peer still sends to it,
    # or gloo threads freeing tensors during interpreter shutdown, abort the process
    started = time.monotonic()
    faulthandler.dump_traceback_later(SLOW_TEARDOWN_S * 4)  # where a slow teardown waits, once, on stderr
    dist.barrier()
    barrier = time.monotonic() - started
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    closing = time.monotonic() - started
    if rank0 and closing > SLOW_TEARDOWN_S:  # seen on one H200: ~57 s between the last evaluation and the end
        print(f"{clock()} closing the process groups took {closing:.0f} s (the barrier {barrier:.0f} s)", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summary(config: Config, world_size: int) -> str:
    """What the run directory holds after a job: the newest checkpoint and what is left to do."""
    newest = newest_checkpoint(config.run.dir)
    left = stages_to_run(config, newest)
    saved = f"newest checkpoint: {newest.path}" if newest else "no checkpoint saved"
    if not left:
        return f"all {len(config.stages)} stages done; {saved}"
    stage = left[0]
    if stage.model_parallel > world_size:
        return (f"{saved}. Stage {stage.name!r} ({stage.layout()}) needs {stage.model_parallel} processes and "
                f"this job had {world_size}: rerun with --nproc {stage.model_parallel} (or more GPUs) to continue")
    return f"{saved}; stages left: {', '.join(s.name for s in left)}"


def main(argv: list[str] | None = None) -> int:
    console = Console()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.nproc is not None and args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc} must be at least 1")
        widest = max(stage.model_parallel for stage in config.resolved_stages())
        world_size = args.nproc or int(os.environ.get("WORLD_SIZE", widest))
        resume, stages = plan(config, world_size)
    except (ConfigError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    command = "python -m launch.train " + " ".join(shlex.quote(arg) for arg in (sys.argv[1:] if argv is None else argv))
    if "RANK" in os.environ:  # started by torchrun: this process is one rank
        run_rank(config, command)
        return 0
    if not stages:
        console.print(f"nothing to train: {summary(config, world_size)}", soft_wrap=True)
        return 0
    m, n = config.model, config.nsa
    console.print(f"{clock()} GPT {m.num_layers} layers, hidden {m.hidden_size}, {m.attention} attention "
                  f"(HQ={m.num_query_heads} HK={m.num_kv_heads}; l={n.compress_block} d={n.stride} "
                  f"l'={n.selection_block} n={n.num_selected} w={n.window} top-n {n.selection_score}) | {world_size} "
                  f"processes | run "
                  f"directory {config.run.dir}", soft_wrap=True)
    for stage in stages:
        console.print(f"  stage {stage.name}: {stage.seq_len} tokens x {stage.steps} steps, {stage.layout()} "
                      f"DP={world_size // stage.model_parallel if stage.model_parallel <= world_size else '-'}, "
                      f"RoPE base {stage.rotary_base:g}{_selection(config, stage)}", soft_wrap=True)
    if resume is not None:
        console.print(f"resuming from {resume.path} (step {resume.state.step}, stage {resume.state.stage})",
                      soft_wrap=True)
    try:
        mp.start_processes(worker, args=(config, world_size, free_port(), command), nprocs=world_size,
                           start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        # a rank that raised shows its traceback here; one that exited (a clear error, or a kill) has
        # printed its message or none
        if isinstance(exc, mp.ProcessRaisedException):
            detail = exc.msg
        elif exc.signal_name == "SIGKILL":
            detail = ("it was killed by SIGKILL, which usually means the machine ran out of memory: lower "
                      "training.micro_batch_size or the stage's seq_len, set training.recompute=true, or use "
                      "more processes")
        else:
            detail = f"exit code {exc.exit_code}"
        console.print(f"[red]training stopped:[/red] rank {exc.error_index} failed ({detail}). "
                      f"{summary(config, world_size)}", soft_wrap=True)
        return 1
    console.print(f"{clock()} {summary(config, world_size)}", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
