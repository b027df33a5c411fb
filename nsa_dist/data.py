"""Training and validation sequences, cut into micro-batches per data-parallel rank and CP shard.

A stage's sequences (`stage_sequences`) are a function of their index alone, so every layout sees the
same data and a checkpoint's data position (the sequences consumed) resumes the stream exactly. Each
index is drawn, by the stage's mix (data.mix or stages[i].mix), from data.source or from one of the
synthetic long-context tasks (nsa_dist/tasks.py). data.source is
- synthetic: each sequence repeats one random segment (data.period tokens) drawn from a fixed sparse
  Markov chain in which every token has data.successors possible next tokens. A model lowers its loss
  first by learning the chain (about ln(successors) nats per token inside a segment), then by copying
  from one period back: a small induction / long-context task;
- indexed: a Megatron-core indexed dataset (nsa_dist/indexed.py) read through Megatron-core's GPTDataset
  (documents packed end to end, each ended by EOD, shuffled, train/validation split by documents), or,
  with data.documents=within, windows that each lie inside one document.
"""

import itertools
import math
import random
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                     parse_and_normalize_split)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_batch_on_this_cp_rank

from kernels.common import device_tensor, remember_bounds
from nsa_dist.config import TASKS, Config, DataConfig, MixConfig
from nsa_dist.indexed import DatasetError, check_indexed
from nsa_dist.tasks import generate, minimum_length
from nsa_dist.tokenizer import MegatronTokenizerAdapter, load_tokenizer

Sequences = Callable[[int], torch.Tensor]  # index -> int64 tokens [seq_len + 1]
SPLITS = ("train", "valid")


class SyntheticCopyTask:
    def __init__(self, data: DataConfig, vocab_size: int):
        self.period, self.seed = data.period, data.seed
        generator = torch.Generator().manual_seed(data.seed)
        self.successors = torch.randint(vocab_size, (vocab_size, data.successors), generator=generator)
        self.vocab_size = vocab_size

    def sequence(self, index: int, length: int) -> torch.Tensor:
        """Sequence number `index`: [length] int64 tokens."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        choices = torch.randint(self.successors.shape[1], (self.period,), generator=generator).tolist()
        segment = [int(torch.randint(self.vocab_size, (1,), generator=generator))]
        for choice in choices[1:]:
            segment.append(int(self.successors[segment[-1], choice]))
        repeats = -(-length // self.period)
        return torch.tensor(segment * repeats)[:length]


# The synthetic stream's validation sequences start here, far beyond any training run's position.
VALIDATION_START = 1 << 40


# ------------------------------------------------------------------------------------ indexed datasets


def split_documents(data: DataConfig, count: int, split: str) -> range:
    """The documents of `split` among `count`, cut as Megatron-core's builder cuts them."""
    begin, end = convert_split_vector_to_split_matrix(parse_and_normalize_split(data.split))[SPLITS.index(split)]
    return range(int(round(begin * count)), int(round(end * count)))


def packed_dataset(config: Config, seq_len: int, split: str) -> GPTDataset:
    """Megatron-core's GPTDataset over data.path for `split`: one epoch of documents packed end to end
    (each ended by EOD) into sequences of seq_len + 1 tokens, shuffled from data.seed. Its index files
    are cached under <run.dir>/data-cache. Every rank calls it (rank 0 builds the cache first)."""
    data = config.data
    tokenizer = load_tokenizer(data.tokenizer, data.eod_token)
    gpt_config = GPTDatasetConfig(
        random_seed=data.seed, sequence_length=seq_len, blend=([data.path], None), split=data.split,
        path_to_cache=str(Path(config.run.dir) / "data-cache"), tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, gpt_config).build()
    dataset = datasets[SPLITS.index(split)]
    if dataset is None or len(dataset) == 0:
        raise DatasetError(f"{data.path} has no {split} sequence of {seq_len + 1} tokens under data.split="
                           f"{data.split!r}: give the {split} split a larger share of the documents, or add data")
    return dataset


