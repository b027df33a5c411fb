"""The synthetic long-context tasks and the NIAH scorer."""

import pytest
import torch

from nsa_dist.config import TASKS
from nsa_dist.data import MixedSequences, task_sequence
from nsa_dist.config import MixConfig
from nsa_dist.evaluation import answer_niah, answer_prefix, niah_cells, niah_grid
from nsa_dist.tasks import INSTRUCTIONS, TaskTooLong, check_answer, generate, minimum_length
from nsa_dist.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed_and_answers_check(task):
    for index in range(20):
        for length in (400, 1000):
            sample = generate(task, TOKENIZER, length, seed=7, index=index)
            again = generate(task, TOKENIZER, length, seed=7, index=index)
            assert sample == again
            assert len(sample.tokens) == length
            assert TOKENIZER.decode(sample.answer).strip() == sample.answer_text
            assert check_answer(sample, TOKENIZER), TOKENIZER.decode(sample.tokens)
    seeds = {tuple(generate(task, TOKENIZER, 400, seed=s, index=0).tokens) for s in range(5)}
    assert len(seeds) == 5  # another seed, another sample


@pytest.mark.parametrize("task", TASKS)
def test_depth_places_the_fact(task):
    early = TOKENIZER.decode(generate(task, TOKENIZER, 2000, 1, 0, depth=0.0).prompt)
    late = TOKENIZER.decode(generate(task, TOKENIZER, 2000, 1, 0, depth=1.0).prompt)
    marker = {"passkey": "The pass key is", "multikey_niah": "The special magic", "variable_tracking": "VAR "}[task]
    assert early.index(marker) < 200 and late.index(marker) > 1000
    # the instruction opens every sample; at depth 0 the fact comes right after it, not at position 0
    instruction = INSTRUCTIONS[task]
    assert early.startswith(instruction) and late.startswith(instruction)
    assert early.index(marker) == len(instruction) + 1  # after the fact's leading space


def test_too_short():
    with pytest.raises(TaskTooLong, match="needs at least"):
        generate("passkey", TOKENIZER, 50, 0, 0)


def test_mix_follows_the_shares():
    source = lambda index: torch.zeros(257, dtype=torch.int64)  # noqa: E731
    mix = MixConfig(source=0.5, passkey=0.25, multikey_niah=0.0, variable_tracking=0.25)
    sequences = MixedSequences(source, mix, TOKENIZER, 256, seed=3)
    rows = [sequences(i) for i in range(400)]
    from_source = sum(int(row.sum() == 0) for row in rows)
    assert 160 < from_source < 240 and all(row.shape == (257,) for row in rows)
    assert all(torch.equal(rows[i], sequences(i)) for i in range(0, 400, 37))


