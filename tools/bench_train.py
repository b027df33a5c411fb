"""Training speed and peak memory of the GPT with NSA against the dense-attention baseline, in one run.

Trains the same model (default: configs/paper.yaml's 12 layers, hidden 1024, 16 query heads per KV head)
with model.attention=nsa and =dense on one process, at one sequence length in bf16 with per-layer
recomputation, and reports tokens/s (median of the steps after the first, which warms up) and peak memory.

    python tools/bench_train.py --seq-len 65536 --steps 3
    python tools/bench_train.py --set model.num_layers=2 --seq-len 512 --steps 2 --set training.dtype=fp32

Writes benchmarks/train_<seq_len>.json and prints a table last. With --profile, torch.profiler records
steps 2 and 3 of each attention and the JSON and the console get its top operators by self time on the
device (CPU without one), e.g. the proof model's 2K stage on its own data, masked documents included:

    python tools/bench_train.py --config configs/proof_100m.yaml --seq-len 2048 --steps 4 --profile \
        --set "stages=[{name: bench, seq_len: 2048, steps: 4, global_batch_size: 32, micro_batch_size: 32}]"

With --host-profile, Python's cProfile records the host side of steps 2 to the last on the training thread
(the device synchronized at both ends): the functions by cumulative and by own time, for a step that is
host-bound (short sequences: the GPU waits for the Python that launches its kernels); the whole profile
goes beside the JSON, <out>.<attention>.prof (python -m pstats FILE).

With --sync-check (GPU only), steps 2 to the last run under torch.cuda's sync debug mode, and every operation
that made the host wait for the device (a read-back, a copy from pageable memory, a stream synchronize) is
counted by the line of this repository's code that led to it: what keeps the host from queueing work ahead.

With --host-check, each step from the second on is timed twice from the start of its forward and backward
(the device idle): until the host has queued them (the gradient finalization is called: the first point that
waits for the device), and until the device has run them (a synchronize there). If the device finishes just
after the host queued its last kernel, it waited for the host all along: the step is host-bound, and fewer or
cheaper launches would shorten it. If it finishes well after, the host was ahead and the device sets the pace.

With --graph-ceiling (GPU), the last step's micro-batches are held fixed after its own forward and backward:
run eagerly a few times (the host's queueing and the device's finish), then captured into one CUDA graph and
replayed. The capture freezes every layout built for those batches, as a graph over layouts of fixed capacity
would (benchmarks/graph-readiness.py lists what changes between micro-batches today), so the replay's time is
the floor a graphed step could reach, and the eager time over it what graphs could save. A capture that fails
is reported with its error and where it came from. The extra runs add to the last step's gradients, so the
bench's last optimizer step is not a real one.

With --compile-report, every Triton compile of the run is recorded (Triton's compilation listener): the step it
came in, the kernel, its seconds, whether the on-disk cache served it, and what set it apart from the same
kernel's other compiles (an autotune candidate's tiles and warps, or an integer argument that was divisible by
16 in one batch and not in another): where a first step's compile time goes, and what compiles again later.
"""

import argparse
import cProfile
import gc
import io
import json
import logging
import os
import pstats
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from statistics import median

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")

from nsa_dist.config import ConfigError, load_config  # noqa: E402  (after the filter: megatron warns at import)
import kernels.nsa as nsa_composition  # noqa: E402
import nsa_dist.trainer as trainer  # noqa: E402
from kernels.nsa import resolve_impl  # noqa: E402
from nsa_dist.trainer import TrainingHooks, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/paper.yaml"))
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per attention (the first is not timed)")
    parser.add_argument("--attention", default="dense,nsa",
                        help="comma-separated, timed in this order: dense, nsa, or nsa-every-row (NSA with the "
                             "selected kernels run on every row, also those the window branch answers for: "
                             "kernels.nsa.WINDOW_SERVES_SELECTION off)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--profile", action="store_true", help="profile steps 2-3 (--steps must be >= 3)")
    parser.add_argument("--host-profile", action="store_true",
                        help="cProfile the host over steps 2 to the last (--steps must be >= 2)")
    parser.add_argument("--sync-check", action="store_true",
                        help="count the host-device synchronizations of steps 2 to the last by source line (GPU)")
    parser.add_argument("--host-check", action="store_true",
                        help="time each step's queueing of forward+backward on the host against the device's run "
                             "of it (steps 2 to the last): is the step host-bound?")
    parser.add_argument("--graph-ceiling", action="store_true",
                        help="after the last step, time its micro-batches eagerly and as a replayed CUDA graph (GPU)")
    parser.add_argument("--compile-report", action="store_true",
                        help="record every Triton compile: step, kernel, seconds, what set its variant apart")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/train_<seq_len>.json)")
    return parser.parse_args()


