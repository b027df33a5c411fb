"""Checkpoints on real gloo processes: exact resume after a rank is killed, saves that fail or die before
their marker, resharding between layouts, the curriculum's stage boundary, and keep-last-k.

Two fixtures run everything (each process group pays Megatron's start-up once): `interrupted` kills and
breaks runs on 2 processes (CP=2), then resumes them beside uninterrupted references; `matrix` saves a
checkpoint in each of five layouts on 4 processes and evaluates each in every layout, and runs a
two-stage curriculum in three variants.
"""

import json
import multiprocessing
import os
import resource
import signal

import pytest
import torch.multiprocessing as mp

from dist_harness import run_distributed
from tiny import tiny_config

from nsa_dist.checkpoint import MARKER, complete_checkpoints, newest_checkpoint, step_dir

CP2 = ["parallel.context=2", "training.global_batch_size=2"]  # on 2 processes: CP=2, DP=1


def run_config(root: str, name: str, *overrides: str):
    """Six steps at CP=2 in run directory root/name, a checkpoint every 3 steps."""
    return tiny_config(*CP2, f"run.dir={root}/{name}", "checkpoint.interval=3", *overrides, steps=6)


def _die() -> None:
    """SIGKILL this rank, as the kernel's OOM killer or a lost node would. Megatron's checkpoint writer keeps
    a manager process per rank that would outlive the kill (holding the test's output open), so it is
    ended first; nothing else of the rank gets a chance to clean up."""
    for child in multiprocessing.active_children():
        child.terminate()
    os.kill(os.getpid(), signal.SIGKILL)


def _killed_after_step_3(rank: int, world_size: int, root: str) -> None:
    from nsa_dist.trainer import TrainingHooks, train

    class KillRank1(TrainingHooks):
        def step(self, log):
            if log.step == 4 and rank == 1:  # step 3's checkpoint is complete, step 6's not yet written
                _die()

    train(run_config(root, "killed"), [KillRank1()])


def _killed_between_shards_and_marker(rank: int, world_size: int, root: str) -> None:
    import nsa_dist.checkpoint as checkpoint
    from nsa_dist.trainer import train

    write_marker = checkpoint.write_json_atomically

    def write_marker_or_die(path, content):
        if content["state"]["step"] == 4:  # every rank's shards of step 4 are on disk; its marker is not
            _die()
        write_marker(path, content)

    checkpoint.write_json_atomically = write_marker_or_die
    train(run_config(root, "crashed", "checkpoint.interval=2", "checkpoint.keep_last=1"))


def _disk_full_at_step_2(rank: int, world_size: int, root: str) -> None:
    from nsa_dist.trainer import TrainingHooks, train

    class FillDisk(TrainingHooks):
        def step(self, log):
            if log.step == 2:  # from now on no file of this process (and its writers) may pass 100 kB
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write then fails with EFBIG, not a signal
                resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    train(run_config(root, "disk_full", "checkpoint.interval=1"), [FillDisk()])


def _resume_all(rank: int, world_size: int, root: str, out_path: str) -> None:
    from nsa_dist.trainer import train

    runs = {
        "reference": run_config(root, "reference"),
        "async": run_config(root, "async", "checkpoint.async_save=true", "checkpoint.interval=1"),
        "killed": run_config(root, "killed"),
        "crashed": run_config(root, "crashed", "checkpoint.interval=2", "checkpoint.keep_last=1"),
        "disk_full": run_config(root, "disk_full", "checkpoint.interval=1"),
    }
    results = {name: [(log.step, log.loss, log.grad_norm) for log in train(config).history]
               for name, config in runs.items()}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def _fails(fn, *args) -> str:
    """Runs fn on 2 processes, which must fail; returns what the failure said."""
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)) as failure:
        run_distributed(fn, 2, *args)
    return str(failure.value)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupted")
    disk = {}
    disk["killed"] = _fails(_killed_after_step_3, str(root))
    disk["killed_newest"] = newest_checkpoint(root / "killed").state.step
    _fails(_killed_between_shards_and_marker, str(root))
    disk["crashed_step_4_marker"] = (step_dir(root / "crashed", 4) / MARKER).exists()
    disk["crashed_step_4_shards"] = sorted(p.name for p in step_dir(root / "crashed", 4).iterdir())
    disk["crashed_complete"] = [c.state.step for c in complete_checkpoints(root / "crashed")]
    disk["disk_full"] = _fails(_disk_full_at_step_2, str(root))
    disk["disk_full_complete"] = [c.state.step for c in complete_checkpoints(root / "disk_full")]
    out_path = root / "results.json"
    run_distributed(_resume_all, 2, str(root), str(out_path))
    disk["crashed_after"] = [c.state.step for c in complete_checkpoints(root / "crashed")]
    disk["async_after"] = [c.state.step for c in complete_checkpoints(root / "async")]
    return root, disk, json.loads(out_path.read_text())


