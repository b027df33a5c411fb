"""The trainer, top to bottom: parallel state from config, model, optimizer, data, loop, logging hooks.

`train(config, hooks)` runs in every process of a torch.distributed job, with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): launch/train.py spawns such processes locally,
and torchrun or Ray set the same variables. Megatron-core does the heavy lifting: its parallel state,
GPTModel, DDP, optimizer, LR schedule and pipeline schedules. Hooks receive a StepLog every
training.log_interval steps, on every rank (the logged values are global, so they agree across ranks).
"""

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from nsa_dist.config import Config, ConfigError
from nsa_dist.data import SyntheticCopyTask, micro_batches
from nsa_dist.megatron_cpu import enable_cpu
from nsa_dist.model import build_model, init_weights, set_rotary_base, transformer_config


@dataclass
class StepLog:
    stage: str
    step: int  # optimizer steps taken so far, over all stages
    loss: float  # mean next-token loss over the step's global batch
    grad_norm: float  # global gradient norm, before clipping
    lr: float
    tokens_per_s: float  # tokens of the global batch per second of step time
    step_time_s: float
    memory_gb: float  # this process's peak CUDA memory allocated, or its resident set size on CPU


Hook = Callable[[StepLog], None]


def resolve_device(config: Config) -> torch.device:
    wanted = config.training.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device='cuda' but no CUDA device is visible: use cpu or auto")
    return torch.device("cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu")


