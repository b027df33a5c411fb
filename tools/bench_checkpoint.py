"""Checkpoint save, load and resharding of a large model on GPUs: seconds, size, and losses after loading.

Run under torchrun, one process per GPU (NCCL):

    torchrun --standalone --nproc_per_node 2 tools/bench_checkpoint.py --seq-len 32768 --steps 3

1. Trains configs/paper.yaml's model (bf16, recomputation, the distributed optimizer) for --steps steps
   with context parallelism over all GPUs, with a checkpoint after step --steps - 1 (`dp_reshardable`,
   within the stage) and one at the end (`fully_reshardable`, the stage's end).
2. Loads the final checkpoint into each layout the GPUs allow (CP over all, DP over all, TP, PP) and
   evaluates the same batch; the loss differences across layouts are bf16 noise, not load errors.
3. Continues training for 2 steps of a second stage in each layout (weights and Adam state resharded)
   and resumes the first stage from its mid-stage checkpoint, whose last step must match the run's.

Writes benchmarks/checkpoint_<gpus>gpu.json and prints a table last.
"""

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
warnings.filterwarnings("ignore", category=FutureWarning)

from nsa_dist.checkpoint import read_checkpoint, step_dir  # noqa: E402
from nsa_dist.config import load_config  # noqa: E402
from nsa_dist.megatron_cpu import enable_cpu  # noqa: E402
from nsa_dist.trainer import evaluate, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/paper.yaml"))
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="e.g. --set model.num_kv_heads=2 (tensor parallelism splits whole KV heads)")
    parser.add_argument("--run-dir", default=str(ROOT / "runs/bench_checkpoint"),
                        help="where checkpoints go, seen by every rank; emptied first")
    return parser.parse_args()


def as_stage(name: str, seq_len: int, steps: int, global_batch_size: int, layout: dict) -> str:
    """One stage as the YAML flow mapping that --set stages=[...] takes."""
    fields = "".join(f", {key}: {value}" for key, value in layout.items())
    return f"{{name: {name}, seq_len: {seq_len}, steps: {steps}, global_batch_size: {global_batch_size}{fields}}}"


def main() -> None:
    args = parse_args()
    gpus = int(os.environ["WORLD_SIZE"])
    rank0 = int(os.environ["RANK"]) == 0
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("nsa_dist").setLevel(logging.INFO if rank0 else logging.WARNING)
    run_dir = Path(args.run_dir)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        enable_cpu()  # a small check of this script on CPU (gloo); the figures are for GPUs
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if rank0:
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    src = as_stage("src", args.seq_len, args.steps, 1, {"context_parallel": gpus})

    def config(run, *stages):
        return load_config(args.config, [*args.overrides, f"run.dir={run}", f"checkpoint.interval={args.steps - 1}",
                                         "checkpoint.keep_last=2", "training.warmup_steps=0",
                                         f"stages=[{', '.join(stages)}]"])

    # 1. train and save
    source = config(run_dir / "source", src)
    history = train(source).history
    final = read_checkpoint(step_dir(source.run.dir, args.steps))
    marker = json.loads((final.path / "complete.json").read_text())
    middle = json.loads((step_dir(source.run.dir, args.steps - 1) / "complete.json").read_text())

    # 2. the final checkpoint in every layout, on the batch after the stage
    layouts = {f"CP={gpus}": {"context_parallel": gpus}, f"DP={gpus}": {"context_parallel": 1},
               f"TP={gpus}": {"context_parallel": 1, "tensor_parallel": gpus},
               f"PP={gpus}": {"context_parallel": 1, "pipeline_parallel": gpus}}
    evaluations = {}
    for name, layout in layouts.items():
        # the same `gpus` sequences in every layout, so the losses compare
        target = config(run_dir / "unused", as_stage("src", args.seq_len, 1, gpus, layout))
        (result,) = evaluate(target, [final.path], "src", first_sequence=final.state.consumed_sequences)
        evaluations[name] = {"loss": result.loss, "load_seconds": result.load_seconds}

    # 3a. a second stage in each layout from the final checkpoint (weights and Adam state resharded)
    continued = {}
    for name, layout in layouts.items():
        if name.startswith("PP"):
            continue  # covered by the evaluation above; one continuation per TP/CP/DP change is enough
        run = run_dir / f"continue {name}"
        if rank0:  # a run whose newest checkpoint is the source's final one
            shutil.copytree(final.path, step_dir(run, args.steps))
        dist.barrier()
        continued[name] = [log.loss for log in
                           train(config(run, src, as_stage("next", args.seq_len, 2, gpus, layout))).history]

    # 3b. resume the first stage from its mid-stage (dp_reshardable) checkpoint
    run = run_dir / "resume"
    if rank0:  # a run whose newest checkpoint is the source's mid-stage one
        shutil.copytree(step_dir(run_dir / "source", args.steps - 1), step_dir(run, args.steps - 1))
    dist.barrier()
    resumed = [log.loss for log in train(config(run, src)).history]

    if rank0:
        files = marker["files"]
        report = {
            "command": "torchrun --nproc_per_node {} tools/bench_checkpoint.py {}".format(gpus, " ".join(sys.argv[1:])),
            "device": f"{gpus} x {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
            "torch": torch.__version__,
            "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                         cwd=ROOT).stdout.strip(),
            "config": source.to_dict(), "train_losses": [log.loss for log in history],
            "tokens_per_s": [log.tokens_per_s for log in history],
            "save_seconds_final": marker["save_seconds"], "save_seconds_mid_stage": middle["save_seconds"],
            "checkpoint_bytes": sum(files.values()), "checkpoint_files": len(files),
            "evaluations": evaluations, "continued": continued,
            "resumed_last_step_loss": resumed[-1], "uninterrupted_last_step_loss": history[-1].loss,
        }
        out = ROOT / f"benchmarks/checkpoint_{gpus}gpu.json"
        out.write_text(json.dumps(report, indent=2))
        base = evaluations[f"CP={gpus}"]["loss"]
        print(f"\n{report['device']}, {args.seq_len} tokens, model {source.model.num_layers} layers hidden "
              f"{source.model.hidden_size} -> {out}")
        print(f"checkpoint {sum(files.values()) / 1e9:.2f} GB in {len(files)} files; save {marker['save_seconds']:.1f} s "
              f"(stage end, fully_reshardable), {middle['save_seconds']:.1f} s (mid-stage, dp_reshardable)")
        print(f"{'loaded into':>12} {'load s':>7} {'loss':>9} {'vs saved layout':>16}")
        for name, e in evaluations.items():
            print(f"{name:>12} {e['load_seconds']:7.1f} {e['loss']:9.4f} {e['loss'] - base:+16.2e}")
        print("next stage, 2 steps from the final checkpoint: " + "; ".join(
            f"{name}: {', '.join(f'{loss:.4f}' for loss in losses)}" for name, losses in continued.items()))
        print(f"resumed mid-stage: last step {resumed[-1]:.4f} vs uninterrupted {history[-1].loss:.4f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
