"""The learned indexer (nsa.indexer_heads) in training, on real gloo processes with the context-parallel path
(CP=2, and TP=2): its loss is logged every step and moves no other weight (the model's losses are those of a
run without it, to the bit, with gradient clipping on: its gradient stays out of the clipped norm), at weight 0
nothing of it runs, and a stage that ranks blocks by it resumes from the previous stage's checkpoint, weights
included."""

import json
import math

import pytest

from dist_harness import run_distributed
from tiny import tiny_config

# n = 5: free picks to rank; a clip far under the tiny model's gradient norm (about 1-3), so that every step
# clips and a norm counting the indexer's gradient would scale the model's steps
BASE = ["parallel.context=2", "training.global_batch_size=2", "nsa.num_selected=5", "training.grad_clip=0.05"]


def _run(rank: int, world_size: int, root: str, out_path: str) -> None:
    from nsa_dist.trainer import train

    two_stages = ("stages=[{name: a, seq_len: 128, steps: 2}, "
                  "{name: b, seq_len: 128, steps: 2, selection_score: indexer}]")
    # the indexer's KL is ~1e-5 on this model: weighted 1e5, its gradient is about the model's in size (a norm
    # that counted it would be ~20% larger), while Adam steps its weight as at weight 1
    runs = (("plain", []), ("indexer", ["nsa.indexer_heads=1", "nsa.indexer_loss_stride=3", "nsa.indexer_loss=1e5"]),
            ("weight 0", ["nsa.indexer_heads=1", "nsa.indexer_loss=0"]),
            ("ranked by it", ["nsa.indexer_heads=1", "nsa.indexer_loss_stride=3", two_stages]),
            # TP=2: each rank's KV head, the replicated weight's gradient summed over the TP group
            ("tensor parallel", ["parallel.context=1", "parallel.tensor=2", "nsa.indexer_heads=1",
                                 "nsa.indexer_loss_stride=3", two_stages]))
    results = {name: [(log.loss, log.indexer_loss, log.indexer_recall, log.grad_norm) for log in train(tiny_config(
                   *BASE, *overrides, f"run.dir={root}/{name.replace(' ', '_')}", steps=3)).history]
               for name, overrides in runs}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


@pytest.mark.timeout(300)
def test_indexer_learns_beside_the_model_and_ranks_a_later_stage(tmp_path):
    out = tmp_path / "out.json"
    run_distributed(_run, 2, str(tmp_path / "runs"), str(out))
    plain, indexer, weight_zero, ranked, tensor = json.loads(out.read_text()).values()
    assert all(kl is None and recall is None for _, kl, recall, _ in plain + weight_zero)
    assert all(norm > 0.05 for *_, norm in plain)  # every step clips
    # the model's losses and clipped norm, to the bit
    assert [(step[0], step[3]) for step in indexer] == [(step[0], step[3]) for step in plain], \
        "the indexer's loss moved the model"
    assert [step[0] for step in weight_zero] == [step[0] for step in plain]
    kls = [kl for _, kl, _, _ in indexer]
    assert all(kl is not None and math.isfinite(kl) and kl > 0 for kl in kls)
    assert len(set(kls)) == len(kls)  # it trains: each step's KL is another
    assert all(0 <= recall <= 1 for _, _, recall, _ in indexer)  # the share of the exact score's free picks it makes
    # the second stage ranks by it (other picks, so other losses), from the first stage's checkpoint
    assert [step[0] for step in ranked[:2]] == [step[0] for step in indexer[:2]]
    assert len(ranked) == 4 and all(math.isfinite(loss) and kl > 0 for loss, kl, _, _ in ranked[2:])
    assert len(tensor) == 4 and all(math.isfinite(loss) and kl > 0 for loss, kl, _, _ in tensor)
