"""The trainer, top to bottom: the curriculum's stages, each in its own parallel layout, from checkpoints.

`train(config, hooks)` runs in every process of a torch.distributed job, with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): launch/train.py spawns such processes locally,
and torchrun or Ray set the same variables. Megatron-core does the heavy lifting: its parallel state,
GPTModel, DDP, optimizer, LR schedule, pipeline schedules and distributed checkpoints.

The curriculum: each stage builds Megatron's model-parallel groups for its own TP/PP/CP (data
parallelism fills the rest of the world), a model and an optimizer, and starts from the newest complete
checkpoint of the run (nsa_dist/checkpoint.py) resharded into that layout: the stage's own newest
checkpoint when a run resumes, else the previous stage's final one. Finished stages are never rerun. A
stage that needs more processes than the job has ends the job after the stages before it; a job started
with enough processes continues from there. Hooks (TrainingHooks: the console, MLflow, tests) hear of each
stage, step and saved checkpoint on the ranks they are given to (launchers give them to rank 0).
"""

import itertools
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from kernels.compile_ahead import compile_ahead
from nsa_dist.checkpoint import (Checkpoint, CheckpointError, CheckpointWriter, TrainState, check_same_model,
                                 load_checkpoint, newest_checkpoint, read_checkpoint, step_dir)
from nsa_dist.config import Config, ConfigError, Stage
from nsa_dist.data import check_data, document_eod, micro_batches, stage_sequences
from nsa_dist import megatron_fallbacks
from nsa_dist.megatron_cpu import enable_cpu
from nsa_dist.attention import (INDEXER_LOSSES, INDEXER_RECALLS, SELECTION_LOSSES, set_comm_stats, set_gather_group, set_num_selected,
                                 set_rotary_base, set_selection_loss, set_selection_score)
from nsa_dist.model import build_model, finalize_grads, init_weights, transformer_config
from nsa_dist.parallel.groups import twin_groups
from nsa_dist.parallel import CommStats

log = logging.getLogger(__name__)


@dataclass
class StepLog:
    stage: str
    step: int  # optimizer steps taken so far, over all stages
    loss: float  # mean next-token loss over the step's global batch
    grad_norm: float  # global gradient norm, before clipping (the learned indexer's left out: nsa.indexer_heads)
    lr: float
    tokens_per_s: float  # tokens of the global batch per second of step time
    step_time_s: float
    memory_gb: float  # this process's peak CUDA memory allocated, or its resident set size on CPU
    # mean loss over the task answers' tokens in the global batch (None without task samples): falls
    # sharply when the model learns to retrieve, while the mean loss barely moves
    answer_loss: float | None = None
    # nsa.selection_loss's KL, the mean over this process's NSA layers and micro-batches (None when off)
    selection_loss: float | None = None
    # the learned indexer's KL (nsa.indexer_heads), the same mean (None without an indexer), and the share
    # of the exact score's free picks its score makes too, over this process's rows with a choice (None: none)
    indexer_loss: float | None = None
    indexer_recall: float | None = None
    # per context-parallel collective of this rank's step: {"bytes": sent + received, "exposed_s": seconds
    # the compute waited on it}; empty without context parallelism
    comm: dict = field(default_factory=dict)


class TrainingHooks:
    """What the trainer reports as it goes, to the console, MLflow or a test; subclasses override what they
    need. Called on the ranks they are given to; checkpoint_saved only on rank 0 (which writes markers)."""

    def stage_started(self, stage: Stage, state: TrainState, source: str) -> None:
        """A stage begins at `state` (step counters), from `source` (a checkpoint path or random weights)."""

    def model_built(self, model: torch.nn.Module, stage: Stage) -> None:
        """The stage's model (Megatron's DDP around the GPT model) is built and holds its starting weights:
        a diagnostic may register module hooks on it (tools/layer_stats.py)."""

    def step(self, log: StepLog) -> None:
        """An optimizer step is done (every training.log_interval steps, and a stage's last)."""

    def checkpoint_saved(self, path: Path, state: TrainState) -> None:
        """A checkpoint is complete (its marker written)."""

    def stage_finished(self, stage: Stage, logs: list[StepLog]) -> None:
        """A stage's last step is done and its final checkpoint complete; `logs` are this job's steps of it."""

    def evaluated(self, stage: Stage, report: dict) -> None:
        """A stage's final checkpoint is evaluated (eval.at_stage_end): nsa_dist/evaluation.py's report,
        whose "files" (eval.json, niah.png) are written."""