class DocumentWindows:
    """Sequences of seq_len + 1 tokens that each lie inside one document of `split` (consecutive windows
    of a document share one token), in an order shuffled from data.seed; documents shorter than a window
    are not used."""

    def __init__(self, config: Config, seq_len: int, split: str):
        data = config.data
        self.dataset = IndexedDataset(data.path)
        self.seq_len = seq_len
        documents = np.asarray(split_documents(data, len(self.dataset), split))
        lengths = self.dataset.sequence_lengths[documents].astype(np.int64)
        windows = np.maximum(lengths - 1, 0) // seq_len
        if windows.sum() == 0:
            longest = int(lengths.max()) if len(lengths) else 0
            raise DatasetError(f"data.documents='within' keeps every sequence inside one document, and no "
                               f"{split} document of {data.path} has the {seq_len + 1} tokens a sequence of "
                               f"seq_len={seq_len} needs (the longest has {longest}): shorten the stage's "
                               "seq_len, use longer documents, or set data.documents=pack or mask")
        self.documents = documents[windows > 0]
        self.ends = np.cumsum(windows[windows > 0])
        self.order = np.random.default_rng(data.seed).permutation(int(self.ends[-1]))

    def __len__(self) -> int:
        return len(self.order)

    def __call__(self, index: int) -> torch.Tensor:
        window = int(self.order[index % len(self.order)])
        slot = int(np.searchsorted(self.ends, window, side="right"))
        first = window - (int(self.ends[slot - 1]) if slot else 0)
        tokens = self.dataset.get(int(self.documents[slot]), offset=first * self.seq_len, length=self.seq_len + 1)
        return torch.from_numpy(tokens.astype(np.int64))


def _gpt_sequences(dataset: GPTDataset) -> Sequences:
    def sequence(index: int) -> torch.Tensor:
        sample = dataset[index % len(dataset)]
        return torch.cat([sample["tokens"][:1], sample["labels"]])

    return sequence


# ------------------------------------------------------------------------------------ a stage's stream


def check_data(config: Config, seq_lens: list[int], evaluate: bool | None = None) -> None:
    """Everything about the data that can fail, checked before training starts (rank 0): the dataset
    files, the tokenizer, the tasks' lengths and documents long enough for each seq_len, and NIAH lengths
    that hold a sample where stages are evaluated (evaluate; default eval.at_stage_end)."""
    from nsa_dist.evaluation import niah_lengths  # evaluation builds on this module

    data = config.data
    tokenizer = load_tokenizer(data.tokenizer, data.eod_token)
    uses_tokenizer = data.source == "indexed" or any(
        getattr(stage.mix, task) > 0 for stage in config.resolved_stages() for task in TASKS)
    if uses_tokenizer and tokenizer.vocab_size > config.model.vocab_size:
        raise DatasetError(f"the tokenizer ({data.tokenizer or 'byte-level'}) has {tokenizer.vocab_size} tokens "
                           f"and model.vocab_size={config.model.vocab_size}: set model.vocab_size to at least "
                           f"{tokenizer.vocab_size}")
    for stage in config.resolved_stages():
        if stage.seq_len not in seq_lens:
            continue
        for task in TASKS:
            need = minimum_length(task, tokenizer) if getattr(stage.mix, task) > 0 else 0
            if need > stage.seq_len + 1:
                raise DatasetError(f"stages[{stage.index}].mix.{task}={getattr(stage.mix, task)} needs sequences "
                                   f"of at least {need} tokens and stage {stage.name!r} has seq_len="
                                   f"{stage.seq_len}: lengthen the stage or set the {task} share to 0")
            min_length = stage.mix.task_min_length
            if 0 < min_length < need + 1:  # + 1: the EOD that ends each sample
                raise DatasetError(f"stages[{stage.index}].mix.task_min_length={min_length} (or data.mix's) is "
                                   f"too short for a {task} sample, which needs {need} tokens and an EOD: "
                                   f"set it to at least {need + 1}, or 0 for one sample per sequence")
        needle = minimum_length(config.eval.niah_task, tokenizer)
        short = [length for length in niah_lengths(config, stage) if length < needle]
        if short and (config.eval.at_stage_end if evaluate is None else evaluate):
            sample = f"a {config.eval.niah_task} sample needs {needle} tokens"
            if short[0] in config.eval.niah_lengths:
                raise DatasetError(f"eval.niah_lengths={config.eval.niah_lengths} holds {short[0]}, and {sample}: "
                                   f"give lengths of at least {needle}")
            raise DatasetError(f"stage {stage.name!r} is evaluated at its seq_len={stage.seq_len} (eval."
                               f"niah_stage_length, or eval.niah_lengths empty), and {sample}: list lengths of at "
                               f"least {needle} in eval.niah_lengths without eval.niah_stage_length, or set "
                               "eval.at_stage_end=false")
    if data.source == "indexed":
        info = check_indexed(data.path, tokenizer, config.model.vocab_size)
        if data.documents == "within":
            for stage in config.resolved_stages():
                if stage.seq_len in seq_lens and info.longest_document < stage.seq_len + 1:
                    raise DatasetError(
                        f"data.documents='within' keeps every sequence inside one document, and the longest "
                        f"document of {data.path} has {info.longest_document} tokens, fewer than the "
                        f"{stage.seq_len + 1} of stages[{stage.index}].seq_len={stage.seq_len} (+1 for the last "
                        "label): shorten the stage, use longer documents, or set data.documents=pack or mask")


