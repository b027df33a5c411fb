"""The learned indexer's loss, Triton part: each query head's log-sum-exp over each selection block of its
row's window, forward and the queries' gradient (kernels/block_selection/indexer.py, _block_mass).

The PyTorch version materializes fp32 [rows, heads, window] logits, masks them, reduces them per block and
keeps what its backward needs: several passes over the largest tensor of the loss, about 850 PyTorch
operators a layer at 8 x 8K, which on the H100 took 9-23 ms a layer (session 47). These kernels read each
row's window once and write only [rows, heads, blocks]:

    lse[r, h, j] = log sum over the visible keys k of block j of exp(scale * q[r, h] . key[k])

with FLOOR (the lowest fp32) where block j holds no key row r sees, as the PyTorch version's masked logits
give. The backward, for the indexer's queries (the keys enter detached):

    dq[r, h] = scale * sum over j of dlse[r, h, j] * sum over k in j of exp(scale q . key[k] - lse[r, h, j]) key[k]

One program takes BLOCK_M (row, head) pairs of one segment and KV head and walks the window's blocks up
to the farthest key its rows see, so the causal half is skipped tile by tile. The keys' window comes
stacked per segment ([segments, window, HK, D]), the rows' queries [segments, rows, HQ, D], and how many
keys before each row its document holds ([segments, rows], -1 on padding rows: they see nothing).
"""

import torch
import triton
import triton.language as tl

from kernels.triton_utils import launch_params, pow2

FLOOR = torch.finfo(torch.float32).min  # a block no key of which the row sees
BLOCK_M = 64  # (row, head) pairs a program
# The dots of fp32 queries (the indexer's) in tf32 on the GPU: in full fp32 (ieee) the forward and the
# backward spill 5.7 and 13.9 KB a program at the proof's shapes, in tf32 none (sm_90a offline compile,
# benchmarks/indexer-kernels-offline.py); the loss learns toward an estimate of the attention anyway.
# bf16 and fp16 dots ignore it; the interpreter computes in full precision.
PRECISION = "tf32"
# Launch parameters set over the defaults (BLOCK_M, num_warps), per kernel: "fwd", "bwd"; empty in use
LAUNCH: dict[str, dict] = {}