def data_parallel_size(config: Config, world_size: int) -> int:
    """DP = world / (TP * PP * CP); checks that the processes and the batch fit the layout."""
    par, tr = config.parallel, config.training
    model_parallel = par.tensor * par.pipeline * par.context
    if world_size % model_parallel:
        raise ConfigError(f"{world_size} processes cannot be split into parallel.tensor={par.tensor} x "
                          f"parallel.pipeline={par.pipeline} x parallel.context={par.context} groups: start a "
                          f"multiple of {model_parallel} processes")
    dp = world_size // model_parallel
    if tr.global_batch_size % (tr.micro_batch_size * dp):
        raise ConfigError(f"training.global_batch_size={tr.global_batch_size} must be a multiple of "
                          f"training.micro_batch_size={tr.micro_batch_size} x data-parallel size {dp}")
    for stage in config.stages:
        if config.stage_context_parallel(stage) != par.context:
            raise ConfigError(f"stage {stage.name!r} asks for context_parallel={stage.context_parallel} but the "
                              f"job runs parallel.context={par.context}: changing CP between stages needs the "
                              "checkpoint resharded into a new job; run such stages as separate jobs for now")
    if config.training.dtype == "bf16" and resolve_device(config).type == "cpu":
        raise ConfigError("training.dtype='bf16' needs a GPU: use training.dtype=fp32 on CPU")
    if (config.nsa.impl == "triton" and resolve_device(config).type == "cpu"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ConfigError("nsa.impl='triton' needs a GPU and none is in use: use nsa.impl=auto (the reference "
                          "on CPU), or set TRITON_INTERPRET=1 to run the kernels in Triton's slow interpreter")
    return dp


def forward_step(batches, model):
    """One micro-batch through this pipeline stage; on the last stage, the per-token loss and its reduction."""
    batch = next(batches)
    # position ids and mask are None: RoPE and the causal mask live inside the attention module
    per_token_loss = model(batch["tokens"], None, None, labels=batch["labels"])

    def loss_func(per_token: torch.Tensor):
        total = per_token.sum()
        tokens = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
        # (loss sum, token count): Megatron divides the gradients by the global token count
        return total, tokens, {"loss": torch.stack([total.detach(), tokens.float()])}

    return per_token_loss, loss_func


def global_mean_loss(losses: list[dict], device: torch.device) -> float:
    """Mean loss over the global batch from each rank's per-micro-batch (sum, count) pairs.

    Only last-stage ranks hold pairs; summing over the whole world adds zeros from the other stages, and
    the TP ranks' identical copies scale sum and count alike, so the ratio is the global mean."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for reduced in losses:
        total += reduced["loss"].double()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def train(config: Config, hooks: Sequence[Hook] = ()) -> list[StepLog]:
    """Trains config's model through all its stages in this process's rank; returns the step logs."""
    par = config.parallel

    # 1. device, process group and Megatron's parallel state
    device = resolve_device(config)
    # Megatron-core's tensor-parallel layers want one CUDA work queue, so that communication kernels run
    # in the order they were issued (it warns otherwise); must be set before CUDA starts.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if device.type == "cpu":
        enable_cpu()  # Megatron-core's CUDA-only calls, redirected: see nsa_dist/megatron_cpu.py
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dp_size = data_parallel_size(config, dist.get_world_size())
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=par.tensor,
                                             pipeline_model_parallel_size=par.pipeline,
                                             context_parallel_size=par.context)
    try:
        return _train(config, hooks, device, dp_size)
    finally:
        parallel_state.destroy_model_parallel()  # so one process can train several layouts (tests)


def _train(config: Config, hooks: Sequence[Hook], device: torch.device, dp_size: int) -> list[StepLog]:
    par, tr = config.parallel, config.training
    torch.manual_seed(tr.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(tr.seed)

    # 2. this pipeline stage's model, with every layout starting from the same weights, in Megatron's DDP
    dtype = torch.bfloat16 if tr.dtype == "bf16" else torch.float32
    tf_config = transformer_config(config, dtype)
    model = build_model(config, tf_config).to(device=device, dtype=dtype)
    init_weights(model, tr.seed, config.model.init_std, config.model.num_layers,
                 parallel_state.get_tensor_model_parallel_rank(), par.tensor)
    # The distributed optimizer shards optimizer state over DP ranks; on CPU it rejects the parameters.
    distributed_optimizer = device.type == "cuda"
    model = DistributedDataParallel(
        config=tf_config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=distributed_optimizer))

    # 3. optimizer (AdamW, clipping, bf16 master weights) and LR schedule: linear warmup, then cosine
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay,
                        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=tr.grad_clip,
                        bf16=dtype == torch.bfloat16, params_dtype=dtype,
                        use_distributed_optimizer=distributed_optimizer),
        [model])
    total_steps = sum(stage.steps for stage in config.stages)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=tr.lr, min_lr=tr.min_lr, lr_warmup_steps=tr.warmup_steps,
        lr_decay_steps=total_steps, lr_decay_style="cosine", start_wd=tr.weight_decay, end_wd=tr.weight_decay,
        wd_incr_steps=total_steps, wd_incr_style="constant")
    tf_config.finalize_model_grads_func = finalize_model_grads  # DP/CP all-reduce, embedding sync, / tokens
    tf_config.no_sync_func = model.no_sync  # reduce gradients once per step, not once per micro-batch
    tf_config.grad_scale_func = optimizer.scale_loss

    # 4. data: this DP rank's micro-batches, split into this CP rank's zigzag shard
    task = SyntheticCopyTask(config.data, config.model.vocab_size)
    num_micro_batches = tr.global_batch_size // (tr.micro_batch_size * dp_size)
    forward_backward = get_forward_backward_func()

    # 5. the loop
    history: list[StepLog] = []
    step = 0
    for stage in config.stages:
        set_rotary_base(model.module, stage.rotary_base or config.model.rotary_base)
        batches = micro_batches(task, stage.seq_len, tr.global_batch_size, tr.micro_batch_size,
                                parallel_state.get_data_parallel_rank(), dp_size,
                                parallel_state.get_context_parallel_group(), device)
        for _ in range(stage.steps):
            start = time.perf_counter()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            losses = forward_backward(forward_step_func=forward_step, data_iterator=batches, model=[model],
                                      num_microbatches=num_micro_batches, seq_length=stage.seq_len,
                                      micro_batch_size=tr.micro_batch_size, forward_only=False)
            scheduler.step(increment=1)  # step k (1-based) runs at the schedule's lr(k)
            lr = optimizer.param_groups[0]["lr"]
            _, grad_norm, _ = optimizer.step()
            loss = global_mean_loss(losses, device)
            step += 1
            elapsed = time.perf_counter() - start
            log = StepLog(stage=stage.name, step=step, loss=loss, grad_norm=float(grad_norm), lr=lr,
                          tokens_per_s=tr.global_batch_size * stage.seq_len / elapsed, step_time_s=elapsed,
                          memory_gb=peak_memory_gb(device))
            history.append(log)
            if step % tr.log_interval == 0 or step == total_steps:
                for hook in hooks:
                    hook(log)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step} of stage {stage.name!r}: lower "
                                         "training.lr or raise training.warmup_steps")
    return history
