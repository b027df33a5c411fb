"""The attention layer training uses (Megatron's SelfAttention with NSA's fused projection and core):
gradients, causality, dense against an explicit softmax, RoPE, packed documents, CP against one rank.

Megatron modules need torch.distributed and parallel state, so each test body runs in real gloo
processes (tests/dist_harness.py); several checks share one process to pay its start-up once.
"""

import math

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from nsa_dist.attention import rotary_freqs
from nsa_dist.config import load_config
from nsa_dist.parallel import split_zigzag

SMALL = ["model.hidden_size=32", "model.num_query_heads=4", "model.num_kv_heads=2", "model.head_dim_k=8",
         "model.head_dim_v=4", "nsa.compress_block=8", "nsa.stride=4", "nsa.selection_block=16",
         "nsa.num_selected=3", "nsa.window=12", "training.dtype=fp32"]


def build_layer(*overrides: str, seed: int = 0):
    """One ParallelSelfAttention (float64 weights) in Megatron's parallel state of this process group,
    built by its spec as a GPT layer builds it. Call inside a distributed worker, between
    initialize_model_parallel and destroy_model_parallel."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.spec_utils import build_module

    from nsa_dist.attention import attention_spec
    from nsa_dist.megatron_cpu import enable_cpu
    from nsa_dist.model import transformer_config

    enable_cpu()
    config = load_config(None, SMALL + list(overrides))
    stage = config.resolved_stages()[0]
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    layer = build_module(attention_spec(config.model, config.nsa), config=transformer_config(config, stage, torch.float32),
                         layer_number=1)
    with torch.no_grad():  # Megatron zero-initializes biases; give every parameter a value that matters
        for param in layer.parameters():
            param.normal_(0, 0.3)
    return layer.double(), config


def _attend(layer, x, **kwargs):
    out, _ = layer(x, None, **kwargs)
    return out


def _single_rank_checks(rank, world):
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    parallel_state.initialize_model_parallel()
    try:
        # every parameter gets a gradient, for each kind of K/V, phi and compressed-key RoPE
        for kv in ("separate", "shared"):
            for phi, rope in (("mlp", "keys"), ("mean", "keys"), ("mlp", "blocks")):
                layer, _ = build_layer(f"nsa.kv={kv}", f"nsa.phi={phi}", f"nsa.compression_rope={rope}")
                x = torch.randn(45, 2, 32, dtype=torch.float64)
                out = _attend(layer, x)
                assert out.shape == (45, 2, 32)
                out.square().sum().backward()
                for name, param in layer.named_parameters():
                    assert param.grad is not None and param.grad.abs().sum() > 0, \
                        f"{kv} {phi} {rope}: {name} has no gradient"

        # compression_rope "blocks": phi compresses the keys before RoPE, and each compressed key is rotated
        # at its block's first position (kernels.nsa.rope_rows; 0, 4, 8, ... with stride 4 here)
        import nsa_dist.attention as attention_module

        layer, config = build_layer("nsa.kv=shared", "nsa.compression_rope=blocks", seed=5)
        seen = []
        compose = attention_module.nsa_context_parallel

        def recording(*args, **kwargs):
            seen.append((args[1][0].detach().clone(), args[2][0].detach().clone(), kwargs["cmp_rope"]))
            return compose(*args, **kwargs)

        attention_module.nsa_context_parallel = recording
        try:
            x = torch.randn(45, 1, 32, dtype=torch.float64)
            _attend(layer, x)
        finally:
            attention_module.nsa_context_parallel = compose
        raw, roped, cmp_rope = seen[0]
        with torch.no_grad():
            mixed, _ = layer.linear_qkv(x)
            k = mixed.view(45, 1, 2, -1)[..., 2 * (8 + 3) : 2 * (8 + 3) + 8].transpose(0, 1)  # [b, s, HK, Dk]
        torch.testing.assert_close(raw, k, rtol=0, atol=0)
        assert (roped - raw).abs().max() > 1e-3  # the other branches get the RoPE'd keys
        blocks = torch.arange((45 - 8) // 4 + 1, dtype=torch.float64) * 4
        want = blocks[:, None] * config.model.rotary_base ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
        want = torch.cat([want, want], dim=-1)  # the layer's table holds the angles mod 2 pi
        for f in (torch.cos, torch.sin):
            torch.testing.assert_close(f(cmp_rope.double()), f(want), rtol=0, atol=1e-6)

        # nsa.gate_bias: every token's gates start at sigmoid(bias), and the bias and gate rows then learn
        layer, _ = build_layer("nsa.gate_bias=[-2.0, -1.0, 2.5]", seed=4)
        layer.start_gates()  # build_layer re-drew every parameter, as the trainer's init_weights does
        seen = []
        compose = attention_module.nsa_context_parallel

        def recording(*args, **kwargs):
            seen.append(args[4].detach().clone())  # q, (k, v) per branch, gates
            return compose(*args, **kwargs)

        attention_module.nsa_context_parallel = recording
        try:
            out = _attend(layer, torch.randn(45, 2, 32, dtype=torch.float64))
        finally:
            attention_module.nsa_context_parallel = compose
        assert seen[0].shape == (2, 45, 4, 3)
        torch.testing.assert_close(seen[0], torch.sigmoid(torch.tensor([-2.0, -1.0, 2.5], dtype=torch.float64))
                                   .expand(2, 45, 4, 3), rtol=0, atol=1e-15)
        out.square().sum().backward()
        gate_rows = layer.linear_qkv.weight.grad.view(2, -1, 32)[:, : 2 * (8 + 3)].view(2, 2, 11, 32)[:, :, 8:]
        assert layer.core_attention.gate_bias.grad.abs().min() > 0 and gate_rows.abs().amin(dim=-1).min() > 0

        # separate K/V: one K and V projection per branch, in the one fused projection
        separate, _ = build_layer("nsa.kv=separate")
        shared, _ = build_layer("nsa.kv=shared")
        extra = sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters())
        assert extra == 2 * 32 * 2 * (8 + 4)  # two more K and V projections of hidden -> HK * (Dk + Dv)

        # causal: later tokens change nothing before them
        for attention in ("nsa", "dense"):
            layer, _ = build_layer(f"model.attention={attention}", seed=1)
            x = torch.randn(40, 1, 32, dtype=torch.float64)
            changed = x.clone()
            changed[25:] = torch.randn(15, 1, 32, dtype=torch.float64)
            with torch.no_grad():
                torch.testing.assert_close(_attend(layer, x)[:25], _attend(layer, changed)[:25], rtol=0, atol=0)

        # dense equals an explicit causal softmax over RoPE'd q and k from the fused projection
        layer, config = build_layer("model.attention=dense", seed=2)
        x = torch.randn(10, 1, 32, dtype=torch.float64)
        with torch.no_grad():
            mixed, _ = layer.linear_qkv(x)
            q, k, v = mixed.view(10, 2, -1).split([2 * 8, 8, 4], dim=-1)
            q, k, v = q.reshape(10, 4, 8), k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            angles = torch.arange(10, dtype=torch.float64)[:, None] * config.model.rotary_base ** (
                -torch.arange(0, 8, 2, dtype=torch.float64) / 8)
            cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

            def rope(t):
                return t * cos + torch.cat([-t[..., 4:], t[..., :4]], dim=-1) * sin

            scores = torch.einsum("thd,shd->hts", rope(q), rope(k)) / 8**0.5
            scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
            expected, _ = layer.linear_proj(torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(10, 1, 16))
            torch.testing.assert_close(_attend(layer, x), expected, rtol=1e-5, atol=1e-6)  # fp32 angles

        # packed documents: each document is attended (and RoPE'd, compressed keys too) as if it were alone
        for attention in ("nsa", "nsa blocks", "dense"):
            rope = "blocks" if attention == "nsa blocks" else "keys"
            layer, _ = build_layer(f"model.attention={attention.split()[0]}", f"nsa.compression_rope={rope}", seed=3)
            lengths = [40, 24, 36]
            x = torch.randn(sum(lengths), 1, 32, dtype=torch.float64)
            cu = torch.tensor([0, 40, 64, 100], dtype=torch.int32)
            packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=40,
                                     max_seqlen_kv=40)
            with torch.no_grad():
                together = _attend(layer, x, packed_seq_params=packed)
                alone = torch.cat([_attend(layer, x[lo:hi]) for lo, hi in zip(cu[:-1], cu[1:])])
            torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-10, msg=lambda m: f"{attention}: {m}")
        sbhd = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=40, max_seqlen_kv=40)
        with pytest.raises(ValueError, match="qkv_format='sbhd'.*qkv_format='thd'"):
            _attend(layer, x, packed_seq_params=sbhd)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.timeout(180)
def test_layer_on_one_rank():
    run_distributed(_single_rank_checks, 1)


def _context_parallel_checks(rank, world):
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from nsa_dist.attention import set_gather_group
    from nsa_dist.parallel.groups import twin_groups

    torch.manual_seed(0)
    x = torch.randn(128, 1, 32, dtype=torch.float64)
    upstream = torch.randn(128, 1, 32, dtype=torch.float64)
    # packed documents over the whole sequence: starting mid-chunk, on a chunk boundary (64), across ranks
    cu = torch.tensor([0, 40, 64, 100, 128], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=40, max_seqlen_kv=40)

    def shard(t):
        return split_zigzag(t.transpose(0, 1), rank, world).transpose(0, 1)

    # separate K/V; shared K/V with compressed keys RoPE'd at their blocks (the halo exchange sends the
    # keys before and after RoPE and the shared values once); the dense baseline
    variants = {"nsa": ["nsa.kv=separate"], "nsa kv shared, compression_rope blocks": [
        "nsa.kv=shared", "nsa.compression_rope=blocks"], "dense": ["model.attention=dense"]}
    for attention, overrides in variants.items():
        parallel_state.initialize_model_parallel()
        full, full_grads = {}, {}
        for documents in (None, packed):
            layer, _ = build_layer(*overrides)
            full[documents is None] = out = _attend(layer, x, packed_seq_params=documents)
            out.backward(upstream)
            full_grads[documents is None] = {name: p.grad.clone() for name, p in layer.named_parameters()}
        parallel_state.destroy_model_parallel()

        parallel_state.initialize_model_parallel(context_parallel_size=world)
        gather_group = twin_groups(parallel_state.get_context_parallel_group())
        # the selection gather on the CP group itself, or on its own; packed documents under CP
        for twin, documents in ((None, None), (gather_group, None), (None, packed)):
            layer, _ = build_layer(*overrides)
            set_gather_group(layer, twin)
            local = _attend(layer, shard(x), packed_seq_params=documents)
            what = f"{attention}, documents={documents is not None}"
            torch.testing.assert_close(local, shard(full[documents is None].detach()), rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"{what}: {m}")
            local.backward(shard(upstream))
            for name, param in layer.named_parameters():  # each rank's share of the weights' gradient
                summed = param.grad.clone()
                dist.all_reduce(summed)
                torch.testing.assert_close(summed, full_grads[documents is None][name], rtol=1e-8, atol=1e-10,
                                           msg=lambda m: f"{what}, {name}: {m}")
        dist.destroy_process_group(gather_group)
        parallel_state.destroy_model_parallel()


@pytest.mark.timeout(180)
def test_layer_under_context_parallelism_equals_one_rank():
    """Outputs and weight gradients of the CP=2 layer equal one rank's, for NSA and the dense baseline, on
    one sequence and on packed documents."""
    run_distributed(_context_parallel_checks, 2)


def test_rotary_angles_are_exact_at_a_million_tokens():
    """The cached angles (reduced mod 2 pi in float64) give cos/sin within fp32 rounding at every position,
    where angles formed in fp32 are off by up to ~0.06 rad near 1M."""
    seq, dim, base = 1 << 20, 64, 5e5
    freqs = rotary_freqs(seq, 1, 0, dim, base, torch.device("cpu"))[:, 0, 0]
    positions = torch.arange(seq, dtype=torch.float64)[:, None]
    exact = positions * base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    exact = torch.cat([exact, exact], dim=-1)
    assert (freqs.double().cos() - exact.cos()).abs().max() < 1e-6
    assert (freqs.double().sin() - exact.sin()).abs().max() < 1e-6
    fp32 = torch.arange(seq, dtype=torch.float32)[:, None] * torch.tensor(base, dtype=torch.float32) ** (
        -torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    assert (fp32.double().cos() - exact[:, : dim // 2].cos()).abs().max() > 1e-3  # what the cache avoids


def test_rotary_angles_follow_the_zigzag_shard():
    """A CP rank's angles are the whole sequence's at its zigzag positions (RoPE at global positions)."""
    full = rotary_freqs(64, 1, 0, 8, 1e4, torch.device("cpu"))
    for rank in range(2):
        shard = rotary_freqs(64, 2, rank, 8, 1e4, torch.device("cpu"))
        torch.testing.assert_close(shard, split_zigzag(full.transpose(0, 1), rank, 2).transpose(0, 1))
    assert math.isclose(float(full[5, 0, 0, 0]), 5.0)


@pytest.mark.parametrize("width", [64, 67, 128], ids=["rotated-whole", "query-and-gate-logits", "doubled-keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_megatrons_rope_bitwise(width, dtype):
    """Rotary (RoPE with a backward of its own) gives the output and the gradient that autograd through
    Megatron's unfused apply_rotary_pos_emb gives, bit for bit: on a head as wide as the rotated channels, on
    NSA's query with its 3 gate logits beside them, on the doubled keys of compression_rope "blocks"."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from nsa_dist.attention import Rotary, rotary_cos_sin

    torch.manual_seed(0)
    angles = rotary_freqs(48, 1, 0, 64, 1e4, torch.device("cpu"))  # [48, 1, 1, 64]
    x = torch.randn(48, 2, 3, width, dtype=dtype, requires_grad=True)
    upstream = torch.randn(48, 2, 3, width, dtype=dtype)
    want = _apply_rotary_pos_emb_bshd(x, angles)
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    got = Rotary.apply(x, *rotary_cos_sin(angles, dtype))
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    assert not torch.equal(got[..., :64], x[..., :64]) and torch.equal(got[..., 64:], x[..., 64:])
    assert rotary_cos_sin(angles, dtype)[0] is rotary_cos_sin(angles, dtype)[0]  # computed once per dtype
