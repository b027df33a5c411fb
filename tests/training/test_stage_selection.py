"""A stage's num_selected (NSA's n, the blocks each query selects; it has no weights) is what that stage's
layers select with, on real gloo processes: a two-stage run changes n at the stage boundary and resumes
from the first stage's checkpoint, and its last checkpoint, evaluated on the same batch with n = 3, 5
and 8 (every block of 128 tokens), gives three different losses; n from the stage or from nsa: is the
same computation, and a checkpoint loads under another nsa.num_selected. The same for a stage's
selection_score (how top-n scores blocks; no weights either): "exact" loses otherwise than "sum" with
n = 5, and from the stage or from nsa: it is the same computation."""

import json

from dist_harness import run_distributed
from tiny import tiny_config

STAGES = "stages=[{name: a, seq_len: 128, steps: 2}, {name: b, seq_len: 128, steps: 2, num_selected: 5}]"


def _run(rank: int, world_size: int, root: str, out_path: str) -> None:
    from nsa_dist.checkpoint import complete_checkpoints
    from nsa_dist.trainer import evaluate, train

    base = ["training.warmup_steps=1", "checkpoint.interval=2", f"run.dir={root}"]
    history = train(tiny_config(*base, STAGES)).history
    (last,) = [c.path for c in complete_checkpoints(root) if c.state.stage == "b"][-1:]

    def loss(*overrides: str) -> float:
        return evaluate(tiny_config(*base, STAGES, *overrides), [last], "b", first_sequence=0)[0].loss

    results = {"stages": [log.stage for log in history],
               "by stage n": {n: loss(f"stages.1.num_selected={n}") for n in (3, 5, 8)},
               "nsa n 5": loss("nsa.num_selected=5", "stages.1.num_selected=null"),
               "by stage score": {score: loss(f"stages.1.selection_score={score}") for score in ("sum", "exact")},
               "nsa exact": loss("nsa.selection_score=exact")}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def test_a_stage_selects_with_its_own_n_and_score(tmp_path):
    out = tmp_path / "out.json"
    run_distributed(_run, 1, str(tmp_path / "run"), str(out))
    results = json.loads(out.read_text())
    assert results["stages"] == ["a", "a", "b", "b"]
    by_n = results["by stage n"]
    assert len({by_n["3"], by_n["5"], by_n["8"]}) == 3, by_n
    assert results["nsa n 5"] == by_n["5"]
    by_score = results["by stage score"]
    assert by_score["sum"] == by_n["5"] and by_score["exact"] != by_score["sum"], by_score
    assert results["nsa exact"] == by_score["exact"]
