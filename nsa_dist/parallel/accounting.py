"""Bytes each rank sends and receives per layer (forward + backward): sequence-sharded NSA next to ring
attention on the same shapes. `nsa_cp_bytes` matches what CommStats records (a test checks it)."""

import torch

from nsa_dist.parallel.layout import ZigzagLayout, halo_len


def nsa_cp_bytes(*, seq_len: int, cp_size: int, cp_rank: int, batch: int, num_kv_heads: int, dk: int, dv: int,
                 block_size: int, stride: int, window: int, kv: str, element_size: int,
                 document_rows: int | None = None) -> dict[str, int]:
    """Bytes sent by this rank per collective (received is the same for every entry).

    halo: the last max(w-1, l-d) tokens of K/V of the window and compression branches (one packed
    exchange; once when kv is shared), to the neighbours; compressed_kv: the all-gather of the T/d
    compressed tokens; selection_kv: the all-gather of the selection branch's raw K/V. Each `_grad`
    entry is the backward's matching transfer (p2p or reduce-scatter). document_rows: for packed
    documents, the compressed tokens gathered per chunk (nsa_cp.DocumentCompression.rows); their halo is
    max(w-1, l-1) tokens."""
    chunk = seq_len // (2 * cp_size)
    kv_width = num_kv_heads * (dk + dv) * element_size  # bytes of one token's K and V
    neighbours = (cp_rank > 0) + (cp_rank < cp_size - 1)
    documents = document_rows is not None
    halo_tokens = halo_len(block_size, stride, window, documents)
    halo = neighbours * batch * halo_tokens * kv_width * (1 if kv == "shared" else 2)
    per_chunk = document_rows if documents else chunk // stride
    compressed = (cp_size - 1) * batch * 2 * per_chunk * kv_width
    selection = (cp_size - 1) * batch * 2 * chunk * kv_width
    out = {"halo": halo, "compressed_kv": compressed, "selection_kv": selection}
    return out | {f"{k}_grad": v for k, v in out.items()}


def ring_attention_bytes(*, seq_len: int, cp_size: int, batch: int, num_kv_heads: int, dk: int, dv: int,
                         element_size: int) -> dict[str, int]:
    """Ring attention (as in Megatron-core/TransformerEngine's p2p CP): the forward passes every rank's K/V
    around the ring (P-1 hops); the backward passes K/V again and dK/dV (2 (P-1) hops)."""
    local_kv = batch * (seq_len // cp_size) * num_kv_heads * (dk + dv) * element_size
    return {"kv": (cp_size - 1) * local_kv, "kv_grad": 2 * (cp_size - 1) * local_kv}


def needed_selection_bytes(block_idx: torch.Tensor, layout: ZigzagLayout, selection_block: int, dk: int, dv: int,
                           element_size: int) -> int:
    """Bytes of the raw K/V of remote selection blocks this rank's queries actually selected (the union per
    batch row and KV head): what a fetch of only the needed blocks would move, against the full gather.

    block_idx: [B, T_local, HK, n] global selection block ids (-1 unused)."""
    chunk = layout.chunk_len
    blocks_per_chunk = chunk // selection_block
    owned = torch.zeros(layout.seq_len // selection_block, dtype=torch.bool)
    for c in layout.chunk_ids:
        owned[c * blocks_per_chunk : (c + 1) * blocks_per_chunk] = True
    needed = 0
    batch, _, num_kv_heads, _ = block_idx.shape
    for b in range(batch):
        for h in range(num_kv_heads):
            ids = block_idx[b, :, h].flatten()
            ids = torch.unique(ids[ids >= 0].long())
            needed += int((~owned.to(ids.device)[ids]).sum())
    return needed * selection_block * (dk + dv) * element_size
