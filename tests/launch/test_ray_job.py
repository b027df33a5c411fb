"""`nsa-dist train` on real Ray clusters started by the tests, tracked in a real MLflow store.

- the quickstart's two stages on a local Ray leave one parent and two child runs in the run's sqlite
  store, with params, a decreasing loss, the loss-curve PNGs and the config YAML;
- a worker SIGKILLed mid-stage: the group restarts from the newest checkpoint and the job finishes
  with the uninterrupted run's per-step losses, bit for bit, in the same MLflow runs;
- a two-node cluster (ray.cluster_utils) runs a CP=2 job with one worker on each node;
- stages of different sizes run as successive worker groups, and a tracking server that is down costs
  the job one warning.
"""

import contextlib
import io
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from launch.cli import main

# the quickstart, shortened: 8 steps at 256 tokens (CP=1, DP=2), then 4 at 512 (CP=2)
QUICK = ["--set", "stages.0.steps=8", "--set", "stages.1.steps=4", "--set", "training.warmup_steps=2",
         "--set", "checkpoint.interval=2"]


QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs/quickstart.yaml")


def train(run_dir, *args: str) -> int:
    return main(["train", QUICKSTART, "--set", f"run.dir={run_dir}", *QUICK, *args])


def mlflow_runs(run_dir: Path) -> tuple:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = {run.data.tags["mlflow.runName"]: run for run in runs if "mlflow.parentRunId" in run.data.tags}
    return client, parents, children


def losses_by_step(client, children: dict) -> dict:
    return {metric.step: metric.value for run in children.values()
            for metric in client.get_metric_history(run.info.run_id, "loss")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The shortened quickstart on a local Ray, with a relative run.dir; returns its directory and output."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    printed = io.StringIO()
    with pytest.MonkeyPatch().context() as patch, contextlib.redirect_stdout(printed):
        patch.chdir(run_dir.parent)  # a relative run.dir is resolved where nsa-dist runs, not in Ray's workers
        assert train(Path("run")) == 0
    return run_dir, printed.getvalue()


@pytest.mark.timeout(300)
def test_quickstart_on_local_ray_is_recorded_in_mlflow(reference, capsys):
    run_dir, printed = reference
    assert "rank 0 on 127.0.0.1" in printed and "rank 1 on 127.0.0.1" in printed  # the local Ray: loopback only
    assert f"all stages done; newest checkpoint: {run_dir}/checkpoints/step_00000012" in printed
    client, parents, children = mlflow_runs(run_dir)
    assert len(parents) == 1 and set(children) == {"short", "long"}
    parent = parents[0]
    assert parent.data.params["model.hidden_size"] == "128" and parent.data.params["stages.1.context_parallel"] == "2"
    assert all(child.data.tags["mlflow.parentRunId"] == parent.info.run_id for child in children.values())
    losses = losses_by_step(client, children)
    assert sorted(losses) == list(range(1, 13))
    assert sum(losses[s] for s in (10, 11, 12)) / 3 < sum(losses[s] for s in (1, 2, 3)) / 3 - 0.3
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert any(path.endswith(".yaml") for path in artifacts) and any(path.endswith(".png") for path in artifacts)
    for child in children.values():
        assert any(a.path.endswith(".png") for a in client.list_artifacts(child.info.run_id))
    assert main(["status", str(run_dir)]) == 0
    status = capsys.readouterr().out
    assert "stages: short (done), long (done)" in status and "(step 12)" in status
    assert f"parent {parent.info.run_id}, short {children['short'].info.run_id}" in status


def _kill_a_worker_once_step_4_is_saved(run_dir: Path, killed: list) -> None:
    marker = run_dir / "checkpoints" / "step_00000004" / "complete.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            process.kill()
            killed.append(process.info["pid"])
            return


@pytest.mark.timeout(420)
def test_a_killed_worker_restarts_the_group_and_the_losses_are_unchanged(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    killed = []
    killer = threading.Thread(target=_kill_a_worker_once_step_4_is_saved, args=(run_dir, killed), daemon=True)
    killer.start()
    assert train(run_dir) == 0
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    client, parents, children = mlflow_runs(run_dir)
    assert len(parents) == 1 and set(children) == {"short", "long"}  # the restarted group continued the runs
    reference_client, _, reference_children = mlflow_runs(reference[0])
    assert losses_by_step(client, children) == losses_by_step(reference_client, reference_children)
    assert "all stages done" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_a_two_node_cluster_runs_one_cp_rank_on_each_node(tmp_path, capsys):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        assert main(["train", "configs/quickstart.yaml", "--address", cluster.address, "--set", f"run.dir={tmp_path}",
                     "--set", "stages=[{name: cp2, seq_len: 256, steps: 2, context_parallel: 2}]",
                     "--set", "training.global_batch_size=1", "--set", "training.warmup_steps=1",
                     "--set", "tracking.enabled=false"]) == 0
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    printed = capsys.readouterr().out.replace("\n", " ")
    assert "worker group 1/1: 2 workers for stage(s) cp2" in printed
    assert "ranks ran on 2 node(s)" in printed


@pytest.mark.timeout(300)
def test_stages_of_different_sizes_run_as_successive_worker_groups_and_a_down_tracking_server_costs_one_warning(
        tmp_path, capsys):
    """Stage a's single sequence per step fits one worker; stage b (CP=2) needs two: two TorchTrainer runs,
    the second starting from the first's final checkpoint. The job's tracking server is down (nothing
    listens on its port): both groups train, and the job prints one warning, not one per group or step.
    (One job tests both, since each Ray job here costs about a minute of CI.)"""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stages = ("stages=[{name: a, seq_len: 256, steps: 2, context_parallel: 1, global_batch_size: 1}, "
              "{name: b, seq_len: 256, steps: 2, context_parallel: 2, global_batch_size: 1}]")
    assert main(["train", QUICKSTART, "--set", f"run.dir={tmp_path}", "--set", stages, "--set",
                 "training.warmup_steps=1", "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("warning") == 1, printed
    printed = printed.replace("\n", " ")
    assert "worker group 1/2: 1 workers for stage(s) a" in printed
    assert "worker group 2/2: 2 workers for stage(s) b" in printed
    assert f"from {tmp_path}/checkpoints/step_00000002" in printed
    assert f"all stages done; newest checkpoint: {tmp_path}/checkpoints/step_00000004" in printed


def test_worker_groups_take_the_most_workers_each_stage_divides():
    from launch.ray_job import worker_groups
    from nsa_dist.config import ConfigError, load_config

    config = load_config(QUICKSTART, ["training.warmup_steps=0",
        "stages=[{name: a, seq_len: 256, steps: 1, context_parallel: 1, global_batch_size: 6}, "
        "{name: b, seq_len: 256, steps: 1, context_parallel: 1, global_batch_size: 4}, "
        "{name: c, seq_len: 512, steps: 1, context_parallel: 2, global_batch_size: 2}, "
        "{name: d, seq_len: 512, steps: 1, context_parallel: 4, global_batch_size: 1}]"])
    groups = worker_groups(config.resolved_stages(), 8, "GPUs")
    assert [(group.workers, [stage.name for stage in group.stages]) for group in groups] == [
        (6, ["a"]), (4, ["b", "c", "d"])]
    with pytest.raises(ConfigError) as error:
        worker_groups(config.resolved_stages(), 2, "GPUs")
    assert "stage 'd' (TP=1 PP=1 CP=4) needs 4 workers and the Ray cluster has 2 GPUs" in str(error.value)
