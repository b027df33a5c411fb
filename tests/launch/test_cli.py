"""`nsa-dist`'s command line: help, printed configs and bad input, each answered with a sentence before any
Ray cluster or worker starts (these tests start none)."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.cli import main


def test_help_lists_the_presets_and_where_fields_are_described():
    printed = subprocess.run([sys.executable, "-m", "launch", "train", "--help"], capture_output=True, text=True,
                             timeout=60).stdout.replace("\n", " ")
    assert "configs/quickstart.yaml" in printed and "configs/paper.yaml" in printed
    assert "--print-config" in printed


def test_the_console_script_and_python_m_launch_are_the_same_command():
    console_script = Path(sys.executable).parent / "nsa-dist"  # installed by `pip install -e .` into the venv
    for command in ([str(console_script)], [sys.executable, "-m", "launch"]):
        done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "{train,status,ui,eval}" in done.stdout


def test_print_config_prints_the_resolved_config(capsys):
    assert main(["train", "configs/quickstart.yaml", "--set", "nsa.window=32", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["nsa"]["window"] == 32 and printed["stages"][1]["context_parallel"] == 2


def test_an_unknown_subcommand_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fly"])
    assert exit_.value.code == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("args,phrase", [
    (["configs/nope.yaml"], "config file 'configs/nope.yaml' does not exist"),
    (["configs/quickstart.yaml", "--set", "training.lr=inf"], "training.lr"),
    (["configs/quickstart.yaml", "--set", "nsa.stride=5"], "nsa.compress_block=16 must be a multiple of nsa.stride=5"),
    (["configs/quickstart.yaml", "--workers", "0"], "--workers 0 must be at least 1"),
])
def test_config_errors_come_before_any_cluster_starts(args, phrase, capsys, tmp_path):
    assert main(["train", *args, "--set", f"run.dir={tmp_path}"]) == 2
    assert phrase in capsys.readouterr().out.replace("\n", " ")
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.mark.timeout(60)
def test_an_unreachable_address_fails_quickly(capsys, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    assert main(["train", "configs/quickstart.yaml", "--set", f"run.dir={tmp_path}", "--address",
                 f"127.0.0.1:{port}"]) == 2
    assert time.monotonic() - start < 60
    assert f"cannot reach the Ray cluster at --address 127.0.0.1:{port}" in capsys.readouterr().out


def test_status_without_runs_and_with_a_missing_run_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 0
    assert "no runs found under runs/" in capsys.readouterr().out
    assert main(["status", "runs/none"]) == 2
    assert "run directory runs/none does not exist" in capsys.readouterr().out


def test_ui_without_a_tracked_run_is_a_clear_message(capsys, tmp_path):
    assert main(["ui", str(tmp_path)]) == 2
    assert "holds no tracked run" in capsys.readouterr().out


def test_the_stage_table_shows_the_answer_loss_where_the_stage_has_tasks():
    """The console's end-of-stage table: the mean answer loss of the last 10 steps when the stage mixed in
    task samples (StepLog.answer_loss), and no such column when it did not."""
    import io

    from rich.console import Console

    from launch.console import ConsoleReporter
    from nsa_dist.config import load_config
    from nsa_dist.trainer import StepLog

    stage = load_config(str(Path(__file__).resolve().parents[2] / "configs/quickstart.yaml")).resolved_stages()[0]
    for answers, expected in (([None] * 12, None), ([9.0, 9.0] + [float(i) for i in range(10)], "4.500")):
        out = io.StringIO()
        logs = [StepLog(stage=stage.name, step=i + 1, loss=2.0, grad_norm=1.0, lr=1e-3, tokens_per_s=100.0,
                        step_time_s=0.5, memory_gb=1.0, answer_loss=a) for i, a in enumerate(answers)]
        ConsoleReporter(Console(file=out, width=200)).stage_finished(stage, logs)
        table = out.getvalue()
        assert "2.0000" in table  # first and last loss
        if expected is None:
            assert "answer loss" not in table
        else:
            assert "answer loss, last 10 steps" in table and expected in table


def test_the_evaluation_line_gives_exact_match_and_answer_prefix():
    """A stage-end evaluation's line in the job's output: the validation loss, the NIAH exact match and
    its graded answer prefix, the grid's lengths and depths, the files written."""
    import io

    from rich.console import Console

    from launch.console import ConsoleReporter
    from nsa_dist.config import load_config

    out = io.StringIO()
    stage = load_config(None, []).resolved_stages()[0]
    report = {"checkpoint": "runs/x/checkpoints/step_00000020", "files": ["eval.json", "niah.png"],
              "validation": {"loss": 1.23456},
              "niah": {"task": "passkey", "mean_accuracy": 0.5, "mean_answer_prefix": 0.7, "lengths": [256],
                       "depths": [0.0, 1.0]}}
    ConsoleReporter(Console(file=out, width=300)).evaluated(stage, report)
    line = out.getvalue()
    assert "validation loss 1.2346, passkey exact match 50% (answer prefix 70%) over lengths [256]" in line
    assert line.rstrip().endswith("depths [0.0, 1.0]; eval.json, niah.png")  # a report without times
    out = io.StringIO()
    report["seconds"] = {"model": 2.04, "niah": 14.2, "validation": 2.76}
    ConsoleReporter(Console(file=out, width=300)).evaluated(stage, report)
    assert "depths [0.0, 1.0], in 19.0 s (model 2.0, NIAH 14.2, validation 2.8); eval.json" in out.getvalue()


def test_the_console_shows_the_indexers_recall_where_the_model_has_one():
    """nsa.indexer_heads: each step's line and the stage table give the share of the exact score's free picks
    the indexer makes too (StepLog.indexer_recall); a model without an indexer shows nothing of it."""
    import io

    from rich.console import Console

    from launch.console import ConsoleReporter
    from nsa_dist.config import load_config
    from nsa_dist.trainer import StepLog

    stage = load_config(str(Path(__file__).resolve().parents[2] / "configs/quickstart.yaml")).resolved_stages()[0]
    for recalls, expected in (([None] * 12, None), ([0.0, 0.0] + [0.5 + i / 100 for i in range(10)], "55%")):
        out = io.StringIO()
        reporter = ConsoleReporter(Console(file=out, width=200))
        logs = [StepLog(stage=stage.name, step=i + 1, loss=2.0, grad_norm=1.0, lr=1e-3, tokens_per_s=100.0,
                        step_time_s=0.5, memory_gb=1.0, indexer_recall=r) for i, r in enumerate(recalls)]
        reporter.step(logs[-1])
        reporter.stage_finished(stage, logs)
        printed = out.getvalue()
        if expected is None:
            assert "indexer recall" not in printed
        else:
            assert "indexer recall 59%" in printed  # the last step's line
            assert "indexer recall, last 10 steps" in printed and expected in printed
