"""MLflowTracker on a real MLflow store (sqlite in tmp_path), driven with synthetic steps of the
quickstart curriculum: no training needed."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from unittest import mock
from urllib.parse import unquote, urlparse

import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from nsa_dist.checkpoint import MARKER, TrainState, step_dir
from nsa_dist.config import load_config
from nsa_dist.tracking import MLflowTracker, read_run_ids, tracking_uri
from nsa_dist.trainer import StepLog, TrainResult

REPO = Path(__file__).resolve().parents[1]
COMMAND = "nsa-dist train configs/quickstart.yaml"


@pytest.fixture(autouse=True)
def environment(tmp_path, monkeypatch):
    """The tracker sets MLflow's HTTP settings in os.environ (process-wide): keep them inside each test.
    The working directory is tmp_path, so a stray ./mlruns or ./mlflow.db would show."""
    with mock.patch.dict(os.environ):
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.2"  # system metrics within a short test
        monkeypatch.chdir(tmp_path)
        yield


def quickstart(tmp_path, *overrides):
    # resolved: the tracker tags checkpoints with resolved paths
    return load_config(REPO / "configs/quickstart.yaml", [f"run.dir={(tmp_path / 'run').resolve()}", *overrides])


def step_log(stage, step: int) -> StepLog:
    comm = {"halo": {"bytes": 4096, "exposed_s": 0.002}} if stage.context > 1 else {}
    return StepLog(stage=stage.name, step=step, loss=5.0 / step, grad_norm=1.0 / step, lr=1e-3,
                   tokens_per_s=1000.0, step_time_s=0.5, memory_gb=0.25, comm=comm)


def run_steps(tracker, config, stage, steps: range, checkpoint_every: int = 10) -> list[StepLog]:
    """What the trainer reports for these steps of a stage: stage_started, each step, its checkpoints."""
    stage_step = steps.start - 1 - stage.first_step
    tracker.stage_started(stage, TrainState(step=steps.start - 1, stage=stage.name, stage_index=stage.index,
                                            stage_step=stage_step), "random weights")
    logs = []
    for step in steps:
        logs.append(step_log(stage, step))
        tracker.step(logs[-1])
        if step % checkpoint_every == 0:
            tracker.checkpoint_saved(step_dir(config.run.dir, step),
                                     TrainState(step=step, stage=stage.name, stage_index=stage.index,
                                                stage_step=step - stage.first_step))
    return logs


class Timed:
    """A tracker's hooks, timed: the slowest call's seconds."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.slowest = 0.0

    def __getattr__(self, name):
        def timed(*args):
            start = time.monotonic()
            getattr(self.tracker, name)(*args)
            self.slowest = max(self.slowest, time.monotonic() - start)
        return timed


def wait_for(condition, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {condition}")


def artifact_dir(run) -> Path:
    return Path(unquote(urlparse(run.info.artifact_uri).path))


def losses(client, run_id) -> dict[int, float]:
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)}


def png_title(path: Path) -> str:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.text["Title"]


