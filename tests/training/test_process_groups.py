"""A job's process groups: stages of one layout share them, a new layout replaces them, and none outlive
train(). Megatron's destroy_model_parallel forgets its NCCL groups without destroying them; left to the
job's end, an H200 took ~0.4 s per group to close them (57 s for the proof's 8 layouts)."""

import json
from pathlib import Path

import pytest

from dist_harness import run_distributed
from tiny import tiny_config

STAGES = ("stages=[{name: a, seq_len: 128, steps: 1, context_parallel: 2}, "
          "{name: b, seq_len: 128, steps: 1, context_parallel: 2}, "
          "{name: c, seq_len: 128, steps: 1, tensor_parallel: 2}]")


def _count_groups(rank: int, world_size: int, run_dir: str, out_path: str) -> None:
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    from nsa_dist.trainer import TrainingHooks, train

    def live_groups() -> list[str]:  # names are unique for the process's lifetime (ids may be reused)
        return sorted(distributed_c10d._world.pg_names[pg] for pg in distributed_c10d._world.pg_map)

    class Record(TrainingHooks):
        def __init__(self):
            self.at_start = {}

        def stage_started(self, stage, state, source):
            self.at_start[stage.name] = live_groups()

    before = live_groups()
    record = Record()
    result = train(tiny_config(STAGES, f"run.dir={run_dir}"), [record])
    if rank == 0:
        Path(out_path).write_text(json.dumps({
            "before": before, "after": live_groups(), "at_start": record.at_start, "steps": len(result.history),
            "initialized_after": parallel_state.model_parallel_is_initialized()}))


@pytest.mark.timeout(240)
def test_stages_of_one_layout_share_its_process_groups_and_none_outlive_the_job(tmp_path):
    out = tmp_path / "groups.json"
    run_distributed(_count_groups, 2, str(tmp_path / "run"), str(out))
    groups = json.loads(out.read_text())
    assert groups["steps"] == 3
    a, b, c = (groups["at_start"][name] for name in "abc")
    assert a == b, "stage b (the same CP=2 layout) rebuilt its process groups"
    assert len(a) > len(groups["before"]) and set(c).isdisjoint(set(a) - set(groups["before"])), \
        "stage c (TP=2) kept stage b's groups"
    assert len(c) <= len(a), "the CP=2 layout's groups were not all destroyed when TP=2 replaced it"
    assert groups["after"] == groups["before"] and not groups["initialized_after"]
