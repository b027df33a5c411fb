"""Checkpoints: Megatron-core's dist_checkpointing (torch_dist format) plus a completion marker written last.

A run's checkpoints live in `<run.dir>/checkpoints/step_<8 digits>/`. Each holds Megatron's files (the
PyTorch DCP shards `*.distcp` and `.metadata`, `common.pt`, `metadata.json`) and `complete.json`, our
marker, which rank 0 writes only after every rank has written its shards and every file is synced. A
directory without the marker is an interrupted save: it is skipped with a warning and never loaded.

What one holds:
- the model: `GPTModel.sharded_state_dict()`, every tensor described by its global shape, so a checkpoint
  saved under one TP/PP/CP/DP layout loads into any other;
- the optimizer: Adam's moments keyed like the model's tensors, so they reshard the same way. The
  distributed optimizer (GPU) saves `fully_reshardable` at the end of a stage (the next stage may change
  TP/PP) and `dp_reshardable` within a stage (fast, and a resume keeps the stage's layout);
- the LR scheduler's state, and per rank the torch, CUDA and Megatron tracker RNG states;
- in the marker: the training state (step, stage, data position), the layout, the resolved config and
  every file's size, so a truncated or missing file is reported before anything is loaded.
"""

import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult

# What a failed save or load raises: PyTorch's DCP reports its ranks' failures as CheckpointException,
# which derives from BaseException, not Exception.
FAILURES = (Exception, CheckpointException)

from nsa_dist.config import Config, ModelConfig, NSAConfig

log = logging.getLogger(__name__)

MARKER = "complete.json"
FORMAT_VERSION = 1
# model fields a checkpoint may not change: they set parameter shapes or what the model computes.
# rotary_base is per stage (RoPE has no weights), init_std only matters before the first step,
# selection_loss and the indexer's loss are training losses (no weights); n and top-n's score are per stage
# (no weights either). nsa.indexer_heads sets the indexer's weights, so it stays.
MODEL_FIELDS_FREE_TO_CHANGE = {"model.rotary_base", "model.init_std", "nsa.impl", "nsa.num_selected",
                               "nsa.selection_loss", "nsa.selection_loss_stride", "nsa.selection_score",
                               "nsa.indexer_loss", "nsa.indexer_loss_stride"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names its path and what to do."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint's marker."""

    step: int = 0  # optimizer steps taken over all stages
    stage: str = ""  # the stage the checkpoint was saved in
    stage_index: int = 0
    stage_step: int = 0  # steps taken in that stage
    stage_done: bool = False  # saved at the end of its stage: the next stage starts from it
    consumed_sequences: int = 0  # the data position: sequences drawn from the stream so far


@dataclass
class Checkpoint:
    """A complete checkpoint on disk, as its marker describes it."""

    path: Path
    state: TrainState
    layout: dict  # {"tensor", "pipeline", "context", "data"} it was saved under
    config: dict  # the resolved config of the run that saved it
    optimizer_sharding: str  # how the distributed optimizer's state was laid out


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:08d}"


# ------------------------------------------------------------------------------------ finding them


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Reads a checkpoint directory's marker and checks that its files are all there, whole.

    Raises CheckpointError naming the path and the fix: missing, not a directory, empty, incomplete (no
    marker), unreadable marker, another format version, a missing or truncated file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (checkpoint.init_from or "
                              "run.dir)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file, not a checkpoint directory: give the "
                              "step_<N> directory under <run.dir>/checkpoints")
    if not any(path.iterdir()):
        raise CheckpointError(f"checkpoint {path} is an empty directory: give a step_<N> directory that "
                              "holds a saved checkpoint")
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MARKER}, so its save was "
                              "interrupted. Use an earlier checkpoint of the run")
    try:
        meta = json.loads(marker.read_text())
        state = TrainState(**meta["state"])
        checkpoint = Checkpoint(path=path, state=state, layout=meta["layout"], config=meta["config"],
                                optimizer_sharding=meta["optimizer_sharding"])
        files, version = meta["files"], meta["format_version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has a corrupt {MARKER} ({exc}): the checkpoint cannot be "
                              "trusted; delete it to fall back to an earlier one") from exc
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this nsa-dist reads "
                              f"version {FORMAT_VERSION}: load it with the nsa-dist that wrote it")
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing its file {name}: it is damaged; delete it "
                                  "to fall back to an earlier one")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: {name} has {file.stat().st_size} bytes but had {size} "
                                  "when saved, so it was truncated or changed; delete the checkpoint to "
                                  "fall back to an earlier one")
    return checkpoint


