"""GPT on Megatron-core with NSA (or dense, for baselines) attention in every layer.

The layer is Megatron's local GPT layer (RMSNorm, SwiGLU MLP) whose self-attention is Megatron's own
SelfAttention with NSA's fused projection and NSA as its core attention (nsa_dist.attention). Everything
else (embedding, norms, MLP, pipeline stages, sequence parallelism, DDP, optimizer, schedules) is
Megatron-core's own.

Parallelism, as applied here:
- TP splits query heads and KV heads in whole GQA groups (HK % TP == 0). phi is replicated; its gradient
  is summed over TP once per step (finalize_grads). Sequence parallelism shards the activations between
  the attention and MLP blocks over TP (Megatron's), when the stage has TP > 1 and asks for it.
- CP: every rank holds the zigzag shard of the sequence that Megatron's `get_batch_on_this_cp_rank`
  produces; RoPE is applied at those global positions, and the core attention is sequence-sharded NSA
  over Megatron's CP group, passed explicitly.
- PP: GPTModel builds this stage's layers; the loss lives on the last stage.
"""

import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils.checkpoint import checkpoint

from nsa_dist.attention import attention_spec, start_gates, sum_replicated_grads
from nsa_dist.config import Config, Stage


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, output_layer, chunk: int,
                          sequence_parallel: int = 1) -> torch.Tensor:
    """Per-token loss [B, S] (fp32) of hidden [S, B, H] against labels [B, S].

    Logits exist for at most `chunk` positions at a time: each chunk's output layer and cross-entropy
    (vocab-parallel under TP, torch's fused one otherwise) are recomputed in backward. At 1M tokens and a 32K vocabulary, the whole sequence's
    fp32 logits alone would be 128 GB.
    With sequence parallelism over `sequence_parallel` TP ranks, hidden holds this rank's S / TP rows and
    the output layer all-gathers each chunk's rows from every TP rank, so each chunk's labels are picked
    at those positions and the losses are put back in sequence order.
    """

    whole_vocabulary = output_layer.tp_group.size() == 1

    def chunk_loss(h, target):
        logits, _ = output_layer(h)
        if whole_vocabulary:  # torch's fused kernel; the vocab-parallel one costs 3 collectives per chunk
            return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view_as(target)
        return vocab_parallel_cross_entropy(logits.float(), target)

    local = hidden.shape[0]
    shard_starts = torch.arange(sequence_parallel, device=labels.device)[:, None] * local
    losses, positions = [], []
    for s in range(0, local, chunk):
        rows = torch.arange(s, min(s + chunk, local), device=labels.device)
        gathered = (shard_starts + rows[None, :]).flatten()  # the sequence positions the chunk's logits hold
        losses.append(checkpoint(chunk_loss, hidden[s : s + chunk], labels[:, gathered].t().contiguous(),
                                 use_reentrant=False))
        positions.append(gathered)
    losses = torch.cat(losses)
    if sequence_parallel > 1:
        losses = losses[torch.argsort(torch.cat(positions))]
    return losses.t()


class NSAGPTModel(GPTModel):
    """Megatron-core's GPTModel whose training loss is computed in sequence chunks (chunked_cross_entropy)."""

    def __init__(self, *args, loss_chunk: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk = loss_chunk

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        if not self.post_process or labels is None:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        sequence_parallel = self.output_layer.tp_group.size() if self.config.sequence_parallel else 1
        return chunked_cross_entropy(hidden_states, labels, self.output_layer, self.loss_chunk, sequence_parallel)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, built as Megatron builds its norms (config, hidden_size, eps).

    Megatron's fallback norm without Apex or Transformer Engine refuses sequence parallelism: under it
    each TP rank normalizes only its shard of the tokens, so the weight's gradient is partial and must be
    summed over TP. This one marks its weight `sequence_parallel`, which is how Megatron's finalize_model_grads
    knows to sum it (what its Apex and TE norms do)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(config: Config) -> ModuleSpec:
    """Megatron's local GPT layer (RMSNorm, SwiGLU MLP) with NSA's (or dense) self-attention."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.model.qk_layernorm)
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.self_attention = attention_spec(config.model, config.nsa, norm=RMSNorm)
    return spec


def block_spec(config: Config, tf_config: TransformerConfig) -> TransformerBlockSubmodules:
    """This pipeline stage's layers and the final norm."""
    return TransformerBlockSubmodules(layer_specs=[layer_spec(config)] * get_num_layers_to_build(tf_config),
                                      layer_norm=RMSNorm)


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
        sequence_parallel=stage.sequence_parallel,
        qk_layernorm=m.qk_layernorm,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        deterministic_mode=tr.deterministic,
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
        transformer_layer_spec=block_spec(config, tf_config),
        vocab_size=config.model.vocab_size,
        max_sequence_length=max(stage.seq_len for stage in config.stages),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",  # RoPE angles come from nsa_dist.attention (global positions, cached)
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
    weights N(0, std), with output projections scaled by 1/sqrt(2 * num_layers) (GPT-2). Then NSA's
    nsa.gate_bias start: the gate rows of the fused projection 0, the gate bias its configured value.
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
    start_gates(gpt)  # nsa.gate_bias: gate rows zero, the gate bias set


def finalize_grads(model: list, *args, **kwargs) -> None:
    """Megatron's finalize_model_grads (DP/CP reduction, embedding sync, division by tokens), then the
    partial gradients of NSA's TP-replicated parameters (phi, gate bias) summed over TP, once per step
    (nsa_dist.attention.sum_replicated_grads)."""
    finalize_model_grads(model, *args, **kwargs)
    for chunk in model:
        sum_replicated_grads(chunk, parallel_state.get_tensor_model_parallel_group())