@triton.jit
def _tile(q, seen, R, HQ: tl.constexpr, HK: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's segment, KV head, (row, head) pairs, their queries [BLOCK_M, BLOCK_D] and keys seen."""
    seg = tl.program_id(0) // HK
    hk = tl.program_id(0) % HK
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < R * GQ
    row = seg.to(tl.int64) * R + m // GQ  # segment-major row index
    head = hk * GQ + m % GQ
    d = tl.arange(0, BLOCK_D)
    q_offs = (row * HQ + head)[:, None] * D + d[None, :]
    q_mask = m_ok[:, None] & (d[None, :] < D)
    q_rows = tl.load(q + q_offs, mask=q_mask, other=0.0)
    row_seen = tl.load(seen + row, mask=m_ok, other=-1)
    return seg, hk, m_ok, row * HQ + head, q_offs, q_mask, q_rows, row_seen


@triton.jit
def _block_logits(k, q_rows, row_seen, seg, hk, j, S, scale, HK: tl.constexpr, D: tl.constexpr,
                  L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Block j's keys [BLOCK_L, BLOCK_D] (in the queries' dtype; BLOCK_L >= 16 for tl.dot, the keys past L
    masked) and scale * q . key [BLOCK_M, BLOCK_L], -inf where not seen."""
    offset = tl.arange(0, BLOCK_L)
    key = j * L + offset
    in_block = offset < L
    d = tl.arange(0, BLOCK_D)
    k_offs = ((seg.to(tl.int64) * S + key) * HK + hk)[:, None] * D + d[None, :]
    keys = tl.load(k + k_offs, mask=in_block[:, None] & (d[None, :] < D), other=0.0).to(q_rows.dtype)
    s = tl.dot(q_rows, tl.trans(keys), input_precision=PRECISION) * scale
    return keys, tl.where(in_block[None, :] & (key[None, :] <= row_seen[:, None]), s, float("-inf"))


@triton.jit
def _block_lse_fwd(q, k, seen, lse, scale, R, NB, S, HQ: tl.constexpr, HK: tl.constexpr, GQ: tl.constexpr,
                   D: tl.constexpr, L: tl.constexpr, FLOOR: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    seg, hk, m_ok, out_row, q_offs, q_mask, q_rows, row_seen = _tile(q, seen, R, HQ, HK, GQ, D, BLOCK_M, BLOCK_D)
    farthest = tl.max(row_seen, 0)
    for j in range(0, NB):
        out = tl.full([BLOCK_M], FLOOR, tl.float32)
        if j * L <= farthest:
            keys, s = _block_logits(k, q_rows, row_seen, seg, hk, j, S, scale, HK, D, L, BLOCK_L, BLOCK_D,
                                         PRECISION)
            top = tl.max(s, 1)
            top = tl.where(top == float("-inf"), 0.0, top)
            total = tl.sum(tl.exp(s - top[:, None]), 1)
            out = tl.where(total > 0, top + tl.log(total), FLOOR)
        tl.store(lse + out_row * NB + j, out, mask=m_ok)


@triton.jit
def _block_lse_bwd(q, k, seen, lse, dlse, dq, scale, R, NB, S, HQ: tl.constexpr, HK: tl.constexpr,
                   GQ: tl.constexpr, D: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    seg, hk, m_ok, out_row, q_offs, q_mask, q_rows, row_seen = _tile(q, seen, R, HQ, HK, GQ, D, BLOCK_M, BLOCK_D)
    farthest = tl.max(row_seen, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(0, NB):
        if j * L <= farthest:
            keys, s = _block_logits(k, q_rows, row_seen, seg, hk, j, S, scale, HK, D, L, BLOCK_L, BLOCK_D,
                                         PRECISION)
            block_lse = tl.load(lse + out_row * NB + j, mask=m_ok, other=0.0)
            grad = tl.load(dlse + out_row * NB + j, mask=m_ok, other=0.0)
            p = tl.exp(s - block_lse[:, None]) * grad[:, None]  # 0 where not seen (s = -inf)
            acc += tl.dot(p.to(keys.dtype), keys, input_precision=PRECISION)
    tl.store(dq + q_offs, (acc * scale).to(dq.dtype.element_ty), mask=q_mask)


def _launch(kind: str, q: torch.Tensor, window: torch.Tensor) -> tuple[dict, tuple]:
    segments, rows, heads, _ = q.shape
    group = heads // window.shape[2]
    launch = launch_params(LAUNCH, kind, BLOCK_M=BLOCK_M, num_warps=4)
    return launch, (segments * window.shape[2], triton.cdiv(rows * group, launch["BLOCK_M"]))


class BlockLSE(torch.autograd.Function):
    """block_lse_triton as an autograd function: differentiable in q only; saves q, the window, the rows'
    counts and the result (all small next to the logits the PyTorch version keeps)."""

    @staticmethod
    def forward(ctx, q, window, seen, selection_block, scale):
        segments, rows, heads, dim = q.shape
        blocks = window.shape[1] // selection_block
        lse = torch.empty(segments, rows, heads, blocks, dtype=torch.float32, device=q.device)
        launch, grid = _launch("fwd", q, window)
        _block_lse_fwd[grid](q, window, seen, lse, scale, rows, blocks, window.shape[1], HQ=heads,
                             HK=window.shape[2], GQ=heads // window.shape[2], D=dim, L=selection_block,
                             FLOOR=FLOOR, BLOCK_L=pow2(selection_block), BLOCK_D=pow2(dim), PRECISION=PRECISION,
                             **launch)
        ctx.save_for_backward(q, window, seen, lse)
        ctx.scale, ctx.selection_block = scale, selection_block
        return lse

    @staticmethod
    def backward(ctx, dlse):
        q, window, seen, lse = ctx.saved_tensors
        segments, rows, heads, dim = q.shape
        dq = torch.empty_like(q)
        launch, grid = _launch("bwd", q, window)
        _block_lse_bwd[grid](q, window, seen, lse, dlse.contiguous(), dq, ctx.scale, rows, lse.shape[-1],
                             window.shape[1], HQ=heads, HK=window.shape[2], GQ=heads // window.shape[2], D=dim,
                             L=ctx.selection_block, BLOCK_L=pow2(ctx.selection_block), BLOCK_D=pow2(dim),
                             PRECISION=PRECISION, **launch)
        return dq, None, None, None, None


def block_lse_triton(q: torch.Tensor, window: torch.Tensor, seen: torch.Tensor, selection_block: int,
                     scale: float) -> torch.Tensor:
    """Each query head's log-sum-exp over each selection block of its row's window (FLOOR where it sees
    no key of the block), Triton: q [B, N, R, HQ, D] (fp32, fp16 or bf16), window [B, N, S, HK, D] (S a
    multiple of selection_block; cast to q's dtype), seen [N, R] or [N, R, 1]: the keys before row r of
    segment n in its document (it sees window keys 0 .. seen; -1: none) -> [B, N, R, HQ, S / l'] float32.
    Differentiable in q."""
    batch, segments, rows, heads, dim = q.shape
    if window.shape[:2] != (batch, segments) or window.shape[-1] != dim or window.shape[2] % selection_block:
        raise ValueError(f"block_lse_triton: window {tuple(window.shape)} must be [B, N, S, HK, D] for q "
                         f"{tuple(q.shape)}, S a multiple of the selection block {selection_block}")
    seen = seen.reshape(1, segments, rows).expand(batch, segments, rows).reshape(batch * segments, rows)
    lse = BlockLSE.apply(q.reshape(batch * segments, rows, heads, dim).contiguous(),
                         window.reshape(batch * segments, *window.shape[2:]).contiguous(),
                         seen.contiguous(), selection_block, scale)
    return lse.view(batch, segments, rows, heads, -1)
