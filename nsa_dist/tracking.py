"""MLflow tracking: one parent run per run directory (the curriculum), one child run per stage.

`MLflowTracker` is a TrainingHooks given to rank 0. Every MLflow call runs in one background thread fed
by a bounded queue, so training never waits for the store. The store is `tracking.tracking_uri`, else
$MLFLOW_TRACKING_URI, else a sqlite file `<run.dir>/mlflow.db` (artifacts in `<run.dir>/mlartifacts`).

What a run directory's runs hold:
- the parent: tags for the git commit, every stage's layout, the hardware and the command; the resolved
  config flattened as params (`model.hidden_size`, `stages.0.seq_len`, ...); `config.yaml`; at the end
  of each job `loss.png`, the whole curriculum's loss with its stage boundaries; `checkpoint.latest`;
- a child per stage (tag mlflow.parentRunId): the resolved stage as params; per step the loss, lr,
  grad_norm, tokens_per_s, step_time_s, memory_gb and `comm/<collective>/bytes|exposed_s`; MLflow's
  system metrics (`system/...`) while the stage trains; checkpoint paths as tags (`checkpoint.latest`,
  `checkpoint.step_<8 digits>`) and each save's seconds (`checkpoint/save_s`, from its complete.json);
  at the stage's end `loss.png`; after an evaluation of one of its checkpoints (nsa_dist/evaluation.py),
  `eval/...` metrics at the checkpoint's step and the report's eval.json and niah.png under
  `eval/step_<8 digits>/`.

The run ids live in `<run.dir>/tracking.json`: a later job on the same run directory (a resumed or
restarted one) continues the same runs. A store that fails (a server down at start or mid-run, a broken
file) gives one warning and tracking is off for the rest of the job; training goes on.
"""

import json
import logging
import os
import queue
import shlex
import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from nsa_dist.checkpoint import MARKER, TrainState, write_json_atomically
from nsa_dist.config import Config, Stage
from nsa_dist.trainer import StepLog, TrainingHooks, TrainResult

log = logging.getLogger(__name__)

RUN_IDS_FILE = "tracking.json"
TRACKING_OFF = "nsa_dist_tracking_off"  # set on the log record of the warning that turns tracking off
QUEUE_SIZE = 10_000  # pending MLflow calls; beyond this new ones are dropped (with one warning)
FINISH_WAIT_S = 30.0  # how long finish() waits for the store to take this job's last calls
# MLflow's HTTP defaults (7 retries with backoff, 120 s per request) take minutes to give up on a dead
# server; one attempt of at most 10 s notices it at once (a refused connection) or within 10 s (a hung
# one). No retries also keeps urllib3 from logging a warning per retry. Values already set win.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MAX_PER_BATCH = 100  # MLflow's limit on params (and on tags) in one log_batch
MAX_TAG_LENGTH = 5000  # MLflow truncates longer tag values itself, with a warning of its own


