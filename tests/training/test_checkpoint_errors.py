"""Bad checkpoints get a sentence naming the path and the fix, before any worker starts, and nothing is
lost: each case below breaks a copy of one real checkpoint and runs the real entry point on it."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from tiny import TINY

from launch.train import main
from nsa_dist.checkpoint import MARKER, newest_checkpoint


TINY_YAML = Path(__file__).with_name("tiny.yaml")  # one stage: stage0, 128 tokens, 2 steps


def args(run_dir, *overrides: str) -> list[str]:
    sets = TINY + [f"run.dir={run_dir}", *overrides]
    return ["--config", str(TINY_YAML)] + [item for override in sets for item in ("--set", override)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run of two steps on one process with a checkpoint after each: step 1 (mid-stage) and step 2 (done)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    assert main(args(run_dir, "checkpoint.interval=1", "checkpoint.keep_last=2") + ["--nproc", "1"]) == 0
    return run_dir


@pytest.fixture
def run_copy(saved, tmp_path):
    """A copy of the saved run that a test may break."""
    return shutil.copytree(saved, tmp_path / "run")


def error_of(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().out.replace("\n", " ")


def step(run_dir, number: int):
    return run_dir / "checkpoints" / f"step_{number:08d}"


# (how to break the copy, extra overrides, what the message must say: {run} is the copy's run dir)
BROKEN_RESUMES = {
    "corrupt marker": (lambda run: (step(run, 2) / MARKER).write_text('{"format_version": 1, "sta'), [],
                       f"{{run}}/checkpoints/step_00000002 has a corrupt {MARKER}"),
    "marker of another format": (
        lambda run: (step(run, 2) / MARKER).write_text(
            json.dumps({**json.loads((step(run, 2) / MARKER).read_text()), "format_version": 99})), [],
        "step_00000002 has format version 99; this nsa-dist reads version 1"),
    "missing shard": (lambda run: (step(run, 2) / "__0_0.distcp").unlink(), [],
                      "step_00000002 is missing its file __0_0.distcp: it is damaged; delete it"),
    "truncated shard": (lambda run: (step(run, 2) / "__0_0.distcp").write_bytes(b"\0" * 100), [],
                        "step_00000002: __0_0.distcp has 100 bytes but had"),
    "another hidden size": (lambda run: None, ["model.hidden_size=128"],
                            "holds another model: model.hidden_size is 64 there and 128 here"),
    "another head count and depth": (lambda run: None, ["model.num_query_heads=8", "model.num_layers=4"],
                                     "model.num_layers is 2 there and 4 here; model.num_query_heads is 4 there "
                                     "and 8 here"),
    "another NSA block": (lambda run: None, ["nsa.compress_block=16", "nsa.selection_block=32"],
                          "nsa.compress_block is 8 there and 16 here"),
    "an indexer the run did not have": (lambda run: None, ["nsa.indexer_heads=1"],
                                        "nsa.indexer_heads is 0 there and 1 here"),
    "a stage the config lost": (lambda run: None, ["stages.0.name=renamed"],
                                "was saved in stage 'stage0', which the config does not have (stages: renamed)"),
    "a stage shortened below its progress": (lambda run: shutil.rmtree(step(run, 2)),
                                             ["stages.0.steps=1", "training.warmup_steps=0"],
                                             "has run 1 steps of stage 'stage0', which now has steps=1: raise "
                                             "stages[0].steps above 1"),
    "checkpoints folder is a file": (
        lambda run: (shutil.rmtree(run / "checkpoints"), (run / "checkpoints").write_text("oops")), [],
        "{run}/checkpoints is a file, but run.dir={run} needs it to be the checkpoint directory"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", BROKEN_RESUMES)
def test_a_broken_run_directory_is_named_before_any_worker_starts(case, run_copy, capsys):
    break_it, overrides, phrase = BROKEN_RESUMES[case]
    break_it(run_copy)
    assert phrase.format(run=run_copy) in error_of(args(run_copy, *overrides), capsys)


def a_file(run: Path) -> Path:
    (run / "file").write_text("x")
    return run / "file"


def an_empty_directory(run: Path) -> Path:
    (run / "empty").mkdir()
    return run / "empty"


def a_checkpoint_without_marker(run: Path) -> Path:
    (step(run, 2) / MARKER).unlink()
    return step(run, 2)


BROKEN_INIT = {
    "missing": (lambda run: run / "nope", "does not exist: check the path"),
    "a file": (a_file, "is a file, not a checkpoint directory"),
    "empty": (an_empty_directory, "is an empty directory"),
    "no marker": (a_checkpoint_without_marker, "is incomplete: it has no complete.json, so its save was interrupted"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", BROKEN_INIT)
def test_a_bad_init_from_is_named(case, run_copy, tmp_path, capsys):
    make, phrase = BROKEN_INIT[case]
    init_from = make(run_copy)
    message = error_of(args(tmp_path / "fresh", f"checkpoint.init_from={init_from}"), capsys)
    assert f"checkpoint {init_from} " in message or f"checkpoint {init_from}:" in message
    assert phrase in message


@pytest.mark.timeout(60)
def test_init_from_another_model_is_refused(saved, tmp_path, capsys):
    init_from = step(saved, 2)
    message = error_of(args(tmp_path / "fresh", f"checkpoint.init_from={init_from}", "model.ffn_hidden_size=256"), capsys)
    assert "model.ffn_hidden_size is 128 there and 256 here" in message


def test_interrupted_saves_are_skipped_with_a_warning(run_copy, caplog):
    (step(run_copy, 2) / MARKER).unlink()
    with caplog.at_level(logging.WARNING, logger="nsa_dist"):
        newest = newest_checkpoint(run_copy)
    assert newest.state.step == 1
    assert f"skipping {step(run_copy, 2)}: it has no {MARKER}" in caplog.text


@pytest.mark.timeout(120)
def test_shards_with_garbage_of_the_right_size_fail_loading_with_the_path(run_copy, capfd):
    """Damage that keeps every file's size passes the marker's check; loading then fails, naming the
    checkpoint, and the run directory is left as it was."""
    shard = step(run_copy, 2) / "common.pt"
    shard.write_bytes(b"\x13" * shard.stat().st_size)
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    two_stages = "stages=[{name: stage0, seq_len: 128, steps: 2}, {name: b, seq_len: 128, steps: 1}]"
    assert main(args(run_copy, two_stages) + ["--nproc", "1"]) == 1
    captured = capfd.readouterr()
    printed = (captured.out + captured.err).replace("\n", " ")
    assert f"checkpoint {step(run_copy, 2)} could not be loaded" in printed
    assert "delete it to fall back to an earlier one" in printed
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before


@pytest.mark.timeout(60)
def test_a_checkpoint_from_before_a_field_existed_counts_it_as_its_default(run_copy):
    """A checkpoint saved before nsa.indexer_heads existed (its marker's config lacks the field) holds a model
    without an indexer: it loads into a config with the default (0) and is refused with an indexer."""
    from nsa_dist.checkpoint import CheckpointError, check_same_model, read_checkpoint
    from nsa_dist.config import load_config

    marker = step(run_copy, 2) / MARKER
    meta = json.loads(marker.read_text())
    for name in ("indexer_heads", "indexer_loss", "indexer_loss_stride"):
        del meta["config"]["nsa"][name]
    marker.write_text(json.dumps(meta))
    checkpoint = read_checkpoint(step(run_copy, 2))
    check_same_model(checkpoint, load_config(str(TINY_YAML), TINY))
    with pytest.raises(CheckpointError, match="nsa.indexer_heads is 0 there and 1 here"):
        check_same_model(checkpoint, load_config(str(TINY_YAML), TINY + ["nsa.indexer_heads=1"]))
