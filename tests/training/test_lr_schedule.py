"""The learning rate the trainer sets at each global step (nsa_dist.trainer.lr_scheduler, on Megatron-core's
OptimizerParamScheduler), positioned as a resumed run positions it."""

import math

import torch

from nsa_dist.checkpoint import TrainState
from nsa_dist.config import load_config
from nsa_dist.trainer import lr_scheduler

SCHEDULE = ["training.lr=1e-3", "training.min_lr=1e-4", "training.warmup_steps=2"]
ONE_STAGE = "stages=[{name: a, seq_len: 1024, steps: 10}]"
TWO_STAGES = "stages=[{name: a, seq_len: 1024, steps: 10}, {name: b, seq_len: 2048, steps: 30}]"


def learning_rates(overrides: list[str]) -> list[float]:
    """The rate of every step of the run, each from a scheduler built for that step."""
    config = load_config(None, SCHEDULE + overrides)
    rates = []
    for stage in config.resolved_stages():
        for stage_step in range(stage.steps):
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
            state = TrainState(step=stage.first_step + stage_step, stage_index=stage.index, stage_step=stage_step)
            lr_scheduler(optimizer, config, stage, state)
            rates.append(optimizer.param_groups[0]["lr"])
    return rates


def cosine(step: int, decay_steps: int) -> float:
    """After the 2 warmup steps: the cosine from 1e-3 to 1e-4 at decay_steps."""
    ratio = (step - 2) / (decay_steps - 2)
    return 1e-4 + (1e-3 - 1e-4) * 0.5 * (math.cos(math.pi * ratio) + 1)


def test_run_wide_cosine_ends_at_the_last_step():
    rates = learning_rates([TWO_STAGES])
    assert len(rates) == 40
    assert rates[:3] == [0.0, 5e-4, 1e-3]  # linear warmup
    for step in range(2, 40):
        assert math.isclose(rates[step], cosine(step, 40), rel_tol=1e-9), step
    assert rates[39] > 1e-4  # still decaying at the last step


def test_lr_decay_steps_keep_the_earlier_steps_when_later_stages_grow():
    """With training.lr_decay_steps=10, a second stage of 30 steps leaves the first stage's rates as a
    10-step run has them, and runs at min_lr."""
    short = learning_rates([ONE_STAGE])
    extended = learning_rates([TWO_STAGES, "training.lr_decay_steps=10"])
    assert extended[:10] == short
    assert short[9] > 1e-4 and short[2] == 1e-3
    assert extended[10:] == [1e-4] * 30
    # without it the first stage's rates move: the cosine spans all 40 steps
    assert learning_rates([TWO_STAGES])[5] > short[5]
