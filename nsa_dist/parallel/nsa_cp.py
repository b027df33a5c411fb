"""NSA over a context-parallel group: each rank computes its zigzag shard's queries exactly.

Per layer and rank (DESIGN §3):
1. The selection branch's raw K/V all-gather starts first (per chunk of KV heads, so transient memory is
   bounded), and overlaps with steps 2-4, which do not need it.
2. One point-to-point halo exchange gives each chunk the K/V tokens just before it (window and
   compression-block reach).
3. Each rank compresses the blocks that end in its chunks; the compressed K/V (T/d tokens in all) are
   all-gathered, so compressed attention and top-n see every block, at global positions.
4. Window attention on halo + chunk.
5. Selected attention over the gathered raw K/V with global block ids.
The backward of every exchange returns gradients to their owners (p2p for halos, reduce-scatter for the
gathers), so outputs and gradients equal the single-rank result.
"""

import torch

from kernels.nsa import Compress, NSAResult, branch_ops, native_sparse_attention
from nsa_dist.parallel.accounting import needed_selection_bytes
from nsa_dist.parallel.comm import CommStats, ZigzagGather, exchange_halo, gather_zigzag, group_size_rank
from nsa_dist.parallel.layout import ZigzagLayout, halo_len, validate_layout


def _exchange_kv_halos(kv_cmp, kv_win, halo, layout, group, stats):
    """One halo exchange for the window's and the compression's K/V (once when they are shared).
    Returns, per local chunk, the haloed (k_cmp, v_cmp, k_win, v_win), each [B, h + C, HK, D]."""
    tensors = [kv_cmp[0], kv_cmp[1]] if kv_cmp is kv_win else [kv_cmp[0], kv_cmp[1], kv_win[0], kv_win[1]]
    dims = [t.shape[-1] for t in tensors]
    packed = torch.cat(tensors, dim=-1)
    halos = exchange_halo(packed, halo, layout, group, stats)
    c = layout.chunk_len
    per_chunk = []
    for i, chunk_halo in enumerate(halos):
        haloed = torch.cat([chunk_halo, packed[:, i * c : (i + 1) * c]], dim=1).split(dims, dim=-1)
        per_chunk.append(haloed * 2 if kv_cmp is kv_win else haloed)
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
    stats: CommStats | None = None,
    impl: str = "reference",
) -> NSAResult:
    """NSA on this rank's zigzag shard of a sequence sharded over the CP group `group`.

    Tensors as in kernels.nsa.native_sparse_attention, but holding only this rank's two zigzag chunks
    (T_local = T / P tokens; RoPE already applied at global positions): q [B, T_local, HQ, Dk],
    kv_* per branch ([B, T_local, HK, Dk], [B, T_local, HK, Dv]) (the same pair object for shared K/V),
    gates [B, T_local, HQ, 3]. `group`: the CP process group (None or size 1: one rank).
    kv_heads_per_gather: KV heads per selection all-gather; transient memory for the gathered raw K/V
    is 2 * B * T * kv_heads_per_gather * (Dk + Dv) elements (two gathers in flight).
    stats: if given, bytes sent/received per collective are added to it.
    impl: "reference" or "triton" (kernels.nsa.branch_ops).
    Returns NSAResult for the local tokens (block ids are global).
    """
    cp_size, cp_rank = group_size_rank(group)
    sizes = dict(block_size=block_size, stride=stride, selection_block=selection_block, num_selected=num_selected,
                 window=window, scale=scale)
    if cp_size == 1:
        return native_sparse_attention(q, kv_cmp, kv_slc, kv_win, gates, compress_k, compress_v, **sizes, impl=impl)
    ops = branch_ops(impl)
    batch, local_len, num_q_heads, _ = q.shape
    num_kv_heads = kv_slc[0].shape[2]
    group_heads = num_q_heads // num_kv_heads
    layout = ZigzagLayout(local_len * cp_size, cp_size, cp_rank)
    validate_layout(layout.seq_len, cp_size, block_size=block_size, stride=stride,
                    selection_block=selection_block, window=window)
    if not 1 <= kv_heads_per_gather <= num_kv_heads or num_kv_heads % kv_heads_per_gather:
        raise ValueError(f"kv_heads_per_gather={kv_heads_per_gather} must divide the {num_kv_heads} KV heads")
    c = layout.chunk_len
    halo = halo_len(block_size, stride, window)

    # 1. start the selection branch's raw K/V gather; it overlaps with everything up to step 5
    head_slices = [slice(h, h + kv_heads_per_gather) for h in range(0, num_kv_heads, kv_heads_per_gather)]
    packed_slc = torch.cat(kv_slc, dim=-1)
    pending = ZigzagGather(packed_slc[:, :, head_slices[0]], group, stats, "selection_kv")

    # 2. halos, 3. compressed tokens of the local chunks, gathered
    haloed = _exchange_kv_halos(kv_cmp, kv_win, halo, layout, group, stats)
    local_cmp = [
        _compress_chunk(k, v, compress_k, compress_v, start, k.shape[1] - c, block_size, stride, c)
        for (k, v, _, _), start in zip(haloed, layout.chunk_starts)
    ]
    dk = local_cmp[0][0].shape[-1]
    packed_cmp = torch.cat([torch.cat(kv, dim=-1) for kv in local_cmp], dim=1)
    drop = block_size // stride - 1  # the padding in front of block 0
    all_cmp = gather_zigzag(packed_cmp, group, stats, "compressed_kv")[:, drop:]
    # contiguous once here, not once per chunk and branch inside the kernels' wrappers
    k_cmp, v_cmp = (x.contiguous() for x in all_cmp.split([dk, packed_cmp.shape[-1] - dk], dim=-1))

    outs = {"cmp": [], "win": [], "lse_cmp": [], "lse_win": [], "blocks": []}
    for i, start in enumerate(layout.chunk_starts):
        q_chunk = q[:, i * c : (i + 1) * c]
        o, lse = ops.compressed(q_chunk, k_cmp, v_cmp, block_size, stride, scale, q_start=start)
        outs["cmp"].append(o)
        outs["lse_cmp"].append(lse)
        outs["blocks"].append(ops.select(q_chunk.detach(), k_cmp.detach(), lse.detach(), block_size, stride,
                                         selection_block, num_selected, scale, q_start=start))
        # 4. window over halo + chunk
        _, _, k_win, v_win = haloed[i]
        o, lse = ops.window(q_chunk, k_win, v_win, window, scale, q_start=start, k_start=start - (k_win.shape[1] - c))
        outs["win"].append(o)
        outs["lse_win"].append(lse)
    block_idx = torch.cat(outs["blocks"], dim=1)
    if stats is not None:
        stats.needed["selection_kv"] += needed_selection_bytes(
            block_idx, layout, selection_block, kv_slc[0].shape[-1], kv_slc[1].shape[-1], kv_slc[0].element_size())

    # 5. selected attention, one gathered KV-head chunk at a time (the next gather runs meanwhile)
    o_slc, lse_slc = [], []
    dk_slc = kv_slc[0].shape[-1]
    for n, heads in enumerate(head_slices):
        gathered = pending.finish()
        if n + 1 < len(head_slices):
            pending = ZigzagGather(packed_slc[:, :, head_slices[n + 1]], group, stats, "selection_kv")
        # contiguous once here, not once per chunk inside the kernels' wrappers
        k_all, v_all = (x.contiguous() for x in gathered.split([dk_slc, gathered.shape[-1] - dk_slc], dim=-1))
        q_heads = q[:, :, heads.start * group_heads : heads.stop * group_heads]
        per_chunk = [
            ops.selected(q_heads[:, i * c : (i + 1) * c], k_all, v_all, block_idx[:, i * c : (i + 1) * c, heads],
                         selection_block, scale, q_start=start)
            for i, start in enumerate(layout.chunk_starts)
        ]
        o_slc.append(torch.cat([o for o, _ in per_chunk], dim=1))
        lse_slc.append(torch.cat([lse for _, lse in per_chunk], dim=1))

    g = gates.float().unsqueeze(-1)
    o_cmp, o_win = torch.cat(outs["cmp"], dim=1), torch.cat(outs["win"], dim=1)
    o_sel = torch.cat(o_slc, dim=2)
    output = g[..., 0, :] * o_cmp.float() + g[..., 1, :] * o_sel.float() + g[..., 2, :] * o_win.float()
    return NSAResult(output.to(q.dtype), block_idx, torch.cat(outs["lse_cmp"], dim=1),
                     torch.cat(lse_slc, dim=2), torch.cat(outs["lse_win"], dim=1))
