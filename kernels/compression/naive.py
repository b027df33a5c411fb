"""phi: compresses each block of l consecutive keys (or values), taken every d tokens, into one token."""

import torch
import torch.nn.functional as F

from kernels.common import acc_dtype, document_layout, document_of, host_bounds


def num_compressed_blocks(seq_len: int, block_size: int, stride: int) -> int:
    """Compressed block i covers tokens [i*stride, i*stride + block_size); only whole blocks exist."""
    return 0 if seq_len < block_size else (seq_len - block_size) // stride + 1


def _blocks(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, N, H, l, D], block i holding tokens i*d .. i*d+l-1."""
    num_blocks = num_compressed_blocks(x.shape[1], block_size, stride)
    x = x[:, : (num_blocks - 1) * stride + block_size] if num_blocks else x[:, :0]
    if num_blocks == 0:
        return x.new_zeros(x.shape[0], 0, x.shape[2], block_size, x.shape[3])
    return x.unfold(1, block_size, stride).transpose(-1, -2)


def mean_compress(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """Mean pooling over each block (fla's choice; the proof model's phi).

    x: [B, T, H, D] any float dtype. Returns [B, N, H, D], N = num_compressed_blocks(T, l, d), x.dtype,
    summed in fp32 (float64 for float64). Where d divides l, as in every configuration here, each run of d
    tokens is summed once and a block adds its l / d runs, so no [N, l] copy of x is made in fp32 (at 128K
    tokens, 4 heads of 128, that copy was 0.5 GB for each of K and V, its backward 2.6 ms of an H100's
    layer backward); otherwise the blocks are unfolded and averaged."""
    acc = acc_dtype(x)
    num_blocks = num_compressed_blocks(x.shape[1], block_size, stride)
    if block_size % stride or num_blocks == 0:
        return _blocks(x, block_size, stride).to(acc).mean(dim=-2).to(x.dtype)
    runs_per_block = block_size // stride
    covered = (num_blocks - 1 + runs_per_block) * stride  # tokens of the last block's end
    runs = x[:, :covered].unflatten(1, (-1, stride)).sum(dim=2, dtype=acc)  # [B, N - 1 + l / d, H, D]
    total = runs[:, :num_blocks]
    for i in range(1, runs_per_block):
        total = total + runs[:, i : i + num_blocks]
    return (total / block_size).to(x.dtype)


def mlp_compress(
    x: torch.Tensor,
    block_size: int,
    stride: int,
    pos_emb: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """The paper's phi: an MLP over a block's l tokens plus a learnable intra-block position embedding.

    x: [B, T, H, D]; pos_emb: [l, D]; w1: [hidden, l*D], b1: [hidden]; w2: [D, hidden], b2: [D].
    The same MLP serves every head. Returns [B, N, H, D] in x.dtype (computed in fp32).
    """
    acc = acc_dtype(x)
    blocks = _blocks(x, block_size, stride).to(acc) + pos_emb.to(acc)
    flat = blocks.flatten(-2)
    hidden = F.silu(F.linear(flat, w1.to(acc), b1.to(acc)))
    return F.linear(hidden, w2.to(acc), b2.to(acc)).to(x.dtype)


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """Document boundaries of packed sequences -> boundaries of their compressed tokens.

    Compression blocks never straddle a document: document d of length L_d has
    num_compressed_blocks(L_d, l, d) of them. Returns int32 [D+1], starting at 0.
    """
    lengths = cu_seqlens.diff().to(torch.int64)
    counts = torch.where(lengths >= block_size, (lengths - block_size) // stride + 1, 0)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def compressed_bounds(bounds: list[int], block_size: int, stride: int) -> list[int]:
    """compressed_cu_seqlens of boundaries held on the host, as a list."""
    out = [0]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out.append(out[-1] + num_compressed_blocks(hi - lo, block_size, stride))
    return out


def document_block_starts(cu_seqlens: torch.Tensor, block_size: int, stride: int,
                          device: torch.device) -> torch.Tensor:
    """[N] int64 global position of the first token of every compression block of every document, in
    document order (block i of document D starts at cu[D] + i * stride)."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    cmp_cu = compressed_cu_seqlens(cu, block_size, stride).to(torch.int64)
    rows = torch.arange(compressed_bounds(host_bounds(cu_seqlens), block_size, stride)[-1], device=device)
    doc = document_of(rows, cmp_cu)
    return cu[doc] + (rows - cmp_cu[doc]) * stride


def compress_blocks(compress, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """phi over chosen blocks: x [1, T, H, D], tokens [N, l] rows of x forming each block -> [1, N, H, D].
    The blocks are gathered as a batch of N sequences of l tokens (each compresses to one token), so phi
    runs once however many documents they come from."""
    return compress(x[0, tokens]).transpose(0, 1)  # [N, l, H, D] -> [N, 1, H, D] -> [1, N, H, D]


def compress_documents(compress, x: torch.Tensor, cu_seqlens: torch.Tensor | None, block_size: int,
                       stride: int) -> torch.Tensor:
    """Applies phi (any [B, T, H, D] -> [B, N, H, D] compression with blocks of block_size tokens every
    stride) to each packed document on its own.

    x: [1, T, H, D] with document boundaries cu_seqlens (int32 [D+1]); the compressed tokens of all
    documents are concatenated in document order (boundaries: compressed_cu_seqlens). None: compress(x).
    phi runs once for all documents (compress_blocks): a loop over documents costs a dozen kernel launches
    per document and layer, forward and backward.
    """
    if cu_seqlens is None:
        return compress(x)
    if x.shape[0] != 1:
        raise ValueError(f"compress_documents: packed documents (cu_seqlens) need batch size 1; got {x.shape[0]}")

    def build():
        starts = document_block_starts(cu_seqlens, block_size, stride, x.device)
        return starts[:, None] + torch.arange(block_size, device=x.device)

    tokens = document_layout(cu_seqlens, ("compress_documents", block_size, stride, x.device), build)
    return compress_blocks(compress, x, tokens)