def tracking_uri(config: Config) -> str:
    """The MLflow store of config's run: tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else a sqlite
    file in run.dir (an absolute path, so the store does not depend on the working directory)."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(config.run.dir).resolve() / 'mlflow.db'}"


def read_run_ids(run_dir: str | Path) -> dict | None:
    """The MLflow runs of a run directory as its tracking.json records them: {"tracking_uri",
    "experiment_id", "parent": run id, "stages": {stage name: run id}}; None before its first tracked
    job. Raises ValueError when the file is unreadable."""
    path = Path(run_dir) / RUN_IDS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not the JSON file nsa-dist writes ({exc}): delete it, and the next job "
                         "starts new MLflow runs for this run directory") from exc


class MLflowTracker(TrainingHooks):
    """Logs one job of a run directory to MLflow; every call returns at once (see the module docstring).

    The launcher creates it on rank 0 before train() and calls finish() after train() returns or raises."""

    def __init__(self, config: Config, *, command: str, hardware: str):
        self.config = config
        self.command = command
        self.hardware = hardware
        self.enabled = config.tracking.enabled
        self.run_dir = Path(config.run.dir)
        self.stages = config.resolved_stages()
        self._finished = False
        # the job's start, taken here on the training thread: the background thread may create the parent
        # run seconds later (a new sqlite store migrates its schema first), while the first steps already run
        self._started_ms = int(time.time() * 1000)
        if not self.enabled:
            return
        self.uri = tracking_uri(config)
        for name, value in HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
        # The monitor logs a warning or error on each failed call and chats at info level at every stage's
        # start and end; a failing store is reported once, by this module.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        self._off = False  # set by the background thread when the store fails; the hooks then queue nothing
        self._warned_full = False
        self._warned_params = False
        self._client: MlflowClient | None = None
        self._ids: dict | None = None
        self._monitor: SystemMetricsMonitor | None = None
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._submit("opening the runs", self._open)

    # ------------------------------------------------------------------------ the hooks (training thread)

    def stage_started(self, stage: Stage, state: TrainState, source: str) -> None:
        self._submit(f"starting stage {stage.name!r}", self._start_stage, stage, int(time.time() * 1000))

    def step(self, log: StepLog) -> None:
        self._submit(f"logging step {log.step}", self._log_step, log, int(time.time() * 1000))

    def checkpoint_saved(self, path: Path, state: TrainState) -> None:
        self._submit(f"tagging checkpoint {path}", self._tag_checkpoint, Path(path).resolve(), state)

    def stage_finished(self, stage: Stage, logs: list[StepLog]) -> None:
        self._submit(f"finishing stage {stage.name!r}", self._finish_stage, stage, list(logs))

    def evaluated(self, stage: Stage, report: dict) -> None:
        self._submit(f"logging the evaluation of stage {stage.name!r}", self._log_evaluation, stage.name, report)

    def finish(self, result: TrainResult | None, error: str | None = None) -> None:
        """Ends this job's part of the runs, waiting at most FINISH_WAIT_S for the store; call it once,
        after train() returns (`result`) or raises (`error`: the exception as text).

        Statuses: FAILED with an `error` tag when error is given; FINISHED when every stage of the
        curriculum is done; SCHEDULED with a `waiting` tag when result.waiting names a stage that needs
        more processes; KILLED when neither result nor error is given (the job was stopped). Otherwise
        (train() stopped early for a later worker group of this job) the parent stays RUNNING."""
        if not self.enabled or self._finished:
            return
        self._finished = True
        deadline = time.monotonic() + FINISH_WAIT_S
        try:
            self._queue.put(("finishing the runs", self._finish, (result, error)), timeout=FINISH_WAIT_S)
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("MLflow did not take this job's last calls within %.0f s (store %s): its runs may lack "
                        "the last steps, plots and statuses", FINISH_WAIT_S, self.uri)

    def ui_hint(self) -> str:
        """What opens this run in the MLflow UI: `nsa-dist ui <run.dir>` for a local store, the parent
        run's page on a tracking server; "" when tracking is disabled or no run was recorded."""
        if not self.enabled or self._ids is None:
            return ""
        if self.uri.startswith(("http://", "https://")):
            ids = self._ids
            return f"{self.uri.rstrip('/')}/#/experiments/{ids['experiment_id']}/runs/{ids['parent']}"
        return f"nsa-dist ui {shlex.quote(self.config.run.dir)}"

    def _submit(self, what: str, task, *args) -> None:
        if not self.enabled or self._off or self._finished:
            return
        try:
            self._queue.put_nowait((what, task, args))
        except queue.Full:
            if not self._warned_full:
                self._warned_full = True
                log.warning("MLflow (%s) is %d calls behind: this job's further steps, checkpoints and stage "
                            "ends are not logged until it catches up; training goes on", self.uri, QUEUE_SIZE)

    # ------------------------------------------------------------------------ the background thread

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            what, task, args = item
            if self._off:
                continue
            try:
                task(*args)
            except Exception as exc:  # whatever the store raises, training must go on
                self._turn_off(what, exc)

    def _turn_off(self, what: str, exc: Exception) -> None:
        self._off = True
        cause = " ".join(str(exc).split())[:400]
        log.warning("MLflow tracking is off for the rest of this job: %s failed on the store %s (%s: %s). "
                    "Training goes on; check that the store is reachable (tracking.tracking_uri or "
                    "MLFLOW_TRACKING_URI), or set tracking.enabled=false",
                    what, self.uri, type(exc).__name__, cause, extra={TRACKING_OFF: True})
        self._stop_monitor()  # its own failures on the store it logs (silenced above), never raises

    def _open(self) -> None:
        """Continues the parent run recorded in tracking.json, or starts one; tags, params, config.yaml."""
        self.run_dir.mkdir(parents=True, exist_ok=True)  # tracking.json, and the default sqlite store
        self._client = MlflowClient(self.uri)
        ids = read_run_ids(self.run_dir)
        parent = self._existing_run(ids["parent"]) if ids else None
        if ids and parent is None:
            log.warning("%s names MLflow run %s, which the store %s does not hold (or holds deleted): "
                        "starting new runs there", self.run_dir / RUN_IDS_FILE, ids["parent"], self.uri)
        if parent is None:
            experiment_id = self._experiment_id()
            parent = self._client.create_run(experiment_id, start_time=self._started_ms,
                                             run_name=self.run_dir.resolve().name)
            self._ids = {"tracking_uri": self.uri, "experiment_id": experiment_id, "parent": parent.info.run_id,
                         "stages": {}}
        else:
            self._ids = {**ids, "tracking_uri": self.uri}  # the sqlite path moves with a moved run.dir
            self._reopen(parent, stale_tags=("error", "waiting"))
        self._save_ids()
        parent_id = self._ids["parent"]
        layout = "; ".join(f"{stage.name}: {stage.layout()}" for stage in self.stages)
        self._client.log_batch(parent_id, tags=[
            RunTag("mlflow.source.git.commit", _git_commit()), RunTag("layout", layout),
            RunTag("hardware", self.hardware), RunTag("command", self.command)])
        self._log_new_params(parent, _flatten(self.config.to_dict()))
        self._client.log_text(parent_id, yaml.safe_dump(self.config.to_dict(), sort_keys=False), "config.yaml")

    def _start_stage(self, stage: Stage, started_ms: int) -> None:
        """Continues the stage's child run or starts one (started at started_ms, when the training thread began
        the stage); its params; system metrics until it ends."""
        self._stop_monitor()
        run_id = self._ids["stages"].get(stage.name)
        run = self._existing_run(run_id) if run_id else None
        if run is None:
            run = self._client.create_run(self._ids["experiment_id"], start_time=started_ms, run_name=stage.name,
                                          tags={"mlflow.parentRunId": self._ids["parent"]})
            self._ids["stages"][stage.name] = run.info.run_id
            self._save_ids()
        else:
            self._reopen(run, stale_tags=("error",))
        self._log_new_params(run, {**_flatten(asdict(stage)), "layout": stage.layout()})
        # resume_logging: a continued run's system metrics go on from its last system step
        self._monitor = SystemMetricsMonitor(run.info.run_id, resume_logging=True, tracking_uri=self.uri)
        self._monitor.start()

    def _log_step(self, step_log: StepLog, timestamp_ms: int) -> None:
        values = {"loss": step_log.loss, "lr": step_log.lr, "grad_norm": step_log.grad_norm,
                  "tokens_per_s": step_log.tokens_per_s, "step_time_s": step_log.step_time_s,
                  "memory_gb": step_log.memory_gb}
        if step_log.answer_loss is not None:
            values["answer_loss"] = step_log.answer_loss
        if step_log.selection_loss is not None:
            values["selection_loss"] = step_log.selection_loss
        if step_log.indexer_loss is not None:
            values["indexer_loss"] = step_log.indexer_loss
        if step_log.indexer_recall is not None:
            values["indexer_recall"] = step_log.indexer_recall
        for name, comm in step_log.comm.items():
            values[f"comm/{name}/bytes"] = comm["bytes"]
            values[f"comm/{name}/exposed_s"] = comm["exposed_s"]
        metrics = [Metric(key, float(value), timestamp_ms, step_log.step) for key, value in values.items()]
        self._client.log_batch(self._ids["stages"][step_log.stage], metrics=metrics)

    def _tag_checkpoint(self, path: Path, state: TrainState) -> None:
        marker = path / MARKER
        seconds = json.loads(marker.read_text()).get("save_seconds") if marker.exists() else None
        metrics = [] if seconds is None else [Metric("checkpoint/save_s", float(seconds), int(time.time() * 1000),
                                                     state.step)]
        self._client.log_batch(self._ids["stages"][state.stage], metrics=metrics, tags=[
            RunTag("checkpoint.latest", str(path)), RunTag(f"checkpoint.{path.name}", str(path))])
        self._client.set_tag(self._ids["parent"], "checkpoint.latest", str(path))

    def _log_evaluation(self, stage_name: str, report: dict) -> None:
        log_evaluation(self._client, self._ids["stages"][stage_name], report)

    def _finish_stage(self, stage: Stage, logs: list[StepLog]) -> None:
        self._stop_monitor()
        run_id = self._ids["stages"][stage.name]
        self._log_loss_plot(run_id, [(stage, self._loss_history(run_id, logs))])
        self._client.set_terminated(run_id, "FINISHED")

    def _finish(self, result: TrainResult | None, error: str | None) -> None:
        self._stop_monitor()
        # A child still running is the stage this job was in when it failed or was stopped, or (a job
        # without error) one whose end an earlier job did not get to record: it ends as the job does.
        ended = "FAILED" if error is not None else "KILLED" if result is None else "FINISHED"
        finished = set()
        for name, run_id in self._ids["stages"].items():
            status = self._client.get_run(run_id).info.status
            if status == "RUNNING":
                if error is not None:
                    self._client.set_tag(run_id, "error", error[:MAX_TAG_LENGTH])
                self._client.set_terminated(run_id, ended)
                status = ended
            if status == "FINISHED":
                finished.add(name)
        history = result.history if result is not None else []
        curves = [(stage, self._loss_history(self._ids["stages"][stage.name],
                                             [s for s in history if s.stage == stage.name]))
                  for stage in self.stages if stage.name in self._ids["stages"]]
        parent_id = self._ids["parent"]
        if curves:
            self._log_loss_plot(parent_id, curves)
        if error is not None:
            self._client.set_tag(parent_id, "error", error[:MAX_TAG_LENGTH])
            self._client.set_terminated(parent_id, "FAILED")
        elif result is None:
            self._client.set_terminated(parent_id, "KILLED")
        elif finished >= {stage.name for stage in self.stages}:
            self._client.set_terminated(parent_id, "FINISHED")
        elif result.waiting is not None:
            waiting = result.waiting
            self._client.set_tag(parent_id, "waiting",
                                 f"stage {waiting.name!r} ({waiting.layout()}) needs {waiting.model_parallel} "
                                 "processes, more than this job had: start a job with at least that many to "
                                 "continue")
            self._client.update_run(parent_id, status="SCHEDULED")
        # else train() stopped at a launcher's last_stage: a later worker group of this job goes on with
        # the parent, which stays RUNNING

    # ------------------------------------------------------------------------ helpers (background thread)

    def _existing_run(self, run_id: str):
        """The run, or None when the store does not hold it (or holds it deleted)."""
        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return None if run.info.lifecycle_stage == "deleted" else run

    def _experiment_id(self) -> str:
        name = self.config.tracking.experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            artifacts = (_sqlite_file(self.uri).parent / "mlartifacts").as_uri() \
                if self.uri.startswith("sqlite:///") else None  # else the store's default
            try:
                return self._client.create_experiment(name, artifact_location=artifacts)
            except MlflowException as exc:  # another job created it meanwhile
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self._client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise RuntimeError(f"experiment {name!r} is deleted in the store: restore it (mlflow experiments "
                               f"restore --experiment-id {experiment.experiment_id}) or set tracking.experiment")
        return experiment.experiment_id

    def _reopen(self, run, stale_tags: tuple[str, ...]) -> None:
        """A continued run is running again; tags describing how an earlier job ended no longer hold."""
        self._client.update_run(run.info.run_id, status="RUNNING")
        for tag in stale_tags:
            if tag in run.data.tags:
                self._client.delete_tag(run.info.run_id, tag)

    def _log_new_params(self, run, params: dict[str, str]) -> None:
        """Logs the params the run does not hold yet; MLflow params cannot change, so a value that differs
        from the one an earlier job logged is kept and reported (once per job)."""
        logged = run.data.params
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        for start in range(0, len(new), MAX_PER_BATCH):
            self._client.log_batch(run.info.run_id, params=new[start:start + MAX_PER_BATCH])
        changed = [f"{key}={logged[key]} (this job: {value})" for key, value in params.items()
                   if key in logged and logged[key] != value]
        if changed and not self._warned_params:
            self._warned_params = True
            log.warning("MLflow run %s keeps the params an earlier job logged, and this job's config differs: "
                        "%s. Use a new run.dir to record this config as runs of its own",
                        run.info.run_id, "; ".join(changed))

    def _loss_history(self, run_id: str, this_job: list[StepLog]) -> dict[int, float]:
        """{step: loss} of a child run: what the store holds (earlier jobs' steps included) and this job's
        steps (which the store may lack, if the queue dropped them). A job restarted from a checkpoint logs
        the steps after it again: the newest value of a step wins."""
        stored = sorted(self._client.get_metric_history(run_id, "loss"), key=lambda metric: metric.timestamp)
        losses = {metric.step: metric.value for metric in stored}
        losses.update({step_log.step: step_log.loss for step_log in this_job})
        return dict(sorted(losses.items()))

    def _log_loss_plot(self, run_id: str, curves: list[tuple[Stage, dict[int, float]]]) -> None:
        """`loss.png` in the run: each stage's loss by global step, dashed lines at stage boundaries."""
        steps = [step for _, losses in curves for step in losses]
        if not steps:
            return
        names = ", ".join(stage.name for stage, _ in curves)
        title = f"loss of {names}, steps {min(steps)}-{max(steps)}"
        figure = Figure(figsize=(8, 4.5), layout="tight")  # no pyplot: Agg renders the PNG, no GUI involved
        axes = figure.add_subplot()
        for stage, losses in curves:
            axes.plot(list(losses), list(losses.values()), marker=".",
                      label=f"{stage.name}: {stage.seq_len} tokens, {stage.layout()}")
        for stage, _ in curves[1:]:
            axes.axvline(stage.first_step + 0.5, color="grey", linestyle="--", linewidth=1)
        axes.set(xlabel="step", ylabel="loss", title=title)
        axes.grid(alpha=0.3)
        axes.legend()
        # the title also goes into the PNG's metadata, where a test (or a script) can read the steps covered
        self._client.log_figure(run_id, figure, "loss.png", save_kwargs={"metadata": {"Title": title}})

    def _stop_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()

    def _save_ids(self) -> None:
        write_json_atomically(self.run_dir / RUN_IDS_FILE, self._ids)


