"""tools/bench_train.py on CPU: real training steps of the quickstart model, timed and, with --profile,
profiled (steps 2-3), with --host-profile profiled on the host (cProfile, steps 2-4), written to its JSON. A
separate process, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_times_and_profiles_steps(tmp_path):
    out = tmp_path / "train.json"
    command = [sys.executable, "tools/bench_train.py", "--config", "configs/quickstart.yaml", "--attention", "dense",
               "--seq-len", "128", "--steps", "4", "--profile", "--host-profile", "--out", str(out),
               "--set", "training.dtype=fp32", "--set", "training.device=cpu", "--set", "model.num_layers=1",
               # a stage of the user's own, shorter than quickstart.yaml's 5 warmup steps (the benchmark sets 1)
               "--set", "stages=[{name: mine, seq_len: 128, steps: 4, global_batch_size: 2, micro_batch_size: 2}]"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["attention"] == "dense" and len(result["losses"]) == 4 and result["tokens_per_s"] > 0
    assert len(result["step_times_s"]) == 4 and result["step_time_s"] == sorted(result["step_times_s"][1:])[1]
    assert "commit" in report and report["seq_len"] == 128
    # the profile covers the model's own operators, by self CPU time (no GPU here)
    assert "aten::" in result["profile"] and "Self CPU time total" in result["profile"]
    # exactly steps 2 and 3, not a later (partial) cycle of the profiler's schedule
    assert result["profiled_steps"] == 2
    assert "steps 2-3 by self time" in done.stdout
    # the host profile: cProfile's tables by cumulative and own time, reaching into the model's forward
    host = result["host_profile"]
    assert result["host_profiled_steps"] == 3 and "Ordered by: cumulative time" in host
    assert "Ordered by: internal time" in host and "trainer.py" in host
    assert "host time of steps 2-4" in done.stdout

    too_few = subprocess.run(command[:command.index("--steps")] + ["--steps", "2", "--profile", "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert too_few.returncode != 0 and "--profile records steps 2 and 3, and --steps=2" in too_few.stderr

    one_step = subprocess.run(command[:command.index("--steps")] + ["--steps", "1", "--host-profile", "--out",
                                                                     str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert one_step.returncode != 0 and "--host-profile records steps 2 to the last, and --steps=1" in one_step.stderr
