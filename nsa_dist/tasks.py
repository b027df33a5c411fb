"""Synthetic long-context tasks, generated offline from a seed: passkey retrieval, multi-key needle in a
haystack and variable tracking (after RULER). Each sample is a one-sentence instruction, then filler text
with facts hidden in it, then a question; its answer is the text the model should continue with. The
instruction comes first, as in the usual passkey and NIAH formats, so that a fact at depth 0 follows it
instead of opening the sample.

Every sample is a function of (task, seed, index, length, depth) alone: training mixes them into its
sequences by index (nsa_dist/data.py), and the NIAH grid of nsa_dist/evaluation.py asks for given
lengths and depths. Samples are assembled from token pieces, so a sample has exactly the length asked
for with any tokenizer; the answer is compared as text.
"""

import functools
import random
import string
from dataclasses import dataclass

from nsa_dist.config import TASKS

FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs to the sea.", "A day has twenty-four hours.", "Birds sing in the morning.",
    "The road goes on and on.", "Snow falls in winter.", "The library opens at nine.", "Trains leave on time.",
)
WORDS = (
    "apple", "bridge", "candle", "desert", "engine", "falcon", "garden", "harbor", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "orchid", "pepper", "quartz", "rocket", "saddle", "tunnel",
    "umbrella", "violin", "walnut", "yogurt", "zephyr", "marble", "copper", "ribbon", "silver", "timber",
)


@dataclass
class TaskSample:
    task: str
    prompt: list[int]  # tokens up to where the answer starts
    answer: list[int]  # the answer's tokens (the greedy continuation should decode to answer_text)
    answer_text: str
    depth: float  # where the (asked-for) fact sits in the filler, 0 (start) to 1 (end)

    @property
    def tokens(self) -> list[int]:
        """The whole sample, as training sees it: prompt then answer."""
        return self.prompt + self.answer


class TaskTooLong(ValueError):
    """The sample's facts and question need more tokens than the length asked for."""


INSTRUCTIONS = {
    "passkey": " Find and remember the pass key.",
    "multikey_niah": " Find and remember the magic numbers.",
    "variable_tracking": " Find and track the variables.",
}


def _rng(task: str, seed: int, index: int, length: int) -> random.Random:
    return random.Random(f"{task}/{seed}/{index}/{length}")  # str seeds hash with sha512: stable across runs


@functools.lru_cache(maxsize=None)
def _filler_sentences(tokenizer) -> tuple[list[int], ...]:
    """FILLER's sentences, each encoded once per tokenizer (samples are generated on the training thread)."""
    return tuple(tokenizer.encode(" " + sentence).tolist() for sentence in FILLER)


def _filler(tokenizer, rng: random.Random, count: int) -> tuple[list[int], list[int]]:
    """`count` tokens of filler sentences, and where each sentence starts."""
    sentences = _filler_sentences(tokenizer)
    out: list[int] = []
    starts = []
    while len(out) < count:
        starts.append(len(out))
        out += rng.choice(sentences)
    return out[:count], starts + [count]


def _place(pieces: list[tuple[float, list[int]]], filler: tuple[list[int], list[int]]) -> list[int]:
    """Inserts each (depth, tokens) piece into the filler at the sentence start nearest that fraction of
    it, in order of depth."""
    filler, starts = filler
    out, start = [], 0
    for depth, tokens in sorted(pieces, key=lambda p: p[0]):
        cut = max(start, min(starts, key=lambda s: abs(s - depth * len(filler))))
        out += filler[start:cut] + tokens
        start = cut
    return out + filler[start:]