class PrintStep(TrainingHooks):
    def __init__(self, attention: str):
        self.attention = attention

    def step(self, log):
        print(f"{self.attention} step {log.step}: {log.step_time_s:.2f} s, loss {log.loss:.4f}, "
              f"{log.memory_gb:.1f} GB", flush=True)


class ProfileSteps(TrainingHooks):
    """torch.profiler over optimizer steps 2 and 3 (the first compiles and warms up)."""

    def __init__(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities,
                                               schedule=torch.profiler.schedule(wait=1, warmup=0, active=2, repeat=1))

    def stage_started(self, stage, state, source):
        self.profiler.start()

    def step(self, log):
        self.profiler.step()

    def report(self, rows: int = 40) -> tuple[str, int]:
        """The top operators by self time on the device (CPU without one), and how many steps they cover."""
        self.profiler.stop()
        averages = self.profiler.key_averages()
        steps = sum(event.count for event in averages if event.key.startswith("ProfilerStep"))
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        return averages.table(sort_by=key, row_limit=rows), steps


class ProfileHost(TrainingHooks):
    """Python's cProfile over optimizer steps 2 to the last, on the training thread: the host's share of a
    step (kernel launches, the model's Python, data), which bounds short steps."""

    def __init__(self, steps: int):
        self.profiler = cProfile.Profile()
        self.steps = steps
        self.seen = 0

    def step(self, log):
        self.seen += 1
        if self.seen in (1, self.steps) and torch.cuda.is_available():
            torch.cuda.synchronize()  # the profiled window starts and ends with the device idle
        if self.seen == 1:
            self.profiler.enable()
        elif self.seen == self.steps:
            self.profiler.disable()

    def report(self, rows: int = 30, dump: Path | None = None) -> str:
        """The top functions by cumulative time, then by own time; `dump`: also the whole profile there
        (pstats's format, for callers and callees: python -m pstats FILE)."""
        if dump is not None:
            dump.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.dump_stats(dump)
        out = io.StringIO()
        stats = pstats.Stats(self.profiler, stream=out)
        for key in ("cumulative", "tottime"):
            stats.sort_stats(key).print_stats(rows)
        return out.getvalue()


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")'s message


class SyncRecorder:
    """Records the warnings of torch.cuda's sync debug mode while started, each under the innermost frame of
    this repository's code outside tools/ that led to it (the line to change), with the stack's last frames."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.stacks: dict[str, list[str]] = {}
        self._catcher = None

    def start(self) -> None:
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")  # every one, not once per line
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING in str(message):  # the stack without this function and the warnings module
                self._record([f for f in traceback.extract_stack()[:-1] if Path(f.filename).name != "warnings.py"])
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show

    def stop(self) -> None:
        if self._catcher is not None:
            self._catcher.__exit__(None, None, None)
            self._catcher = None

    def _record(self, frames: list[traceback.FrameSummary]) -> None:
        def where(frame):
            path = Path(frame.filename)
            return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{frame.lineno} ({frame.name})"

        ours = [f for f in frames if Path(f.filename).is_relative_to(ROOT)
                and not Path(f.filename).is_relative_to(ROOT / "tools")]
        key = where(ours[-1] if ours else frames[-1])
        self.counts[key] += 1
        self.stacks.setdefault(key, [where(f) for f in frames[-6:]])

    def report(self, steps: int) -> tuple[str, list[dict]]:
        """A table of the synchronizations by source line, most first, with their number a step."""
        rows = [{"location": key, "count": count, "per_step": count / steps, "stack": self.stacks[key]}
                for key, count in self.counts.most_common()]
        lines = [f"{row['count']:>7} {row['per_step']:>9.1f}  {row['location']}" for row in rows]
        return "\n".join([f"{'count':>7} {'per step':>9}  where (innermost line of ours)"] + lines
                         + [f"{sum(self.counts.values()):>7} {sum(self.counts.values()) / steps:>9.1f}  in all"]), rows


class SyncCheck(TrainingHooks):
    """torch.cuda's sync debug mode over optimizer steps 2 to the last (the first compiles and autotunes)."""

    def __init__(self, steps: int):
        self.recorder = SyncRecorder()
        self.steps = steps
        self.seen = 0

    def step(self, log):
        self.seen += 1
        if self.seen == 1:
            torch.cuda.synchronize()
            self.recorder.start()
            torch.cuda.set_sync_debug_mode("warn")
        elif self.seen == self.steps:
            torch.cuda.set_sync_debug_mode("default")
            self.recorder.stop()