@dataclass
class Evaluation:
    loss: float  # mean next-token loss over the evaluated batches
    load_seconds: float  # time to load (and reshard) the checkpoint


@dataclass
class TrainResult:
    history: list[StepLog]  # the steps this job took
    checkpoint: Path | None  # the run's newest complete checkpoint
    waiting: Stage | None  # the first stage this job could not run: it needs more processes


# ------------------------------------------------------------------------------------ checks


def resolve_device(config: Config) -> torch.device:
    wanted = config.training.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device='cuda' but no CUDA device is visible: use cpu or auto")
    return torch.device("cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu")


def stages_to_run(config: Config, resume: Checkpoint | None) -> list[Stage]:
    """The stages left after the run's newest checkpoint: a finished stage is never rerun."""
    stages = config.resolved_stages()
    if resume is None:
        return stages
    names = [stage.name for stage in stages]
    state = resume.state
    if state.stage not in names:
        raise CheckpointError(f"checkpoint {resume.path} was saved in stage {state.stage!r}, which the config "
                              f"does not have (stages: {', '.join(names)}): restore that stage, or choose a new "
                              "run.dir to start over")
    stage = stages[names.index(state.stage)]
    if not state.stage_done and state.stage_step >= stage.steps:
        raise CheckpointError(f"checkpoint {resume.path} has run {state.stage_step} steps of stage {stage.name!r}, "
                              f"which now has steps={stage.steps}: raise stages[{stage.index}].steps above "
                              f"{state.stage_step}, or choose a new run.dir")
    return stages[stage.index + (1 if state.stage_done else 0):]


# On CPU, sequences longer than this would take hours per step: CPU runs are for tests and small models.
CPU_MAX_SEQ_LEN = 65536


def check_layouts(config: Config, world_size: int, stages: Sequence[Stage], device: torch.device) -> None:
    """Checks that this job's processes, batches and device (where the workers train, which a launcher may
    know better than this process) fit the stages it will run; raises ConfigError.

    A stage that needs more processes than the job has waits for a later job, unless it is the first
    one left, in which case the job could do nothing."""
    for stage in stages:
        where = f"stage {stage.name!r} ({stage.layout()})"
        if stage.model_parallel > world_size:
            if stage is stages[0]:
                raise ConfigError(f"{where} needs {stage.model_parallel} processes and this job has "
                                  f"{world_size}: start at least {stage.model_parallel}")
            continue
        if world_size % stage.model_parallel:
            raise ConfigError(f"{world_size} processes cannot be split into {where} groups: start a multiple of "
                              f"{stage.model_parallel} processes")
        dp = world_size // stage.model_parallel
        if stage.global_batch_size % (stage.micro_batch_size * dp):
            raise ConfigError(f"{where}: global_batch_size={stage.global_batch_size} must be a multiple of "
                              f"micro_batch_size={stage.micro_batch_size} x data-parallel size {dp} (set "
                              f"training.global_batch_size or stages[{stage.index}].global_batch_size)")
    longest = max((stage.seq_len for stage in stages), default=0)
    if device.type == "cpu" and longest > CPU_MAX_SEQ_LEN:
        raise ConfigError(f"a stage has {longest} tokens per sequence and this job trains on CPUs: CPU runs are for "
                          f"tests and small models, up to {CPU_MAX_SEQ_LEN} tokens; train on GPUs, or shorten the "
                          "stages")
    if config.training.dtype == "bf16" and device.type == "cpu":
        raise ConfigError("training.dtype='bf16' needs a GPU: use training.dtype=fp32 on CPU")
    if config.nsa.impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("nsa.impl='triton' needs a GPU and none is in use: use nsa.impl=auto (the reference "
                          "on CPU), or set TRITON_INTERPRET=1 to run the kernels in Triton's slow interpreter")


