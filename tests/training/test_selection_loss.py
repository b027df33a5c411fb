"""nsa.selection_loss (the selection alignment loss, kernels/block_selection/alignment.py) in training, on
real gloo processes with the context-parallel path (CP=2): it is logged per step, it changes the updates
from the second step on, at weight 0 nothing of it runs, nsa.selection_loss_stride scores other rows, and a
stage's own selection_loss turns it on for that stage alone."""

import json
import math

import pytest

from dist_harness import run_distributed
from tiny import tiny_config

CP2 = ["parallel.context=2", "training.global_batch_size=2", "nsa.num_selected=5"]  # n = 3 picks no free block


def _run(rank: int, world_size: int, root: str, out_path: str) -> None:
    from nsa_dist.trainer import train

    # the last: off in its first stage (nsa.selection_loss 0), on in its second (the stage's own weight)
    later = ("stages=[{name: a, seq_len: 128, steps: 2}, "
             "{name: b, seq_len: 128, steps: 1, selection_loss: 100.0}]")
    runs = (("off", "0", 1, []), ("off again", "0", 1, []), ("on", "100.0", 1, []), ("every 2nd row", "100.0", 2, []),
            ("second stage", "0", 1, [later]))
    results = {name: [(log.loss, log.selection_loss) for log in train(tiny_config(
                   *CP2, f"nsa.selection_loss={weight}", f"nsa.selection_loss_stride={stride}",
                   f"run.dir={root}/{name}", *stages, steps=3)).history]
               for name, weight, stride, stages in runs}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


@pytest.mark.timeout(300)
def test_selection_loss_is_logged_and_changes_training(tmp_path):
    out = tmp_path / "out.json"
    run_distributed(_run, 2, str(tmp_path / "runs"), str(out))
    off, again, on, strided, second = json.loads(out.read_text()).values()
    assert again == off  # deterministic: a difference below is the loss's
    assert all(selection is None for _, selection in off)
    assert all(selection is not None and math.isfinite(selection) and selection > 0 for _, selection in on)
    # the first step's loss is computed before any update, by the same forward (the loss leaves the layer's
    # output as it is); the second's follows an update the loss changed (Adam's first steps move by about
    # the gradient's sign, so the change is small)
    assert on[0][0] == off[0][0]
    assert on[1][0] != off[1][0]
    # every 2nd row: the same first forward, a mean over other rows
    assert strided[0][0] == off[0][0] and 0 < strided[0][1] != on[0][1]
    # a stage's own weight: nothing in the first stage, the loss in the second
    assert [selection is None for _, selection in second] == [True, True, False] and second[2][1] > 0