class CompileRecorder(TrainingHooks):
    """Every Triton compile while started (triton.knobs.compilation.listener), under the optimizer step it
    came in (1 until the first step ends). A compile's variant is what its source was specialized on: the
    constexprs (an int equal to 1 becomes one), the arguments marked divisible by 16, and num_warps and
    num_stages; two compiles of one kernel differ in some of these."""

    def __init__(self):
        self.step_now = 1
        self.events: list[dict] = []

    def start(self) -> None:
        import triton

        triton.knobs.compilation.listener = self._record

    def stop(self) -> None:
        import triton

        triton.knobs.compilation.listener = None

    def step(self, log):
        self.step_now += 1

    def _record(self, *, src, metadata, metadata_group, times, cache_hit) -> None:
        fn = getattr(src, "fn", None)
        names = getattr(fn, "arg_names", [])

        def arg(path):
            return names[path[0]] if path and path[0] < len(names) else str(path)

        variant = {arg(path): str(value) for path, value in getattr(src, "constants", {}).items()}
        variant.update({arg(path): "divisible by 16" for path, attrs in getattr(src, "attrs", {}).items()
                        if ["tt.divisibility", 16] in [list(a) for a in attrs]})
        variant.update({key: str(metadata.get(key)) for key in ("num_warps", "num_stages")})
        microseconds = times.ir_initialization + sum(d for _, d in times.lowering_stages) + times.store_results
        self.events.append({"step": self.step_now, "kernel": getattr(src, "name", metadata.get("name", "?")),
                            "seconds": microseconds / 1e6, "cache_hit": cache_hit, "variant": variant})

    def report(self) -> tuple[str, dict]:
        """Compiles and their seconds by step, then by kernel with what its variants differ in."""
        built = [e for e in self.events if not e["cache_hit"]]
        by_step: dict[int, list[dict]] = {}
        by_kernel: dict[str, list[dict]] = {}
        for event in built:
            by_step.setdefault(event["step"], []).append(event)
            by_kernel.setdefault(event["kernel"], []).append(event)
        lines = [f"{'step':>5} {'compiles':>9} {'seconds':>8}"]
        lines += [f"{step:>5} {len(events):>9} {sum(e['seconds'] for e in events):>8.2f}"
                  for step, events in sorted(by_step.items())]
        lines += [f"{'all':>5} {len(built):>9} {sum(e['seconds'] for e in built):>8.2f}"
                  f"   (and {len(self.events) - len(built)} served by Triton's cache)", "",
                  f"{'kernel':<28} {'compiles':>9} {'seconds':>8}  steps  variants differ in"]
        kernels = {}
        for name, events in sorted(by_kernel.items(), key=lambda item: -sum(e["seconds"] for e in item[1])):
            keys = sorted({key for e in events for key in e["variant"]})
            differ = [key for key in keys if len({e["variant"].get(key) for e in events}) > 1]
            steps = sorted({e["step"] for e in events})
            kernels[name] = {"compiles": len(events), "seconds": sum(e["seconds"] for e in events),
                             "steps": steps, "differ_in": differ}
            lines.append(f"{name:<28} {len(events):>9} {kernels[name]['seconds']:>8.2f}  "
                         f"{','.join(map(str, steps)):<5}  {', '.join(differ) or '-'}")
        return "\n".join(lines), {"events": self.events, "kernels": kernels}


