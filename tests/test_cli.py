"""`make train`'s entry point: runs on a preset, and rejects bad input with a sentence, not a traceback."""

import pytest

from launch.train import main

FAST = ["--config", "configs/quickstart.yaml", "--set", "stages.0.seq_len=64", "--set", "stages.1.seq_len=96"]


@pytest.mark.timeout(120)
def test_train_entry_point_runs_every_stage(capsys):
    assert main(FAST) == 0
    printed = capsys.readouterr().out
    assert "short" in printed and "long" in printed and "True" in printed


def test_bad_config_is_a_clear_message(capsys):
    assert main(["--config", "configs/quickstart.yaml", "--set", "nsa.stride=5"]) == 2
    printed = capsys.readouterr().out
    assert "nsa.compress_block=16 must be a multiple of nsa.stride=5" in printed


def test_missing_config_file(capsys):
    assert main(["--config", "configs/nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().out
