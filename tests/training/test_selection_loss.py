"""nsa.selection_loss (the selection alignment loss, kernels/block_selection/alignment.py) in training, on
real gloo processes with the context-parallel path (CP=2): it is logged per step, it changes the updates
from the second step on, and at weight 0 nothing of it runs."""

import json
import math

import pytest

from dist_harness import run_distributed
from tiny import tiny_config

CP2 = ["parallel.context=2", "training.global_batch_size=2"]


def _run(rank: int, world_size: int, root: str, out_path: str) -> None:
    from nsa_dist.trainer import train

    results = {weight: [(log.loss, log.selection_loss) for log in train(tiny_config(
                   *CP2, f"nsa.selection_loss={weight}", f"run.dir={root}/{weight}", steps=3)).history]
               for weight in ("0", "100.0")}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


@pytest.mark.timeout(300)
def test_selection_loss_is_logged_and_changes_training(tmp_path):
    out = tmp_path / "out.json"
    run_distributed(_run, 2, str(tmp_path / "runs"), str(out))
    off, on = json.loads(out.read_text()).values()
    assert all(selection is None for _, selection in off)
    assert all(selection is not None and math.isfinite(selection) and selection > 0 for _, selection in on)
    # the first step's loss is computed before any update; the second's follows an update the loss changed
    assert on[0][0] == pytest.approx(off[0][0], rel=1e-6)
    assert on[1][0] != pytest.approx(off[1][0], rel=1e-5)  # measured: 4.77269 against 4.77307