def plan(config: Config, world_size: int) -> tuple[Checkpoint | None, list[Stage]]:
    """What a job of world_size processes would do: the checkpoint it starts from and the stages left.
    Raises ConfigError or CheckpointError before any process starts."""
    resume = newest_checkpoint(config.run.dir)
    if resume is not None:
        check_same_model(resume, config)
    elif config.checkpoint.init_from:
        check_same_model(read_checkpoint(config.checkpoint.init_from), config)
    stages = stages_to_run(config, resume)
    check_layouts(config, world_size, stages, resolve_device(config))
    check_data(config, [stage.seq_len for stage in stages])
    return resume, stages


# ------------------------------------------------------------------------------------ one step


def forward_step(batches, model):
    """One micro-batch through this pipeline stage; on the last stage, the per-token loss and its reduction."""
    batch = next(batches)
    # position ids and mask are None: RoPE and the causal mask live inside the attention module. With
    # data.documents=mask the batch carries the documents' cu_seqlens (Megatron's PackedSeqParams) for the
    # attention, which then keeps each document to itself.
    tokens, labels, documents = batch["tokens"], batch["labels"], batch.get("packed_seq_params")
    answers = batch["answers"]
    if documents is not None:  # Megatron's THD layout: the micro-batch's rows packed into one row
        tokens, labels, answers = tokens.reshape(1, -1), labels.reshape(1, -1), answers.reshape(1, -1)
    per_token_loss = model(tokens, None, None, labels=labels, packed_seq_params=documents)

    def loss_func(per_token: torch.Tensor):
        total = per_token.sum()
        # a fill on the device: torch.tensor(n, device=...) copies from host memory, which waits for the GPU
        tokens = torch.full((), per_token.numel(), dtype=torch.int, device=per_token.device)
        on_answers = (per_token.detach() * answers).sum()  # a product, not a boolean index: no device sync
        # (loss sum, token count): Megatron divides the gradients by the global token count; the same over
        # the task answers' tokens alone is reported (retrieval as it is learned)
        return total, tokens, {"loss": torch.stack([total.detach(), tokens.float()]),
                               "answers": torch.stack([on_answers, answers.sum().float()])}

    return per_token_loss, loss_func


def shared_share(recalls: list[torch.Tensor]) -> float | None:
    """The ratio of summed [shared, total] pairs (INDEXER_RECALLS), or None without a total."""
    if not recalls:
        return None
    shared, total = torch.stack(recalls).sum(0).tolist()
    return shared / total if total else None


def global_mean_losses(losses: list[dict], device: torch.device, keys=("loss",)) -> list[float | None]:
    """Mean losses over the global batch from each rank's per-micro-batch (sum, count) pairs, one per key
    ("loss"; "answers": over the task answers' tokens only), in one all-reduce; None where the batch holds
    no such token.

    Only last-stage ranks hold pairs; summing over the whole world adds zeros from the other stages, and
    the TP ranks' identical copies scale sum and count alike, so the ratio is the global mean."""
    total = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
    for reduced in losses:
        total += torch.stack([reduced[key].double() for key in keys])
    dist.all_reduce(total)
    return [total_sum / count if count else None for total_sum, count in total.tolist()]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


# ------------------------------------------------------------------------------------ building


