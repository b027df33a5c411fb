"""NSA over a context-parallel group: each rank computes its zigzag shard's queries exactly.

This module only communicates; the branches and their composition are kernels.nsa.compose_nsa, the same
function the single-rank path uses. Per layer and rank (DESIGN §3):
1. One point-to-point halo exchange gives each chunk the K/V tokens just before it (window and
   compression-block reach).
2. Each rank compresses the blocks that end in its chunks; the compressed K/V (T/d tokens in all) are
   all-gathered, so compressed attention and top-n see every block, at global positions.
3. The selection branch's raw K/V are all-gathered per slice of KV heads (transient memory stays bounded).
   The gather overlaps steps 1-2 and the compressed, top-n and window branches, which do not need it.
   On NCCL, collectives of one process group run in issue order on one stream, so the overlap needs the
   gather on its own group (`gather_group`, see nsa_dist.parallel.groups); without one, the gather is
   issued after the small collectives that the compute waits on, and overlaps only the compute.
The backward of every exchange returns gradients to their owners (p2p for halos, fp32 reduce-scatter
for the gathers), so outputs and gradients equal the single-rank result.

Packed documents (cu_seqlens over the whole sequence, the same on every rank) change step 2 only: a
document's compression blocks start every d tokens from its own start, so each chunk compresses the
blocks whose last token it holds (reaching up to l-1 tokens into its halo), pads them to the most any
chunk holds, and the gathered tokens are cut back to the document order the branches read.
"""

from typing import NamedTuple

import torch

from kernels.common import document_layout, host_bounds
from kernels.compression.naive import compress_blocks, document_block_starts
from kernels.nsa import Compress, NSAResult, QuerySpan, compose_nsa, native_sparse_attention, same_pair
from nsa_dist.parallel.accounting import needed_selection_bytes
from nsa_dist.parallel.comm import (CommStats, DeferredReduceScatter, ZigzagGather, exchange_halo, gather_zigzag,
                                    group_size_rank)
from nsa_dist.parallel.layout import ZigzagLayout, halo_len, validate_layout


def _exchange_kv_halos(kv_cmp, kv_win, halo, layout, group, stats):
    """One halo exchange for the window's and the compression's K/V, each tensor sent once however many
    of the four roles it plays (shared K/V: k and v; with nsa.compression_rope "blocks" the compression
    reads the keys before RoPE, so three). Returns, per local chunk, the haloed (k_cmp, v_cmp, k_win,
    v_win), each [B, h + C, HK, D]."""
    roles = [kv_cmp[0], kv_cmp[1], kv_win[0], kv_win[1]]
    tensors = []
    for t in roles:
        if not any(t is seen for seen in tensors):
            tensors.append(t)
    which = [next(i for i, seen in enumerate(tensors) if t is seen) for t in roles]
    dims = [t.shape[-1] for t in tensors]
    packed = torch.cat(tensors, dim=-1)
    halos = exchange_halo(packed, halo, layout, group, stats)
    c = layout.chunk_len
    per_chunk = []
    for i, chunk_halo in enumerate(halos):
        haloed = torch.cat([chunk_halo, packed[:, i * c : (i + 1) * c]], dim=1).split(dims, dim=-1)
        per_chunk.append(tuple(haloed[j] for j in which))
    return per_chunk


def _compress_chunk(k, v, compress_k, compress_v, start, halo_tokens, block_size, stride, chunk_len):
    """Compressed tokens of the blocks that end in this chunk, padded at the front to chunk_len / d.

    k, v: [B, halo_tokens + C, HK, D], the chunk with its halo. A block ending in the chunk starts at most
    l - d tokens before it; the sequence's first chunk has no such blocks before block 0, so it is padded
    with l/d - 1 zero tokens that are dropped after the gather."""
    reach = 0 if start == 0 else block_size - stride
    span = slice(halo_tokens - reach, None)
    k_cmp, v_cmp = compress_k(k[:, span]), compress_v(v[:, span])
    pad = chunk_len // stride - k_cmp.shape[1]
    if pad:
        k_cmp = torch.cat([k_cmp.new_zeros(k_cmp.shape[0], pad, *k_cmp.shape[2:]), k_cmp], dim=1)
        v_cmp = torch.cat([v_cmp.new_zeros(v_cmp.shape[0], pad, *v_cmp.shape[2:]), v_cmp], dim=1)
    return k_cmp, v_cmp


class DocumentCompression(NamedTuple):
    """Where one rank's compression blocks of packed documents come from, and where they go."""

    tokens: list[torch.Tensor]  # per local chunk: [n, l] rows of its haloed K/V forming the blocks ending in it
    rows: int  # M: compressed tokens per chunk in the gather (the most that any chunk of the sequence holds)
    keep: torch.Tensor  # [N] rows of the gathered [2P * M] tokens that are real blocks, in document order