def _facts(task: str, rng: random.Random, depth: float) -> tuple[list[tuple[float, str]], str, str]:
    """(depth, text) facts, the question and the answer of one sample."""
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        return ([(depth, f" The pass key is {key}. Remember it. {key} is the pass key.")],
                " What is the pass key? The pass key is", f" {key}")
    if task == "multikey_niah":
        keys = rng.sample(WORDS, 4)
        values = [str(rng.randint(100000, 999999)) for _ in keys]
        depths = [depth] + [rng.random() for _ in keys[1:]]
        facts = [(d, f" The special magic number for {k} is: {v}.") for d, k, v in zip(depths, keys, values)]
        return facts, f" What is the special magic number for {keys[0]}? The special magic number for " \
                      f"{keys[0]} is:", f" {values[0]}"
    if task == "variable_tracking":
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(5)]
        while len(set(names)) < 5:
            names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(5)]
        value, other = rng.sample(range(10000, 99999), 2)
        chain, distractors = names[:3], names[3:]
        # the chain's assignments in order, from `depth` on; a distractor chain with another value anywhere
        chain_depths = sorted([depth] + [depth + (1 - depth) * rng.random() for _ in chain[1:]])
        facts = [(chain_depths[0], f" VAR {chain[0]} = {value}.")]
        facts += [(d, f" VAR {b} = VAR {a}.") for d, a, b in zip(chain_depths[1:], chain, chain[1:])]
        other_depths = sorted(rng.random() for _ in distractors)
        facts += [(other_depths[0], f" VAR {distractors[0]} = {other}."),
                  (other_depths[1], f" VAR {distractors[1]} = VAR {distractors[0]}.")]
        return facts, f" Question: which variables are assigned the value {value}? Answer:", " " + " ".join(chain)
    raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def generate(task: str, tokenizer, length: int, seed: int, index: int, depth: float | None = None) -> TaskSample:
    """Sample `index` of `task` with exactly `length` tokens (prompt + answer); the asked-for fact at
    `depth` (0..1) of the filler, or at a depth drawn from the seed when None. Raises TaskTooLong when
    `length` cannot hold the facts, the question and the answer."""
    rng = _rng(task, seed, index, length)
    if depth is None:
        depth = rng.random()
    facts, question, answer_text = _facts(task, rng, depth)
    instruction = tokenizer.encode(INSTRUCTIONS[task]).tolist()
    pieces = [(d, tokenizer.encode(text).tolist()) for d, text in facts]
    question_ids = tokenizer.encode(question).tolist()
    answer = tokenizer.encode(answer_text).tolist()
    fixed = len(instruction) + sum(len(p) for _, p in pieces) + len(question_ids) + len(answer)
    if fixed > length:
        raise TaskTooLong(f"a {task} sample needs at least {fixed} tokens and {length} were asked for")
    prompt = instruction + _place(pieces, _filler(tokenizer, rng, length - fixed)) + question_ids
    return TaskSample(task, prompt, answer, answer_text.strip(), depth)


def drawn_depth(task: str, seed: int, index: int, length: int) -> float:
    """The depth generate() draws for sample `index` of `length` tokens (depth None), without building it."""
    return _rng(task, seed, index, length).random()


def minimum_length(task: str, tokenizer) -> int:
    """A length every sample of `task` fits in (the longest of a few samples' fixed parts, plus a margin
    for tokenizers whose piece lengths vary)."""
    need = 0
    for index in range(8):
        try:
            generate(task, tokenizer, 1, 0, index)
        except TaskTooLong as exc:
            need = max(need, int(str(exc).split("at least ")[1].split(" ")[0]))
    return need + 8


def check_answer(sample: TaskSample, tokenizer) -> bool:
    """Recovers the answer from the prompt's text by the task's own rules, independently of the generator's
    bookkeeping: True when it equals the sample's answer."""
    import re

    text = tokenizer.decode(sample.prompt)
    if sample.task == "passkey":
        found = re.findall(r"The pass key is (\d+)\. Remember it", text)
        return found == [sample.answer_text]
    if sample.task == "multikey_niah":
        key = re.findall(r"What is the special magic number for (\w+)\?", text)[-1]
        return re.findall(rf"The special magic number for {key} is: (\d+)\.", text) == [sample.answer_text]
    value = re.findall(r"assigned the value (\d+)\?", text)[-1]
    assignments = re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.", text)
    holds = {}
    for name, source in assignments:  # facts appear in the text in the order they are made
        holds[name] = holds.get(source[4:]) if source.startswith("VAR ") else source
    return " ".join(name for name, v in holds.items() if v == value) == sample.answer_text