def complete_checkpoints(run_dir: str | Path, warn: bool = True) -> list[Checkpoint]:
    """The run's complete checkpoints, oldest first. Directories without a marker (interrupted saves, or
    saves in progress) are skipped, with a warning if `warn`; a damaged complete checkpoint raises
    CheckpointError."""
    root = checkpoints_dir(run_dir)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} is a file, but run.dir={run_dir} needs it to be the checkpoint "
                              "directory: move the file or choose another run.dir")
    found = []
    for path in sorted(root.glob("step_*")) if root.is_dir() else []:
        if not (path / MARKER).exists():
            if warn:
                log.warning("skipping %s: it has no %s (its save was interrupted); it is never loaded", path,
                            MARKER)
            continue
        found.append(read_checkpoint(path))
    return sorted(found, key=lambda c: c.state.step)


def newest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_model(checkpoint: Checkpoint, config: Config) -> None:
    """Raises CheckpointError listing every model/NSA field in which the checkpoint's config differs. A field
    the checkpoint's config lacks (saved before the field existed) counts as its default, the model that
    version built (e.g. nsa.indexer_heads 0: no indexer)."""
    saved = _flatten({"model": checkpoint.config.get("model", {}), "nsa": checkpoint.config.get("nsa", {})})
    defaults = _flatten({"model": asdict(ModelConfig()), "nsa": asdict(NSAConfig())})
    saved = {**defaults, **saved}
    wanted = _flatten({"model": asdict(config.model), "nsa": asdict(config.nsa)})
    differences = [f"{name} is {saved.get(name)!r} there and {value!r} here"
                   for name, value in wanted.items()
                   if name not in MODEL_FIELDS_FREE_TO_CHANGE and saved.get(name) != value]
    if differences:
        raise CheckpointError(f"checkpoint {checkpoint.path} holds another model: " + "; ".join(differences)
                              + ". Set these fields to the checkpoint's values, or choose a new run.dir to "
                              "train a new model")


# ------------------------------------------------------------------------------------ state dicts


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    return {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
            "context": parallel_state.get_context_parallel_world_size(),
            "data": parallel_state.get_data_parallel_world_size()}


def _rng_sharded_object() -> ShardedObject:
    """This rank's RNG states, one object per rank of the layout (loaded only into the same layout)."""
    shape = tuple(_layout()[axis] for axis in ("pipeline", "tensor", "context", "data"))
    offset = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_context_parallel_rank(), parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", _rng_state(), shape, offset, replica_id=0)


