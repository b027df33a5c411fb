"""`make train`: trains the config's GPT model (Megatron-core, NSA) through its stages and prints the loss.

Starts one process per rank on this machine (default: parallel.tensor x pipeline x context, so DP=1),
or, when started by torchrun (RANK is set), runs as that one rank.
"""

import argparse
import os
import socket
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console

# Megatron-core says so at import on machines without TransformerEngine and apex, then uses torch's
# norms and optimizers, which is what we want (DESIGN §4). Set before the imports that trigger it.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")

from nsa_dist.config import Config, ConfigError, load_config
from nsa_dist.trainer import StepLog, data_parallel_size, train


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML preset, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set nsa.window=128 (repeatable)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes to start (default: TP x PP x CP; more processes add data parallelism)")
    return parser.parse_args(argv)


def print_step(log: StepLog) -> None:
    print(f"{log.stage:>8} step {log.step:4d}  loss {log.loss:7.4f}  grad norm {log.grad_norm:6.3f}  "
          f"lr {log.lr:.2e}  {log.tokens_per_s:7.0f} tok/s  {log.memory_gb:5.2f} GB", flush=True)


def worker(local_rank: int, config: Config, world_size: int, port: int) -> None:
    """One rank of a local job: torchrun's environment, then the trainer."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_rank(config)


def run_rank(config: Config) -> None:
    if not torch.cuda.is_available():
        # processes share the cores: one thread each unless there are cores to spare
        torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["WORLD_SIZE"])))
    hooks = [print_step] if os.environ["RANK"] == "0" else []
    history = train(config, hooks)
    if os.environ["RANK"] == "0":
        print(f"loss {history[0].loss:.4f} -> {history[-1].loss:.4f} over {history[-1].step} steps", flush=True)
    # tear down together while the interpreter is alive: a rank that exits while a peer still sends to it,
    # or gloo threads freeing tensors during interpreter shutdown, abort the process
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    console = Console()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        par = config.parallel
        world_size = args.nproc or int(os.environ.get("WORLD_SIZE", par.tensor * par.pipeline * par.context))
        data_parallel_size(config, world_size)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        return 2
    if "RANK" in os.environ:  # started by torchrun: this process is one rank
        run_rank(config)
        return 0
    m, n = config.model, config.nsa
    console.print(f"GPT {m.num_layers} layers, hidden {m.hidden_size}, {m.attention} attention "
                  f"(HQ={m.num_query_heads} HK={m.num_kv_heads}; l={n.compress_block} d={n.stride} "
                  f"l'={n.selection_block} n={n.num_selected} w={n.window}) | {world_size} processes: "
                  f"TP={par.tensor} PP={par.pipeline} CP={par.context} DP={world_size // (par.tensor * par.pipeline * par.context)}")
    mp.start_processes(worker, args=(config, world_size, free_port()), nprocs=world_size, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
