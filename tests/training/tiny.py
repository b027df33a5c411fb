"""The tiny model the training tests share."""

from nsa_dist.config import load_config

# A tiny model every layout can split: 2 layers (PP=2), 2 KV heads and an even vocabulary (TP=2),
# 128 tokens = 2 * CP * selection_block * 2 with a window that fits one CP chunk (CP=2).
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_query_heads=4",
    "model.num_kv_heads=2", "model.head_dim_k=16", "model.head_dim_v=8", "model.vocab_size=128",
    "nsa.compress_block=8", "nsa.stride=4", "nsa.selection_block=16", "nsa.num_selected=3", "nsa.window=16",
    "data.period=24", "data.successors=2", "training.micro_batch_size=1", "training.global_batch_size=4",
    "training.lr=3e-3", "training.min_lr=3e-4", "training.warmup_steps=1", "training.device=cpu",
    "tracking.enabled=false",  # MLflow has its own tests (tests/test_tracking.py, tests/launch/)
]


def tiny_config(*overrides: str, steps: int = 3):
    return load_config(None, TINY + ["stages.0.seq_len=128", f"stages.0.steps={steps}", *overrides])
