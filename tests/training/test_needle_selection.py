"""tools/needle_selection.py: the needle's positions, the hit measure and the needle's rank on hand-made picks
and scores, and the tool end to end on CPU (the quickstart NSA model at its initial weights, a separate process, as a user runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from needle_selection import (answer_rows, needle_hit, needle_positions, rank_in_topn_order,  # noqa: E402
                              with_needle_blocks)
from nsa_dist.tasks import TaskSample  # noqa: E402


def test_needle_is_every_copy_of_the_answer_in_the_prompt():
    sample = TaskSample("passkey", prompt=[5, 1, 2, 7, 1, 2, 9, 1], answer=[1, 2], answer_text="12", depth=0.5)
    assert needle_positions(sample) == [1, 2, 4, 5]
    assert answer_rows(sample) == [7, 8]  # the logits at 7 predict answer[0], at 8 answer[1]


def test_needle_hit_counts_rows_and_heads_whose_picks_hold_a_needle_block():
    # [1, T=4, HK=2, n=2], blocks of 16 tokens; the needle at positions 20-21 (block 1) and 40 (block 2)
    picks = torch.tensor([[[0, 3], [0, 1]], [[2, -1], [0, 3]], [[0, -1], [0, -1]], [[1, 2], [0, 1]]])[None]
    assert needle_hit(picks, [0, 1], [20, 21, 40], 16) == pytest.approx(2 / 4)  # rows 0-1: heads (0,1), (1,0)
    assert needle_hit(picks, [2], [20, 21, 40], 16) == 0.0
    assert needle_hit(picks, [3], [20, 21, 40], 16) == 1.0


def test_rank_follows_topn_order_forced_blocks_first():
    # rows at positions 100 and 56, blocks of 16: row 0 may pick blocks 0-6 (0, 5, 6 forced), row 1 blocks
    # 0-3 (0, 2, 3 forced); a future block's score (0.8, 0.9) does not count
    scores = torch.tensor([[0.0, 0.3, 0.9, 0.1, 0.5, 0.0, 0.0, 0.8],
                           [0.0, 0.2, 0.0, 0.0, 0.9, 0.9, 0.9, 0.9]])
    positions = torch.tensor([100, 56])
    # row 0: the forced three rank 1-3, then 2 (0.9), 4 (0.5), 1 (0.3), 3 (0.1); row 1: 1 after the forced
    assert rank_in_topn_order(scores, positions, [1], 16).tolist() == [6, 4]
    assert rank_in_topn_order(scores, positions, [3, 4], 16)[0].item() == 5  # the best of the needle's blocks
    assert rank_in_topn_order(scores, positions, [5], 16)[0].item() == 1  # forced: always first


def test_oracle_swaps_the_lowest_free_pick_for_each_missing_needle_block():
    # blocks of 16, n = 5; rows at positions 100 (blocks 0-6, forced 0, 5, 6) and 101; one KV head
    picks = torch.tensor([[[0, 1, 3, 5, 6]], [[0, 2, 5, 6, -1]]], dtype=torch.int32)[None]  # [1, T=2, HK=1, n]
    scores = torch.tensor([[[0.0, 0.3, 0.1, 0.2, 0.9, 0.0, 0.0]], [[0.0, 0.3, 0.1, 0.2, 0.9, 0.0, 0.0]]])
    out = with_needle_blocks(picks, scores, [0, 1], torch.tensor([100, 101]), [4], 16)
    # row 0: block 4 replaces block 3 (score 0.2 < block 1's 0.3); row 1: it fills the empty slot
    assert out[0, 0, 0].tolist() == [0, 1, 4, 5, 6] and out[0, 1, 0].tolist() == [0, 2, 4, 5, 6]
    assert picks[0, 0, 0].tolist() == [0, 1, 3, 5, 6]  # the input is left as it was
    # two needle blocks, one already picked and one missing: only the free pick goes, never a forced one
    out = with_needle_blocks(picks[:, :1], scores[:1], [0], torch.tensor([100]), [1, 2], 16)
    assert out[0, 0, 0].tolist() == [0, 1, 2, 5, 6]
    # a needle block after the row (here block 7 > 6) is not the row's to take
    assert torch.equal(with_needle_blocks(picks, scores, [0, 1], torch.tensor([100, 101]), [7], 16), picks)


def _run(tmp_path, *args):
    out = tmp_path / "needle.json"
    done = subprocess.run([sys.executable, "tools/needle_selection.py", "--config", "configs/quickstart.yaml",
                           "--samples", "2", *args, "--out", str(out), "--set", "training.dtype=fp32",
                           "--set", "training.device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.timeout(300)
def test_tool_reports_each_depth_and_layer(tmp_path):
    # selection blocks of 64: at depth 0 the pass key (after the task's 32-token instruction) is in block 0
    report, stdout = _run(tmp_path, "--length", "512", "--depths", "0", "0.5", "--set", "nsa.selection_block=64")
    assert report["length"] == 512 and list(report["depths"]) == ["0.0", "0.5"]
    for depth, row in report["depths"].items():
        assert len(row["layers"]) == 2 and 0 <= row["accuracy"] <= 1
        for layer in row["layers"]:
            assert 0 <= layer["hit"] <= 1 and set(layer["gates"]) == {"cmp", "slc", "win"}
            assert all(0 < g < 1 for g in layer["gates"].values())
            # the ranks recomputed from compressed attention's scores reproduce what top-n picked
            assert layer["group_hit"] == pytest.approx(layer["hit"])
            assert 1 <= layer["rank_best_head"] and 1 <= layer["rank_group"] and 0 <= layer["head_hit"] <= 1
            assert 1 <= layer["rank_max_score"] and 0 <= layer["max_score_hit"] <= 1
    # at depth 0 the needle sits in block 0, which every query takes; far outside the 64-token window
    assert all(layer["hit"] == 1.0 for layer in report["depths"]["0.0"]["layers"])
    assert all(layer["rank_group"] == layer["rank_best_head"] == 1 for layer in report["depths"]["0.0"]["layers"])
    assert report["depths"]["0.0"]["needle_in_window"] == 0.0
    # at depth 0.5 (block 4 of 8) the picks are not forced: some rows rank it below n = 4
    assert any(layer["rank_group"] > 1 for layer in report["depths"]["0.5"]["layers"])
    assert "L2" in stdout and "0.50" in stdout and "the best single query head's" in stdout
    # 256 tokens are n = 4 blocks of 64: every query takes every block, so the needle is always picked
    report, _ = _run(tmp_path, "--length", "256", "--depths", "0.5", "--set", "nsa.selection_block=64")
    assert all(layer["hit"] == 1.0 for layer in report["depths"]["0.5"]["layers"])


@pytest.mark.timeout(300)
def test_oracle_puts_the_needle_into_every_layers_picks(tmp_path):
    """Without the oracle, top-n at initial weights misses the needle's block in some layer at depth 0.5 (n = 4
    of 8 blocks, three of them forced); with it, every layer's picks hold it at every answer row."""
    args = ["--length", "512", "--depths", "0.5", "--set", "nsa.selection_block=64"]
    plain, _ = _run(tmp_path, *args)
    assert plain["oracle"] is False and min(layer["hit"] for layer in plain["depths"]["0.5"]["layers"]) < 1.0
    forced, stdout = _run(tmp_path, *args, "--oracle")
    assert forced["oracle"] is True and "oracle, the needle's blocks put into the picks" in stdout
    assert all(layer["hit"] == 1.0 for layer in forced["depths"]["0.5"]["layers"])
    # the first layer's top-n scored the same input either way (the ranks are top-n's, not the oracle's)
    first = plain["depths"]["0.5"]["layers"][0], forced["depths"]["0.5"]["layers"][0]
    assert first[0]["rank_group"] == first[1]["rank_group"] and first[0]["group_hit"] == first[1]["group_hit"]


