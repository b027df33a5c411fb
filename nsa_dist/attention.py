"""NSA as Megatron-core attention: Megatron's own SelfAttention, a fused projection, NSA as the core.

`ParallelSelfAttention` is Megatron's `SelfAttention` with one change to what its column-parallel
`linear_qkv` produces. Per KV group (so a TP shard holds whole GQA groups) the output features are

    [ G query heads x (Dk + 3 gate logits) | K per branch (nb x Dk) | V per branch (nb x Dv) ]

with G = HQ / HK, nb = 3 for NSA with separate K/V (cmp, slc, win), 1 for shared K/V and for dense
attention (which has no gate logits). Everything else is Megatron's: sequence parallelism, qk-layernorm
(on the Dk query channels and every branch's keys), the output projection, checkpointing. RoPE is `Rotary`:
the arithmetic of Megatron's unfused `apply_rotary_pos_emb`, bitwise, with a backward of its own. The gate
logits ride as un-rotated trailing channels of each query head (RoPE rotates only the first Dk channels), so
they reach the core attention with the query they belong to and need no extra path through Megatron's
forward.

The core attention is `NSACoreAttention` (NSA over the context-parallel group; one rank is the same code
with a group of one) or `DenseCoreAttention` (the baseline). phi, the compression MLP, the optional gate
bias (`nsa.gate_bias`) and the optional learned indexer (`nsa.indexer_heads`) are shared by all heads and
so replicated over TP; their gradients are summed over the TP group once per step (`sum_replicated_grads`,
called where Megatron finalizes gradients).
"""

import functools
import math
from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import Attention, SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from kernels.block_selection.indexer import indexer_init
from kernels.common import document_layout, document_of
from kernels.compression import mean_compress, mlp_compress
from kernels.compression.naive import document_block_starts, num_compressed_blocks
from kernels.nsa import resolve_impl
from nsa_dist.config import ModelConfig, NSAConfig
from nsa_dist.parallel import dense_context_parallel, nsa_context_parallel, zigzag_positions
from nsa_dist.parallel.dense_cp import causal_sdpa, dense_documents

BRANCHES = ("cmp", "slc", "win")
# the selection alignment loss of every NSA layer's forward on this process since the trainer last took
# them (nsa.selection_loss; detached means, one a layer and micro-batch): the trainer logs their mean
SELECTION_LOSSES: list[torch.Tensor] = []
# the same for the learned indexer's loss (nsa.indexer_heads; MLflow: indexer_loss), and its recall's two
# sums, [shared picks, picks] a layer and micro-batch (the trainer logs their ratio as indexer_recall)
INDEXER_LOSSES: list[torch.Tensor] = []
INDEXER_RECALLS: list[torch.Tensor] = []


