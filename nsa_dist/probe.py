"""A checkpoint's model on one process, for the tools that look inside it (tools/selection_overlap.py,
tools/needle_selection.py): which stage and weights to use, the model in eval mode, and a record of
what every NSA layer was given and returned, and of what its top-n selection scored."""

import argparse
import contextlib
import functools
import os
from dataclasses import replace
from typing import Callable, NamedTuple

import torch

import kernels.nsa as nsa_kernels
import nsa_dist.attention as nsa_attention
from nsa_dist.checkpoint import Checkpoint, check_same_model, load_checkpoint, read_checkpoint
from nsa_dist.config import Config, ConfigError, Stage
from nsa_dist.trainer import _build, _start_processes, parallel_layout


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every probe tool takes: --config, --checkpoint, --stage and --set (see
    checkpoint_and_stage)."""
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the initial weights)")
    parser.add_argument("--stage", default=None, help="stage whose RoPE base and data mix apply (default: the "
                                                       "checkpoint's, else the last)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for training")


def require_nsa(config: Config, config_path: str, what: str) -> None:
    if config.model.attention != "nsa":
        raise ConfigError(f"model.attention={config.model.attention!r} in {config_path}: {what} needs an NSA model; "
                          "give an NSA config (or --set model.attention=nsa)")


def checkpoint_and_stage(config: Config, checkpoint_dir: str | None,
                         stage_name: str | None) -> tuple[Checkpoint | None, Stage]:
    """The checkpoint (None: the initial weights) and the stage whose RoPE base and data mix apply (by
    default the checkpoint's, else the last), laid out on one process."""
    checkpoint = read_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if checkpoint is not None:
        check_same_model(checkpoint, config)
    stages = {stage.name: stage for stage in config.resolved_stages()}
    name = stage_name or (checkpoint.state.stage if checkpoint else config.stages[-1].name)
    if name not in stages:
        raise ConfigError(f"--stage {name!r} is not in the config (stages: {', '.join(stages)})")
    return checkpoint, replace(stages[name], tensor=1, pipeline=1, context=1)


def start_one_process(config: Config, port: int) -> torch.device:
    """torch.distributed on this process alone (a world of one, at 127.0.0.1:port unless the environment
    says otherwise); returns the device the config trains on."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    return _start_processes(config)


@contextlib.contextmanager
def loaded_model(config: Config, stage: Stage, checkpoint: Checkpoint | None, device: torch.device):
    """Megatron's GPT of `config` in `stage`'s parallel state, with the checkpoint's weights (or the
    initial ones), in eval mode."""
    with parallel_layout(stage) as gather_group:
        model, optimizer = _build(config, stage, device, gather_group)
        if checkpoint is not None:
            load_checkpoint(checkpoint, model, optimizer, with_optimizer=False)
        gpt = model.module
        gpt.eval()
        yield gpt


@contextlib.contextmanager
def recorded_nsa_layers(keep: Callable[[tuple, object], object]):
    """While active, every NSA layer call appends keep(args, result) to the yielded list, in layer order:
    args are nsa_context_parallel's positional arguments (q, kv_cmp, kv_slc, kv_win, gates, ...), result
    its NSAResult. Clear the list between forward passes."""
    records: list = []
    original = nsa_attention.nsa_context_parallel

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        records.append(keep(args, result))
        return result

    nsa_attention.nsa_context_parallel = recording
    try:
        yield records
    finally:
        nsa_attention.nsa_context_parallel = original


class SelectionInputs(NamedTuple):
    """What one NSA layer's top-n selection was given (kernels.nsa.compose_nsa): the query rows, the
    compressed keys as scored (phi'd, and RoPE'd when nsa.compression_rope is "blocks"), compressed
    attention's log-sum-exp for those rows, the rows' first global position, how the GQA group's heads'
    scores were combined (nsa.selection_score), with the raw-key scores the raw keys it read instead, and
    with a learned indexer (nsa.indexer_heads) its weight."""

    q: torch.Tensor  # [B, C, HQ, Dk]
    k_cmp: torch.Tensor  # [B, N, HK, Dk]
    lse_cmp: torch.Tensor  # [B, C, HQ] float32
    block_size: int
    stride: int
    selection_block: int
    scale: float | None
    q_start: int
    score: str
    keys: torch.Tensor | None = None  # [B, S, HK, Dk] from position 0, the raw-key scores only
    indexer: torch.Tensor | None = None  # the learned indexer's weight W [2, H, G, Dk / 2], where the layer has one


@contextlib.contextmanager
def wrapped_selection(wrap: Callable):
    """While active, every NSA layer's top-n call select(q, k_cmp, lse_cmp, block_size, stride,
    selection_block, num_selected, scale, *, q_start, cu_seqlens, score, keys, indexer) becomes wrap(select, the same
    arguments): wrap may look at them and returns the picks. Wrappers nest, the last entered outermost."""
    original = nsa_kernels.branch_ops

    def wrapped_ops(impl: str) -> nsa_kernels.BranchOps:
        ops = original(impl)
        return ops._replace(select=functools.partial(wrap, ops.select))

    nsa_kernels.branch_ops = wrapped_ops
    try:
        yield
    finally:
        nsa_kernels.branch_ops = original


@contextlib.contextmanager
def recorded_selection_inputs():
    """While active, every top-n selection of every NSA layer appends its SelectionInputs to the yielded
    list, in call order (one call per layer on one process: one query span). Clear it between passes."""
    records: list[SelectionInputs] = []

    def record(select, q, k_cmp, lse_cmp, block_size, stride, selection_block, num_selected, scale=None, *,
               q_start=0, cu_seqlens=None, score="sum", keys=None, indexer=None):
        records.append(SelectionInputs(q, k_cmp, lse_cmp, block_size, stride, selection_block, scale, q_start, score,
                                       keys, indexer))
        return select(q, k_cmp, lse_cmp, block_size, stride, selection_block, num_selected, scale, q_start=q_start,
                      cu_seqlens=cu_seqlens, score=score, keys=keys, indexer=indexer)

    with wrapped_selection(record):
        yield records