@pytest.mark.parametrize("task", TASKS)
def test_packed_task_sequence_holds_whole_samples(task):
    """task_min_length > 0: samples end to end, each ended by EOD, each answerable from its own text, at
    lengths from the minimum up to most of the sequence; exactly the length asked for."""
    import re

    length, min_length = 2049, max(200, minimum_length(task, TOKENIZER) + 1)
    lengths = []
    for index in range(6):
        tokens = task_sequence(task, TOKENIZER, length, seed=1, index=index, min_length=min_length)
        assert len(tokens) == length and tokens[-1] == TOKENIZER.eod
        ends = [i for i, token in enumerate(tokens) if token == TOKENIZER.eod]
        starts = [0] + [end + 1 for end in ends[:-1]]
        for start, end in zip(starts, ends):
            lengths.append(end + 1 - start)
            text = TOKENIZER.decode(tokens[start:end])
            assert len(re.findall(r"What is the pass key|special magic number for \w+\?|Question:", text)) == 1
        assert task_sequence(task, TOKENIZER, length, 1, index, min_length) == tokens  # a function of the index
    assert min(lengths) >= min_length and max(lengths) > length // 3 and len(lengths) > 2 * 6
    # each sample is the generator's own, with its answer: the packed passkey samples answer right
    if task == "passkey":
        tokens = task_sequence(task, TOKENIZER, length, seed=1, index=0, min_length=min_length)
        text = TOKENIZER.decode(tokens[:tokens.index(TOKENIZER.eod)])
        key = re.findall(r"The pass key is (\d+)\. Remember it", text)
        assert len(key) == 1 and text.endswith(f"The pass key is {key[0]}")
    # 0 (the default), or a sequence shorter than two samples: one sample fills it
    assert task_sequence(task, TOKENIZER, length, 1, 0) == generate(task, TOKENIZER, length, 1, 0).tokens
    short = 2 * min_length - 1
    assert task_sequence(task, TOKENIZER, short, 1, 0, min_length) == generate(task, TOKENIZER, short, 1, 0).tokens
    # max_length caps the samples (a remainder shorter than min_length may join the last one)
    capped = 0
    for index in range(6):
        tokens = task_sequence(task, TOKENIZER, length, 1, index, min_length, 2 * min_length)
        ends = [i for i, token in enumerate(tokens) if token == TOKENIZER.eod]
        sizes = [end - start for start, end in zip([-1] + ends[:-1], ends)]
        assert len(tokens) == length and tokens[-1] == TOKENIZER.eod and min(sizes) >= min_length
        assert max(sizes[:-1]) <= 2 * min_length and sizes[-1] < 3 * min_length
        capped += len(sizes)
    assert capped > len(lengths)
    # full_share: that share of the sequences (drawn per index) hold one sample as long as the sequence;
    # the others are the packed sequences above, unchanged
    full = [index for index in range(40)
            if task_sequence(task, TOKENIZER, length, 1, index, min_length, full_share=0.5)
            == generate(task, TOKENIZER, length, 1, index).tokens]
    assert 10 <= len(full) <= 30
    for index in set(range(40)) - set(full):
        assert task_sequence(task, TOKENIZER, length, 1, index, min_length, full_share=0.5) == \
            task_sequence(task, TOKENIZER, length, 1, index, min_length)
    assert all(task_sequence(task, TOKENIZER, length, 1, index, min_length, full_share=1.0)
               == generate(task, TOKENIZER, length, 1, index).tokens for index in range(3))


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


def test_answer_prefix_grades_a_miscopied_answer():
    """answer_prefix: the part of the answer right before the first wrong character, as greedy decoding
    (nsa_dist.evaluation.greedy_predictor) returns a wrong answer up to its first wrong token."""
    assert answer_prefix("89275", " 89275") == 1.0
    assert answer_prefix("89275", " 8925") == pytest.approx(3 / 5)  # 8, 9, 2 right; 5 where 7 belongs
    assert answer_prefix("89275", " 1") == 0.0
    assert answer_prefix("89275", "") == 0.0
    cells = niah_cells("passkey", TOKENIZER, [200], [0.0, 1.0], samples=2, seed=0)
    # depth 0: both answers right; depth 1: one with its first two digits right, one wrong from the start
    answers = {(200, 0.0): [s.answer_text for s in cells[(200, 0.0)]],
               (200, 1.0): [" " + cells[(200, 1.0)][0].answer_text[:2] + "x", " x"]}
    grid = niah_grid([200], [0.0, 1.0], cells, answers)
    assert grid["accuracy"] == [[1.0], [0.0]]
    assert grid["answer_prefix"] == [[1.0], [pytest.approx(2 / 5 / 2)]]
    assert grid["mean_answer_prefix"] == pytest.approx((1 + 0.2) / 2)