def rotary_angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """RoPE angles of `positions` [N]: [N, head_dim] fp32, each half's angle repeated (the rotate-half
    convention of Megatron's apply_rotary_pos_emb). Formed in float64 and reduced modulo 2*pi before the
    cast: at position 1M an fp32 angle is off by up to ~0.06 rad."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    angles = torch.remainder(positions.double()[:, None] * (base**-exponents)[None, :], 2 * math.pi)
    return torch.cat([angles, angles], dim=-1).float()


@functools.lru_cache(maxsize=16)
def rotary_freqs(seq_len: int, cp_size: int, cp_rank: int, head_dim: int, base: float,
                 device: torch.device) -> torch.Tensor:
    """RoPE angles of this CP rank's zigzag shard of a seq_len sequence: [T_local, 1, 1, head_dim] fp32,
    the layout Rotary broadcasts over [s, b, h, d]. Cached per (length, layout, base), so the layers of
    a step share one tensor."""
    positions = rotary_positions(seq_len, cp_size, cp_rank, device)
    return rotary_angles(positions, head_dim, base)[:, None, None, :]


def document_rotary_freqs(cu_seqlens: torch.Tensor, seq_len: int, cp_size: int, cp_rank: int, head_dim: int,
                          base: float, device: torch.device) -> torch.Tensor:
    """RoPE angles of packed documents, each from position 0: [T_local, 1, 1, head_dim] fp32, one row per
    token of this CP rank's zigzag shard (cu_seqlens: boundaries over the whole seq_len sequence). Built
    once per cu_seqlens (the layers of a step share it)."""
    def build():
        positions = rotary_positions(seq_len, cp_size, cp_rank, device)
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        return rotary_angles(positions - cu[document_of(positions, cu)], head_dim, base)[:, None, None, :]

    return document_layout(cu_seqlens, ("rotary", seq_len, cp_size, cp_rank, head_dim, base, device), build)


@functools.lru_cache(maxsize=16)
def block_rotary_freqs(seq_len: int, block_size: int, stride: int, head_dim: int, base: float,
                       device: torch.device) -> torch.Tensor:
    """RoPE angles of a seq_len sequence's compressed tokens, each at its block's first position (i * stride):
    [N, head_dim] fp32, for nsa.compression_rope "blocks"."""
    starts = torch.arange(num_compressed_blocks(seq_len, block_size, stride), device=device) * stride
    return rotary_angles(starts, head_dim, base)


def document_block_rotary_freqs(cu_seqlens: torch.Tensor, block_size: int, stride: int, head_dim: int, base: float,
                                device: torch.device) -> torch.Tensor:
    """block_rotary_freqs of packed documents, each from position 0: [N, head_dim], one row per compressed
    token in document order. Built once per cu_seqlens."""
    def build():
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        starts = document_block_starts(cu_seqlens, block_size, stride, device)
        return rotary_angles(starts - cu[document_of(starts, cu)], head_dim, base)

    return document_layout(cu_seqlens, ("block_rotary", block_size, stride, head_dim, base, device), build)


def rotary_positions(seq_len: int, cp_size: int, cp_rank: int, device: torch.device) -> torch.Tensor:
    """Global positions of this CP rank's tokens (its two zigzag chunks; all of them on one rank)."""
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    return zigzag_positions(seq_len, cp_rank, cp_size).to(device)


class Rotary(torch.autograd.Function):
    """RoPE on x's first R channels, the rest passed through: Rotary.apply(x [..., D], cos, sin [..., R] in x's
    dtype) computes what Megatron's unfused apply_rotary_pos_emb does (rotate-half; bitwise the same output and
    gradient). Its backward is the rotation by minus the angles and one concatenation, where autograd through
    Megatron's slices makes a zero-filled tensor of x's size for each slice and adds them up: two of them for
    NSA's query, whose gate logits ride beside its channels, and for the doubled keys of compression_rope
    "blocks" (kernels-notes, session 42)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x's first R = cos.shape[-1] channels rotated (inverse: the transposed rotation, RoPE's backward), the
    rest copied, each half written into one new tensor. Megatron computes x * cos + cat(-b, a) * sin over the
    halves a, b; per half that is a * cos_a - b * sin_a and b * cos_b + a * sin_b, the same roundings (a
    negated product is exact, and adding it is subtracting), so the same bits, without the two
    concatenations (the half turn, then the rotated channels beside the rest) that were most of RoPE's
    memory traffic. The transposed rotation: a * cos_a + b * sin_b and b * cos_b - a * sin_a. On the GPU
    one Triton kernel computes the same, to the bit (kernels/rope.py): seven launches a call become one."""
    if x.is_cuda:
        from kernels.rope import rotate_triton  # imported on first use, as kernels.nsa.branch_ops does

        return rotate_triton(x, cos, sin, inverse)
    half, r = cos.shape[-1] // 2, cos.shape[-1]
    a, b = x[..., :half], x[..., half:r]
    cos_a, cos_b, sin_a, sin_b = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    out = x.new_empty(x.shape)
    out_a, out_b = out[..., :half], out[..., half:r]
    torch.mul(a, cos_a, out=out_a)
    torch.mul(b, cos_b, out=out_b)
    if inverse:
        out_a.add_(b * sin_b)
        out_b.sub_(a * sin_a)
    else:
        out_a.sub_(b * sin_a)
        out_b.add_(a * sin_b)
    out[..., r:] = x[..., r:]
    return out