@pytest.mark.timeout(60)
def test_two_stage_curriculum_one_parent_two_children(tmp_path):
    config = quickstart(tmp_path)
    short, long = config.resolved_stages()
    for step, seconds in ((10, 2.5), (20, 0.25)):  # what the checkpoint writer's marker says of these saves
        step_dir(config.run.dir, step).mkdir(parents=True)
        (step_dir(config.run.dir, step) / MARKER).write_text(json.dumps({"save_seconds": seconds}))
    tracker = MLflowTracker(config, command=COMMAND, hardware="2 CPU cores")
    history = run_steps(tracker, config, short, range(1, 21))
    # the child run's id appears once the background thread has created it; its system metrics soon after
    client = MlflowClient(tracking_uri(config))
    short_id = wait_for(lambda: (read_run_ids(config.run.dir) or {}).get("stages", {}).get("short"))
    wait_for(lambda: any(key.startswith("system/") for key in client.get_run(short_id).data.metrics))
    tracker.stage_finished(short, history)
    history += run_steps(tracker, config, long, range(21, 31))
    tracker.stage_finished(long, history[20:])
    tracker.finish(TrainResult(history, step_dir(config.run.dir, 30), waiting=None))

    ids = read_run_ids(config.run.dir)
    assert ids["tracking_uri"] == f"sqlite:///{(tmp_path / 'run').resolve() / 'mlflow.db'}"
    assert set(ids["stages"]) == {"short", "long"}
    runs = {run.info.run_id: run for run in client.search_runs([ids["experiment_id"]])}
    assert set(runs) == {ids["parent"], *ids["stages"].values()}
    parent = runs[ids["parent"]]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["layout"] == "short: TP=1 PP=1 CP=1; long: TP=1 PP=1 CP=2"
    assert parent.data.tags["hardware"] == "2 CPU cores"
    assert parent.data.tags["command"] == COMMAND
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert parent.data.tags["mlflow.source.git.commit"] == head
    assert parent.data.tags["checkpoint.latest"] == str(step_dir(config.run.dir, 30))
    params = parent.data.params
    assert (params["model.hidden_size"], params["stages.0.seq_len"], params["stages.1.context_parallel"]) == \
        ("128", "256", "2")
    assert params["training.lr"] == "0.001" and params["tracking.experiment"] == "nsa-dist"

    for stage, steps in ((short, range(1, 21)), (long, range(21, 31))):
        child = runs[ids["stages"][stage.name]]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == ids["parent"]
        assert child.data.params["seq_len"] == str(stage.seq_len)
        assert child.data.params["layout"] == stage.layout()
        assert child.data.params["lr_schedule"] == "continue"
        history_of_stage = losses(client, child.info.run_id)
        assert list(history_of_stage) == list(steps)
        values = list(history_of_stage.values())
        assert all(a > b for a, b in zip(values, values[1:]))  # decreasing
        for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "memory_gb"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == list(steps)
        checkpoint = step_dir(config.run.dir, steps[-1])
        assert child.data.tags["checkpoint.latest"] == str(checkpoint)
        assert child.data.tags[f"checkpoint.{checkpoint.name}"] == str(checkpoint)
        title = f"loss of {stage.name}, steps {steps[0]}-{steps[-1]}"
        assert png_title(artifact_dir(child) / "loss.png") == title
    assert "checkpoint.step_00000010" in runs[ids["stages"]["short"]].data.tags
    assert any(key.startswith("system/cpu") for key in runs[ids["stages"]["short"]].data.metrics)
    long_id = ids["stages"]["long"]
    assert [m.value for m in client.get_metric_history(long_id, "comm/halo/bytes")] == [4096.0] * 10
    assert [m.step for m in client.get_metric_history(long_id, "comm/halo/exposed_s")] == list(range(21, 31))
    assert "comm/halo/bytes" not in runs[ids["stages"]["short"]].data.metrics
    # each save's seconds at its step, from its marker (step 30's checkpoint has none here: no metric)
    saves = client.get_metric_history(ids["stages"]["short"], "checkpoint/save_s")
    assert sorted((m.step, m.value) for m in saves) == [(10, 2.5), (20, 0.25)]
    assert not client.get_metric_history(long_id, "checkpoint/save_s")

    # artifacts beside the store, the config as YAML, the curriculum's plot
    parent_artifacts = artifact_dir(parent)
    assert parent_artifacts.is_relative_to(Path(config.run.dir, "mlartifacts"))
    assert yaml.safe_load((parent_artifacts / "config.yaml").read_text()) == config.to_dict()
    assert png_title(parent_artifacts / "loss.png") == "loss of short, long, steps 1-30"
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert tracker.ui_hint() == f"nsa-dist ui {config.run.dir}"


