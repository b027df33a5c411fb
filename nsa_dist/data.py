"""A learnable synthetic token stream, cut into micro-batches per data-parallel rank and CP shard.

Each sequence repeats one random segment (config.data.period tokens) drawn from a fixed sparse Markov
chain in which every token has config.data.successors possible next tokens. A model lowers its loss
first by learning the chain (about ln(successors) nats per token inside a segment), then by copying
from one period back (zero loss after the first segment): a small induction / long-context task.
Every sequence is a function of (seed, its index) alone, so every layout sees the same data.
"""

from typing import Iterator

import torch
from megatron.core.utils import get_batch_on_this_cp_rank

from nsa_dist.config import DataConfig


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


# Evaluation reads the stream from here on, far beyond any training run's position: held-out sequences.
VALIDATION_START = 1 << 40


def micro_batches(task: SyntheticCopyTask, seq_len: int, global_batch: int, micro_batch: int, dp_rank: int,
                  dp_size: int, cp_group, device: torch.device, first_sequence: int = 0) -> Iterator[dict]:
    """Yields {"tokens", "labels"} micro-batches, each [micro_batch, seq_len / CP] on `device`, forever.

    The k-th step from here uses sequences first_sequence + [k * global_batch, (k + 1) * global_batch)
    (first_sequence is the data position a checkpoint saved); DP rank d takes its contiguous share of
    them, in micro-batches. Labels are the next tokens. Both are split into this
    rank's zigzag shard with Megatron-core's own splitter, given the CP group explicitly (left out, it
    would split over the whole world).
    """
    per_rank = global_batch // dp_size
    step = 0
    while True:
        first = first_sequence + step * global_batch + dp_rank * per_rank
        for start in range(first, first + per_rank, micro_batch):
            rows = torch.stack([task.sequence(i, seq_len + 1) for i in range(start, start + micro_batch)])
            batch = {"tokens": rows[:, :-1].to(device), "labels": rows[:, 1:].to(device)}
            yield get_batch_on_this_cp_rank(batch, cp_group=cp_group)
        step += 1