def rotary_cos_sin(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE angles in `dtype`, as Megatron rounds them, computed once per angles tensor and
    dtype (the angles are cached per step: every layer asks for the same)."""
    cached = angles.__dict__.setdefault("_cos_sin", {})
    if dtype not in cached:
        cached[dtype] = (angles.cos().to(dtype), angles.sin().to(dtype))
    return cached[dtype]


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


def _to_batch_major(x: torch.Tensor, packed: bool) -> torch.Tensor:
    """Megatron's [s, b, h, d] (or [t, h, d] for packed documents) -> [b, s, h, d]."""
    return x.unsqueeze(0) if packed else x.transpose(0, 1)


def _cu_seqlens(packed_seq_params) -> torch.Tensor | None:
    """The packed documents' boundaries over the whole sequence (under CP too: every rank holds them all,
    and each rank's tokens are its zigzag shard of that sequence)."""
    if packed_seq_params is None:
        return None
    if packed_seq_params.qkv_format != "thd":
        raise ValueError(f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}: packed documents "
                         "reach the attention in Megatron's 'thd' layout (the micro-batch's rows packed into one "
                         "row, B = 1); build PackedSeqParams with qkv_format='thd'")
    return packed_seq_params.cu_seqlens_q.to(torch.int32)


class NSACoreAttention(MegatronModule):
    """Megatron core attention computing NSA over the context-parallel group.

    Takes Megatron's query [s, b, HQ, Dk + 3] (the gate logits trailing), key [s, b, nb * HK, Dk] and
    value [s, b, nb * HK, Dv] (branches major), all for this rank's TP heads and CP shard with RoPE at
    global positions; returns [s, b, HQ * Dv]. With nsa.compression_rope "blocks" the key is
    [s, b, nb * HK, 2 * Dk]: its first Dk channels RoPE'd, the last Dk the same keys before RoPE, which
    phi compresses; each compressed key is then rotated at its block's first position."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None, attention_type=None,
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, *, model: ModelConfig, nsa: NSAConfig):
        super().__init__(config=config)
        self.model, self.nsa = model, nsa
        self.cp_group = pg_collection.cp
        self.tp_size = pg_collection.tp.size()
        self.comm_stats = None  # CommStats the CP collectives report to (set_comm_stats)
        self.gather_group = None  # a twin of the CP group for the selection gather (set_gather_group)
        self.softmax_scale = softmax_scale
        self.compress_k = Compression(nsa.phi, nsa.compress_block, nsa.stride, model.head_dim_k)
        self.compress_v = Compression(nsa.phi, nsa.compress_block, nsa.stride, model.head_dim_v)
        # a learned bias on the (cmp, slc, win) gate logits, shared by the heads (nsa.gate_bias)
        self.gate_bias = nn.Parameter(torch.tensor(nsa.gate_bias)) if any(nsa.gate_bias) else None
        self.rotary_base = model.rotary_base  # for nsa.compression_rope "blocks"; set_rotary_base changes it
        self.num_selected = nsa.num_selected  # a curriculum stage may change it: set_num_selected
        self.selection_loss = nsa.selection_loss  # the alignment loss's weight; a stage may change it too
        self.selection_score = nsa.selection_score  # top-n's block score; per stage too: set_selection_score
        # the learned indexer's weight W [2, H, G, Dk / 2] (kernels/block_selection/indexer.py), one for all KV
        # heads; trained by its own loss only
        self.indexer = None
        if nsa.indexer_heads:
            group = model.num_query_heads // model.num_kv_heads
            self.indexer = nn.Parameter(indexer_init(nsa.indexer_heads, group, model.head_dim_k))
            # Left out of the global gradient norm that clipping divides every gradient by, so that the
            # indexer moves no other weight even through clipping: Megatron's optimizers leave a parameter
            # marked `shared` out of that norm (and carry the mark to their fp32 and sharded copies). The
            # clip factor still scales W's gradient, which Adam's step all but ignores.
            self.indexer.shared = True

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        packed = packed_seq_params is not None
        cu_seqlens = _cu_seqlens(packed_seq_params)
        dk, n = self.model.head_dim_k, self.nsa
        query, key, value = (_to_batch_major(x, packed) for x in (query, key, value))
        # split, not two slices: its backward is one concatenation, where each slice's would be a zero-filled
        # tensor of the whole width, a copy and an add
        q, gate_logits = query.split([dk, query.shape[-1] - dk], dim=-1)
        gates = torch.sigmoid(gate_logits if self.gate_bias is None else gate_logits + self.gate_bias)
        branches = len(BRANCHES) if n.kv == "separate" else 1
        key, raw_keys = key.split([dk, key.shape[-1] - dk], dim=-1)  # raw: before RoPE ("blocks"; else empty)
        cmp_rope = None
        # each branch's K and V laid out densely once: with shared K/V the window and selected branches read
        # the same pair, and the kernels' wrappers would each copy a strided one (kernels.nsa.compose_nsa
        # does the same for q and the gates)
        keys = [k.contiguous() for k in key.chunk(branches, dim=2)]
        values = [v.contiguous() for v in value.chunk(branches, dim=2)]
        per_branch = list(zip(keys, values)) if branches > 1 else [(keys[0], values[0])] * len(BRANCHES)
        if n.compression_rope == "blocks":
            per_branch[0] = (raw_keys.chunk(branches, dim=2)[0], per_branch[0][1])
            cmp_rope = self._block_rotary_freqs(q.shape[1] * self.cp_group.size(), cu_seqlens, q.device)
        sizes = dict(block_size=n.compress_block, stride=n.stride, selection_block=n.selection_block,
                     num_selected=self.num_selected, window=n.window, selection_score=self.selection_score,
                     scale=self.softmax_scale, impl=resolve_impl(n.impl, q.device))
        learning = self.training and torch.is_grad_enabled()
        aligned = self.selection_loss > 0 and learning
        indexed = self.indexer is not None and n.indexer_loss > 0 and learning
        result = nsa_context_parallel(q, *per_branch, gates, self.compress_k, self.compress_v, group=self.cp_group,
                                      gather_group=self.gather_group, stats=self.comm_stats, cu_seqlens=cu_seqlens,
                                      cmp_rope=cmp_rope, selection_loss=n.selection_loss_stride if aligned else 0,
                                      indexer=self.indexer, indexer_loss=n.indexer_loss_stride if indexed else 0,
                                      **sizes)
        out = result.output
        # each TP rank's loss is a mean over its own KV heads' rows, and their gradients add up over TP (the
        # replicated weights' in sum_replicated_grads): 1 / TP of each makes them the mean over every head's
        tokens = q.shape[0] * q.shape[1] / self.tp_size
        if aligned:  # nsa.selection_loss: weight x mean KL per token of this rank's rows
            out = _add_loss(out, result.selection_terms, self.selection_loss, tokens, SELECTION_LOSSES)
        if indexed:  # the indexer's: its gradient reaches the indexer's weight only
            terms = result.indexer_terms
            out = _add_loss(out, (terms.kl, terms.rows), n.indexer_loss, tokens, INDEXER_LOSSES)
            INDEXER_RECALLS.append(torch.stack([terms.overlap, terms.choices]).detach())
        return out.squeeze(0).flatten(-2) if packed else out.transpose(0, 1).flatten(-2)

    def _block_rotary_freqs(self, seq_len: int, cu_seqlens: torch.Tensor | None, device: torch.device):
        """RoPE angles of the whole sequence's compressed tokens, at their blocks' first positions."""
        sizes = (self.nsa.compress_block, self.nsa.stride, self.model.head_dim_k, self.rotary_base, device)
        if cu_seqlens is None:
            return block_rotary_freqs(seq_len, *sizes)
        return document_block_rotary_freqs(cu_seqlens, *sizes)


def _add_loss(out: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor], weight: float, tokens: int,
              log: list[torch.Tensor]) -> torch.Tensor:
    """out, with weight x (mean KL of terms = (sum, rows)) x tokens joining the model's loss in the backward
    (Megatron's device for MoE auxiliary losses; its scale is 1 without MoE and fp16). Megatron divides every
    gradient by the global token count (calculate_per_token_loss), so the loss is counted once per token of
    the rank's rows. The detached mean goes to `log`, which the trainer averages into its metrics."""
    total, rows = terms
    mean = total / rows.clamp_min(1)
    log.append(mean.detach())
    return MoEAuxLossAutoScaler.apply(out, weight * mean * tokens)


class DenseCoreAttention(MegatronModule):
    """Megatron core attention computing full causal attention: torch's fused kernels on one rank (cuDNN or
    flash on GPU), the mask-free sequence-sharded baseline (nsa_dist.parallel.dense_cp) over a CP group."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None, attention_type=None,
                 cp_comm_type=None, softmax_scale=None, pg_collection=None):
        super().__init__(config=config)
        self.cp_group = pg_collection.cp
        self.comm_stats = None
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        packed = packed_seq_params is not None
        cu_seqlens = _cu_seqlens(packed_seq_params)
        q, k, v = (_to_batch_major(x, packed) for x in (query, key, value))
        if self.cp_group.size() > 1:
            out = dense_context_parallel(q, k, v, group=self.cp_group, scale=self.softmax_scale, stats=self.comm_stats,
                                         cu_seqlens=cu_seqlens)
        elif cu_seqlens is None:
            out = causal_sdpa(q, k, v, self.softmax_scale)
        else:
            out = dense_documents(q, k, v, cu_seqlens, packed_seq_params.max_seqlen_q, self.softmax_scale)
        return out.squeeze(0).flatten(-2) if packed else out.transpose(0, 1).flatten(-2)


class ParallelSelfAttention(SelfAttention):
    """Megatron's SelfAttention with NSA's fused projection (see the module docstring) and RoPE at the
    tokens' global positions (the zigzag CP shard's), computed once per sequence length and base."""

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type=AttnMaskType.causal, cp_comm_type: str | None = None, pg_collection=None, *,
                 model: ModelConfig, nsa: NSAConfig):
        # Attention.__init__ builds the core attention and the output projection; SelfAttention.__init__
        # would build Megatron's q|k|v projection, which is replaced here by NSA's.
        Attention.__init__(self, config=config, submodules=submodules, layer_number=layer_number,
                           attn_mask_type=attn_mask_type, attention_type="self", cp_comm_type=cp_comm_type,
                           pg_collection=pg_collection)
        tp = self.pg_collection.tp.size()
        if model.num_kv_heads % tp:
            raise ValueError(f"tensor parallel size {tp} must divide model.num_kv_heads={model.num_kv_heads}: "
                             "TP splits whole GQA groups; lower parallel.tensor or raise num_kv_heads")
        self.model = model
        self.rotary_base = model.rotary_base  # a curriculum stage may change it: set_rotary_base
        self.token_freqs = None  # RoPE angles of this forward's tokens, [S, 1, 1, Dk], set during forward
        self.gate_width = len(BRANCHES) if model.attention == "nsa" else 0
        # nsa.compression_rope "blocks": the core attention also gets the keys before RoPE (NSACoreAttention)
        self.raw_keys = model.attention == "nsa" and nsa.compression_rope == "blocks"
        self.branches = len(BRANCHES) if model.attention == "nsa" and nsa.kv == "separate" else 1
        dk, dv = model.head_dim_k, model.head_dim_v
        group = model.num_query_heads // model.num_kv_heads
        self.split_sizes = [group * (dk + self.gate_width), self.branches * dk, self.branches * dv]
        self.linear_qkv = submodules.linear_qkv(
            config.hidden_size, model.num_kv_heads * sum(self.split_sizes), config=config,
            init_method=config.init_method, gather_output=False, bias=config.add_bias_linear or config.add_qkv_bias,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="qkv", tp_group=self.pg_collection.tp)
        self.gate_bias = nsa.gate_bias if self.gate_width and any(nsa.gate_bias) else None
        self.start_gates()
        self.q_layernorm = self.k_layernorm = None
        if model.qk_layernorm:
            self.q_layernorm = build_module(submodules.q_layernorm, hidden_size=dk, config=config,
                                            eps=config.layernorm_epsilon)
            self.k_layernorm = build_module(submodules.k_layernorm, hidden_size=dk, config=config,
                                            eps=config.layernorm_epsilon)
        if dv != dk:  # Attention.__init__ sized the output projection for Dv = Dk
            self.linear_proj = build_module(
                submodules.linear_proj, model.num_query_heads * dv, config.hidden_size, config=config,
                init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
                skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj", tp_group=self.pg_collection.tp)

    @torch.no_grad()
    def start_gates(self) -> None:
        """With nsa.gate_bias set, makes every token's gates sigmoid(gate_bias): zeroes the projection's gate
        rows and sets the core attention's bias. Call again after re-initializing the weights."""
        if self.gate_bias is None:
            return
        dk, hidden = self.model.head_dim_k, self.config.hidden_size
        group = self.model.num_query_heads // self.model.num_kv_heads
        weight = self.linear_qkv.weight.view(self.num_query_groups_per_partition, -1, hidden)
        weight[:, : self.split_sizes[0]].view(-1, group, dk + self.gate_width, hidden)[:, :, dk:] = 0
        self.core_attention.gate_bias.copy_(torch.tensor(self.gate_bias))

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        """[s, b, hidden] -> query [s, b, HQ_tp, Dk + gates], key [s, b, nb * HK_tp, Dk], value
        [s, b, nb * HK_tp, Dv], keys and values ordered branch-major."""
        if output_gate or not split_qkv:
            raise NotImplementedError("NSA's projection supports neither attention_output_gate nor fused QKV RoPE")
        mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        groups = self.num_query_groups_per_partition
        dk, dv = self.model.head_dim_k, self.model.head_dim_v
        q, k, v = mixed.view(s, b, groups, -1).split(self.split_sizes, dim=-1)
        query = q.reshape(s, b, self.num_attention_heads_per_partition, dk + self.gate_width)
        key = k.reshape(s, b, groups, self.branches, dk).transpose(2, 3).reshape(s, b, -1, dk)
        value = v.reshape(s, b, groups, self.branches, dv).transpose(2, 3).reshape(s, b, -1, dv)
        if self.q_layernorm is not None:
            query = torch.cat([self.q_layernorm(query[..., :dk]), query[..., dk:]], dim=-1)
            key = self.k_layernorm(key)
        if self.raw_keys:  # RoPE rotates the first Dk channels only, so the copy reaches the core as it is
            key = torch.cat([key, key], dim=-1)
        if self.token_freqs is not None:  # None outside forward (Megatron's own calls of this method)
            cos, sin = rotary_cos_sin(self.token_freqs, query.dtype)
            query, key = Rotary.apply(query, cos, sin), Rotary.apply(key, cos, sin)
        return query, key, value

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        """Megatron's forward, with RoPE at this rank's tokens' positions applied by
        get_query_key_value_tensors (Rotary), so Megatron is given no rotary argument (GPTModel is built
        without a position embedding, so it arrives empty)."""
        cp = self.pg_collection.cp
        seq = hidden_states.shape[0] * (self.pg_collection.tp.size() if self.config.sequence_parallel else 1)
        if kwargs.get("packed_seq_params") is None:
            self.token_freqs = rotary_freqs(seq * cp.size(), cp.size(), cp.rank(), self.model.head_dim_k,
                                            self.rotary_base, hidden_states.device)
        else:
            # Packed documents: RoPE restarts at each document's start, one angle row per token; Megatron's own
            # packed-sequence RoPE would read the boundaries back from the GPU and loop over the documents, in
            # every layer.
            cu_seqlens = _cu_seqlens(kwargs["packed_seq_params"])
            self.token_freqs = document_rotary_freqs(cu_seqlens, seq * cp.size(), cp.size(), cp.rank(),
                                                     self.model.head_dim_k, self.rotary_base, hidden_states.device)
        kwargs["rotary_pos_emb"] = None
        try:
            return super().forward(hidden_states, attention_mask, **kwargs)
        finally:
            self.token_freqs = None


