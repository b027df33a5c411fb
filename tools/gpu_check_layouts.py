"""GPU check: the paper model trains the same in every parallel layout, in bf16 over NCCL.

    torchrun --standalone --nproc_per_node 2 tools/gpu_check_layouts.py --seq-len 32768 --steps 5

Trains configs/paper.yaml's model (with 2 KV heads, so that TP=2 can split them) from the same weights on
the same batches in each layout the GPUs allow: DP (TP1 CP1, the reference), CP, TP, PP and, on 4 GPUs,
CP4 and TP2 x CP2. Prints each layout's losses and their largest relative difference from the reference;
bf16 rounds at 4e-3, so layouts that agree within 1e-2 agree within bf16 noise. Exits non-zero otherwise.
"""

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")

from nsa_dist.config import load_config  # noqa: E402
from nsa_dist.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-2


def layouts(world: int) -> dict:
    found = {"TP1 CP1": [], f"CP{world}": [f"parallel.context={world}"], f"TP{world}": [f"parallel.tensor={world}"],
             f"PP{world}": [f"parallel.pipeline={world}"]}
    if world == 4:
        found["TP2 CP2"] = ["parallel.tensor=2", "parallel.context=2"]
        found["CP2 PP2"] = ["parallel.context=2", "parallel.pipeline=2"]
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    results = {}
    world = int(os.environ["WORLD_SIZE"])
    # one run directory per layout, the same on every rank (torchrun gives all ranks one MASTER_PORT)
    runs = Path(tempfile.gettempdir()) / f"nsa-gpu-check-layouts-{os.environ['MASTER_PORT']}"
    for index, (name, parallel) in enumerate(layouts(world).items()):
        config = load_config(str(ROOT / "configs/paper.yaml"), [
            "model.num_kv_heads=2", "training.dtype=bf16", "training.recompute=true", "tracking.enabled=false",
            "training.micro_batch_size=1", "training.warmup_steps=1", "training.global_batch_size=4", "checkpoint.interval=0",
            f"stages=[{{name: check, seq_len: {a.seq_len}, steps: {a.steps}}}]",
            f"run.dir={runs / str(index)}", *parallel, *a.overrides])
        history = train(config).history
        results[name] = [log.loss for log in history]
        if dist.get_rank() == 0:
            print(f"{name}: " + " ".join(f"{loss:.4f}" for loss in results[name]), flush=True)
    reference = results["TP1 CP1"]
    failed = False
    if dist.get_rank() == 0:
        print(f"\n{a.seq_len} tokens, {world} GPUs, bf16: largest relative loss difference from TP1 CP1")
        for name, losses in results.items():
            worst = max(abs(x - y) / abs(y) for x, y in zip(losses, reference))
            failed |= worst > TOLERANCE
            print(f"{name:>10}: {worst:.2e} {'ok' if worst <= TOLERANCE else 'OUT OF TOLERANCE'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