def source_sequences(config: Config, seq_len: int, split: str = "train") -> Sequences:
    """data.source's sequences of seq_len + 1 tokens for `split` (train or valid)."""
    data = config.data
    if data.source == "synthetic":
        task = SyntheticCopyTask(data, config.model.vocab_size)
        offset = 0 if split == "train" else VALIDATION_START
        return lambda index: task.sequence(offset + index, seq_len + 1)
    if data.documents == "within":
        return DocumentWindows(config, seq_len, split)
    return _gpt_sequences(packed_dataset(config, seq_len, split))


def task_sequence(task: str, tokenizer, length: int, seed: int, index: int, min_length: int = 0,
                  max_length: int = 0, full_share: float = 0.0) -> list[int]:
    """Task sequence `index` of `length` tokens: one sample when min_length is 0 or two samples of
    min_length do not fit, and in a share full_share of the sequences (a draw from seed and index);
    otherwise samples each ended by EOD, of lengths drawn log-uniformly from min_length to what is left,
    or to max_length when that is less (a remainder shorter than min_length joins the last sample, which
    may then pass max_length by less than min_length)."""
    return task_samples(task, tokenizer, length, seed, index, min_length, max_length, full_share)[0]


def task_samples(task: str, tokenizer, length: int, seed: int, index: int, min_length: int = 0,
                 max_length: int = 0, full_share: float = 0.0) -> tuple[list[int], list[range]]:
    """task_sequence's tokens, and where each of its samples' answers lies in them."""
    if one_sample(task, length, seed, index, min_length, full_share):
        sample = generate(task, tokenizer, length, seed, index)
        return sample.tokens, [range(len(sample.prompt), length)]
    tokens: list[int] = []
    answers: list[range] = []
    for size in packed_sizes(task, length, seed, index, min_length, max_length):
        part = len(tokens) // min_length  # < length / min_length: distinct per sample of this sequence
        sample = generate(task, tokenizer, size - 1, seed, (index << 24) + part)
        answers.append(range(len(tokens) + len(sample.prompt), len(tokens) + size - 1))
        tokens += sample.tokens + [tokenizer.eod]
    return tokens, answers


