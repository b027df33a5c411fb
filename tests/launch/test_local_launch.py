"""The local launcher (`python -m launch.train`, also one rank under torchrun): runs the quickstart's
curriculum, resumes it, and rejects bad input with a sentence, not a traceback."""

import pytest

from launch.train import main

FAST = ["--config", "configs/quickstart.yaml", "--set", "stages.0.steps=2", "--set", "stages.1.steps=1",
        "--set", "training.warmup_steps=1", "--set", "checkpoint.interval=0", "--set", "tracking.enabled=false"]


def printed_by(capfd) -> str:
    """stdout and stderr (the ranks' logs) of the launcher and its ranks, captured at the file descriptors
    because ranks are child processes."""
    captured = capfd.readouterr()
    return (captured.out + captured.err).replace("\n", " ")


def fast(tmp_path, *args):
    return FAST + ["--set", f"run.dir={tmp_path}", *args]


@pytest.mark.timeout(180)
def test_train_runs_both_stages_and_a_rerun_has_nothing_left(tmp_path, capfd):
    exact_later = ["--set", "stages.1.selection_score=exact"]  # a stage's own top-n score, printed in the plan
    assert main(fast(tmp_path, *exact_later)) == 0
    printed = printed_by(capfd)
    assert "2 processes" in printed and "top-n sum)" in printed
    assert "stage short: 256 tokens x 2 steps, TP=1 PP=1 CP=1 DP=2, RoPE base 10000 " in printed
    assert "stage long: 512 tokens x 1 steps, TP=1 PP=1 CP=2 DP=1, RoPE base 20000, top-n exact" in printed
    assert "short step 1: loss" in printed and "long step 3: loss" in printed
    assert f"saved checkpoint {tmp_path}/checkpoints/step_00000002 (step 2, end of stage short)" in printed
    assert f"from {tmp_path}/checkpoints/step_00000002" in printed  # stage long starts from stage short's end
    assert f"all 2 stages done; newest checkpoint: {tmp_path}/checkpoints/step_00000003" in printed
    assert main(fast(tmp_path, *exact_later)) == 0
    printed = printed_by(capfd)
    assert "nothing to train: all 2 stages done" in printed and "step 1:" not in printed


@pytest.mark.timeout(180)
def test_a_stage_wider_than_the_job_waits_for_the_next_job(tmp_path, capfd):
    """One process runs stage short (CP=1) and stops before stage long (CP=2); a job with two processes
    picks it up from stage short's final checkpoint without rerunning stage short."""
    assert main(fast(tmp_path, "--nproc", "1")) == 0
    printed = printed_by(capfd)
    assert "short step 2: loss" in printed and "long step" not in printed
    assert "Stage 'long' (TP=1 PP=1 CP=2) needs 2 processes and this job had 1: rerun with --nproc 2" in printed
    assert main(fast(tmp_path)) == 0
    printed = printed_by(capfd)
    assert f"resuming from {tmp_path}/checkpoints/step_00000002 (step 2, stage short)" in printed
    assert "short step" not in printed and "long step 3: loss" in printed
    assert "all 2 stages done" in printed


@pytest.mark.parametrize("args,phrase", [
    (["--nproc", "3", "--set", "training.global_batch_size=6"], "3 processes cannot be split into stage 'long' (TP=1 PP=1 CP=2) groups"),
    (["--nproc", "0"], "--nproc 0 must be at least 1"),
    (["--nproc", "-2"], "--nproc -2 must be at least 1"),
    (["--nproc", "4", "--set", "training.global_batch_size=2"], "data-parallel size 4"),
    (["--set", "training.dtype=bf16", "--set", "training.device=cpu"], "needs a GPU"),
    (["--set", "stages.1.seq_len=131072", "--set", "training.device=cpu"],
     "a stage has 131072 tokens per sequence and this job trains on CPUs"),
    (["--set", "stages.0.context_parallel=4", "--set", "stages.0.seq_len=512", "--nproc", "2"],
     "stage 'short' (TP=1 PP=1 CP=4) needs 4 processes and this job has 2: start at least 4"),
])
def test_layout_errors_are_clear_messages(args, phrase, tmp_path, capsys):
    assert main(["--config", "configs/quickstart.yaml", "--set", f"run.dir={tmp_path}", *args]) == 2
    assert phrase in capsys.readouterr().out.replace("\n", " ")


def test_bad_config_is_a_clear_message(capsys):
    assert main(["--config", "configs/quickstart.yaml", "--set", "nsa.stride=5"]) == 2
    printed = capsys.readouterr().out
    assert "nsa.compress_block=16 must be a multiple of nsa.stride=5" in printed


def test_missing_config_file(capsys):
    assert main(["--config", "configs/nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_triton_on_cpu_without_the_interpreter_is_a_clear_message(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = ["--config", "configs/quickstart.yaml", "--set", "nsa.impl=triton", "--set", "training.device=cpu",
            "--set", f"run.dir={tmp_path}"]
    assert main(args) == 2
    assert "nsa.impl='triton' needs a GPU" in capsys.readouterr().out.replace("\n", " ")