@pytest.mark.timeout(60)
def test_runs_start_when_the_job_and_its_stages_do(tmp_path, monkeypatch):
    """The parent run spans the job from the tracker's creation and a child its stage from stage_started, on the
    training thread, however late the background thread creates them (a new sqlite store first migrates its
    schema, seconds on a busy machine, while the first steps run): here every create_run first waits 1 s."""
    create_run = MlflowClient.create_run

    def slow_store(self, *args, **kwargs):
        time.sleep(1.0)
        return create_run(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", slow_store)
    config = quickstart(tmp_path)
    short, _ = config.resolved_stages()
    job_start = int(time.time() * 1000)  # ms, as MLflow keeps them
    tracker = MLflowTracker(config, command=COMMAND, hardware="2 CPU cores")
    stage_start = int(time.time() * 1000)
    history = run_steps(tracker, config, short, range(1, 3))
    stage_started = int(time.time() * 1000) + 1
    tracker.finish(TrainResult(history, None, waiting=None))

    ids = read_run_ids(config.run.dir)
    client = MlflowClient(tracking_uri(config))
    parent = client.get_run(ids["parent"]).info
    child = client.get_run(ids["stages"]["short"]).info
    assert job_start <= parent.start_time <= stage_start + 1  # not when the store got to it, 1 s later
    assert stage_start <= child.start_time <= stage_started


@pytest.mark.timeout(60)
def test_resumed_job_continues_the_same_runs(tmp_path, caplog):
    config = quickstart(tmp_path)
    short, long = config.resolved_stages()
    client = MlflowClient(tracking_uri(config))

    # job 1: stage short, then long up to step 27 with a checkpoint at 25, then it fails
    first = MLflowTracker(config, command=COMMAND, hardware="2 CPU cores")
    logs = run_steps(first, config, short, range(1, 21))
    first.stage_finished(short, logs)
    run_steps(first, config, long, range(21, 28), checkpoint_every=25)
    first.finish(None, error="RuntimeError: worker died")
    ids = read_run_ids(config.run.dir)
    assert client.get_run(ids["parent"]).info.status == "FAILED"
    assert client.get_run(ids["parent"]).data.tags["error"] == "RuntimeError: worker died"
    assert client.get_run(ids["stages"]["long"]).info.status == "FAILED"
    assert client.get_run(ids["stages"]["short"]).info.status == "FINISHED"

    # job 2 resumes from the checkpoint at step 25 (steps 26, 27 again); its config differs in one field
    caplog.set_level(logging.WARNING)
    changed = quickstart(tmp_path, "training.log_interval=2")
    second = MLflowTracker(changed, command=COMMAND, hardware="2 CPU cores")
    logs = run_steps(second, config, long, range(26, 31))
    wait_for(lambda: client.get_run(ids["stages"]["long"]).info.status == "RUNNING")
    second.stage_finished(long, logs)
    second.finish(TrainResult(logs, step_dir(config.run.dir, 30), waiting=None))

    assert read_run_ids(config.run.dir) == ids
    runs = client.search_runs([ids["experiment_id"]])
    assert sorted(run.info.run_id for run in runs) == sorted([ids["parent"], *ids["stages"].values()])
    parent = client.get_run(ids["parent"])
    assert parent.info.status == "FINISHED" and "error" not in parent.data.tags
    assert parent.data.params["training.log_interval"] == "1"  # params keep the first job's value
    long_run = client.get_run(ids["stages"]["long"])
    assert long_run.info.status == "FINISHED" and "error" not in long_run.data.tags
    assert list(losses(client, long_run.info.run_id)) == list(range(21, 31))
    # the stage's plot covers both jobs' steps, the curriculum's plot every step
    assert png_title(artifact_dir(long_run) / "loss.png") == "loss of long, steps 21-30"
    assert png_title(artifact_dir(parent) / "loss.png") == "loss of short, long, steps 1-30"
    assert long_run.data.tags["checkpoint.step_00000025"] == str(step_dir(config.run.dir, 25))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "training.log_interval=1 (this job: 2)" in warnings[0].getMessage()


@pytest.mark.timeout(60)
def test_a_job_waiting_for_more_processes_is_scheduled_not_failed(tmp_path):
    config = quickstart(tmp_path)
    short, long = config.resolved_stages()
    tracker = MLflowTracker(config, command=COMMAND, hardware="1 CPU core")
    logs = run_steps(tracker, config, short, range(1, 21))
    tracker.stage_finished(short, logs)
    tracker.finish(TrainResult(logs, step_dir(config.run.dir, 20), waiting=long))

    parent = MlflowClient(tracking_uri(config)).get_run(read_run_ids(config.run.dir)["parent"])
    assert parent.info.status == "SCHEDULED"
    assert parent.data.tags["waiting"].startswith("stage 'long' (TP=1 PP=1 CP=2) needs 2 processes")


@pytest.mark.timeout(60)
def test_a_tracking_server_that_is_down_gives_one_warning_and_never_blocks(tmp_path, caplog):
    port = free_port()  # nothing listens there
    config = quickstart(tmp_path, f"tracking.tracking_uri=http://127.0.0.1:{port}")
    short, long = config.resolved_stages()
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    tracker = MLflowTracker(config, command=COMMAND, hardware="2 CPU cores")
    hooks = Timed(tracker)
    for stage, steps in ((short, range(1, 21)), (long, range(21, 31))):
        hooks.stage_finished(stage, run_steps(hooks, config, stage, steps))
    tracker.finish(TrainResult([], None, waiting=None))
    took = time.monotonic() - start

    assert hooks.slowest < 0.1, f"a hook call took {hooks.slowest:.3f} s"
    assert took < 5.0, f"the job's tracking took {took:.1f} s with the server down"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].name.startswith("nsa_dist")
    assert f"127.0.0.1:{port}" in warnings[0].getMessage()
    assert tracker.ui_hint() == ""
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_server(directory: Path):
    """A real `mlflow server` (sqlite store, served artifacts) on 127.0.0.1; yields (url, stop)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{directory / 'server.db'}",
         "--artifacts-destination", str(directory / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop():
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn worker
            server.wait()

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
        except OSError:
            return False

    try:
        # a new server migrates its sqlite schema before it answers: about 20 s on the 2-core CI machine, and in
        # one CI run at b92ce58, whose multi-process tests all ran 2-3x slower than usual, over 40 s
        wait_for(healthy, timeout_s=120)
        yield f"http://127.0.0.1:{port}", stop
    finally:
        stop()


@pytest.mark.timeout(180)
def test_a_tracking_server_that_goes_down_mid_run_gives_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with mlflow_server(tmp_path) as (url, stop):
        config = quickstart(tmp_path, f"tracking.tracking_uri={url}")
        short, long = config.resolved_stages()
        tracker = MLflowTracker(config, command=COMMAND, hardware="2 CPU cores")
        hooks = Timed(tracker)
        logs = run_steps(hooks, config, short, range(1, 11))
        client = MlflowClient(url)
        short_id = wait_for(lambda: (read_run_ids(config.run.dir) or {}).get("stages", {}).get("short"))
        wait_for(lambda: len(client.get_metric_history(short_id, "loss")) == 10)
        parent_id = read_run_ids(config.run.dir)["parent"]
        assert [a.path for a in client.list_artifacts(parent_id)] == ["config.yaml"]
        stop()
        start = time.monotonic()
        logs += run_steps(hooks, config, short, range(11, 21))
        hooks.stage_finished(short, logs)
        hooks.stage_finished(long, run_steps(hooks, config, long, range(21, 31)))
        tracker.finish(TrainResult(logs, None, waiting=None))
        took = time.monotonic() - start

    assert hooks.slowest < 0.1, f"a hook call took {hooks.slowest:.3f} s"
    assert took < 5.0, f"the job's tracking took {took:.1f} s after the server went down"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].name.startswith("nsa_dist") and url in warnings[0].getMessage()
    experiment_id = read_run_ids(config.run.dir)["experiment_id"]
    assert tracker.ui_hint() == f"{url}/#/experiments/{experiment_id}/runs/{parent_id}"


@pytest.mark.timeout(60)
def test_disabled_tracking_writes_nothing(tmp_path):
    config = quickstart(tmp_path, "tracking.enabled=false")
    short, long = config.resolved_stages()
    tracker = MLflowTracker(config, command=COMMAND, hardware="2 CPU cores")
    logs = run_steps(tracker, config, short, range(1, 21))
    tracker.stage_finished(short, logs)
    tracker.finish(TrainResult(logs, None, waiting=long))
    assert list(tmp_path.iterdir()) == []
    assert read_run_ids(config.run.dir) is None
    assert tracker.ui_hint() == ""
