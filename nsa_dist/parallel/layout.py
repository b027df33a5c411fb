"""The zigzag sequence layout of context parallelism (DESIGN §3).

The sequence is cut into 2P equal chunks; CP rank r holds chunks r and 2P-1-r, concatenated. This is
the split Megatron-core's `get_batch_on_this_cp_rank` makes, and it balances causal work: every rank
holds one early and one late chunk.
"""

from dataclasses import dataclass

import torch


class LayoutError(ValueError):
    """A sequence length or NSA size does not fit the context-parallel layout; the message says how."""


@dataclass(frozen=True)
class ZigzagLayout:
    seq_len: int  # tokens in the whole sequence
    cp_size: int  # P
    cp_rank: int  # r

    @property
    def num_chunks(self) -> int:
        return 2 * self.cp_size

    @property
    def chunk_len(self) -> int:
        return self.seq_len // self.num_chunks

    @property
    def chunk_ids(self) -> tuple[int, int]:
        """The two global chunks this rank holds, in local order."""
        return self.cp_rank, self.num_chunks - 1 - self.cp_rank

    @property
    def chunk_starts(self) -> tuple[int, int]:
        return tuple(c * self.chunk_len for c in self.chunk_ids)

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[seq_len // P] int64: the global position of every local token."""
        return torch.cat([torch.arange(s, s + self.chunk_len, device=device) for s in self.chunk_starts])


def zigzag_positions(seq_len: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """[seq_len // cp_size] int64 global positions of this rank's two zigzag chunks."""
    return ZigzagLayout(seq_len, cp_size, cp_rank).positions()


def split_zigzag(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's shard of a full-sequence tensor: chunks r and 2P-1-r along `dim`, concatenated."""
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def merge_zigzag(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of split_zigzag: shards[r] is rank r's shard; returns the full sequence along `dim`."""
    cp_size = len(shards)
    halves = [s.chunk(2, dim=dim) for s in shards]
    first = [halves[r][0] for r in range(cp_size)]
    second = [halves[r][1] for r in reversed(range(cp_size))]
    return torch.cat(first + second, dim=dim)


def validate_layout(seq_len: int, cp_size: int, *, block_size: int, stride: int, selection_block: int,
                    window: int, documents: bool = False) -> None:
    """Raises LayoutError unless NSA with these sizes can run sharded over cp_size ranks (documents: over
    packed documents, whose compression blocks reach further back; see halo_len)."""
    if cp_size < 1:
        raise LayoutError(f"context-parallel size {cp_size} must be at least 1")
    unit = 2 * cp_size * selection_block
    if seq_len % unit:
        raise LayoutError(
            f"seq_len={seq_len} must be a multiple of 2 * cp_size * selection_block = {unit} for CP={cp_size}: "
            f"each of the {2 * cp_size} chunks must hold whole selection blocks; pad or crop the sequence"
        )
    chunk = seq_len // (2 * cp_size)
    halo = halo_len(block_size, stride, window, documents)
    if halo > chunk:
        reach = "compress_block - 1" if documents else "compress_block - stride"
        raise LayoutError(
            f"the left halo ({halo} tokens = max(window - 1, {reach}) with window={window}, "
            f"compress_block={block_size}, stride={stride}) is longer than one chunk ({chunk} tokens at "
            f"seq_len={seq_len}, CP={cp_size}): use a shorter window, a longer sequence or a smaller CP"
        )


def halo_len(block_size: int, stride: int, window: int, documents: bool = False) -> int:
    """Tokens each chunk needs from the one before: the window reaches w-1 back, and compression blocks
    ending in the chunk start up to l-d tokens before it (chunk starts are multiples of d). In packed
    documents a document's blocks start every d tokens from the document's own start, so a block ending in
    the chunk may start up to l-1 tokens before it."""
    return max(window - 1, block_size - 1 if documents else block_size - stride)
