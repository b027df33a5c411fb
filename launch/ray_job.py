"""`nsa-dist train` on Ray: one worker per GPU (or CPU slot), supervised, restarted from the newest
checkpoint when one dies.

Ray Train's `TorchTrainer` places the workers (a placement group with one bundle per worker, ranks
ordered by node so tensor-parallel groups stay inside a node), starts torch.distributed among them
(NCCL on GPUs, gloo on CPUs) and, with `FailureConfig(max_failures)`, restarts the whole group when a
worker dies. Each worker runs `nsa_dist.trainer.train`, which resumes from the run directory's newest
complete checkpoint, so a restart continues where the last checkpoint left off; Ray's own checkpoint
tracking is not used. The curriculum's stages are grouped by the number of workers each can use (the
largest that its TP x PP x CP and its batch divide): each group is one TorchTrainer run, one after the
other, in this job.

Rank 0 forwards what the trainer reports (stages, steps, saved checkpoints) and the warnings of
nsa-dist's loggers through a Ray queue to this driver, which prints them; workers' own output stays in
Ray's log files, so the console shows one clean progress view. Rank 0 also logs to MLflow; when its
store fails, tracking is off for the rest of the job, the later worker groups included.
"""

import dataclasses
import logging
import os
import socket
import threading
from dataclasses import dataclass

import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Empty, Queue

from launch.console import ConsoleReporter, ForwardHooks, deliver
from nsa_dist.config import Config, ConfigError, Stage
from nsa_dist.tracking import TRACKING_OFF

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The job cannot start or run on Ray; the message says what to do."""


def connect(address: str | None) -> bool:
    """Joins the Ray cluster at `address` (or $RAY_ADDRESS), or starts a local Ray with its dashboard off
    (on 127.0.0.1: see launch/cli.py). Returns whether a local Ray was started (and should be shut down)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        return True
    if not address.startswith("ray://") and ":" in address:
        host, port = address.rsplit(":", 1)
        try:  # ray.init waits minutes for an unreachable head; a plain connect says so in seconds
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as exc:
            raise LaunchError(f"cannot reach the Ray cluster at --address {address} ({exc}): check the head's "
                              "address (HOST:6379) and that `ray start --head` runs there") from exc
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LaunchError(f"cannot join the Ray cluster at {address}: {exc}") from exc
    return False


@dataclass
class WorkerGroup:
    workers: int
    stages: list[Stage]


