"""Runs a test body in real processes on gloo (no mocked collectives)."""

import multiprocessing
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    dist.barrier()  # no rank tears down while a peer still sends to it
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can release their last tensors after Python
    # is torn down, which aborts the process now and then ("terminate called without an active
    # exception"). A failure has already raised above, so exiting 0 here hides nothing. Helper processes
    # this rank started (Megatron's checkpoint writer keeps a multiprocessing manager) would outlive an
    # os._exit, so they are ended first.
    for child in multiprocessing.active_children():
        child.terminate()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int, *args) -> None:
    """Calls fn(rank, world_size, *args) in world_size spawned processes; a failure in any raises here.
    fn must be a module-level function (it is pickled by name)."""
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
