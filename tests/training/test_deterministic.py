"""training.deterministic on real gloo processes, with NSA's Triton kernels (the interpreter on CPU): while
the run trains, PyTorch's deterministic algorithms are on and Megatron's model is built in its
deterministic mode; the compressed branch's backward takes the split path (no atomics) where it would
otherwise take the one pass; the split path's gradients train the model as the one pass's do; and the
process's setting is restored once the run returns. (Two GPU runs repeating each other to the bit:
benchmarks/gpu_checks/deterministic.sh; a CPU run repeats itself either way.)"""

import json
import math

import pytest

from dist_harness import run_distributed
from tiny import tiny_config


def _run(rank: int, world_size: int, root: str, out_path: str) -> None:
    import torch
    from megatron.core.utils import get_model_config

    import kernels.compressed_attention.triton as compressed
    from kernels import range_attention
    from nsa_dist.trainer import TrainingHooks, train

    # the one pass from the first token (it starts at 16K tokens of 64 heads of 128), so that the default run takes it here
    compressed.ONE_PASS_MIN_WORK = 1
    paths = []
    for name in ("_bwd_one_pass", "_bwd_split"):
        def counted(*args, _original=getattr(range_attention, name), _name=name):
            paths.append(_name)
            return _original(*args)

        setattr(range_attention, name, counted)

    class Seen(TrainingHooks):
        def __init__(self):
            self.enabled, self.mode = [], None

        def model_built(self, model, stage):
            self.mode = get_model_config(model).deterministic_mode

        def step(self, log):
            self.enabled.append(torch.are_deterministic_algorithms_enabled())

    results = {}
    for name, extra in (("default", []), ("deterministic", ["training.deterministic=true"])):
        paths.clear()
        seen = Seen()
        config = tiny_config("nsa.impl=triton", "model.num_layers=1", "training.global_batch_size=2", *extra,
                             f"run.dir={root}/{name}", steps=2)
        losses = [log.loss for log in train(config, [seen]).history]
        results[name] = dict(losses=losses, paths=sorted(set(paths)), enabled=seen.enabled, mode=seen.mode,
                             after=torch.are_deterministic_algorithms_enabled())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


@pytest.mark.timeout(300)
def test_deterministic_training_takes_the_deterministic_paths(tmp_path):
    out = tmp_path / "out.json"
    run_distributed(_run, 2, str(tmp_path / "runs"), str(out))
    default, deterministic = json.loads(out.read_text()).values()
    assert default["enabled"] == [False, False] and default["mode"] is False
    assert default["paths"] == ["_bwd_one_pass", "_bwd_split"]  # the compressed branch's one pass, the window's split
    assert deterministic["enabled"] == [True, True] and deterministic["mode"] is True
    assert deterministic["paths"] == ["_bwd_split"]
    assert deterministic["after"] is False and default["after"] is False
    # the same first step; then the split path's gradients, equal up to the order of their sums
    assert deterministic["losses"][0] == default["losses"][0]
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(deterministic["losses"], default["losses"]))
