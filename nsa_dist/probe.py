"""A checkpoint's model on one process, for the tools that look inside it (tools/selection_overlap.py,
tools/needle_selection.py): which stage and weights to use, the model in eval mode, and a record of
what every NSA layer was given and returned."""

import argparse
import contextlib
import os
from dataclasses import replace
from typing import Callable

import torch

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
