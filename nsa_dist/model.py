"""GPT on Megatron-core with NSA (or dense, for baselines) attention at every layer's self-attention slot.

Megatron's SelfAttention has one fused QKV projection and a core-attention slot. NSA needs more: per-branch
K/V (the paper's default), per-head gates and phi (the compression MLP), so `ParallelSelfAttention`
replaces SelfAttention at the `self_attention` slot of Megatron's local GPT layer spec and owns those
projections as tensor-parallel layers. Everything else (embedding, norms, MLP, pipeline stages, DDP,
optimizer, schedules) is Megatron-core's own.

Parallelism, as applied here:
- TP splits query heads and KV heads in whole GQA groups (HK % TP == 0): ColumnParallelLinear for q,
  K/V and gates, RowParallelLinear for the output. phi is shared by every head, so it is replicated and
  its gradient is summed over the TP group.
- CP: every rank holds the zigzag shard of the sequence that Megatron's `get_batch_on_this_cp_rank`
  produces; RoPE is applied at those global positions, and the core attention is sequence-sharded NSA
  (`nsa_context_parallel`) over Megatron's CP group, passed explicitly.
- PP: GPTModel builds this stage's layers; the loss lives on the last stage.
"""

import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.compression import mlp_compress
from kernels.nsa import resolve_impl
from nsa_dist.attention import BRANCHES, Compression
from nsa_dist.config import Config, ModelConfig, NSAConfig, Stage
from nsa_dist.parallel import dense_context_parallel, nsa_context_parallel, zigzag_positions
from nsa_dist.rope import apply_rotary, rotary_angles


class ReplicatedCompression(Compression):
    """phi, replicated on every TP rank: each rank compresses its own KV heads with the same MLP, so the
    MLP's gradient is the sum over the TP group (copy_to_tensor_model_parallel_region: identity forward,
    all-reduce backward)."""

    def __init__(self, kind: str, block_size: int, stride: int, head_dim: int, tp_group):
        super().__init__(kind, block_size, stride, head_dim)
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            return super().forward(x)
        pos_emb, w1, b1, w2, b2 = (copy_to_tensor_model_parallel_region(p, self.tp_group)
                                   for p in (self.pos_emb, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias))
        return mlp_compress(x, self.block_size, self.stride, pos_emb, w1, b1, w2, b2)