@pytest.mark.timeout(300)
def test_oracle_in_chosen_layers_and_one_layer_at_a_time(tmp_path):
    """--oracle-layers forces the needle in the layers named only; --oracle-sweep adds a pass per layer with
    the oracle in that layer alone, beside a main pass with top-n's own picks."""
    args = ["--length", "512", "--depths", "0.5", "--set", "nsa.selection_block=64"]
    swept, stdout = _run(tmp_path, *args, "--oracle-sweep")
    plain = swept["depths"]["0.5"]["layers"]
    assert swept["oracle"] is False and swept["oracle_layers"] is None
    assert min(layer["hit"] for layer in plain) < 1.0  # top-n at initial weights misses it somewhere
    assert list(swept["oracle_sweep"]) == ["1", "2"] and "with the oracle in one layer alone" in stdout
    for forced_layer, passes in swept["oracle_sweep"].items():
        row = passes["0.5"]
        assert 0 <= row["accuracy"] <= 1 and row["hits"][int(forced_layer) - 1] == 1.0
    # forcing layer 2 leaves layer 1's picks as top-n made them (its input does not depend on layer 2)
    assert swept["oracle_sweep"]["2"]["0.5"]["hits"][0] == plain[0]["hit"]
    second, stdout = _run(tmp_path, *args, "--oracle-layers", "2")
    assert second["oracle"] is True and second["oracle_layers"] == [2] and "of layers 2 only" in stdout
    first, last = second["depths"]["0.5"]["layers"]
    assert last["hit"] == 1.0 and first["hit"] == plain[0]["hit"] and first["rank_group"] == plain[0]["rank_group"]
    assert second["depths"]["0.5"]["accuracy"] == swept["oracle_sweep"]["2"]["0.5"]["accuracy"]