def _end_helpers_and_exit(signum, frame) -> None:
    """On SIGTERM (how torch.multiprocessing, torchrun and Ray stop the other ranks when one fails), end the
    helper processes this rank started before exiting: Megatron's checkpoint writer keeps a
    multiprocessing manager per rank, which would otherwise outlive the rank."""
    for child in multiprocessing.active_children():
        child.terminate()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _start_processes(config: Config) -> torch.device:
    """Device, the default process group (idempotent) and the SIGTERM handler."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _end_helpers_and_exit)
    device = resolve_device(config)
    # Megatron-core's tensor-parallel layers want one CUDA work queue, so that communication kernels run
    # in the order they were issued (it warns otherwise); must be set before CUDA starts.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if config.training.deterministic:
        # cuBLAS's deterministic GEMMs need a fixed workspace, read when its first handle is made
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    megatron_fallbacks.install()  # gradient clipping without apex: no sync per parameter
    if device.type == "cpu":
        enable_cpu()  # Megatron-core's CUDA-only calls, redirected: see nsa_dist/megatron_cpu.py
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id binds NCCL to this GPU at once (barriers then know their device, no warning).
        dist.init_process_group("nccl", device_id=device)
    return device


class _Layout:
    """The parallel layout whose process groups are alive: its (TP, PP, CP), the twin of this rank's CP
    group, the groups that existed before it (the rest are its own), and whether layouts are kept."""

    sizes: tuple[int, int, int] | None = None
    gather_group = None
    groups_before: frozenset = frozenset()
    keep = False


_live = _Layout()


def _tear_down_layout() -> None:
    """Destroys every process group of the live layout, Megatron's included: its destroy_model_parallel
    forgets its NCCL groups without destroying them, so each layout would leave ~17 of them (and their
    communicators' memory) until the job's end, whose teardown then took ~0.4 s per group on an H200 (57 s
    after the proof's 8 layouts). Groups are destroyed in creation order, the same on every rank."""
    parallel_state.destroy_model_parallel()  # destroys its gloo groups
    # torch has no public list of a process's groups; _world.pg_map is the registry destroy_process_group uses
    for pg in [pg for pg in dist.distributed_c10d._world.pg_map if pg not in _live.groups_before]:
        dist.destroy_process_group(pg)
    _live.sizes, _live.gather_group = None, None


@contextmanager
def parallel_layout(stage: Stage):
    """Megatron's parallel groups for the stage's layout, and the twin of this rank's CP group that NSA's
    selection gather runs on (nsa_dist.parallel.groups), which it yields. Torn down on exit, unless inside
    kept_layouts(), where they live on for the next stage or evaluation of the same layout."""
    sizes = (stage.tensor, stage.pipeline, stage.context)
    if _live.sizes != sizes:
        if _live.sizes is not None:
            _tear_down_layout()
        _live.groups_before = frozenset(dist.distributed_c10d._world.pg_map)
        _live.sizes = sizes
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=stage.tensor,
                                                 pipeline_model_parallel_size=stage.pipeline,
                                                 context_parallel_size=stage.context)
        _live.gather_group = twin_groups(parallel_state.get_context_parallel_group())
    try:
        yield _live.gather_group
    finally:
        if not _live.keep:
            _tear_down_layout()


@contextmanager
def kept_layouts():
    """Within: a layout's process groups outlive its parallel_layout block, so stages and evaluations of one
    layout share them (a curriculum changes layout rarely). On exit, the live layout is torn down."""
    _live.keep = True
    try:
        yield
    finally:
        _live.keep = False
        if _live.sizes is not None:
            _tear_down_layout()


def _build(config: Config, stage: Stage, device: torch.device, gather_group):
    """This stage's model (every layout starts from the same weights), in Megatron's DDP, and its optimizer."""
    tr = config.training
    torch.manual_seed(tr.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(tr.seed)
    dtype = torch.bfloat16 if tr.dtype == "bf16" else torch.float32
    tf_config = transformer_config(config, stage, dtype)
    model = build_model(config, tf_config).to(device=device, dtype=dtype)
    init_weights(model, tr.seed, config.model.init_std, config.model.num_layers,
                 parallel_state.get_tensor_model_parallel_rank(), stage.tensor)
    set_rotary_base(model, stage.rotary_base)
    set_num_selected(model, stage.num_selected)
    set_selection_loss(model, stage.selection_loss)
    set_selection_score(model, stage.selection_score)
    set_gather_group(model, gather_group)
    # The distributed optimizer shards optimizer state over DP ranks; on CPU it rejects the parameters.
    distributed_optimizer = device.type == "cuda"
    model = DistributedDataParallel(
        config=tf_config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=distributed_optimizer))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay,
                        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=tr.grad_clip,
                        bf16=dtype == torch.bfloat16, params_dtype=dtype,
                        use_distributed_optimizer=distributed_optimizer),
        [model])
    tf_config.finalize_model_grads_func = finalize_grads  # DP/CP all-reduce, embedding sync, phi over TP, / tokens
    tf_config.no_sync_func = model.no_sync  # reduce gradients once per step, not once per micro-batch
    tf_config.grad_scale_func = optimizer.scale_loss
    return model, optimizer