def document_compression(cu_seqlens: torch.Tensor, layout: ZigzagLayout, halo: int, block_size: int, stride: int,
                         device: torch.device) -> DocumentCompression:
    """The DocumentCompression of this rank's chunks (each with `halo` tokens of K/V before it, none before
    the sequence's first chunk); built once per cu_seqlens, layout and sizes, then shared by the layers."""
    def build():
        c = layout.chunk_len
        first = document_block_starts(cu_seqlens, block_size, stride, device)
        holder = (first + block_size - 1) // c  # the chunk holding each block's last token (ascending)
        counts = torch.bincount(holder, minlength=layout.num_chunks).tolist()
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        rows = max(counts)
        tokens = []
        for chunk, start in zip(layout.chunk_ids, layout.chunk_starts):
            origin = start - min(halo, start)  # global position of the haloed K/V's first row
            blocks = first[offsets[chunk] : offsets[chunk + 1]]
            tokens.append(blocks[:, None] - origin + torch.arange(block_size, device=device))
        keep = torch.cat([torch.arange(count, device=device) + chunk * rows for chunk, count in enumerate(counts)])
        return DocumentCompression(tokens, rows, keep)

    key = ("cp_compression", layout, halo, block_size, stride, device)
    return document_layout(cu_seqlens, key, build)


def _compress_documents_chunk(k, v, compress_k, compress_v, tokens: torch.Tensor, rows: int):
    """Compressed tokens of the document blocks ending in this chunk (`tokens` index its haloed k, v
    [1, h + C, HK, D]), padded at the back with zero tokens to `rows`, which are dropped after the gather."""
    k_cmp, v_cmp = compress_blocks(compress_k, k, tokens), compress_blocks(compress_v, v, tokens)
    pad = rows - tokens.shape[0]
    if pad:
        k_cmp = torch.cat([k_cmp, k_cmp.new_zeros(1, pad, *k_cmp.shape[2:])], dim=1)
        v_cmp = torch.cat([v_cmp, v_cmp.new_zeros(1, pad, *v_cmp.shape[2:])], dim=1)
    return k_cmp, v_cmp


class GatheredSelectionKV:
    """The selection branch's raw K/V of the whole sequence, all-gathered one slice of KV heads at a time.

    The first gather starts at construction; iterating yields (head slice, k, v) with k, v [B, T, h, D] in
    sequence order, starting the next slice's gather before handing out the current one, so at most two
    slices are in flight: 2 * B * T * kv_heads_per_gather * (Dk + Dv) elements."""

    def __init__(self, kv: tuple[torch.Tensor, torch.Tensor], kv_heads_per_gather: int, group, stats):
        num_kv_heads = kv[0].shape[2]
        if not 1 <= kv_heads_per_gather <= num_kv_heads or num_kv_heads % kv_heads_per_gather:
            raise ValueError(f"kv_heads_per_gather={kv_heads_per_gather} must divide the {num_kv_heads} KV heads")
        self.dk = kv[0].shape[-1]
        # the gradient's reduce-scatters overlap the backward of what follows (DeferredReduceScatter)
        self.gathers = DeferredReduceScatter(torch.cat(kv, dim=-1), group, stats, "selection_kv")
        self.head_slices = [slice(h, h + kv_heads_per_gather) for h in range(0, num_kv_heads, kv_heads_per_gather)]
        self.pending = self._start(0)

    def _start(self, n: int) -> ZigzagGather:
        return self.gathers.gather((slice(None), slice(None), self.head_slices[n]))

    def __iter__(self):
        for n, heads in enumerate(self.head_slices):
            gathered = self.pending.finish()
            if n + 1 < len(self.head_slices):
                self.pending = self._start(n + 1)
            # contiguous once here, not once per chunk inside the kernels' wrappers
            k, v = (x.contiguous() for x in gathered.split([self.dk, gathered.shape[-1] - self.dk], dim=-1))
            yield heads, k, v