@pytest.mark.timeout(300)
def test_tool_follows_the_models_selection_score(tmp_path):
    """With nsa.selection_score "max" the model selects by the largest head's score, and the group's rank
    (computed with the configured score) still reproduces its picks, and equals the "max" rank."""
    report, stdout = _run(tmp_path, "--length", "512", "--depths", "0.5", "--set", "nsa.selection_block=64",
                          "--set", "nsa.selection_score=max")
    assert report["nsa"]["selection_score"] == "max" and "group's score (max)" in stdout
    for layer in report["depths"]["0.5"]["layers"]:
        assert layer["group_hit"] == pytest.approx(layer["hit"])
        assert layer["rank_group"] == layer["rank_max_score"] and layer["group_hit"] == layer["max_score_hit"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("score", ["exact", "bound", "indexer"])
def test_tool_compares_scores_when_the_model_selects_by_the_raw_keys(tmp_path, score):
    """With nsa.selection_score "exact", "bound" or "indexer" the layers hand top-n the raw keys, and the report
    ranks the needle by the sum, exact and bound scores side by side, and by the learned indexer's where the
    model has one: the model's own score reproduces its picks."""
    indexer = ["--set", "nsa.indexer_heads=2"] if score == "indexer" else []
    report, stdout = _run(tmp_path, "--length", "512", "--depths", "0.5", "--set", "nsa.selection_block=64",
                          "--set", f"nsa.selection_score={score}", *indexer)
    names = ["sum", "exact", "bound"] + (["indexer"] if indexer else [])
    assert report["nsa"]["selection_score"] == score and f"by score: {' / '.join(names)}" in stdout
    for layer in report["depths"]["0.5"]["layers"]:
        assert set(layer["rank_by"]) == set(layer["hit_by"]) == set(names)
        assert layer["hit_by"][score] == pytest.approx(layer["hit"]) == pytest.approx(layer["group_hit"])
        assert all(1 <= rank <= 8 for rank in layer["rank_by"].values())  # 512 tokens: 8 blocks of 64
    if score == "exact":
        plain, _ = _run(tmp_path, "--length", "512", "--depths", "0.5", "--set", "nsa.selection_block=64")
        assert "rank_by" not in plain["depths"]["0.5"]["layers"][0]  # the sum's layers hand top-n no raw keys


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    (["--depths", "0.5", "1.5"], "--depths 0.5 1.5: every depth must lie in [0, 1]"),
    (["--length", "40"], "--length 40: a passkey sample needs at least"),
    (["--oracle-layers", "0", "3"], "--oracle-layers 0 3: layers are numbered 1 to 2 (model.num_layers)"),
    (["--set", "model.attention=dense"], "model.attention='dense' in configs/quickstart.yaml: needle selection "
                                         "needs an NSA model"),
])
def test_tool_refuses_bad_input_by_name(args, message, tmp_path):
    done = subprocess.run([sys.executable, "tools/needle_selection.py", "--config", "configs/quickstart.yaml",
                           *args, "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=100)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "x.json").exists()