def lr_scheduler(optimizer, config: Config, stage: Stage, state: TrainState) -> OptimizerParamScheduler:
    """Linear warmup, then cosine: the run-wide schedule at the global step (to min_lr at
    training.lr_decay_steps, or at the run's last step; min_lr after), or (lr_schedule: restart) the stage's
    own schedule at its own step, positioned at `state`'s step counters."""
    tr = config.training
    if stage.lr_schedule == "continue":
        decay = tr.lr_decay_steps if tr.lr_decay_steps is not None else config.total_steps
        peak, floor, warmup, done = tr.lr, tr.min_lr, tr.warmup_steps, state.step
    else:
        peak, floor, warmup, decay, done = stage.lr, stage.min_lr, stage.warmup_steps, stage.steps, state.stage_step
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=peak, min_lr=floor, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style="cosine", start_wd=tr.weight_decay, end_wd=tr.weight_decay, wd_incr_steps=decay,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    if done:
        scheduler.step(increment=done)
    return scheduler


def _broadcast_from_rank0(compute: Callable):
    """compute() on rank 0 (e.g. reading the run directory), its result or its error on every rank."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", compute())
        except (CheckpointError, ConfigError) as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


# ------------------------------------------------------------------------------------ training


@contextmanager
def deterministic_algorithms(on: bool):
    """training.deterministic: PyTorch's deterministic algorithms while the block runs (the process's setting
    is restored after it: a test or benchmark may train several configs in one process)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def train(config: Config, hooks: Sequence[TrainingHooks] = (), last_stage: str | None = None) -> TrainResult:
    """Trains config's model through the stages left in its run directory (up to and including
    `last_stage` if given: a launcher that runs later stages with another number of processes); every
    rank calls it."""
    device = _start_processes(config)
    world_size = dist.get_world_size()
    resume, stages = _broadcast_from_rank0(lambda: plan(config, world_size))
    initial = None
    if resume is None and config.checkpoint.init_from:
        initial = read_checkpoint(config.checkpoint.init_from)

    def checkpoint_saved(path: Path, state: TrainState) -> None:
        for hook in hooks:
            hook.checkpoint_saved(path, state)

    writer = CheckpointWriter(config, on_saved=checkpoint_saved)
    history: list[StepLog] = []
    # stages and evaluations of one layout share its process groups
    with deterministic_algorithms(config.training.deterministic), kept_layouts():
        try:
            for stage in stages:
                if stage.model_parallel > world_size:
                    return TrainResult(history, resume.path if resume else None, waiting=stage)
                with parallel_layout(stage) as gather_group:
                    resume = _train_stage(config, stage, resume, initial, writer, hooks, device, history,
                                          gather_group)
                if config.eval.at_stage_end:
                    from nsa_dist.evaluation import evaluate_checkpoint

                    report = evaluate_checkpoint(config, resume, stage)
                    for hook in hooks:
                        hook.evaluated(stage, report)
                if stage.name == last_stage:
                    break
        finally:
            writer.close()
    return TrainResult(history, resume.path if resume else None, waiting=None)