def worker_groups(stages: list[Stage], slots: int, unit: str) -> list[WorkerGroup]:
    """Consecutive stages that use the same number of workers: for each stage the largest number <= slots
    that its TP x PP x CP divides and whose data parallelism divides its batch."""
    groups: list[WorkerGroup] = []
    for stage in stages:
        fitting = [n for n in range(slots, 0, -1) if n % stage.model_parallel == 0
                   and stage.global_batch_size % (stage.micro_batch_size * (n // stage.model_parallel)) == 0]
        if not fitting:
            raise ConfigError(f"stage {stage.name!r} ({stage.layout()}) needs {stage.model_parallel} workers and the "
                              f"Ray cluster has {slots} {unit}: add {unit} or lower the stage's parallel sizes")
        if groups and groups[-1].workers == fitting[0]:
            groups[-1].stages.append(stage)
        else:
            groups.append(WorkerGroup(fitting[0], [stage]))
    return groups


def cluster_slots(config: Config) -> tuple[int, bool]:
    """Workers the cluster can hold: its GPUs, or its CPUs when it has none (or training.device is cpu)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 and config.training.device != "cpu"
    if config.training.device == "cuda" and not gpus:
        raise ConfigError("training.device='cuda' but the Ray cluster has no GPUs: use cpu or auto")
    return (gpus if use_gpu else int(resources.get("CPU", 0))), use_gpu


class _ForwardLogs(logging.Handler):
    """Sends nsa-dist's warnings (e.g. a tracking server that went away) from a worker to the driver."""

    def __init__(self, send):
        super().__init__(logging.WARNING)
        self.send = send

    def emit(self, record):
        self.send(("log", (f"(rank {os.environ.get('RANK', '?')}) {record.getMessage()}",)))
        if getattr(record, TRACKING_OFF, False):
            self.send(("tracking_off", ()))


def _worker_main(job: dict) -> None:
    """One Ray Train worker: the trainer for this group's stages; rank 0 reports and tracks."""
    from nsa_dist.tracking import train_tracked
    from nsa_dist.trainer import train

    config, events = job["config"], job["events"]
    rank = ray.train.get_context().get_world_rank()
    logging.getLogger("nsa_dist").addHandler(_ForwardLogs(events.put))
    events.put(("placement", (rank, ray.get_runtime_context().get_node_id())))
    if rank != 0:
        train(config, last_stage=job["last_stage"])
        return
    _, ui_hint = train_tracked(config, [ForwardHooks(events.put)], command=job["command"],
                               hardware=job["hardware"], last_stage=job["last_stage"])
    if ui_hint:
        events.put(("tracking", (ui_hint,)))


class _Driver:
    """Prints what the workers send while a group trains."""

    def __init__(self, reporter: ConsoleReporter):
        self.reporter = reporter
        self.placement: dict[int, str] = {}  # rank -> Ray node id
        self.ui_hint = None
        self.tracking_off = False  # the store failed: later worker groups do not track

    def handle(self, event: tuple) -> None:
        name, args = event
        if name == "placement":
            rank, node_id = args
            self.placement[rank] = node_id
        elif name == "log":
            self.reporter.console.print(f"[yellow]warning[/yellow] {args[0]}")
        elif name == "tracking":
            self.ui_hint = args[0]
        elif name == "tracking_off":
            self.tracking_off = True
        else:
            deliver(event, self.reporter)

    def pump(self, queue: Queue, done: threading.Event) -> None:
        while not (done.is_set() and queue.empty()):
            try:
                self.handle(queue.get(timeout=0.2))
            except Empty:
                continue


def run(config: Config, groups: list[WorkerGroup], use_gpu: bool, *, command: str, max_failures: int,
        reporter: ConsoleReporter) -> _Driver:
    """Trains each worker group in turn; raises LaunchError when a group fails past max_failures."""
    driver = _Driver(reporter)
    hardware = _describe_cluster(use_gpu)
    events = Queue(actor_options={"num_cpus": 0})
    for index, group in enumerate(groups):
        reporter.console.print(f"worker group {index + 1}/{len(groups)}: {group.workers} workers for stage(s) "
                               f"{', '.join(stage.name for stage in group.stages)}")
        if driver.tracking_off and config.tracking.enabled:  # one warning a job, not one a group
            config = dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, enabled=False))
        trainer = TorchTrainer(
            _worker_main,
            train_loop_config={"config": config, "events": events, "last_stage": group.stages[-1].name,
                               "command": command, "hardware": hardware},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=group.workers, use_gpu=use_gpu,
                                         resources_per_worker={"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}),
            run_config=RunConfig(name=f"group{index}-{group.stages[0].name}",
                                 storage_path=os.path.abspath(os.path.join(config.run.dir, "ray")),
                                 failure_config=FailureConfig(max_failures=max_failures)))
        done = threading.Event()
        pump = threading.Thread(target=driver.pump, args=(events, done), daemon=True)
        pump.start()
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray Train raises its own errors with the workers' tracebacks inside
            raise LaunchError(f"worker group {index + 1} failed after {max_failures} restarts: {exc}") from exc
        finally:
            done.set()
            pump.join()
        if getattr(result, "error", None) is not None:
            raise LaunchError(f"worker group {index + 1} failed after {max_failures} restarts: {result.error}")
        address = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        reporter.console.print(f"  ranks ran on {len(set(driver.placement.values()))} node(s): " + ", ".join(
            f"rank {rank} on {address.get(node_id, '?')} (node {node_id[:8]})"
            for rank, node_id in sorted(driver.placement.items())))
        driver.placement.clear()
    return driver


def _describe_cluster(use_gpu: bool) -> str:
    resources = ray.cluster_resources()
    nodes = len([node for node in ray.nodes() if node.get("Alive")])
    kind = f"{int(resources.get('GPU', 0))} GPUs" if use_gpu else f"{int(resources.get('CPU', 0))} CPUs"
    name = f" ({torch.cuda.get_device_name()})" if use_gpu and torch.cuda.is_available() else ""
    return f"Ray cluster: {nodes} node(s), {kind}{name}"
