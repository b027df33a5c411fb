"""A job's first checkpoint save, with the checkpoint writer starting Megatron's results queue ahead of it
(nsa_dist/checkpoint.py, _start_results_queue) and without (the queue then starts inside the first save).

Each run is a new one-process gloo job (as a training job is) that trains a small model and saves a
checkpoint every --interval steps; runs alternate without / with, --repeats of each. Per save it records
how long the save waited for the writer's warm start (with only) and how long the save itself took, both
measured around CheckpointWriter.save. The model is the tests' tiny one, on the CPU; on a GPU machine
benchmarks/gpu_checks/first_save.sh times the proof model's.

    python tools/bench_first_save.py --repeats 3 --interval 20

Writes benchmarks/first_save-<commit>.json (the command, machine, commit and every run) and prints the
medians.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "training"))  # the tests' tiny model (tests/training/tiny.py)


def _job(rank: int, world_size: int, port: int, warm: bool, steps: int, interval: int, run_dir: str,
         out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    import nsa_dist.checkpoint as checkpoint
    from nsa_dist.trainer import train
    from tiny import tiny_config

    if not warm:  # Megatron starts its queue inside the first save, as before the warm start existed
        checkpoint._start_results_queue = lambda: None
    saves = []
    original = checkpoint.CheckpointWriter.save

    def timed_save(self, *args, **kwargs):
        start = time.perf_counter()
        self.results_queue_started.join()
        waited = time.perf_counter() - start
        result = original(self, *args, **kwargs)
        saves.append({"waited_s": waited, "save_s": time.perf_counter() - start - waited})
        return result

    checkpoint.CheckpointWriter.save = timed_save
    train(tiny_config(f"run.dir={run_dir}", f"checkpoint.interval={interval}", steps=steps), [])
    Path(out).write_text(json.dumps(saves))
    dist.destroy_process_group()


def one_run(warm: bool, steps: int, interval: int) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "saves.json"
        mp.spawn(_job, args=(1, port, warm, steps, interval, f"{tmp}/run", str(out)), nprocs=1, join=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs without and with the warm start, alternated")
    parser.add_argument("--interval", type=int, default=20, help="steps between checkpoints (two saves a run)")
    args = parser.parse_args()
    if args.repeats < 1 or args.interval < 1:
        sys.exit(f"error: --repeats {args.repeats} and --interval {args.interval} must be at least 1")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or None
    runs = {"without": [], "with": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(one_run(name == "with", 2 * args.interval, args.interval))
    report = {"command": "python3 " + " ".join(sys.argv), "commit": commit, "machine": platform.node(),
              "cpus": os.cpu_count(), "steps_before_first_save": args.interval, "runs": runs}
    out = ROOT / "benchmarks" / f"first_save-{commit}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"{'warm start':>10} {'first save s':>13} {'waited s':>9} {'second save s':>14}  (medians of {args.repeats})")
    for name, saves in runs.items():
        first = statistics.median(run[0]["save_s"] for run in saves)
        waited = statistics.median(run[0]["waited_s"] for run in saves)
        second = statistics.median(run[1]["save_s"] for run in saves)
        print(f"{name:>10} {first:>13.2f} {waited:>9.2f} {second:>14.2f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
