"""RoPE as one Triton kernel: nsa_dist/attention.py's Rotary on the GPU.

The PyTorch rotation (attention._rotate) is seven kernels a call: two products into the output's halves,
two more products, an add and a subtract into them, and the copy of the channels past the rotated ones
(NSA's query carries its gate logits there). Four calls a layer (q and k, forward and backward) make 28
launches a layer, of the ~165 PyTorch operators an NSA layer adds to a training step that the host must
issue; at the proof's 2K stage NSA's step is host-bound (benchmarks/kernels-notes.md, session 47). This
kernel does one call in one launch, and reads x and writes the output once.

It rounds as the PyTorch version does, to the bit: each product rounded to x's dtype, then their sum or
difference rounded (fp16/bf16 products of two such values are exact in fp32, as PyTorch computes them
before rounding), and no fused multiply-add (enable_fp_fusion=False), which would skip a rounding in fp32.
With the halves a, b of x's first R channels and cos, sin [.., R] split the same way:

    forward:  a cos_a - b sin_a  and  b cos_b + a sin_b
    inverse:  a cos_a + b sin_b  and  b cos_b - a sin_a   (the transposed rotation: RoPE's backward)
"""

import torch
import triton
import triton.language as tl

from kernels.triton_utils import pow2

ROWS = 16  # (batch, head) rows of one position a program


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rope(x, cos, sin, out, BH, H, stride_s, stride_b, stride_h, stride_c, HALF: tl.constexpr,
          D: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, INVERSE: tl.constexpr,
          ROWS: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = bh < BH
    src = x + s * stride_s + (bh // H) * stride_b + (bh % H) * stride_h  # [ROWS] pointers
    dst = out + (s * BH + bh) * D
    f = tl.arange(0, BLOCK_HALF)
    f_ok = f < HALF
    mask = row_ok[:, None] & f_ok[None, :]
    a = tl.load(src[:, None] + f[None, :], mask=mask, other=0.0)
    b = tl.load(src[:, None] + HALF + f[None, :], mask=mask, other=0.0)
    cos_a = tl.load(cos + s * stride_c + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    cos_b = tl.load(cos + s * stride_c + HALF + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    sin_a = tl.load(sin + s * stride_c + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    sin_b = tl.load(sin + s * stride_c + HALF + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    dtype = x.dtype.element_ty
    a, b = a.to(tl.float32), b.to(tl.float32)
    if INVERSE:
        out_a = _round(a * cos_a, dtype) + _round(b * sin_b, dtype)
        out_b = _round(b * cos_b, dtype) - _round(a * sin_a, dtype)
    else:
        out_a = _round(a * cos_a, dtype) - _round(b * sin_a, dtype)
        out_b = _round(b * cos_b, dtype) + _round(a * sin_b, dtype)
    tl.store(dst[:, None] + f[None, :], out_a.to(dtype), mask=mask)
    tl.store(dst[:, None] + HALF + f[None, :], out_b.to(dtype), mask=mask)
    if BLOCK_REST > 0:  # the channels past the rotated ones, copied
        g = 2 * HALF + tl.arange(0, BLOCK_REST)
        rest = row_ok[:, None] & (g[None, :] < D)
        tl.store(dst[:, None] + g[None, :], tl.load(src[:, None] + g[None, :], mask=rest, other=0.0), mask=rest)


def rotate_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """attention._rotate in one kernel, bitwise the same: x [S, B, H, D] (any strides with a dense last
    dim), cos and sin [S, 1, 1, R] in x's dtype (R even, at most D; rows with a dense last dim) -> a new
    dense [S, B, H, D], its first R channels rotated (inverse: by minus the angles), the rest copied."""
    seq, batch, heads, dim = x.shape
    rotary = cos.shape[-1]
    if cos.shape != (seq, 1, 1, rotary) or sin.shape != cos.shape or rotary % 2 or rotary > dim:
        raise ValueError(f"rotate_triton: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be "
                         f"[S, 1, 1, R] with S = {seq} and R even, at most the head dim {dim}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half, rest = rotary // 2, dim - rotary
    grid = (seq, triton.cdiv(batch * heads, ROWS))
    _rope[grid](x, cos, sin, out, batch * heads, heads, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                HALF=half, D=dim, BLOCK_HALF=pow2(half, 1), BLOCK_REST=pow2(rest, 1) if rest else 0,
                INVERSE=inverse, ROWS=ROWS, enable_fp_fusion=False)
    return out
