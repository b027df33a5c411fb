"""What a training job prints: a progress bar per stage (step/steps, loss, tokens/s, ETA), a summary table at
each stage's end, and each saved checkpoint. Without a terminal (CI, `ray job submit`, a log file) it prints
one whole line per logged step instead of redrawing a bar.

`ConsoleReporter` is a TrainingHooks: rank 0 of a torchrun job calls it directly; under Ray, rank 0
forwards its calls through a queue (`ForwardHooks`) and the driver calls it, so the bar is drawn on the
user's terminal rather than in a worker's log.

Lines that mark a job's phases (a stage starting, a checkpoint saved, an evaluation done) begin with the
wall-clock time, so a log shows where a job's time goes besides its steps.
"""

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from nsa_dist.checkpoint import TrainState
from nsa_dist.config import Stage
from nsa_dist.trainer import StepLog, TrainingHooks


def clock() -> str:
    return time.strftime("%H:%M:%S")


class ConsoleReporter(TrainingHooks):
    def __init__(self, console: Console | None = None):
        self.console = console or Console(soft_wrap=True)  # soft_wrap: long lines stay whole in logs
        self.progress: Progress | None = None
        self.task = None
        self.stage_start = 0  # global step before the current stage's first

    def stage_started(self, stage: Stage, state: TrainState, source: str) -> None:
        self.console.print(f"{clock()} [bold]stage {stage.name}[/bold]: {stage.seq_len} tokens x "
                           f"{stage.global_batch_size} sequences per step, {stage.layout()}, RoPE base "
                           f"{stage.rotary_base:g}, steps {state.step + 1}-"
                           f"{state.step + stage.steps - state.stage_step}, from {source}")
        self.stage_start = state.step - state.stage_step
        if self.console.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task(stage.name, total=stage.steps, completed=state.stage_step,
                                               status="")
            self.progress.start()

    def step(self, log: StepLog) -> None:
        answers = f" (answers {log.answer_loss:.3f})" if log.answer_loss is not None else ""
        # the learned indexer: the share of the exact score's free picks it makes too (nsa.indexer_heads)
        recall = f"  indexer recall {log.indexer_recall:.0%}" if log.indexer_recall is not None else ""
        status = f"loss {log.loss:.4f}{answers}{recall}  {log.tokens_per_s:,.0f} tok/s  {log.memory_gb:.2f} GB"
        if self.progress is not None:
            self.progress.update(self.task, completed=log.step - self.stage_start, status=status)
        else:
            self.console.print(f"{log.stage} step {log.step}: {status}  lr {log.lr:.2e}  grad norm "
                               f"{log.grad_norm:.3f}  {log.step_time_s:.2f} s")

    def checkpoint_saved(self, path: Path, state: TrainState) -> None:
        self.console.print(f"{clock()} saved checkpoint {path} (step {state.step}"
                           f"{', end of stage ' + state.stage if state.stage_done else ''})")

    def stage_finished(self, stage: Stage, logs: list[StepLog]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if not logs:
            return
        table = Table(title=f"{clock()} stage {stage.name} ({len(logs)} steps in this job)", title_justify="left")
        columns = ["first loss", "last loss", "mean tokens/s", "mean step s", "peak memory GB"]
        row = [f"{logs[0].loss:.4f}", f"{logs[-1].loss:.4f}",
               f"{sum(log.tokens_per_s for log in logs) / len(logs):,.0f}",
               f"{sum(log.step_time_s for log in logs) / len(logs):.2f}", f"{max(log.memory_gb for log in logs):.2f}"]
        answers = [log.answer_loss for log in logs[-10:] if log.answer_loss is not None]
        if answers:  # the stage mixes in tasks: how well the last steps answered them
            columns.append("answer loss, last 10 steps")
            row.append(f"{sum(answers) / len(answers):.3f}")
        recalls = [log.indexer_recall for log in logs[-10:] if log.indexer_recall is not None]
        if recalls:
            columns.append("indexer recall, last 10 steps")
            row.append(f"{sum(recalls) / len(recalls):.0%}")
        for column in columns:
            table.add_column(column, justify="right")
        table.add_row(*row)
        self.console.print(table)

    def evaluated(self, stage: Stage, report: dict) -> None:
        niah, validation = report["niah"], report["validation"]
        self.console.print(f"{clock()} evaluated {report['checkpoint']} ({stage.name}): validation loss "
                           f"{validation['loss']:.4f}, {niah['task']} exact match {niah['mean_accuracy']:.0%} "
                           f"(answer prefix {niah['mean_answer_prefix']:.0%}) over lengths {niah['lengths']} x depths "
                           f"{niah['depths']}{_eval_seconds(report)}; {', '.join(report['files'])}")


def _eval_seconds(report: dict) -> str:
    """The evaluation's wall time for its console line, e.g. ', in 19.0 s (model 2.1, NIAH 14.2, validation
    2.7)'; empty for a report written before the times were kept."""
    seconds = report.get("seconds")
    if not seconds:
        return ""
    parts = ", ".join(f"{'NIAH' if name == 'niah' else name} {value:.1f}" for name, value in seconds.items())
    return f", in {sum(seconds.values()):.1f} s ({parts})"


class ForwardHooks(TrainingHooks):
    """Sends every hook call, with its arguments, to `send` (under Ray: a queue the driver reads)."""

    def __init__(self, send):
        self.send = send

    def stage_started(self, stage, state, source):
        self.send(("stage_started", (stage, state, source)))

    def step(self, log):
        self.send(("step", (log,)))

    def checkpoint_saved(self, path, state):
        self.send(("checkpoint_saved", (path, state)))

    def stage_finished(self, stage, logs):
        self.send(("stage_finished", (stage, logs)))

    def evaluated(self, stage, report):
        self.send(("evaluated", (stage, report)))


def deliver(event: tuple, hooks: TrainingHooks) -> None:
    """Calls on `hooks` what a ForwardHooks sent."""
    name, args = event
    getattr(hooks, name)(*args)