def one_sample(task: str, length: int, seed: int, index: int, min_length: int, full_share: float) -> bool:
    """Whether task sequence `index` is one sample as long as itself (task_sequence)."""
    if min_length <= 0 or length < 2 * min_length:
        return True
    # a draw of its own: with full_share 0 every sequence is as before
    return full_share > 0 and random.Random(f"full/{task}/{seed}/{index}").random() < full_share


def packed_sizes(task: str, length: int, seed: int, index: int, min_length: int, max_length: int) -> list[int]:
    """The lengths of a packed task sequence's samples, each with its EOD (task_sequence)."""
    rng = random.Random(f"pack/{task}/{seed}/{index}")
    sizes: list[int] = []
    left = length
    while left > 0:
        longest = min(left, max_length) if max_length else left
        size = left if left < 2 * min_length else round(math.exp(rng.uniform(math.log(min_length), math.log(longest))))
        if left - size < min_length:
            size = left
        sizes.append(size)
        left -= size
    return sizes


class MixedSequences:
    """Sequence `index` comes from `source`, or is task samples (mix.task_min_length: one or several), as
    a draw from (seed, index) falls in the mix's shares. Called, it gives the tokens (a Sequences);
    `with_answers` also marks the tokens of the task samples' answers, on which training measures
    retrieval as it goes (StepLog.answer_loss)."""

    def __init__(self, source: Sequences, mix: MixConfig, tokenizer, seq_len: int, seed: int):
        self.source, self.mix, self.tokenizer, self.seq_len, self.seed = source, mix, tokenizer, seq_len, seed
        self.kinds = [(kind, share) for kind, share in mix.shares().items() if share > 0]
        self.bounds = np.cumsum([share for _, share in self.kinds])

    def __call__(self, index: int) -> torch.Tensor:
        return self.with_answers(index)[0]

    def kind(self, index: int) -> str:
        """What sequence `index` is: "source" or a task's name (a draw from the seed and the index)."""
        draw = random.Random(f"mix/{self.seed}/{index}").random() * self.bounds[-1]
        return self.kinds[min(int(np.searchsorted(self.bounds, draw, side="right")), len(self.kinds) - 1)][0]

    def with_answers(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [seq_len + 1] int64 and a bool mask of the same shape, True on answer tokens."""
        kind = self.kind(index)
        if kind == "source":
            tokens = self.source(index)
            return tokens, torch.zeros(tokens.shape, dtype=torch.bool)
        mix = self.mix
        tokens, answers = task_samples(kind, self.tokenizer, self.seq_len + 1, self.seed, index, mix.task_min_length,
                                       mix.task_max_length, mix.task_full_share)
        mask = torch.zeros(len(tokens), dtype=torch.bool)
        for answer in answers:
            mask[answer.start : answer.stop] = True
        return torch.tensor(tokens, dtype=torch.int64), mask


def with_answers(sequences: Sequences, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's tokens and its answer-token mask (all False for sequences that hold no task samples)."""
    if isinstance(sequences, MixedSequences):
        return sequences.with_answers(index)
    tokens = sequences(index)
    return tokens, torch.zeros(tokens.shape, dtype=torch.bool)


def stage_sequences(config: Config, seq_len: int, mix: MixConfig, split: str = "train") -> Sequences:
    """The stream of a stage: its mix for training; data.source's validation split alone for `valid`."""
    source = source_sequences(config, seq_len, split)
    if split == "valid" or mix.source == 1:
        return source
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.eod_token)
    return MixedSequences(source, mix, tokenizer, seq_len, config.data.seed)


# ------------------------------------------------------------------------------------ micro-batches


