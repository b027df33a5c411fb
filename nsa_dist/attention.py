"""Attention modules that own their projections: NSA (the product) and dense causal (the baseline)."""


import torch
import torch.nn.functional as F
from torch import nn

from kernels.compression import mean_compress, mlp_compress
from kernels.nsa import NSAResult, native_sparse_attention, resolve_impl
from nsa_dist.config import ModelConfig, NSAConfig
from nsa_dist.parallel import nsa_context_parallel, zigzag_positions
from nsa_dist.parallel.comm import group_size_rank
from nsa_dist.rope import apply_rotary, rotary_angles

BRANCHES = ("cmp", "slc", "win")


class Compression(nn.Module):
    """phi: one compressed token per block of l keys (or values) taken every d tokens."""

    def __init__(self, kind: str, block_size: int, stride: int, head_dim: int):
        super().__init__()
        self.kind, self.block_size, self.stride = kind, block_size, stride
        if kind == "mlp":
            self.pos_emb = nn.Parameter(torch.randn(block_size, head_dim) * 0.02)
            self.fc1 = nn.Linear(block_size * head_dim, head_dim)
            self.fc2 = nn.Linear(head_dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D] -> [B, N, H, D]."""
        if self.kind == "mean":
            return mean_compress(x, self.block_size, self.stride)
        return mlp_compress(x, self.block_size, self.stride, self.pos_emb,
                            self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class NSAAttention(nn.Module):
    """Native Sparse Attention over [B, T, hidden] with its q, per-branch (or shared) K/V, gate and phi.

    RoPE is applied to q and every k before NSA, so phi compresses rotated keys and all positions are
    the tokens' global positions. With `cp_group` set (see apply_context_parallel) the input is this
    rank's zigzag shard and NSA runs sequence-sharded; the math does not change.
    """

    cp_group = None  # the context-parallel process group, set by apply_context_parallel

    def __init__(self, model: ModelConfig, nsa: NSAConfig):
        super().__init__()
        self.model, self.nsa = model, nsa
        hq, hk, dk, dv = model.num_query_heads, model.num_kv_heads, model.head_dim_k, model.head_dim_v
        kv_names = BRANCHES if nsa.kv == "separate" else ("shared",)
        self.q_proj = nn.Linear(model.hidden_size, hq * dk, bias=False)
        self.k_proj = nn.ModuleDict({b: nn.Linear(model.hidden_size, hk * dk, bias=False) for b in kv_names})
        self.v_proj = nn.ModuleDict({b: nn.Linear(model.hidden_size, hk * dv, bias=False) for b in kv_names})
        self.gate_proj = nn.Linear(model.hidden_size, hq * len(BRANCHES))
        self.compress_k = Compression(nsa.phi, nsa.compress_block, nsa.stride, dk)
        self.compress_v = Compression(nsa.phi, nsa.compress_block, nsa.stride, dv)
        self.o_proj = nn.Linear(hq * dv, model.hidden_size, bias=False)

    def attend(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> NSAResult:
        """x: [B, T, hidden] -> NSAResult with output [B, T, HQ, Dv] (before the output projection)."""
        batch, seq, _ = x.shape
        m = self.model
        cp_size, cp_rank = group_size_rank(self.cp_group)
        if positions is None and cp_size > 1:
            positions = zigzag_positions(seq * cp_size, cp_rank, cp_size).to(x.device)
        elif positions is None:
            positions = torch.arange(seq, device=x.device)
        cos, sin = rotary_angles(positions, m.head_dim_k, m.rotary_base)
        q = apply_rotary(self.q_proj(x).view(batch, seq, m.num_query_heads, m.head_dim_k), cos, sin)
        kv = {}
        for name in self.k_proj:
            k = self.k_proj[name](x).view(batch, seq, m.num_kv_heads, m.head_dim_k)
            v = self.v_proj[name](x).view(batch, seq, m.num_kv_heads, m.head_dim_v)
            kv[name] = (apply_rotary(k, cos, sin), v)
        per_branch = [kv[b] for b in BRANCHES] if "shared" not in kv else [kv["shared"]] * 3
        gates = torch.sigmoid(self.gate_proj(x)).view(batch, seq, m.num_query_heads, len(BRANCHES))
        n = self.nsa
        sizes = dict(block_size=n.compress_block, stride=n.stride, selection_block=n.selection_block,
                     num_selected=n.num_selected, window=n.window, impl=resolve_impl(n.impl, x.device))
        if cp_size > 1:
            return nsa_context_parallel(q, *per_branch, gates, self.compress_k, self.compress_v,
                                        group=self.cp_group, **sizes)
        return native_sparse_attention(q, *per_branch, gates, self.compress_k, self.compress_v, **sizes)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]."""
        out = self.attend(x, positions).output
        return self.o_proj(out.flatten(-2))


class DenseAttention(nn.Module):
    """Full causal GQA attention with RoPE: the baseline NSA is compared against."""

    def __init__(self, model: ModelConfig):
        super().__init__()
        self.model = model
        hq, hk, dk, dv = model.num_query_heads, model.num_kv_heads, model.head_dim_k, model.head_dim_v
        self.q_proj = nn.Linear(model.hidden_size, hq * dk, bias=False)
        self.k_proj = nn.Linear(model.hidden_size, hk * dk, bias=False)
        self.v_proj = nn.Linear(model.hidden_size, hk * dv, bias=False)
        self.o_proj = nn.Linear(hq * dv, model.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        m = self.model
        if positions is None:
            positions = torch.arange(seq, device=x.device)
        cos, sin = rotary_angles(positions, m.head_dim_k, m.rotary_base)
        q = apply_rotary(self.q_proj(x).view(batch, seq, m.num_query_heads, m.head_dim_k), cos, sin)
        k = apply_rotary(self.k_proj(x).view(batch, seq, m.num_kv_heads, m.head_dim_k), cos, sin)
        v = self.v_proj(x).view(batch, seq, m.num_kv_heads, m.head_dim_v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).flatten(-2))


def build_attention(model: ModelConfig, nsa: NSAConfig) -> nn.Module:
    """The attention module the config asks for: `model.attention` is nsa or dense."""
    return NSAAttention(model, nsa) if model.attention == "nsa" else DenseAttention(model)


def apply_context_parallel(module: nn.Module, group) -> nn.Module:
    """Shards every NSA layer in `module` over the context-parallel `group`: each layer then expects this
    rank's zigzag shard of the sequence (nsa_dist.parallel.split_zigzag)."""
    for layer in module.modules():
        if isinstance(layer, NSAAttention):
            layer.cp_group = group
    return module