class HostCheck:
    """--host-check: wraps the trainer's forward-backward function and its gradient finalization. Each training
    call (not evaluation's forward-only ones) starts with the device idle; at the finalization's entry the host
    has queued the whole forward and backward (the finalization is the first thing in it that waits for the
    device), and a synchronize there tells when the device has run it."""

    def __init__(self):
        self.queued: list[float] = []
        self.done: list[float] = []
        self._start: float | None = None

    def wrap(self, forward_backward):
        def timed(**kwargs):
            if kwargs.get("forward_only"):
                return forward_backward(**kwargs)
            _synchronize()
            self._start = time.perf_counter()
            try:
                return forward_backward(**kwargs)
            finally:
                self._start = None

        return timed

    def wrap_finalize(self, finalize):
        def timed(*args, **kwargs):
            if self._start is not None:
                self.queued.append(time.perf_counter() - self._start)
                _synchronize()
                self.done.append(time.perf_counter() - self._start)
            return finalize(*args, **kwargs)

        return timed

    def report(self) -> dict:
        """Medians over the steps after the first (which compiles): the host's queueing, the device's finish,
        and the device's tail after the host's last launch, in milliseconds."""
        queued, done = self.queued[1:] or self.queued, self.done[1:] or self.done
        return {"steps": len(queued), "host_queued_ms": median(queued) * 1e3, "device_done_ms": median(done) * 1e3,
                "device_tail_ms": median(d - q for q, d in zip(queued, done)) * 1e3,
                "queued_ms": [q * 1e3 for q in self.queued], "done_ms": [d * 1e3 for d in self.done]}


class GraphCeiling:
    """--graph-ceiling: wraps the trainer's forward-backward function and its gradient finalization. After the
    last training call returns, its micro-batches are drawn anew from the iterator once and held: run eagerly
    REPEATS + 1 times (the first not counted; the warm-up a capture needs), then captured into a CUDA graph and replayed REPEATS + 1 times. The finalization is
    skipped in these runs: it is the step's first wait for the device (HostCheck), and a wait cannot be
    captured. The result is printed as soon as it is measured, in case what follows a failed capture fails."""

    REPEATS = 5

    def __init__(self, steps: int, line: str):
        self.steps, self.line = steps, line
        self.calls = 0
        self.skip_finalize = False
        self.result: dict | None = None

    def wrap(self, forward_backward):
        def run(**kwargs):
            losses = forward_backward(**kwargs)
            if not kwargs.get("forward_only"):
                self.calls += 1
                if self.calls == self.steps:
                    self.result = self.measure(forward_backward, kwargs)
            return losses

        return run

    def wrap_finalize(self, finalize):
        def run(*args, **kwargs):
            return None if self.skip_finalize else finalize(*args, **kwargs)

        return run

    def measure(self, forward_backward, kwargs) -> dict:
        batches = [next(kwargs["data_iterator"]) for _ in range(kwargs["num_microbatches"])]

        def once():
            forward_backward(**{**kwargs, "data_iterator": iter(batches)})

        def timed(run) -> tuple[float, float]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            queued = time.perf_counter() - start
            torch.cuda.synchronize()
            return queued, time.perf_counter() - start

        self.skip_finalize = True
        try:
            eager = [timed(once) for _ in range(self.REPEATS + 1)][1:]
            result = {"micro_batches": len(batches), "eager_host_queued_ms": median(q for q, _ in eager) * 1e3,
                      "eager_device_done_ms": median(d for _, d in eager) * 1e3}
            # the whole run is on bench()'s side stream, so the capture uses it: a capture on another stream
            # would meet the autograd engine syncing with the stream Megatron's DDP hooks were made on
            stream = torch.cuda.current_stream()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream):
                    once()
            except Exception as error:  # what a graph of the step would have to get rid of first
                frames = traceback.extract_tb(error.__traceback__)
                ours = [f for f in frames if f.filename.startswith(str(ROOT)) and "tools/" not in f.filename]
                at = (ours or frames)[-1]
                result["capture_error"] = f"{type(error).__name__}: {str(error)[:500]}"
                result["capture_error_at"] = f"{at.filename}:{at.lineno} ({at.name})"
                print(f"\n{self.line}: CUDA graph capture failed at {result['capture_error_at']}: "
                      f"{result['capture_error']}", flush=True)
                return result
            replays = [timed(graph.replay) for _ in range(self.REPEATS + 1)][1:]
            result["graph_replay_ms"] = median(d for _, d in replays) * 1e3
            result["eager_over_graph"] = result["eager_device_done_ms"] / result["graph_replay_ms"]
            del graph
            print(f"\n{self.line}: forward+backward of one fixed step, medians of {self.REPEATS}: eager queued by the "
                  f"host in {result['eager_host_queued_ms']:.1f} ms and run in {result['eager_device_done_ms']:.1f} "
                  f"ms; as a replayed CUDA graph {result['graph_replay_ms']:.1f} ms "
                  f"({result['eager_over_graph']:.2f}x)", flush=True)
            return result
        finally:
            self.skip_finalize = False


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


