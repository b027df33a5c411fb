"""How much of a training step Python's garbage collector takes: a job run as one torchrun rank in this
process, with gc.callbacks timing every collection, by generation, split into those before the first
training step (imports, model building) and those from the first backward on (the first step's
forward counts as before: a small error). On the CPU dev machine, e.g. the
proof's dense model (all 12 layers) at 2 x 256 tokens a step:

    python benchmarks/gc-probe.py --config configs/proof_100m_dense.yaml --set run.dir=/tmp/gc-probe \\
        --set "stages=[{name: s, seq_len: 256, steps: 60, global_batch_size: 2, micro_batch_size: 2}]" \\
        --set eval.at_stage_end=false --set training.dtype=fp32 --set training.warmup_steps=5

The arguments are launch.train's. Measured in benchmarks/kernels-notes.md, session 65.
"""
import collections
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
COLLECTIONS = {"before": collections.defaultdict(list), "training": collections.defaultdict(list)}
STATE = {"phase": "before", "started": 0.0}


def on_collection(phase: str, info: dict) -> None:
    if phase == "start":
        STATE["started"] = time.perf_counter()
    else:
        COLLECTIONS[STATE["phase"]][info["generation"]].append(time.perf_counter() - STATE["started"])


def report(steps: int) -> None:
    print(f"gc-probe: {len(gc.get_objects()):,} tracked objects at the end; {steps} training steps (the config's; a resumed run trains fewer)")
    for phase, by_generation in COLLECTIONS.items():
        for generation in (0, 1, 2):
            times = by_generation.get(generation, [])
            total = sum(times) * 1e3
            per_step = f", {total / steps:.2f} ms a step" if phase == "training" and steps else ""
            print(f"gc-probe: {phase:8s} generation {generation}: {len(times):5d} collections, {total:8.1f} ms in all"
                  f"{per_step}, longest {max(times, default=0) * 1e3:.2f} ms")


def main() -> int:
    import torch
    from launch.train import main as train_main, parse_args
    from nsa_dist.config import load_config

    args = parse_args(sys.argv[1:])
    steps = sum(stage.steps for stage in load_config(args.config, args.overrides).stages)
    # the first backward pass (Megatron's schedule calls torch.autograd.backward) starts the training phase
    backward = torch.autograd.backward

    def first_backward_starts_training(*args, **kwargs):
        STATE["phase"] = "training"
        return backward(*args, **kwargs)

    torch.autograd.backward = first_backward_starts_training
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29611"))
    gc.callbacks.append(on_collection)
    code = train_main(sys.argv[1:])
    gc.callbacks.remove(on_collection)
    report(steps)
    return code


if __name__ == "__main__":
    sys.exit(main())