def _train_stage(config: Config, stage: Stage, start: Checkpoint | None, initial: Checkpoint | None,
                 writer: CheckpointWriter, hooks: Sequence[TrainingHooks], device: torch.device,
                 history: list[StepLog], gather_group) -> Checkpoint:
    """Runs one stage from `start` (this stage's newest checkpoint, or the previous stage's final one;
    None for a new run, which may take its weights from `initial`); returns the stage's final checkpoint."""
    # 1. model and optimizer in this stage's layout, their state from the checkpoint it starts from
    model, optimizer = _build(config, stage, device, gather_group)
    if start is not None and start.state.stage == stage.name:  # resume inside this stage: everything
        state = replace(start.state)
        load_checkpoint(start, model, optimizer, with_optimizer=True)
    elif start is not None:  # the previous stage's weights (and Adam's moments, unless reset)
        state = TrainState(step=start.state.step, stage=stage.name, stage_index=stage.index,
                           consumed_sequences=start.state.consumed_sequences)
        load_checkpoint(start, model, optimizer, with_optimizer=stage.optimizer_state == "keep")
    else:
        state = TrainState(stage=stage.name, stage_index=stage.index)
        if initial is not None:
            load_checkpoint(initial, model, optimizer, with_optimizer=False)
    for hook in hooks:
        hook.model_built(model, stage)
    scheduler = lr_scheduler(optimizer, config, stage, state)
    source = str(start.path if start is not None else (initial.path if initial else "random weights"))
    if dist.get_rank() == 0:
        log.info("stage %s: %d tokens, %s DP=%d, steps %d-%d, from %s", stage.name, stage.seq_len, stage.layout(),
                 parallel_state.get_data_parallel_world_size(), state.step + 1,
                 state.step + stage.steps - state.stage_step, source)
    for hook in hooks:
        hook.stage_started(stage, replace(state), source)

    # 2. data: this DP rank's micro-batches from the saved data position, split into this CP rank's shard
    tr = config.training
    dp_size = parallel_state.get_data_parallel_world_size()
    batches = micro_batches(stage_sequences(config, stage.seq_len, stage.mix), stage.global_batch_size,
                            stage.micro_batch_size, parallel_state.get_data_parallel_rank(), dp_size,
                            parallel_state.get_context_parallel_group(), device,
                            first_sequence=state.consumed_sequences, eod=document_eod(config),
                            workers=config.data.workers)
    num_micro_batches = stage.global_batch_size // (stage.micro_batch_size * dp_size)
    forward_backward = get_forward_backward_func()

    # 3. the loop; checkpoints every checkpoint.interval steps and at the stage's end
    first_log = len(history)
    ahead = tr.compile_ahead and device.type == "cuda"
    while state.stage_step < stage.steps:
        start_time = time.perf_counter()
        if ahead:  # inside the first step's time, which would otherwise compile the same kernels one by one
            batches = _compile_ahead(model, optimizer, batches, stage, forward_backward, device)
            ahead = False
        comm = CommStats()
        set_comm_stats(model, comm)  # the attention layers add their collectives' bytes and waits
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(forward_step_func=forward_step, data_iterator=batches, model=[model],
                                  num_microbatches=num_micro_batches, seq_length=stage.seq_len,
                                  micro_batch_size=stage.micro_batch_size, forward_only=False)
        scheduler.step(increment=1)  # step k (1-based) runs at the schedule's lr(k)
        lr = optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = optimizer.step()
        loss, answer_loss = global_mean_losses(losses, device, ("loss", "answers"))
        selection_loss, indexer_loss = (torch.stack(means).mean().item() if means else None
                                        for means in (SELECTION_LOSSES, INDEXER_LOSSES))
        indexer_recall = shared_share(INDEXER_RECALLS)
        for records in (SELECTION_LOSSES, INDEXER_LOSSES, INDEXER_RECALLS):
            records.clear()
        state.step += 1
        state.stage_step += 1
        state.consumed_sequences += stage.global_batch_size
        elapsed = time.perf_counter() - start_time
        exposed = comm.exposed_seconds()
        step_log = StepLog(stage=stage.name, step=state.step, loss=loss, grad_norm=float(grad_norm), lr=lr,
                           tokens_per_s=stage.global_batch_size * stage.seq_len / elapsed, step_time_s=elapsed,
                           memory_gb=peak_memory_gb(device), answer_loss=answer_loss,
                           selection_loss=selection_loss, indexer_loss=indexer_loss, indexer_recall=indexer_recall,
                           comm={name: {"bytes": comm.sent[name] + comm.received[name],
                                        "exposed_s": exposed.get(name, 0.0)} for name in comm.sent})
        history.append(step_log)
        if state.step % tr.log_interval == 0 or state.stage_step == stage.steps:
            for hook in hooks:
                hook.step(step_log)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {state.step} of stage {stage.name!r}: lower "
                                     "training.lr or raise training.warmup_steps")
        state.stage_done = state.stage_step == stage.steps
        interval = config.checkpoint.interval
        if state.stage_done or (interval and state.step % interval == 0):
            writer.save(model, optimizer, scheduler, replace(state))
        writer.poll()
    writer.wait()  # the next stage loads this one's final checkpoint
    for hook in hooks:
        hook.stage_finished(stage, history[first_log:])
    return read_checkpoint(step_dir(config.run.dir, state.step))