@pytest.mark.timeout(300)
def test_a_rank_killed_mid_stage_resumes_bit_for_bit(interrupted):
    """Killed after step 3's checkpoint: the rerun takes steps 4-6, with the losses and gradient norms
    of the uninterrupted run to the last bit (fp32 on CPU: same weights, Adam state, LR, data, RNG)."""
    _, disk, results = interrupted
    assert "signal SIGKILL" in disk["killed"] and disk["killed_newest"] == 3
    reference, resumed = results["reference"], results["killed"]
    assert [step for step, _, _ in resumed] == [4, 5, 6]
    assert resumed == reference[3:]


@pytest.mark.timeout(300)
def test_a_save_killed_before_its_marker_is_ignored_and_the_previous_checkpoint_used(interrupted):
    _, disk, results = interrupted
    # every shard of step 4 was written, the marker was not: an incomplete checkpoint
    assert not disk["crashed_step_4_marker"] and any(n.endswith(".distcp") for n in disk["crashed_step_4_shards"])
    # keep_last=1 did not delete step 2 for the step 4 that never completed
    assert disk["crashed_complete"] == [2]
    assert [step for step, _, _ in results["crashed"]] == [3, 4, 5, 6]
    assert results["crashed"] == results["reference"][2:]
    # the rerun saved step 4 again, then pruned step 2 (keep_last=1; step 6 ends the stage and is kept)
    assert disk["crashed_after"] == [6]


@pytest.mark.timeout(300)
def test_a_full_disk_fails_the_save_with_a_clear_message_and_keeps_the_previous_checkpoint(interrupted):
    root, disk, results = interrupted
    message = disk["disk_full"]
    assert f"saving checkpoint {root}/disk_full/checkpoints/step_00000002 failed" in message
    assert f"the previous checkpoint {root}/disk_full/checkpoints/step_00000001 is intact" in message
    assert "rerun the same command to resume" in message
    assert disk["disk_full_complete"] == [1]
    assert results["disk_full"] == results["reference"][1:]


@pytest.mark.timeout(300)
def test_async_saves_complete_and_do_not_change_training(interrupted):
    _, disk, results = interrupted
    assert results["async"] == results["reference"]
    assert disk["async_after"] == [5, 6]  # keep_last=2


# ---------------------------------------------------------------------------------- resharding

# five layouts on 4 processes (data parallelism fills the rest)
LAYOUTS = {
    "TP1 PP1 CP1": [],
    "TP2": ["parallel.tensor=2"],
    "CP2": ["parallel.context=2"],
    "PP2": ["parallel.pipeline=2"],
    "TP2+CP2": ["parallel.tensor=2", "parallel.context=2"],
}
TWO_STAGES = ["training.warmup_steps=1",
              "stages=[{name: a, seq_len: 128, steps: 2, context_parallel: 1}, "
              "{name: b, seq_len: 256, steps: 2, rotary_base: 20000.0}]"]