def attention_spec(model: ModelConfig, nsa: NSAConfig, norm=None) -> ModuleSpec:
    """The self-attention slot of a GPT layer: ParallelSelfAttention with NSA's (or dense) core attention,
    Megatron's local linear layers, and qk-layernorm (with `model.qk_layernorm`) by `norm` (None:
    Megatron's local norm)."""
    local = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=model.qk_layernorm)
    megatron = local.submodules.self_attention
    core = (functools.partial(NSACoreAttention, model=model, nsa=nsa) if model.attention == "nsa"
            else DenseCoreAttention)
    submodules = replace(megatron.submodules, core_attention=core)
    if model.qk_layernorm and norm is not None:
        submodules = replace(submodules, q_layernorm=norm, k_layernorm=norm)
    return ModuleSpec(module=ParallelSelfAttention, params={**megatron.params, "model": model, "nsa": nsa},
                      submodules=submodules)


def _modules(model: nn.Module, kind: type):
    return (m for m in model.modules() if isinstance(m, kind))


def set_rotary_base(model: nn.Module, base: float) -> None:
    """Sets the RoPE base of every attention layer (curriculum stages may raise it as context grows)."""
    for module in _modules(model, (ParallelSelfAttention, NSACoreAttention)):
        module.rotary_base = base