def nsa_context_parallel(
    q: torch.Tensor,
    kv_cmp: tuple[torch.Tensor, torch.Tensor],
    kv_slc: tuple[torch.Tensor, torch.Tensor],
    kv_win: tuple[torch.Tensor, torch.Tensor],
    gates: torch.Tensor,
    compress_k: Compress,
    compress_v: Compress,
    *,
    group,
    block_size: int,
    stride: int,
    selection_block: int,
    num_selected: int,
    window: int,
    scale: float | None = None,
    kv_heads_per_gather: int = 1,
    gather_group=None,
    stats: CommStats | None = None,
    impl: str = "reference",
    cu_seqlens: torch.Tensor | None = None,
    cmp_rope: torch.Tensor | None = None,
    selection_score: str = "sum",
    selection_loss: int = 0,
    indexer: torch.Tensor | None = None,
    indexer_loss: int = 0,
) -> NSAResult:
    """NSA on this rank's zigzag shard of a sequence sharded over the CP group `group`.

    Tensors as in kernels.nsa.native_sparse_attention, but holding only this rank's two zigzag chunks
    (T_local = T / P tokens; RoPE already applied at global positions): q [B, T_local, HQ, Dk],
    kv_* per branch ([B, T_local, HK, Dk], [B, T_local, HK, Dv]) (shared K/V: the same tensors, exchanged once),
    gates [B, T_local, HQ, 3]. `group`: the CP process group (None or size 1: one rank).
    kv_heads_per_gather: KV heads per selection all-gather (see GatheredSelectionKV).
    gather_group: a process group of the same ranks as `group` for the selection gather, so that on NCCL
    it runs beside the halo and compressed collectives (None: it shares `group`, issued after them).
    stats: if given, bytes sent/received and exposed waits per collective are added to it.
    impl: "reference" or "triton" (kernels.nsa.branch_ops).
    cu_seqlens: optional int32 [num_docs + 1] boundaries of packed documents over the whole sequence (global
    positions, B = 1), as in native_sparse_attention: no branch attends across documents.
    cmp_rope: optional RoPE angles [N, R] of the whole sequence's compressed tokens (kernels.nsa.compose_nsa;
    kv_cmp's keys are then the keys before RoPE): each rank rotates the gathered tokens.
    selection_score: how top-n scores a block for a GQA group, "sum", "max", "exact", "bound" or "indexer"
    (compose_nsa).
    selection_loss: k > 0 also gives the selection alignment loss's terms over every k-th of this rank's
    rows (compose_nsa).
    indexer, indexer_loss: the learned indexer's weight, and k > 0 for its loss's terms over every k-th of
    this rank's rows (compose_nsa).
    Returns NSAResult for the local tokens (block ids are global, or per document as on one rank).
    """
    cp_size, cp_rank = group_size_rank(group)
    sizes = dict(block_size=block_size, stride=stride, selection_block=selection_block, num_selected=num_selected,
                 window=window, scale=scale, impl=impl, cu_seqlens=cu_seqlens, cmp_rope=cmp_rope,
                 selection_score=selection_score, selection_loss=selection_loss, indexer=indexer,
                 indexer_loss=indexer_loss)
    if cp_size == 1:
        return native_sparse_attention(q, kv_cmp, kv_slc, kv_win, gates, compress_k, compress_v, **sizes)
    documents = cu_seqlens is not None
    layout = ZigzagLayout(q.shape[1] * cp_size, cp_size, cp_rank)
    validate_layout(layout.seq_len, cp_size, block_size=block_size, stride=stride,
                    selection_block=selection_block, window=window, documents=documents)
    if documents and (q.shape[0] != 1 or host_bounds(cu_seqlens)[-1] != layout.seq_len):
        raise ValueError(f"packed documents under context parallelism need batch size 1 and cu_seqlens ending at "
                         f"the whole sequence's {layout.seq_len} tokens; got batch {q.shape[0]} and cu_seqlens "
                         f"ending at {host_bounds(cu_seqlens)[-1]}")
    c = layout.chunk_len
    halo = halo_len(block_size, stride, window, documents)

    # On its own group the selection gather starts first and overlaps everything up to the selected branch
    if gather_group is not None:
        selection_kv = GatheredSelectionKV(kv_slc, kv_heads_per_gather, gather_group, stats)

    # 1. halos, 2. compressed tokens of the local chunks, gathered
    haloed = _exchange_kv_halos(kv_cmp, kv_win, halo, layout, group, stats)
    if documents:
        blocks = document_compression(cu_seqlens, layout, halo, block_size, stride, q.device)
        local_cmp = [_compress_documents_chunk(k, v, compress_k, compress_v, tokens, blocks.rows)
                     for (k, v, _, _), tokens in zip(haloed, blocks.tokens)]
    else:
        local_cmp = [
            _compress_chunk(k, v, compress_k, compress_v, start, k.shape[1] - c, block_size, stride, c)
            for (k, v, _, _), start in zip(haloed, layout.chunk_starts)
        ]
    dk = local_cmp[0][0].shape[-1]
    packed_cmp = torch.cat([torch.cat(kv, dim=-1) for kv in local_cmp], dim=1)
    all_cmp = gather_zigzag(packed_cmp, group, stats, "compressed_kv")
    if documents:
        all_cmp = all_cmp[:, blocks.keep]
    else:
        all_cmp = all_cmp[:, block_size // stride - 1 :]  # the padding in front of block 0
    # contiguous once here, not once per chunk and branch inside the kernels' wrappers
    k_cmp, v_cmp = (x.contiguous() for x in all_cmp.split([dk, packed_cmp.shape[-1] - dk], dim=-1))

    # 3. on the CP group itself, the selection gather queues behind the collectives above, not before them
    if gather_group is None:
        selection_kv = GatheredSelectionKV(kv_slc, kv_heads_per_gather, group, stats)

    spans = []
    for i, start in enumerate(layout.chunk_starts):
        _, _, k_win, v_win = haloed[i]
        spans.append(QuerySpan(offset=i * c, start=start, length=c, k_win=k_win, v_win=v_win,
                               win_start=start - (k_win.shape[1] - c)))
    result = compose_nsa(q, gates, k_cmp, v_cmp, spans, selection_kv, shared_kv=same_pair(kv_slc, kv_win), **sizes)
    if stats is not None and not documents:  # block ids count from each document's start there
        stats.needed["selection_kv"] += needed_selection_bytes(
            result.block_idx, layout, selection_block, kv_slc[0].shape[-1], kv_slc[1].shape[-1],
            kv_slc[0].element_size())
    return result