def _prepare_distributed_optimizer_for_loading(optimizer) -> None:
    """Two gaps of Megatron-core 0.16.1's distributed optimizer with torch's Adam (no Apex or Transformer
    Engine), bridged here for every DistributedOptimizer inside `optimizer`:

    - it can describe its state for loading only once that state exists, and a new one has none: one step
      on zero gradients creates it (Megatron does the same for its FSDP); the checkpoint overwrites it;
    - its fully reshardable loaders copy every key of Adam's per-parameter state, 'step' included, but the
      checkpoint keeps 'step' per parameter group (restored before the copy), so the copy keeps the
      restored 'step' instead of failing on the missing key.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer):
            continue
        if not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()
        if getattr(inner, "_keeps_restored_step", False):
            continue
        copy_states = inner._set_main_param_and_optimizer_states

        def copy_keeping_step(model_param, tensors, inner=inner, copy_states=copy_states):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
            step = inner.optimizer.state[main_param].get("step")
            if "step" not in tensors and step is not None:
                tensors = {**tensors, "step": step}
            copy_states(model_param, tensors)

        inner._set_main_param_and_optimizer_states = copy_keeping_step
        inner._keeps_restored_step = True


def _sharded_state_dict(model, optimizer, scheduler, optimizer_sharding: str, *, with_optimizer: bool,
                        with_rng: bool, is_loading: bool) -> dict:
    gpt = model.module  # Megatron's DDP wraps the GPTModel
    model_state = gpt.sharded_state_dict()
    state = {"model": model_state}
    if with_optimizer:
        if is_loading:
            _prepare_distributed_optimizer_for_loading(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_sharding})
        if scheduler is not None:  # saved for the record (Megatron's tools read it); see load_checkpoint
            state["scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_sharded_object()
    return state


# ------------------------------------------------------------------------------------ save


def _sync_files(path: Path) -> dict:
    """fsyncs every file of a checkpoint and returns {name: size}: the marker may only follow durable data."""
    sizes = {}
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
        sizes[file.name] = file.stat().st_size
    return sizes


def write_json_atomically(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(content, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Deletes complete checkpoints beyond the newest keep_last (a stage's final checkpoint is kept), and
    interrupted saves older than the newest complete checkpoint (they can never be completed)."""
    complete = complete_checkpoints(run_dir, warn=False)  # newer saves may be in progress (async_save)
    if not complete:
        return
    for checkpoint in complete[:-keep_last]:
        if not checkpoint.state.stage_done:
            shutil.rmtree(checkpoint.path)
    newest = complete[-1].path.name
    for path in checkpoints_dir(run_dir).glob("step_*"):
        if not (path / MARKER).exists() and path.name < newest:
            shutil.rmtree(path)


def _start_results_queue() -> None:
    """Starts the queue through which Megatron's writer processes report each save's results, so that the
    first save finds it running. Megatron starts it on the first save otherwise: a multiprocessing manager
    in a spawned process (filesystem_async._get_write_results_queue), which imports the job's main module
    again (torch, Megatron, MLflow: 7-8 s on the CI machine) before it serves. One round trip of the
    classes a save's results hold then makes the manager import their modules (PyTorch's distributed
    checkpoint, 0.7 s), which it would otherwise do on the first save's results. On the CI machine the tiny
    model's first save took 2.26 s without this and 0.15 s with it, later saves 0.13-0.16 s (medians of 3,
    tools/bench_first_save.py, benchmarks/first_save-9013160.json); in the proof run on
    an H100 the first save took 17-22 s and the later ones 3-5 s. A failure here is left to the save,
    which meets it again and reports it."""
    try:
        results = filesystem_async._get_write_results_queue()
        results.put((WriteResult, MetadataIndex, _StorageInfo))  # pickled by name: unpickling imports them
        results.get()
    except Exception as error:  # the save starts it again and raises there, with its own message
        log.debug("starting Megatron's checkpoint results queue ahead of the first save failed: %s", error)


