"""tools/selection_overlap.py: the overlap measure on hand-made picks, and the tool end to end on CPU (the
quickstart NSA model at its initial weights, a separate process, as a user runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from selection_overlap import union_ratio  # noqa: E402


def test_union_ratio_counts_distinct_valid_blocks_per_tile():
    # [B=1, T=4, HK=1, n=3]; -1 is no block. Tokens 0-1 pick {0,1,2} and {0,1,3}; tokens 2-3 pick {0,5} and {0,5}
    picks = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 5, -1], [5, 0, -1]]).reshape(1, 4, 1, 3)
    per_token = (3 + 3 + 2 + 2) / 4
    assert union_ratio(picks, 1) == pytest.approx(1.0)
    assert union_ratio(picks, 2) == pytest.approx(((4 + 2) / 2) / per_token)
    assert union_ratio(picks, 4) == pytest.approx(5 / per_token)  # {0, 1, 2, 3, 5}


@pytest.mark.timeout(300)
def test_tool_reports_each_layer_and_random_inputs(tmp_path):
    out = tmp_path / "overlap.json"
    done = subprocess.run([sys.executable, "tools/selection_overlap.py", "--config", "configs/quickstart.yaml",
                           "--seq-len", "512", "--sequences", "1", "--tiles", "1", "2", "4", "--out", str(out),
                           "--set", "training.dtype=fp32", "--set", "training.device=cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["union_over_one_token"]
    assert list(rows) == ["layer 1", "layer 2", "mean over layers"]
    for row in [*rows.values(), report["random_inputs"]]:
        ratios = [row[str(tile)] for tile in (1, 2, 4)]
        assert ratios[0] == pytest.approx(1.0)
        assert all(a <= b + 1e-12 for a, b in zip(ratios, ratios[1:])) and ratios[2] <= 4
    # 512 tokens hold 16 blocks of 32 and each token picks 4: later tokens pick among many, so tiles differ
    assert report["random_inputs"]["4"] > 1.0
    assert "layer 2" in done.stdout and "random q, k" in done.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    (["--tiles", "1", "0"], "--tiles 1 0: every tile size must be at least 1 token"),
    (["--checkpoint", "/nonexistent/step_1"], "checkpoint /nonexistent/step_1 does not exist"),
    (["--set", "model.attention=dense"], "model.attention='dense' in configs/quickstart.yaml: selection overlap "
                                         "needs an NSA model"),
])
def test_tool_refuses_bad_input_by_name(args, message, tmp_path):
    done = subprocess.run([sys.executable, "tools/selection_overlap.py", "--config", "configs/quickstart.yaml",
                           *args, "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=100)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "x.json").exists()