def test_one_pass_predictor_answers_as_greedy_decoding():
    """greedy_predictor reads the greedy answer off one forward pass over prompt + true answer. Against
    token-by-token greedy decoding with a causal stand-in model: a right answer comes back whole, a wrong
    one up to and including the first token greedy decoding gets wrong."""
    from nsa_dist.evaluation import greedy_predictor
    from nsa_dist.tasks import TaskSample

    vocab = 256

    def model(tokens, *_):  # causal: position t predicts from tokens t-2..t only
        prev = torch.nn.functional.pad(tokens, (2, 0))
        following = (prev[:, 2:] * 7 + prev[:, 1:-1] * 3 + prev[:, :-2] + 1) % vocab
        return torch.nn.functional.one_hot(following, vocab).float()

    def greedy(prompt, new):
        tokens = list(prompt)
        for _ in range(new):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
        return tokens[len(prompt):]

    generator = torch.Generator().manual_seed(0)
    samples = []
    for k in range(6):
        prompt = torch.randint(vocab, (37,), generator=generator).tolist()
        answer = greedy(prompt, 5)
        if k % 2:  # wrong from answer token k // 2 on
            answer = answer[: k // 2] + [(t + 1) % vocab for t in answer[k // 2:]]
        samples.append(TaskSample("passkey", prompt, answer, TOKENIZER.decode(answer).strip(), 0.5))
    predicted = greedy_predictor(model, TOKENIZER, torch.device("cpu"), pad_to=16)(samples)
    for k, (sample, text) in enumerate(zip(samples, predicted)):
        decoded = greedy(sample.prompt, len(sample.answer))
        first_wrong = next((i for i, (a, b) in enumerate(zip(decoded, sample.answer)) if a != b), None)
        assert (first_wrong is None) == (k % 2 == 0)
        expected = decoded if first_wrong is None else decoded[: first_wrong + 1]
        assert text == TOKENIZER.decode(expected), k


@pytest.mark.parametrize("min_length", [0, 128])
def test_answer_spans_hold_the_answers(min_length):
    """task_samples marks where each sample's answer lies: there, the sequence holds exactly the answer that
    the sample's own text gives (found by check_answer's rules), and nowhere else is marked."""
    import re

    from nsa_dist.data import task_samples

    tokens, answers = task_samples("passkey", TOKENIZER, 1024, 1, 7, min_length)
    assert len(tokens) == 1024
    assert len(answers) == 1 if min_length == 0 else len(answers) >= 3  # one sample, or several packed
    text_before = 0
    for answer in answers:
        said = TOKENIZER.decode(tokens[text_before : answer.start])
        key = re.findall(r"The pass key is (\d+)\. Remember it", said)[-1]
        assert TOKENIZER.decode(tokens[answer.start : answer.stop]) == " " + key
        text_before = answer.stop
    assert task_samples("passkey", TOKENIZER, 1024, 1, 7, min_length)[0] == task_sequence(
        "passkey", TOKENIZER, 1024, 1, 7, min_length)


def test_task_distances_replays_the_sampler():
    """tools/task_distances.py counts, per stage, the task samples the training sequences hold and how far
    before the question each puts its fact, from the sampler's draws alone. Against the sequences
    themselves (the trainer's numbering: the second stage's follow the first's): as many samples, each
    passkey fact found within a few percent of the sample's length of where the tool puts it, some packed
    and some whole (task_full_share)."""
    import re
    import sys
    from pathlib import Path

    from nsa_dist.config import load_config
    from nsa_dist.data import stage_sequences, with_answers

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import task_distances

    mix = "{source: 0.25, passkey: 0.75, task_min_length: 300, task_full_share: 0.3}"
    config = load_config(None, [f"stages=[{{name: a, seq_len: 1024, steps: 2, global_batch_size: 4, mix: {mix}}}, "
                                f"{{name: b, seq_len: 2048, steps: 3, global_batch_size: 4, mix: {mix}}}]",
                                "training.warmup_steps=1"])
    stage = config.resolved_stages()[1]
    sequences = stage_sequences(config, stage.seq_len, stage.mix)
    found, whole = [], 0
    for index in range(2 * 4, 2 * 4 + 3 * 4):  # after stage a's 8 sequences
        tokens, answers = with_answers(sequences, index)
        text = TOKENIZER.decode(tokens.tolist())
        ends = [0] + [m.end() for m in re.finditer(re.escape(TOKENIZER.decode([TOKENIZER.eod])), text)]
        starts = [m.start() for m in re.finditer(r"The pass key is \d+\. Remember it", text)]
        questions = [m.start() for m in re.finditer(r"What is the pass key", text)]
        assert len(starts) == len(questions)
        found += [(q - s, q - max(e for e in ends if e <= s)) for s, q in zip(starts, questions)]
        whole += len(starts) == 1 and TOKENIZER.eod not in tokens[:-1].tolist()
    distances = task_distances.lookup_distances(config, stage)
    assert len(distances) == len(found) > 12 and 0 < whole < 12
    for distance, (true, sample_length) in zip(distances, found):
        assert abs(distance - true) <= 0.05 * 2048 + 40, (distance, true, sample_length)
    rows = task_distances.report(config)
    assert [row["task_samples"] for row in rows] == [len(task_distances.lookup_distances(config, s))
                                                      for s in config.resolved_stages()]
    assert rows[1]["at_least"]["0.2"] == sum(d >= 0.2 * 2048 for d in distances)