class CheckpointWriter:
    """Saves checkpoints, synchronously or (async_save) in Megatron's background writer processes.

    The marker is written by rank 0 once every rank's shards are on disk; only then are old checkpoints
    pruned, so a failed save never costs the previous checkpoint."""

    def __init__(self, config: Config, on_saved: Callable[[Path, TrainState], object] = lambda path, state: None):
        self.run_dir = Path(config.run.dir)
        self.config = config
        self.on_saved = on_saved  # called on rank 0 once a checkpoint is complete
        self.keep_last = config.checkpoint.keep_last
        self.queue = AsyncCallsQueue() if config.checkpoint.async_save else None
        self.results_queue_started = threading.Thread(target=_start_results_queue, daemon=True,
                                                      name="checkpoint-results-queue")
        self.results_queue_started.start()

    def save(self, model, optimizer, scheduler, state: TrainState) -> Path:
        """Saves (or, with async_save, starts saving) a checkpoint of `state`; every rank calls it."""
        self.results_queue_started.join()  # started with the writer; as a rule done long before the first save
        path = step_dir(self.run_dir, state.step)
        if dist.get_rank() == 0:
            if path.exists():  # an earlier save of this step that never completed
                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier()
        sharding = "fully_reshardable" if state.stage_done else "dp_reshardable"
        sharded = _sharded_state_dict(model, optimizer, scheduler, sharding, with_optimizer=True, with_rng=True,
                                      is_loading=False)
        start = time.perf_counter()
        try:
            request = dist_checkpointing.save(sharded, str(path), async_sharded_save=self.queue is not None)
        except FAILURES as exc:
            raise self._save_failed(path, exc) from exc
        marker = {"format_version": FORMAT_VERSION, "state": asdict(state), "layout": _layout(),
                  "config": self.config.to_dict(), "optimizer_sharding": sharding}

        def finish():
            if dist.get_rank() == 0:
                marker["files"] = _sync_files(path)
                marker["save_seconds"] = round(time.perf_counter() - start, 3)
                write_json_atomically(path / MARKER, marker)
                prune_checkpoints(self.run_dir, self.keep_last)
                size = sum(marker["files"].values())
                log.info("saved checkpoint %s (step %d, stage %s%s) in %.1f s, %.1f MB", path, state.step,
                         state.stage, ", done" if state.stage_done else "", marker["save_seconds"], size / 1e6)
                self.on_saved(path, state)
            dist.barrier()

        if self.queue is None:
            finish()
        else:
            request.add_finalize_fn(finish)
            self.queue.schedule_async_request(request)
        return path

    def _save_failed(self, path: Path, exc: Exception) -> CheckpointError:
        previous = newest_checkpoint(self.run_dir)
        kept = f"the previous checkpoint {previous.path} is intact" if previous else "no earlier checkpoint exists"
        cause = " ".join(str(exc).split())  # DCP's messages span lines
        return CheckpointError(f"saving checkpoint {path} failed ({type(exc).__name__}: {cause}); {kept}. Free disk "
                               "space (or lower checkpoint.keep_last) and rerun the same command to resume")

    def poll(self) -> None:
        """Finishes background saves that are done (async_save); call once per step on every rank."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Blocks until every background save is complete and marked."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        # a manager still starting when the job ends would not be shut down with it: let it finish starting
        self.results_queue_started.join()
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)
            self.queue.close()


# ------------------------------------------------------------------------------------ load


def load_checkpoint(checkpoint: Checkpoint, model, optimizer, *, with_optimizer: bool) -> float:
    """Loads a checkpoint into this layout's model (and optimizer), resharding as needed; returns the
    seconds it took. RNG states are restored only into the layout the checkpoint was saved under. The
    LR schedule is not loaded: the trainer positions it from the config and the saved step counters, so a
    changed schedule in the config takes effect on resume."""
    start = time.perf_counter()
    same_layout = checkpoint.layout == _layout()
    sharded = _sharded_state_dict(model, optimizer, None, checkpoint.optimizer_sharding,
                                  with_optimizer=with_optimizer, with_rng=same_layout, is_loading=True)
    try:
        loaded = dist_checkpointing.load(sharded, str(checkpoint.path))
        model.module.load_state_dict(loaded["model"])
    except FAILURES as exc:
        cause = " ".join(str(exc).split())
        raise CheckpointError(f"checkpoint {checkpoint.path} could not be loaded ({type(exc).__name__}: {cause}); "
                              "its files may be damaged: delete it to fall back to an earlier one") from exc
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    else:
        optimizer.reload_model_params()  # fp32 main weights (bf16 training) from the loaded weights
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        log.info("loaded checkpoint %s in %.1f s%s", checkpoint.path, seconds, "" if same_layout else
                 f" (saved under {_describe(checkpoint.layout)}, resharded into {_describe(_layout())})")
    return seconds


def _describe(layout: dict) -> str:
    return " ".join(f"{axis[:1].upper()}P={layout[axis]}" for axis in ("tensor", "pipeline", "context", "data"))