def set_num_selected(model: nn.Module, n: int) -> None:
    """Sets NSA's n, the blocks each query selects, in every NSA layer (a stage's num_selected: n has no
    weights); a model with dense attention has none."""
    for module in _modules(model, NSACoreAttention):
        module.num_selected = n


def set_selection_loss(model: nn.Module, weight: float) -> None:
    """Sets the selection alignment loss's weight in every NSA layer (a stage's selection_loss; 0: off)."""
    for module in _modules(model, NSACoreAttention):
        module.selection_loss = weight


def set_selection_score(model: nn.Module, score: str) -> None:
    """Sets how top-n scores blocks (a stage's selection_score: "sum", "max", "exact" or "bound") in every NSA
    layer."""
    for module in _modules(model, NSACoreAttention):
        module.selection_score = score


def start_gates(model: nn.Module) -> None:
    """Re-applies nsa.gate_bias's start (ParallelSelfAttention.start_gates) in every attention layer."""
    for module in _modules(model, ParallelSelfAttention):
        module.start_gates()


def set_comm_stats(model: nn.Module, stats) -> None:
    """Makes every core attention report its context-parallel collectives to `stats` (a CommStats)."""
    for module in _modules(model, (NSACoreAttention, DenseCoreAttention)):
        module.comm_stats = stats


def set_gather_group(model: nn.Module, group) -> None:
    """Gives every NSA layer the twin of its CP group for the selection gather (nsa_dist.parallel.groups)."""
    for module in _modules(model, NSACoreAttention):
        module.gather_group = group


def sum_replicated_grads(model: nn.Module, tp_group) -> None:
    """Sums the gradients of NSA's replicated parameters (phi and the gate bias) over the TP group, in one
    coalesced fp32 all-reduce.

    They are replicated on every TP rank, and each rank uses them for its own heads only, so each holds a
    partial gradient. Call once per step after Megatron's finalize_model_grads (gradients in the
    model's fp32 main_grad buffers)."""
    if tp_group.size() == 1:
        return
    grads = [p.main_grad for m in _modules(model, NSACoreAttention) for p in m.parameters() if p.requires_grad]
    if not grads:
        return
    coalesced = _flatten_dense_tensors(grads)
    dist.all_reduce(coalesced, group=tp_group)
    for grad, summed in zip(grads, _unflatten_dense_tensors(coalesced, grads)):
        grad.copy_(summed)