def _compile_ahead(model, optimizer, batches: Iterator, stage: Stage, forward_backward, device: torch.device):
    """Compiles the Triton kernels of this stage's step in parallel before it runs (kernels/compile_ahead.py):
    the dry pass is the step's first micro-batch forward and backward, whose gradients and losses are then
    thrown away. Returns the micro-batches with that one still first."""
    first = next(batches)

    def dry_pass():
        forward_backward(forward_step_func=forward_step, data_iterator=iter([first]), model=[model],
                         num_microbatches=1, seq_length=stage.seq_len, micro_batch_size=stage.micro_batch_size,
                         forward_only=False)

    try:
        report = compile_ahead(dry_pass, device)
    except Exception as error:  # only time is lost: the step compiles each kernel as it launches it
        report = None
        log.warning("stage %s: compiling the step's Triton kernels ahead of it failed (%s: %s); the step compiles "
                    "each as it launches it. Set training.compile_ahead: false to skip the attempt, and report this",
                    stage.name, type(error).__name__, error)
    finally:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        for records in (SELECTION_LOSSES, INDEXER_LOSSES, INDEXER_RECALLS):
            records.clear()
    if report is not None and dist.get_rank() == 0:
        log.info("stage %s: %s", stage.name, report.line())
    return itertools.chain([first], batches)


# ------------------------------------------------------------------------------------ evaluation


def evaluate(config: Config, checkpoints: Sequence[str | Path], stage_name: str, num_batches: int = 1,
             first_sequence: int | None = None) -> list[Evaluation]:
    """Mean loss of each checkpoint's weights on the same `num_batches` global batches of a stage's
    training stream from `first_sequence` on (None: data.source's validation sequences), computed in that
    stage's layout (any layout
    loads any checkpoint); every rank calls it. The model is built once and loads each checkpoint in turn."""
    device = _start_processes(config)
    stages = {stage.name: stage for stage in config.resolved_stages()}
    if stage_name not in stages:
        raise ConfigError(f"stage {stage_name!r} is not in the config: use one of {', '.join(stages)}")
    stage = stages[stage_name]
    sources = _broadcast_from_rank0(lambda: [read_checkpoint(path) for path in checkpoints])
    for source in sources:
        check_same_model(source, config)
    check_layouts(config, dist.get_world_size(), [stage], device)
    with parallel_layout(stage) as gather_group:
        model, optimizer = _build(config, stage, device, gather_group)
        model.eval()
        dp_size = parallel_state.get_data_parallel_world_size()
        results = []
        for source in sources:
            load_seconds = load_checkpoint(source, model, optimizer, with_optimizer=False)
            split = "valid" if first_sequence is None else "train"
            batches = micro_batches(stage_sequences(config, stage.seq_len, stage.mix, split), stage.global_batch_size,
                                    stage.micro_batch_size, parallel_state.get_data_parallel_rank(), dp_size,
                                    parallel_state.get_context_parallel_group(), device,
                                    first_sequence=first_sequence or 0, eod=document_eod(config))
            losses = []
            with torch.no_grad():
                for _ in range(num_batches):
                    losses += get_forward_backward_func()(
                        forward_step_func=forward_step, data_iterator=batches, model=[model],
                        num_microbatches=stage.global_batch_size // (stage.micro_batch_size * dp_size),
                        seq_length=stage.seq_len, micro_batch_size=stage.micro_batch_size, forward_only=True)
            results.append(Evaluation(global_mean_losses(losses, device)[0], load_seconds))
        return results
