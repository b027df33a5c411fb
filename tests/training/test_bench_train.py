"""tools/bench_train.py on CPU: real training steps of the quickstart model, timed and, with --profile,
profiled (steps 2-3), with --host-profile profiled on the host (cProfile, steps 2-4), with --host-check its
forward+backward timed as queued and as run (steps 2-4), written to its JSON. A separate process, as a user
runs it."""

import json
import os
import pstats
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_times_and_profiles_steps(tmp_path):
    out = tmp_path / "train.json"
    command = [sys.executable, "tools/bench_train.py", "--config", "configs/quickstart.yaml", "--attention", "dense",
               "--seq-len", "128", "--steps", "4", "--profile", "--host-profile", "--compile-report", "--out", str(out),
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
    # the host profile: cProfile's tables by cumulative and own time, reaching into the step's schedule and the
    # model's forward (the top 30 by cumulative time; the trainer's own functions start before the profile and
    # may fall outside them: a loaded CI machine once left trainer.py out)
    host = result["host_profile"]
    assert result["host_profiled_steps"] == 3 and "Ordered by: cumulative time" in host
    assert "Ordered by: internal time" in host
    assert "schedules.py" in host and "transformer_layer.py" in host
    assert "host time of steps 2-4" in done.stdout
    # and the whole profile beside the JSON, readable by pstats (callers and callees)
    stats = pstats.Stats(str(tmp_path / "train.dense.prof"))
    assert any(Path(filename).name == "trainer.py" for filename, _, _ in stats.stats)
    # the compile report is wired in; dense attention on CPU compiles no Triton kernel
    assert result["compiles"] == {"events": [], "kernels": {}}
    assert "Triton compiles by step and kernel" in done.stdout

    # the host check (a run of its own): one forward+backward a training step (the stage-end evaluation's
    # forward-only calls left out), each run no sooner than queued; medians over steps 2-4
    checked = subprocess.run(command[:command.index("--profile")] + ["--host-check", "--out", str(out)]
                             + command[command.index("--set"):], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr[-3000:]
    check = json.loads(out.read_text())["results"][0]["host_check"]
    assert len(check["queued_ms"]) == len(check["done_ms"]) == 4 and check["steps"] == 3
    assert all(0 < queued <= done for queued, done in zip(check["queued_ms"], check["done_ms"]))
    assert check["host_queued_ms"] == sorted(check["queued_ms"][1:])[1] and check["device_tail_ms"] >= 0
    assert "forward+backward of steps 2-4, medians: queued by the host in" in checked.stdout

    too_few = subprocess.run(command[:command.index("--steps")] + ["--steps", "2", "--profile", "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert too_few.returncode != 0 and "--profile records steps 2 and 3, and --steps=2" in too_few.stderr

    one_step = subprocess.run(command[:command.index("--steps")] + ["--steps", "1", "--host-profile", "--out",
                                                                     str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert one_step.returncode != 0 and "--host-profile records steps 2 to the last, and --steps=1" in one_step.stderr
    one_step = subprocess.run(command[:command.index("--steps")] + ["--steps", "1", "--host-check", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert one_step.returncode != 0 and "--host-check times steps 2 to the last, and --steps=1" in one_step.stderr
    if not torch.cuda.is_available():  # --graph-ceiling captures a CUDA graph: refused on CPU, with the reason
        refused = subprocess.run(command[:command.index("--profile")] + ["--graph-ceiling", "--out", str(out)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "--graph-ceiling needs a GPU" in refused.stderr


def _synchronizes(times):
    for _ in range(times):
        warnings.warn("called a synchronizing CUDA operation")  # what torch's sync debug mode warns


def test_sync_recorder_counts_by_the_line_of_ours_that_synchronized(recwarn):
    """--sync-check's recorder: while started, each sync-debug warning is counted under the innermost frame
    of the repository's code outside tools/ (here this file's warn line); other warnings pass through, and
    nothing is recorded once stopped. On CPU the option is refused with the reason."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_train

    recorder = bench_train.SyncRecorder()
    recorder.start()
    _synchronizes(3)
    warnings.warn("something else")
    recorder.stop()
    _synchronizes(1)
    here = f"tests/training/test_bench_train.py:{_synchronizes.__code__.co_firstlineno + 2} (_synchronizes)"
    assert dict(recorder.counts) == {here: 3}
    assert recorder.stacks[here][-1] == here and "(test_sync_recorder_counts_by" in recorder.stacks[here][-2]
    table, rows = recorder.report(steps=2)
    assert rows == [{"location": here, "count": 3, "per_step": 1.5, "stack": recorder.stacks[here]}]
    assert here in table and table.splitlines()[-1].split() == ["3", "1.5", "in", "all"]
    # the warning outside the recorder and the unrelated one reached the usual handling
    ours = ("something else", "called a synchronizing CUDA operation")
    assert [str(w.message) for w in recwarn if str(w.message) in ours] == list(ours)

    refused = subprocess.run([sys.executable, "tools/bench_train.py", "--config", "configs/quickstart.yaml",
                              "--steps", "2", "--sync-check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--sync-check needs a GPU" in refused.stderr


COMPILE_SCRIPT = r'''
import json, sys, tempfile, os
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
sys.path.insert(0, os.path.join(os.getcwd(), "tools"))
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench_train import CompileRecorder

@triton.jit
def scale_rows(x, y, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n) * factor, mask=offs < n)

def build(block, n_divisible, warps):
    signature = {"x": "*fp32", "y": "*fp32", "n": "i32", "factor": "fp32", "BLOCK": "constexpr"}
    attrs = {(2,): [["tt.divisibility", 16]]} if n_divisible else {}
    source = ASTSource(scale_rows, signature, constexprs={"BLOCK": block}, attrs=attrs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

recorder = CompileRecorder()
recorder.start()
build(64, False, 4)
build(128, False, 4)            # step 1: an autotune-like pair, tiles apart
recorder.step(None)
build(64, True, 4)              # step 2: n divisible by 16 in this batch: a new variant
build(64, False, 4)             # the first again: Triton's cache serves it
recorder.stop()
build(32, False, 2)             # not recorded
table, report = recorder.report()
print(table)
print(json.dumps(report["kernels"]))
print(json.dumps([[e["step"], e["cache_hit"]] for e in report["events"]]))
'''


def test_compile_recorder_names_each_compiles_step_and_what_set_it_apart(tmp_path):
    """--compile-report's recorder on real Triton compiles (offline, for an H100/H200 target: no GPU needed,
    so run without the interpreter): compiles are counted under the step they came in, the cache's hits apart,
    and a kernel's variants are told apart by the constexpr and the divisibility of an integer argument."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = tmp_path / "compile_variants.py"  # Triton reads a @jit function's source from its file
    script.write_text(COMPILE_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    kernels, events = json.loads(lines[-2]), json.loads(lines[-1])
    assert events == [[1, False], [1, False], [2, False], [2, True]]
    (name, kernel), = kernels.items()
    assert name == "scale_rows" and kernel["compiles"] == 3 and kernel["steps"] == [1, 2]
    assert kernel["differ_in"] == ["BLOCK", "n"] and kernel["seconds"] > 0
    assert "(and 1 served by Triton's cache)" in done.stdout


def test_bench_train_times_nsa_with_the_selected_kernels_on_every_row(tmp_path):
    """--attention nsa-every-row trains NSA with the selected branch computed on the rows the window branch
    answers for (kernels.nsa.WINDOW_SERVES_SELECTION off), to time the two against each other: same model,
    data and losses up to rounding. An unknown line is refused by name."""
    out = tmp_path / "train.json"
    command = [sys.executable, "tools/bench_train.py", "--config", "configs/quickstart.yaml",
               "--attention", "nsa,nsa-every-row", "--seq-len", "128", "--steps", "2", "--out", str(out),
               "--set", "training.dtype=fp32", "--set", "training.device=cpu", "--set", "model.num_layers=1",
               "--set", "nsa.kv=shared",
               "--set", "stages=[{name: mine, seq_len: 128, steps: 2, global_batch_size: 2, micro_batch_size: 2}]"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served, every_row = json.loads(out.read_text())["results"]
    assert (served["attention"], every_row["attention"]) == ("nsa", "nsa-every-row")
    assert len(served["losses"]) == len(every_row["losses"]) == 2
    for a, b in zip(served["losses"], every_row["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (served["losses"], every_row["losses"])

    wrong = subprocess.run(command[:command.index("--attention")] + ["--attention", "nsa,sparse"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "['sparse'] not among dense, nsa, nsa-every-row" in wrong.stderr