def packed_seq_params(tokens: torch.Tensor, eod: int, device: torch.device | None = None) -> PackedSeqParams:
    """Document boundaries of a [B, S] micro-batch as Megatron's PackedSeqParams (THD: the B rows one
    after the other): a document ends after each EOD token and at each row's end. cu_seqlens is put on
    `device` (default: the tokens'). With the tokens on the host, as the training loop passes them,
    nothing waits for the GPU."""
    batch, seq = tokens.shape
    bounds = [0]
    for row in range(batch):
        ends = (torch.nonzero(tokens[row, :-1] == eod).flatten() + 1).tolist()
        bounds += [row * seq + end for end in ends] + [(row + 1) * seq]
    cu_seqlens = device_tensor(bounds, torch.int32, device or tokens.device)
    remember_bounds(cu_seqlens, bounds)  # the attention's layouts read them from the host, not the GPU
    longest = max(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


class RankRows(torch.utils.data.IterableDataset):
    """The rows [micro_batch, seq_len + 1] of one DP rank's micro-batches, in order, forever: the k-th step
    from here uses sequences first_sequence + [k * global_batch, (k + 1) * global_batch), of which DP rank
    d takes its contiguous share. Under a DataLoader with several workers, worker w makes micro-batches
    w, w + workers, ..., which the DataLoader hands out in order."""

    def __init__(self, sequences: Sequences, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 first_sequence: int = 0):
        self.sequences, self.global_batch, self.micro_batch = sequences, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.first_sequence = dp_rank, dp_size, first_sequence

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, answers): tokens and the answer-token mask (with_answers), each [micro_batch, seq_len + 1]."""
        worker = torch.utils.data.get_worker_info()
        workers, mine = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        per_rank = self.global_batch // self.dp_size
        starts = (self.first_sequence + step * self.global_batch + self.dp_rank * per_rank + offset
                  for step in itertools.count() for offset in range(0, per_rank, self.micro_batch))
        for index, start in enumerate(starts):
            if index % workers == mine:
                pairs = [with_answers(self.sequences, i) for i in range(start, start + self.micro_batch)]
                yield torch.stack([tokens for tokens, _ in pairs]), torch.stack([answers for _, answers in pairs])


def micro_batches(sequences: Sequences, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                  cp_group, device: torch.device, first_sequence: int = 0, eod: int | None = None,
                  workers: int = 0) -> Iterator[dict]:
    """Yields {"tokens", "labels", "answers"} micro-batches, each [micro_batch, seq_len / CP] on `device`,
    forever, with "packed_seq_params" (the documents' cu_seqlens over the whole sequence) when `eod` is
    given. "answers" marks the labels that are task answers' tokens.

    The rows are RankRows's (first_sequence is the data position a checkpoint saved), made on this thread
    or, with `workers` > 0, ahead of it by that many DataLoader worker processes (the same rows either
    way). Labels are the next tokens. Both are split into this rank's zigzag shard with Megatron-core's
    own splitter, given the CP group explicitly (left out, it would split over the whole world).
    """
    rows_stream = RankRows(sequences, global_batch, micro_batch, dp_rank, dp_size, first_sequence)
    if workers:
        # forked, as DataLoader workers are by default on Linux: the sequence functions are closures, which a
        # spawned worker could not receive (processes started by torch.multiprocessing default to spawn)
        rows_stream = torch.utils.data.DataLoader(rows_stream, batch_size=None, num_workers=workers,
                                                  prefetch_factor=4, multiprocessing_context="fork")
    stream = iter(rows_stream)
    try:
        for rows, answers in stream:
            documents = packed_seq_params(rows[:, :-1], eod, device) if eod is not None else None
            batch = {"tokens": rows[:, :-1].to(device), "labels": rows[:, 1:].to(device),
                     "answers": answers[:, 1:].to(device)}
            batch = get_batch_on_this_cp_rank(batch, cp_group=cp_group)
            if documents is not None:
                batch["packed_seq_params"] = documents
            yield batch
    finally:
        del stream  # a DataLoader's worker processes end with their iterator, here when the stage ends


def document_eod(config: Config) -> int | None:
    """The EOD token whose positions bound the documents the attention sees alone (data.documents=mask);
    None when attention crosses documents."""
    if config.data.source == "indexed" and config.data.documents == "mask":
        return load_tokenizer(config.data.tokenizer, config.data.eod_token).eod
    return None
