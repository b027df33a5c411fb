"""The attention modules that own projections: NSA (kv shared/separate, phi mlp/mean) and dense."""

import pytest
import torch

from nsa_dist.attention import DenseAttention, NSAAttention, build_attention
from nsa_dist.config import load_config
from nsa_dist.rope import apply_rotary, rotary_angles

SMALL = ["model.hidden_size=32", "model.num_query_heads=4", "model.num_kv_heads=2", "model.head_dim_k=8",
         "model.head_dim_v=4", "nsa.compress_block=8", "nsa.stride=4", "nsa.selection_block=16",
         "nsa.num_selected=3", "nsa.window=12"]


def small_config(*extra):
    return load_config(None, SMALL + list(extra))


@pytest.mark.parametrize("kv", ["separate", "shared"])
@pytest.mark.parametrize("phi", ["mlp", "mean"])
def test_nsa_module_shapes_and_gradients(kv, phi):
    config = small_config(f"nsa.kv={kv}", f"nsa.phi={phi}")
    torch.manual_seed(0)
    layer = NSAAttention(config.model, config.nsa)
    x = torch.randn(2, 45, 32)
    out = layer(x)
    assert out.shape == (2, 45, 32)
    out.square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_separate_kv_has_one_projection_per_branch():
    separate = NSAAttention(small_config().model, small_config("nsa.kv=separate").nsa)
    shared = NSAAttention(small_config().model, small_config("nsa.kv=shared").nsa)
    assert sorted(separate.k_proj) == ["cmp", "slc", "win"] and list(shared.k_proj) == ["shared"]
    extra = sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters())
    assert extra == 2 * 32 * 2 * (8 + 4)  # two more K and V projections of hidden -> HK * (Dk + Dv)


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_module_is_causal(attention):
    config = small_config(f"model.attention={attention}")
    torch.manual_seed(1)
    layer = build_attention(config.model, config.nsa)
    x = torch.randn(1, 40, 32)
    changed = x.clone()
    changed[:, 25:] = torch.randn(1, 15, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[:, :25], layer(changed)[:, :25], rtol=0, atol=0)


def test_dense_matches_explicit_causal_softmax():
    config = small_config("model.attention=dense")
    torch.manual_seed(2)
    layer = DenseAttention(config.model)
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    layer = layer.double()
    cos, sin = rotary_angles(torch.arange(10), 8, config.model.rotary_base)
    q = apply_rotary(layer.q_proj(x).view(1, 10, 4, 8), cos.double(), sin.double())
    k = apply_rotary(layer.k_proj(x).view(1, 10, 2, 8), cos.double(), sin.double()).repeat_interleave(2, dim=2)
    v = layer.v_proj(x).view(1, 10, 2, 4).repeat_interleave(2, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / 8**0.5
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    torch.testing.assert_close(layer(x), layer.o_proj(expected.flatten(-2)))


def test_rope_uses_global_positions():
    """With mean pooling every NSA score is a sum of RoPE dot products, so shifting all positions by a
    constant leaves the output unchanged; a wrong or dropped position would break this."""
    config = small_config("nsa.phi=mean")
    torch.manual_seed(3)
    layer = NSAAttention(config.model, config.nsa).double()
    x = torch.randn(1, 33, 32, dtype=torch.float64)
    base = layer.attend(x, torch.arange(33))
    shifted = layer.attend(x, torch.arange(33) + 1000)
    torch.testing.assert_close(base.output, shifted.output, rtol=1e-5, atol=1e-6)
    assert torch.equal(base.block_idx, shifted.block_idx)
    moved = layer.attend(x, torch.arange(33) * 2)
    assert not torch.allclose(base.output, moved.output, atol=1e-3)
