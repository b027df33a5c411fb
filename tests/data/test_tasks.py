"""The synthetic long-context tasks and the NIAH scorer."""

import pytest
import torch

from nsa_dist.config import TASKS
from nsa_dist.data import mixed_sequences
from nsa_dist.config import MixConfig
from nsa_dist.evaluation import answer_niah, niah_cells, niah_grid
from nsa_dist.tasks import TaskTooLong, check_answer, generate
from nsa_dist.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed_and_answers_check(task):
    for index in range(20):
        for length in (300, 1000):
            sample = generate(task, TOKENIZER, length, seed=7, index=index)
            again = generate(task, TOKENIZER, length, seed=7, index=index)
            assert sample == again
            assert len(sample.tokens) == length
            assert TOKENIZER.decode(sample.answer).strip() == sample.answer_text
            assert check_answer(sample, TOKENIZER), TOKENIZER.decode(sample.tokens)
    seeds = {tuple(generate(task, TOKENIZER, 300, seed=s, index=0).tokens) for s in range(5)}
    assert len(seeds) == 5  # another seed, another sample


@pytest.mark.parametrize("task", TASKS)
def test_depth_places_the_fact(task):
    early = TOKENIZER.decode(generate(task, TOKENIZER, 2000, 1, 0, depth=0.0).prompt)
    late = TOKENIZER.decode(generate(task, TOKENIZER, 2000, 1, 0, depth=1.0).prompt)
    marker = {"passkey": "pass key is", "multikey_niah": "magic number for", "variable_tracking": "VAR "}[task]
    assert early.index(marker) < 200 and late.index(marker) > 1000


def test_too_short():
    with pytest.raises(TaskTooLong, match="needs at least"):
        generate("passkey", TOKENIZER, 50, 0, 0)


def test_mix_follows_the_shares():
    source = lambda index: torch.zeros(257, dtype=torch.int64)  # noqa: E731
    mix = MixConfig(source=0.5, passkey=0.25, multikey_niah=0.0, variable_tracking=0.25)
    sequences = mixed_sequences(source, mix, TOKENIZER, 256, seed=3)
    rows = [sequences(i) for i in range(400)]
    from_source = sum(int(row.sum() == 0) for row in rows)
    assert 160 < from_source < 240 and all(row.shape == (257,) for row in rows)
    assert all(torch.equal(rows[i], sequences(i)) for i in range(0, 400, 37))


def test_niah_scorer():
    cells = niah_cells("passkey", TOKENIZER, [200, 400], [0.0, 0.5, 1.0], samples=3, seed=0)
    assert len(cells) == 6 and all(len(samples) == 3 for samples in cells.values())
    right = answer_niah(cells, lambda samples: [s.answer_text for s in samples])
    wrong = answer_niah(cells, lambda samples: [s.answer_text + "0" for s in samples])
    assert niah_grid([200, 400], [0.0, 0.5, 1.0], cells, right)["mean_accuracy"] == 1.0
    grid = niah_grid([200, 400], [0.0, 0.5, 1.0], cells, wrong)
    assert grid["mean_accuracy"] == 0.0 and grid["accuracy"] == [[0.0, 0.0]] * 3
    first = cells[(200, 0.5)][0].answer_text
    assert grid["examples"][1][0][0] == {"expected": first, "predicted": first + "0"}
    assert all(len(cell) == 2 for row in grid["examples"] for cell in row)
    # one right answer of three in one cell
    one = {cell: texts if cell != (400, 1.0) else [cells[cell][0].answer_text, "", ""] for cell, texts in wrong.items()}
    assert niah_grid([200, 400], [0.0, 0.5, 1.0], cells, one)["accuracy"][2] == [0.0, pytest.approx(1 / 3)]
    # the prompt alone never holds the answer's position: a predictor that echoes the prompt's end fails
    echo = answer_niah(cells, lambda samples: [TOKENIZER.decode(s.prompt[-5:]) for s in samples])
    assert niah_grid([200, 400], [0.0, 0.5, 1.0], cells, echo)["mean_accuracy"] == 0