ATTENTION_LINES = ("dense", "nsa", "nsa-every-row")


def out_path(args) -> Path:
    return Path(args.out) if args.out else ROOT / f"benchmarks/train_{args.seq_len}.json"


def bench(args, line: str) -> dict:
    attention = "nsa" if line == "nsa-every-row" else line
    nsa_composition.WINDOW_SERVES_SELECTION = line != "nsa-every-row"
    config = load_config(args.config, [
        "training.dtype=bf16", "training.recompute=true", "training.warmup_steps=1", "parallel.context=1",
        f"stages=[{{name: bench, seq_len: {args.seq_len}, steps: {args.steps}}}]",
        f"run.dir={tempfile.mkdtemp(prefix=f'bench_train_{line}_')}",  # a fresh run: nothing to resume
        *args.overrides, f"model.attention={attention}",
    ])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    profile = ProfileSteps() if args.profile else None
    host = ProfileHost(args.steps) if args.host_profile else None
    syncs = SyncCheck(args.steps) if args.sync_check else None
    compiles = CompileRecorder() if args.compile_report else None
    if compiles:
        compiles.start()
    pace = HostCheck() if args.host_check else GraphCeiling(args.steps, line) if args.graph_ceiling else None
    forward_backward_func, finalize_grads = trainer.get_forward_backward_func, trainer.finalize_grads
    if pace:
        trainer.get_forward_backward_func = lambda: pace.wrap(forward_backward_func())
        trainer.finalize_grads = pace.wrap_finalize(finalize_grads)
    # a CUDA graph is captured on a stream other than the default one, and the autograd engine waits for the
    # stream each parameter's gradient-accumulation node was made on (Megatron's DDP keeps them from its
    # start): so with --graph-ceiling the whole run, model building included, goes on one side stream
    stream = torch.cuda.Stream() if args.graph_ceiling else None
    try:
        with torch.cuda.stream(stream):
            history = train(config, [PrintStep(line)] + [h for h in (profile, host, syncs, compiles) if h]).history
    finally:
        nsa_composition.WINDOW_SERVES_SELECTION = True
        trainer.get_forward_backward_func, trainer.finalize_grads = forward_backward_func, finalize_grads
        if compiles:
            compiles.stop()
    timed = history[1:] or history
    result = {
        "attention": line,
        # medians: a short step's mean is skewed by the second step, which may still compile or autotune
        "tokens_per_s": median(log.tokens_per_s for log in timed),
        "step_time_s": median(log.step_time_s for log in timed),
        "step_times_s": [log.step_time_s for log in history],
        "first_step_time_s": history[0].step_time_s,
        "peak_memory_gb": max(log.memory_gb for log in history),
        "losses": [log.loss for log in history],
        "config": config.to_dict(),
    }
    if profile:
        result["profile"], result["profiled_steps"] = profile.report()
        print(f"\n{line}: steps 2-3 by self time\n{result['profile']}", flush=True)
    if host:
        result["host_profile"] = host.report(dump=out_path(args).with_suffix(f".{line}.prof"))
        result["host_profiled_steps"] = args.steps - 1
        print(f"\n{line}: host time of steps 2-{args.steps}\n{result['host_profile']}", flush=True)
    if isinstance(pace, GraphCeiling):
        result["graph_ceiling"] = pace.result
    elif pace:
        result["host_check"] = pace.report()
        check = result["host_check"]
        print(f"\n{line}: forward+backward of steps 2-{args.steps}, medians: queued by the host in "
              f"{check['host_queued_ms']:.1f} ms, run by the device in {check['device_done_ms']:.1f} ms (its tail "
              f"after the last launch {check['device_tail_ms']:.1f} ms)", flush=True)
    if compiles:
        table, result["compiles"] = compiles.report()
        print(f"\n{line}: Triton compiles by step and kernel\n{table}", flush=True)
    if syncs:
        table, result["syncs"] = syncs.recorder.report(args.steps - 1)
        print(f"\n{line}: host-device synchronizations of steps 2-{args.steps}\n{table}", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def git_commit() -> str | None:
    """$COMMIT where set (the GPU machine's copy of the tree may hold a stale .git: the device scripts pass
    it), else HEAD of the checkout this runs from; None outside a git checkout (e.g. a copied working tree)."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"][:7]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def main() -> None:
    args = parse_args()
    # the trainer's stage lines (compile_ahead's among them: what the first step spent compiling)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("nsa_dist.trainer").setLevel(logging.INFO)
    if args.profile and args.steps < 3:
        sys.exit(f"error: --profile records steps 2 and 3, and --steps={args.steps}: pass --steps 3 or more")
    if args.host_profile and args.steps < 2:
        sys.exit(f"error: --host-profile records steps 2 to the last, and --steps={args.steps}: pass --steps 2 or more")
    if args.host_check and args.steps < 2:
        sys.exit(f"error: --host-check times steps 2 to the last, and --steps={args.steps}: pass --steps 2 or more")
    if args.sync_check and args.steps < 2:
        sys.exit(f"error: --sync-check records steps 2 to the last, and --steps={args.steps}: pass --steps 2 or more")
    if args.graph_ceiling and not torch.cuda.is_available():
        sys.exit("error: --graph-ceiling needs a GPU: it captures a CUDA graph; run it on the GPU machine")
    if args.graph_ceiling and args.host_check:
        sys.exit("error: --graph-ceiling and --host-check both time the forward and backward: pass one of them")
    unknown = [line for line in args.attention.split(",") if line not in ATTENTION_LINES]
    if unknown:
        sys.exit(f"error: --attention {args.attention}: {unknown} not among {', '.join(ATTENTION_LINES)}")
    if args.sync_check and not torch.cuda.is_available():
        sys.exit("error: --sync-check needs a GPU: it counts where the host waits for the device "
                 "(torch.cuda.set_sync_debug_mode); run it on the GPU machine")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        results = [bench(args, attention) for attention in args.attention.split(",")]
    except ConfigError as exc:  # e.g. bf16 (the default here) on a machine without a GPU
        sys.exit(f"error: {exc}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    # the nsa: section of the configs the benchmark ran (the same for every attention)
    nsa_impl = resolve_impl(results[0]["config"]["nsa"]["impl"],
                            torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"command": "python3 " + " ".join(sys.argv), "device": device, "torch": torch.__version__,
              "commit": git_commit(),
              "nsa_impl": nsa_impl, "seq_len": args.seq_len, "results": results}
    out = out_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    base = results[0]
    print(f"\n{device}, seq_len {args.seq_len}, NSA implementation: {nsa_impl}  -> {out}")
    print(f"{'attention':>13} {'tokens/s':>10} {'step s':>8} {'peak GB':>8} {'speed vs ' + base['attention']:>16}")
    for r in results:
        print(f"{r['attention']:>13} {r['tokens_per_s']:>10.0f} {r['step_time_s']:>8.2f} {r['peak_memory_gb']:>8.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>15.2f}x")


if __name__ == "__main__":
    main()
