"""How much the top-n picks of consecutive tokens overlap: in a trained NSA model, layer by layer, and for the
random inputs that tools/bench_kernels.py gives the kernels.

    python tools/selection_overlap.py --config configs/proof_100m.yaml \
        --checkpoint runs/proof_100m/checkpoints/step_00001050 --seq-len 8192

A selected-attention kernel over tiles of TT consecutive tokens would load the union of their picked blocks
once (benchmarks/kernels-notes.md). For TT in --tiles, this reports the mean number of distinct blocks a
tile's tokens pick, divided by the mean number one token picks: 1 when the TT tokens pick the same blocks,
TT when they share none. The model runs over --sequences held-out sequences of the data (with the config's
documents setting); the random line is the picks of random q and k at the same sizes. Without --checkpoint
the model keeps its initial weights. Block ids count per document, so a tile that straddles two packed
documents may undercount (rare with documents much longer than TT). One process; writes --out (JSON) and
prints a table.
"""

import argparse
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
warnings.filterwarnings("ignore", category=FutureWarning, message=".*(load_state_dict. is deprecated|DTensor instead)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.compression.naive import mean_compress  # noqa: E402
from kernels.nsa import branch_ops, resolve_impl  # noqa: E402
from nsa_dist.checkpoint import CheckpointError  # noqa: E402
from nsa_dist.config import ConfigError, load_config  # noqa: E402
from nsa_dist.data import document_eod, packed_seq_params, stage_sequences  # noqa: E402
from nsa_dist.probe import (add_model_arguments, checkpoint_and_stage, loaded_model,  # noqa: E402
                            recorded_nsa_layers, require_nsa, start_one_process)


def union_ratio(block_idx: torch.Tensor, tile: int) -> float:
    """block_idx [B, T, HK, n] (-1: no block) -> mean distinct valid ids per tile of `tile` consecutive tokens,
    over the mean valid ids per token."""
    batch, seq, heads, picks = block_idx.shape
    seq -= seq % tile
    ids = block_idx[:, :seq].reshape(batch, seq // tile, tile, heads, picks).transpose(2, 3).flatten(3)
    ids = ids.sort(dim=-1).values
    new = torch.ones_like(ids, dtype=torch.bool)
    new[..., 1:] = ids[..., 1:] != ids[..., :-1]
    distinct = ((ids >= 0) & new).sum(-1).double().mean()
    per_token = (block_idx[:, :seq] >= 0).sum(-1).double().mean()
    return float(distinct / per_token)


def random_picks(config, seq_len: int, device: torch.device) -> torch.Tensor:
    """Top-n of random q, k (normal, bf16 on the GPU), as tools/bench_kernels.py feeds the kernels."""
    m, n = config.model, config.nsa
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, seq_len, m.num_query_heads, m.head_dim_k, device=device, dtype=dtype, generator=generator)
    k = torch.randn(1, seq_len, m.num_kv_heads, m.head_dim_k, device=device, dtype=dtype, generator=generator)
    ops = branch_ops(resolve_impl(n.impl, device))
    k_cmp = mean_compress(k, n.compress_block, n.stride)
    with torch.no_grad():
        _, lse = ops.compressed(q, k_cmp, k_cmp, n.compress_block, n.stride, None, q_start=0, cu_seqlens=None)
        return ops.select(q, k_cmp, lse, n.compress_block, n.stride, n.selection_block, n.num_selected, None,
                          q_start=0, cu_seqlens=None, score=n.selection_score)


def model_picks(config, stage, checkpoint, sequences: int, device: torch.device) -> list[list[torch.Tensor]]:
    """Per held-out sequence, each NSA layer's block_idx, in layer order."""
    keep = lambda args, result: result.block_idx.detach()  # noqa: E731
    with recorded_nsa_layers(keep) as picks, loaded_model(config, stage, checkpoint, device) as gpt:
        held_out = stage_sequences(config, stage.seq_len, stage.mix, "valid")
        eod = document_eod(config)
        per_sequence = []
        with torch.no_grad():
            for index in range(sequences):
                tokens = held_out(index)[None, :-1]
                documents = packed_seq_params(tokens, eod, device) if eod is not None else None
                picks.clear()
                gpt(tokens.to(device), None, None, packed_seq_params=documents)
                per_sequence.append(list(picks))
        return per_sequence


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the stage's)")
    p.add_argument("--sequences", type=int, default=2, help="held-out sequences to run")
    p.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--out", default="benchmarks/selection_overlap.json")
    a = p.parse_args(argv)
    if a.sequences < 1:
        raise ConfigError(f"--sequences {a.sequences} must be at least 1")
    if min(a.tiles) < 1:
        raise ConfigError(f"--tiles {' '.join(map(str, a.tiles))}: every tile size must be at least 1 token")
    if a.seq_len is not None and a.seq_len < 1:
        raise ConfigError(f"--seq-len {a.seq_len} must be at least 1 (or left out for the stage's)")
    config = load_config(a.config, a.overrides)
    require_nsa(config, a.config, "selection overlap")
    checkpoint, stage = checkpoint_and_stage(config, a.checkpoint, a.stage)
    stage = replace(stage, seq_len=a.seq_len or stage.seq_len)
    # the stage's n (stages may set their own), for the random picks and the report as for the model
    config = replace(config, nsa=replace(config.nsa, num_selected=stage.num_selected))
    device = start_one_process(config, port=29512)

    per_sequence = model_picks(config, stage, checkpoint, a.sequences, device)
    layers = len(per_sequence[0])
    model_rows = {f"layer {i + 1}": {tile: sum(union_ratio(seq[i], tile) for seq in per_sequence) / len(per_sequence)
                                     for tile in a.tiles} for i in range(layers)}
    model_rows["mean over layers"] = {tile: sum(row[tile] for row in model_rows.values()) / layers for tile in a.tiles}
    random_row = {tile: union_ratio(random_picks(config, stage.seq_len, device), tile) for tile in a.tiles}
    report = {"config": a.config, "checkpoint": a.checkpoint, "stage": stage.name, "seq_len": stage.seq_len,
              "sequences": a.sequences, "documents": config.data.documents, "device": str(device),
              "num_selected": config.nsa.num_selected, "union_over_one_token": model_rows,
              "random_inputs": random_row}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"distinct picked blocks of TT consecutive tokens / one token's (n={config.nsa.num_selected}, "
          f"{stage.seq_len} tokens, {a.sequences} held-out sequences)")
    print(f"{'':>18}" + "".join(f"{'TT=' + str(t):>8}" for t in a.tiles))
    for label, row in [*model_rows.items(), ("random q, k", random_row)]:
        print(f"{label:>18}" + "".join(f"{row[t]:>8.2f}" for t in a.tiles))
    return report


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError) as exc:
        sys.exit(f"error: {exc}")