def train_tracked(config: Config, hooks: list, *, command: str, hardware: str,
                  last_stage: str | None = None) -> tuple[TrainResult, str]:
    """Rank 0's train(): with an MLflowTracker among the hooks when tracking is enabled, whose runs end as
    the training ends (FAILED, with the error, if it raises). Returns the result and the command that
    opens the run in the MLflow UI ("" without tracking)."""
    from nsa_dist.trainer import train

    if not config.tracking.enabled:
        return train(config, hooks, last_stage=last_stage), ""
    tracker = MLflowTracker(config, command=command, hardware=hardware)
    try:
        result = train(config, [*hooks, tracker], last_stage=last_stage)
    except BaseException as exc:
        tracker.finish(None, error=f"{type(exc).__name__}: {exc}")
        raise
    tracker.finish(result)
    return result, tracker.ui_hint()


def log_evaluation(client: MlflowClient, run_id: str, report: dict) -> None:
    """An evaluation report (nsa_dist/evaluation.py) into run_id: eval/val_loss, eval/val_perplexity,
    eval/niah_accuracy, eval/niah_answer_prefix (where the report has it), eval/niah/len<L>_depth<d> and,
    for an NSA model, eval/gate/layer<i>_<branch> (each layer's mean gate per branch) at the checkpoint's
    step; eval/loss_by_position with
    each bucket's first position as its step (a curve over positions); its files as artifacts."""
    step, now = report["step"], int(time.time() * 1000)
    niah = report["niah"]
    values = {"eval/val_loss": report["validation"]["loss"], "eval/val_perplexity": report["validation"]["perplexity"],
              "eval/niah_accuracy": niah["mean_accuracy"]}
    if "mean_answer_prefix" in niah:  # reports written before it was added lack it
        values["eval/niah_answer_prefix"] = niah["mean_answer_prefix"]
    for row, depth in enumerate(niah["depths"]):
        for column, length in enumerate(niah["lengths"]):
            values[f"eval/niah/len{length}_depth{depth:g}"] = niah["accuracy"][row][column]
    gates = report.get("gates")  # NSA models only
    if gates:
        for layer, means in enumerate(gates["mean_by_layer"], start=1):
            values.update({f"eval/gate/layer{layer}_{branch}": mean for branch, mean in zip(gates["branches"], means)})
    metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
    buckets = report["loss_by_position"]
    metrics += [Metric("eval/loss_by_position", float(loss), now, start)
                for start, loss in zip(buckets["starts"], buckets["loss"])]
    client.log_batch(run_id, metrics=metrics)
    for file in report["files"]:
        client.log_artifact(run_id, file, f"eval/step_{step:08d}")


def log_evaluation_to_run(run_dir: str | Path, stage_name: str, report: dict) -> str:
    """For an evaluation outside training (`nsa-dist eval`): logs the report into the stage's MLflow run
    of the run directory; returns that run's id, or "" when the run directory was not tracked. A store
    that fails gives a warning, never an error."""
    ids = read_run_ids(run_dir)
    if ids is None:
        return ""
    run_id = ids.get("stages", {}).get(stage_name, ids["parent"])
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    try:
        log_evaluation(MlflowClient(ids["tracking_uri"]), run_id, report)
    except Exception as exc:  # the evaluation's files are written whatever the store does
        log.warning("the evaluation was not logged to MLflow run %s (store %s): %s: %s", run_id,
                    ids["tracking_uri"], type(exc).__name__, " ".join(str(exc).split())[:300])
        return ""
    return run_id


def _sqlite_file(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///")).resolve()


def _flatten(tree, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists as {"a.b": "value", "stages.0.seq_len": "256"}: MLflow params are strings."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    flat = {}
    for key, value in items:
        if isinstance(value, (dict, list)):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _git_commit() -> str:
    """HEAD of the repository this code runs from, or "unknown" (e.g. a copy without .git, as Ray ships a
    job's working directory)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
