"""tools/layer_stats.py: the per-layer records of a run's first steps, end to end on CPU (the quickstart
model, a separate process, as a user runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from layer_stats import _block  # noqa: E402


def test_parameters_group_by_layer_and_block():
    assert _block("module.decoder.layers.0.self_attention.linear_qkv.weight") == "L1.attn"
    assert _block("module.decoder.layers.11.mlp.linear_fc2.weight") == "L12.mlp"
    assert _block("module.embedding.word_embeddings.weight") == "embedding.word_embeddings"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_tool_records_every_layer_at_every_step(attention, tmp_path):
    out = tmp_path / "stats.json"
    done = subprocess.run([sys.executable, "tools/layer_stats.py", "--config", "configs/quickstart.yaml", "--steps",
                           "3", "--out", str(out), "--set", f"model.attention={attention}",
                           "--set", "training.device=cpu", "--set", "training.dtype=fp32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(r["layers"]) == {"1", "2"}
        for stats in r["layers"].values():
            assert 0 < stats["q_rms"] and 0 < stats["k_rms"] and 0 < stats["attn_out_rms"] < stats["out_max"]
            # the bound is the largest q norm times the largest k norm times 1/sqrt(32): at least the RMS pair's
            assert stats["logit_bound"] >= stats["q_rms"] * stats["k_rms"] * 32 ** 0.5 * 0.999
            gates = [stats.get(f"gate_{b}") for b in ("cmp", "slc", "win")]
            assert all(0.3 < g < 0.7 for g in gates) if attention == "nsa" else gates == [None] * 3
        # every block's weights moved (Adam's first steps move each by about lr per entry) and had gradients
        assert {"L1.attn", "L1.mlp", "L2.attn", "L2.mlp", "embedding.word_embeddings"} <= set(r["blocks"])
        assert all(b["update"] > 0 and b["grad_norm"] > 0 for b in r["blocks"].values())
        # the blocks' norms, clipping undone, make up the step's gradient norm (above the clip of 1 here)
        assert r["grad_norm"] > 1.0
        assert sum(b["grad_norm"] ** 2 for b in r["blocks"].values()) ** 0.5 == pytest.approx(r["grad_norm"], rel=1e-3)
    assert "largest loss rise" in done.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--set", "model.attention=sparse"], "model.attention='sparse' is not allowed"),
])
def test_tool_refuses_bad_input_by_name(args, message, tmp_path):
    done = subprocess.run([sys.executable, "tools/layer_stats.py", "--config", "configs/quickstart.yaml", *args,
                           "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "x.json").exists()
