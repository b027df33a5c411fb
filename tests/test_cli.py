"""`make train`'s entry point: runs on a preset, and rejects bad input with a sentence, not a traceback."""

import pytest

from launch.train import main

FAST = ["--config", "configs/quickstart.yaml", "--set", "stages.0.steps=2", "--set", "stages.1.steps=1",
        "--set", "training.warmup_steps=1"]


@pytest.mark.timeout(120)
def test_train_entry_point_trains_every_stage_on_two_processes(capfd):
    assert main(FAST) == 0
    printed = capfd.readouterr().out  # the ranks are child processes: capture at the file descriptors
    assert "2 processes: TP=1 PP=1 CP=2 DP=1" in printed.replace("\n", " ")
    assert "short step    1" in printed and "long step    3" in printed
    assert "over 3 steps" in printed


@pytest.mark.parametrize("args,phrase", [
    (["--nproc", "3"], "3 processes cannot be split"),
    (["--nproc", "4", "--set", "training.global_batch_size=1"], "data-parallel size 2"),
    (["--set", "training.dtype=bf16", "--set", "training.device=cpu"], "needs a GPU"),
    (["--set", "stages.1.context_parallel=1"], "changing CP between stages"),
])
def test_layout_errors_are_clear_messages(args, phrase, capsys):
    assert main(["--config", "configs/quickstart.yaml", *args]) == 2
    assert phrase in capsys.readouterr().out.replace("\n", " ")


def test_bad_config_is_a_clear_message(capsys):
    assert main(["--config", "configs/quickstart.yaml", "--set", "nsa.stride=5"]) == 2
    printed = capsys.readouterr().out
    assert "nsa.compress_block=16 must be a multiple of nsa.stride=5" in printed


def test_missing_config_file(capsys):
    assert main(["--config", "configs/nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_triton_on_cpu_without_the_interpreter_is_a_clear_message(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = ["--config", "configs/quickstart.yaml", "--set", "nsa.impl=triton", "--set", "training.device=cpu"]
    assert main(args) == 2
    assert "nsa.impl='triton' needs a GPU" in capsys.readouterr().out.replace("\n", " ")