def _matrix(rank: int, world_size: int, root: str, out_path: str) -> None:
    from nsa_dist.trainer import evaluate, train

    # each layout trains 3 steps with a checkpoint after step 2, which is then loaded into every layout
    # and evaluated on the batch that step 3 trained on
    results = {"step 3": {}}
    checkpoints = {}
    for name, overrides in LAYOUTS.items():
        history = train(tiny_config(*overrides, f"run.dir={root}/{name}", "checkpoint.interval=2")).history
        results["step 3"][name] = history[2].loss
        checkpoints[name] = step_dir(f"{root}/{name}", 2)
    step_3_batch = 8  # sequences consumed by two steps of 4
    results["matrix"] = {
        target: {source: result.loss for source, result in zip(
            checkpoints, evaluate(tiny_config(*overrides), list(checkpoints.values()), "stage0",
                                  first_sequence=step_3_batch))}
        for target, overrides in LAYOUTS.items()}
    # a curriculum: stage a at DP=4, stage b (twice the tokens, another RoPE base) in another layout
    variants = {"keep TP2+CP2": ["stages.1.tensor_parallel=2", "stages.1.context_parallel=2"],
                "keep DP4": ["stages.1.context_parallel=1"],
                "reset TP2+CP2": ["stages.1.tensor_parallel=2", "stages.1.context_parallel=2",
                                  "stages.1.optimizer_state=reset"]}
    results["curriculum"] = {}
    for name, overrides in variants.items():
        run_dir = f"{root}/curriculum {name}"
        config = tiny_config(*TWO_STAGES, f"run.dir={run_dir}", *overrides)
        history = train(config).history
        end_of_a = [c for c in complete_checkpoints(run_dir) if c.state.stage == "a"][-1]
        (first_b_batch,) = evaluate(config, [end_of_a.path], "b", first_sequence=end_of_a.state.consumed_sequences)
        results["curriculum"][name] = {"history": [(log.stage, log.step, log.loss) for log in history],
                                       "stage b first batch": first_b_batch.loss}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    run_distributed(_matrix, 4, str(root), str(root / "results.json"))
    return json.loads((root / "results.json").read_text())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("source", LAYOUTS)
def test_a_checkpoint_loads_into_every_layout_with_the_same_loss(source, matrix):
    """Saved after step 2 in `source`, loaded into each layout: the loss on the batch of step 3 equals the
    loss that step 3 computed in `source` (so the trained weights, not the initial ones, were loaded)."""
    step_3 = matrix["step 3"][source]
    for target, losses in matrix["matrix"].items():
        assert losses[source] == pytest.approx(step_3, rel=1e-6), f"saved in {source}, loaded in {target}"


@pytest.mark.timeout(600)
def test_curriculum_stage_b_starts_from_stage_a_final_weights_and_adam_state(matrix):
    runs = matrix["curriculum"]
    for name, run in runs.items():
        stages = [stage for stage, _, _ in run["history"]]
        assert stages == ["a", "a", "b", "b"], name
        # stage b's first loss is stage a's final weights on stage b's first batch, in stage b's layout
        assert run["history"][2][2] == pytest.approx(run["stage b first batch"], rel=1e-6), name
    keep_tp_cp, keep_dp, reset = (runs[n]["history"] for n in ("keep TP2+CP2", "keep DP4", "reset TP2+CP2"))
    # Adam's moments resharded into TP2+CP2 or kept at DP4 give the same second step of stage b ...
    assert keep_tp_cp[3][2] == pytest.approx(keep_dp[3][2], rel=1e-6)
    # ... and matter: reset moments (same weights, first b loss equal) give another one
    assert reset[2][2] == pytest.approx(keep_tp_cp[2][2], rel=1e-6)
    assert abs(reset[3][2] - keep_tp_cp[3][2]) > 1e-4


def _first_save_with_the_queue_started(rank: int, world_size: int, root: str) -> None:
    """A writer made, its results queue waited for, then a real save: the queue Megatron's save reports
    through must be the one the writer started, and must carry what its writer processes put."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from nsa_dist.checkpoint import CheckpointWriter
    from nsa_dist.trainer import train

    started = []
    original = CheckpointWriter.save

    def save(self, *args, **kwargs):
        self.results_queue_started.join(timeout=120)
        started.append(filesystem_async._results_queue)
        assert started[0] is not None, "the writer did not start Megatron's results queue"
        return original(self, *args, **kwargs)

    CheckpointWriter.save = save
    train(tiny_config(f"run.dir={root}/queue", steps=2), [])
    assert started and all(queue is started[0] for queue in started + [filesystem_async._results_queue])
    assert [c.state.step for c in complete_checkpoints(f"{root}/queue")] == [2]


@pytest.mark.timeout(300)
def test_the_writer_starts_the_results_queue_before_the_first_save(tmp_path):
    """Megatron starts its results queue (a manager in a spawned process that imports the job's main module
    again) on the first save unless the writer has: most of a first save's time (tools/bench_first_save.py)."""
    run_distributed(_first_save_with_the_queue_started, 1, str(tmp_path))