class ParallelLinearDict(nn.ModuleDict):
    """Tensor-parallel projections by name (one per NSA branch). Megatron's checkpointing would take a
    plain ModuleDict's tensors as replicated; this one asks each layer for its TP-sharded entries."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        sharded = {}
        for name, layer in self.items():
            sharded.update(layer.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return sharded


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group, stats=None) -> torch.Tensor:
    """Causal GQA attention of this rank's queries over the whole sequence: [B, T_local, H, D] in and out.

    On one rank, torch's fused causal kernels (flash / cuDNN on GPU); over a CP group, the sequence-sharded
    dense baseline, which all-gathers K/V and masks by global position."""
    if cp_group is None or cp_group.size() == 1:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)
    return dense_context_parallel(q, k, v, group=cp_group, stats=stats)


class ParallelSelfAttention(MegatronModule):
    """Self-attention with TP-sharded projections; the core is NSA over the CP group, or dense.

    Built by Megatron's TransformerLayer from the spec (config, layer_number, pg_collection); called
    with hidden_states [s_local, b, hidden] and returns (output [s_local, b, hidden], bias=None).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, model: ModelConfig, nsa: NSAConfig,
                 pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.layer_number = layer_number
        self.model, self.nsa = model, nsa
        self.tp_group, self.cp_group = pg_collection.tp, pg_collection.cp
        self.rotary_base = model.rotary_base  # a curriculum stage may change it: set_rotary_base
        self.comm_stats = None  # CommStats that CP collectives report to (set_comm_stats), or None
        tp = self.tp_group.size()
        if model.num_kv_heads % tp:
            raise ValueError(f"tensor parallel size {tp} must divide model.num_kv_heads={model.num_kv_heads}: "
                             "TP splits whole GQA groups; lower parallel.tensor or raise num_kv_heads")
        self.q_heads, self.kv_heads = model.num_query_heads // tp, model.num_kv_heads // tp
        hq, hk, dk, dv = model.num_query_heads, model.num_kv_heads, model.head_dim_k, model.head_dim_v

        def column(out_features: int, bias: bool = False) -> ColumnParallelLinear:
            return ColumnParallelLinear(config.hidden_size, out_features, config=config, init_method=config.init_method,
                                        bias=bias, gather_output=False, tp_group=self.tp_group)

        separate = model.attention == "nsa" and nsa.kv == "separate"
        kv_names = BRANCHES if separate else ("shared",)
        self.linear_q = column(hq * dk)
        self.linear_k = ParallelLinearDict({name: column(hk * dk) for name in kv_names})
        self.linear_v = ParallelLinearDict({name: column(hk * dv) for name in kv_names})
        if model.attention == "nsa":
            # gate output features are ordered (head, branch), so a TP shard holds whole heads
            self.linear_gate = column(hq * len(BRANCHES), bias=True)
            self.compress_k = ReplicatedCompression(nsa.phi, nsa.compress_block, nsa.stride, dk, self.tp_group)
            self.compress_v = ReplicatedCompression(nsa.phi, nsa.compress_block, nsa.stride, dv, self.tp_group)
        self.linear_proj = RowParallelLinear(hq * dv, config.hidden_size, config=config,
                                             init_method=config.output_layer_init_method, bias=False,
                                             input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **megatron_kwargs):
        """Causal masking is built into both cores and RoPE is applied here at global positions, so
        Megatron's mask and rotary arguments (None with position_embedding_type='none') are not used."""
        seq, batch, _ = hidden_states.shape
        m, n = self.model, self.nsa
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        positions = zigzag_positions(seq * cp_size, cp_rank, cp_size).to(hidden_states.device)
        cos, sin = rotary_angles(positions, m.head_dim_k, self.rotary_base)

        def heads(linear, num_heads, head_dim):
            out, _ = linear(hidden_states)
            return out.view(seq, batch, num_heads, head_dim).transpose(0, 1)  # [B, T_local, H, D]

        q = apply_rotary(heads(self.linear_q, self.q_heads, m.head_dim_k), cos, sin)
        kv = {name: (apply_rotary(heads(self.linear_k[name], self.kv_heads, m.head_dim_k), cos, sin),
                     heads(self.linear_v[name], self.kv_heads, m.head_dim_v))
              for name in self.linear_k}
        if m.attention == "dense":
            out = dense_attention(q, *kv["shared"], self.cp_group, self.comm_stats)
        else:
            gates = torch.sigmoid(heads(self.linear_gate, self.q_heads, len(BRANCHES)))
            per_branch = [kv[b] for b in BRANCHES] if "shared" not in kv else [kv["shared"]] * 3
            out = nsa_context_parallel(
                q, *per_branch, gates, self.compress_k, self.compress_v, group=self.cp_group,
                block_size=n.compress_block, stride=n.stride, selection_block=n.selection_block,
                num_selected=n.num_selected, window=n.window, impl=resolve_impl(n.impl, q.device),
                stats=self.comm_stats,
            ).output
        out = out.transpose(0, 1).reshape(seq, batch, self.q_heads * m.head_dim_v)
        return self.linear_proj(out)


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, output_layer, chunk: int) -> torch.Tensor:
    """Per-token loss [B, S] (fp32) of hidden [S, B, H] against labels [B, S].

    Logits exist for at most `chunk` positions at a time: each chunk's output layer and vocab-parallel
    cross-entropy are recomputed in backward. At 1M tokens and a 32K vocabulary, the whole sequence's
    fp32 logits alone would be 128 GB.
    """

    def chunk_loss(h, target):
        logits, _ = output_layer(h)
        return vocab_parallel_cross_entropy(logits.float(), target)

    losses = [checkpoint(chunk_loss, hidden[s : s + chunk], labels[:, s : s + chunk].t(), use_reentrant=False)
              for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(losses).t()


class NSAGPTModel(GPTModel):
    """Megatron-core's GPTModel whose training loss is computed in sequence chunks (chunked_cross_entropy)."""

    def __init__(self, *args, loss_chunk: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk = loss_chunk

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        if not self.post_process or labels is None:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        return chunked_cross_entropy(hidden_states, labels, self.output_layer, self.loss_chunk)


def layer_spec(config: Config) -> ModuleSpec:
    """Megatron's local GPT layer (RMSNorm, SwiGLU MLP) with ParallelSelfAttention at the attention slot."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention = ModuleSpec(module=ParallelSelfAttention,
                                                params={"model": config.model, "nsa": config.nsa})
    return spec


def transformer_config(config: Config, stage: Stage, dtype: torch.dtype) -> TransformerConfig:
    """Megatron's TransformerConfig for this model in a stage's layout."""
    m, tr = config.model, config.training
    recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_query_heads,
        num_query_groups=m.num_kv_heads,
        kv_channels=m.head_dim_k,
        tensor_model_parallel_size=stage.tensor,
        pipeline_model_parallel_size=stage.pipeline,
        context_parallel_size=stage.context,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Megatron's own init also marks TP-sharded parameters (grad-norm and checkpointing read the marks);
        # init_weights then overwrites the values so that every layout starts from the same model.
        perform_initialization=True,
        calculate_per_token_loss=True,
        cuda_graph_scope=[],  # no CUDA graphs; Megatron 0.16's default ("full") warns that it is deprecated
        **(recompute if tr.recompute else {}),
    )


def build_model(config: Config, tf_config: TransformerConfig) -> NSAGPTModel:
    """This pipeline stage's part of the GPT model (parallel state must be initialised)."""
    return NSAGPTModel(
        config=tf_config,
        transformer_layer_spec=layer_spec(config),
        vocab_size=config.model.vocab_size,
        max_sequence_length=max(stage.seq_len for stage in config.stages),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",  # RoPE is applied inside ParallelSelfAttention
        loss_chunk=config.training.loss_chunk,
    )


def _global_name(gpt: GPTModel, name: str) -> str:
    """A parameter's name with its layer's global number, the same on every pipeline layout."""
    if name.startswith("decoder.layers."):
        _, _, local, rest = name.split(".", 3)
        return f"decoder.layers.{gpt.decoder.layers[int(local)].layer_number}.{rest}"
    return name


@torch.no_grad()
def init_weights(gpt: GPTModel, seed: int, std: float, num_layers: int, tp_rank: int, tp_size: int) -> None:
    """Initialises every parameter from (seed, its global name) alone, then keeps this rank's TP shard.

    So every TP/PP/CP/DP layout starts from the same full model. Norm weights are 1, biases 0, other
    weights N(0, std), with output projections scaled by 1/sqrt(2 * num_layers) (GPT-2).
    """
    for local_name, param in gpt.named_parameters():
        name = _global_name(gpt, local_name)
        if "layernorm" in name:
            param.fill_(1.0)
            continue
        if name.endswith("bias"):
            param.zero_()
            continue
        scale = std / (2 * num_layers) ** 0.5 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
        sharded = getattr(param, "tensor_model_parallel", False)
        dim = param.partition_dim if sharded else 0
        shape = list(param.shape)
        shape[dim] *= tp_size if sharded else 1
        generator = torch.Generator(device=param.device).manual_seed(seed + zlib.crc32(name.encode()))
        full = torch.randn(shape, generator=generator, device=param.device, dtype=torch.float32) * scale
        if sharded and name.endswith("mlp.linear_fc1.weight"):
            # SwiGLU's fc1 stacks [gate; up]; each TP rank holds its slice of both halves
            full = full.view(2, shape[0] // 2, -1).chunk(tp_size, dim=1)[tp_rank].reshape(param.shape)
        elif sharded:
            full = full.chunk(tp_size, dim=dim)[tp_rank]
        param.copy_(full)


def set_rotary_base(gpt: GPTModel, base: float) -> None:
    """Sets the RoPE base of every attention layer (curriculum stages may raise it as context grows)."""
    for module in gpt.modules():
        if isinstance(module, ParallelSelfAttention):
            module.rotary_base = base


def set_comm_stats(gpt: GPTModel, stats) -> None:
    """Makes every attention layer report its context-parallel collectives to `stats` (a CommStats)."""
    for module in gpt.modules():
        if isinstance(module, ParallelSelfAttention):
            module.comm_stats = stats
