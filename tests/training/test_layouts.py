"""Megatron-core GPT with NSA trains identically in every parallel layout, and learns.

Real processes on gloo (tests/dist_harness.py). To keep CI time bounded, one group of 4 processes
trains every multi-rank layout in turn (the trainer tears its parallel state down after each), and one
single process trains the references; each group pays its start-up once.
"""

import json

import pytest

from dist_harness import run_distributed
from tiny import tiny_config

FIRST_STEPS = 3
LEARN_STEPS = 20

# name -> overrides; on 4 processes, what is left of the world is data parallelism
LAYOUTS = {
    "DP4": [],
    "TP2": ["parallel.tensor=2"],
    "CP2": ["parallel.context=2"],
    "PP2": ["parallel.pipeline=2"],
    "TP2+CP2": ["parallel.tensor=2", "parallel.context=2"],
    "CP2+PP2": ["parallel.context=2", "parallel.pipeline=2"],
    "CP2+PP2 recompute": ["parallel.context=2", "parallel.pipeline=2", "training.recompute=true"],
    "TP2+PP2 kv shared phi mean": ["parallel.tensor=2", "parallel.pipeline=2", "nsa.kv=shared", "nsa.phi=mean"],
    "TP2 SP": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "TP2+CP2 SP": ["parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true"],
    "TP2 qk-layernorm": ["parallel.tensor=2", "model.qk_layernorm=true"],
    "TP2 gate bias": ["parallel.tensor=2", "nsa.gate_bias=[-2.0, -2.0, 2.0]"],
    "TP2+CP2 rope blocks kv shared": ["parallel.tensor=2", "parallel.context=2", "nsa.compression_rope=blocks",
                                      "nsa.kv=shared"],
    "TP2 SP micro-batch 2": ["parallel.tensor=2", "parallel.sequence_parallel=true", "training.micro_batch_size=2"],
    "dense DP4": ["model.attention=dense"],
    "dense TP2+CP2": ["model.attention=dense", "parallel.tensor=2", "parallel.context=2"],
    "dense TP2 micro-batch 2": ["model.attention=dense", "parallel.tensor=2", "training.micro_batch_size=2"],
}
# name -> (overrides, steps), trained on one process
REFERENCES = {
    "nsa": ([], FIRST_STEPS),
    "nsa kv shared phi mean": (["nsa.kv=shared", "nsa.phi=mean"], FIRST_STEPS),
    "nsa qk-layernorm": (["model.qk_layernorm=true"], FIRST_STEPS),
    "nsa gate bias": (["nsa.gate_bias=[-2.0, -2.0, 2.0]"], FIRST_STEPS),
    "nsa rope blocks kv shared": (["nsa.compression_rope=blocks", "nsa.kv=shared"], FIRST_STEPS),
    "dense": (["model.attention=dense"], FIRST_STEPS),
    "nsa learns": ([], LEARN_STEPS),
    "dense learns": (["model.attention=dense"], LEARN_STEPS),
}


def _train_runs(rank: int, world_size: int, runs: dict, out_path: str, run_root: str) -> None:
    from nsa_dist.trainer import train

    results = {}
    for index, (name, (overrides, steps)) in enumerate(runs.items()):
        # each run in its own run directory, or it would resume from the previous run's checkpoint
        result = train(tiny_config(*overrides, f"run.dir={run_root}/{index}", steps=steps))
        results[name] = [(log.loss, log.grad_norm) for log in result.history]
        results[f"{name} comm"] = result.history[0].comm
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def _spawn(world_size: int, runs: dict, tmp_path) -> dict:
    out_path = str(tmp_path / f"results_{world_size}.json")
    run_distributed(_train_runs, world_size, runs, out_path, str(tmp_path / "runs"))
    with open(out_path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return _spawn(1, REFERENCES, tmp_path_factory.mktemp("references"))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    runs = {name: (overrides, FIRST_STEPS) for name, overrides in LAYOUTS.items()}
    return _spawn(4, runs, tmp_path_factory.mktemp("layouts"))


def _reference_for(layout: str) -> str:
    if layout.startswith("dense"):
        return "dense"
    if "qk-layernorm" in layout:
        return "nsa qk-layernorm"
    if "gate bias" in layout:
        return "nsa gate bias"
    if "rope blocks" in layout:
        return "nsa rope blocks kv shared"
    return "nsa kv shared phi mean" if "kv shared" in layout else "nsa"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_steps_match_one_process(layout, layouts, references):
    """Loss and gradient norm of the first steps, fp32: the layout changes only summation order."""
    expected, got = references[_reference_for(layout)], layouts[layout]
    comm = layouts[f"{layout} comm"]
    if "CP2" in layout:  # every step reports its context-parallel collectives
        wanted = {"dense_kv"} if layout.startswith("dense") else {"halo", "compressed_kv", "selection_kv"}
        assert wanted <= set(comm) and all(comm[name]["bytes"] > 0 for name in wanted), comm
        assert all(entry["exposed_s"] >= 0 for entry in comm.values())
    else:
        assert comm == {}
    assert len(got) == len(expected) == FIRST_STEPS
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, expected), start=1):
        assert loss == pytest.approx(ref_loss, rel=1e-6), f"{layout} step {step} loss"
        assert norm == pytest.approx(ref_norm, rel=1e-6), f"{layout} step {step} grad norm"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["nsa learns", "dense learns"])
def test_twenty_steps_lower_the_loss(name, references):
    losses = [loss for loss, _ in references[name]]
    assert len(losses) == LEARN_STEPS
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < first - 0.5, f"{name}: loss {first:.3f} -> {last:.3f}"
