"""`make train`: the main job on its embedded default.

Until the trainer lands (issue 5) this runs one NSA attention layer per curriculum stage on random
hidden states, forward and backward, and prints what each branch computed.
"""

import argparse
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from nsa_dist.attention import NSAAttention
from nsa_dist.config import Config, ConfigError, StageConfig, load_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML preset, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set nsa.window=128 (repeatable)")
    return parser.parse_args(argv)


def resolve_device(config: Config) -> torch.device:
    wanted = config.training.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device='cuda' but no CUDA device is visible: use cpu or auto")
    return torch.device("cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu")


def run_stage(config: Config, stage: StageConfig, device: torch.device) -> dict:
    """One NSA layer forward+backward at the stage's sequence length; returns what it computed."""
    torch.manual_seed(config.training.seed)
    model = config.model
    if stage.rotary_base is not None:
        model = type(model)(**{**vars(model), "rotary_base": stage.rotary_base})
    layer = NSAAttention(model, config.nsa).to(device)
    x = torch.randn(config.training.micro_batch_size, stage.seq_len, model.hidden_size, device=device)
    start = time.perf_counter()
    result = layer.attend(x)
    out = layer.o_proj(result.output.flatten(-2))
    out.square().mean().backward()
    elapsed = time.perf_counter() - start
    blocks = result.block_idx
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    return {
        "stage": stage.name,
        "seq_len": stage.seq_len,
        "out rms": out.pow(2).mean().sqrt().item(),
        "blocks/q": (blocks >= 0).sum(-1).float().mean().item(),
        "no-cmp frac": (result.lse_cmp == float("-inf")).float().mean().item(),
        "grads ok": all(torch.isfinite(g).all().item() for g in grads),
        "fwd+bwd s": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    console = Console()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        device = resolve_device(config)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        return 2
    m, n = config.model, config.nsa
    console.print(f"NSA layer on {device}: HQ={m.num_query_heads} HK={m.num_kv_heads} Dk={m.head_dim_k} "
                  f"Dv={m.head_dim_v} | l={n.compress_block} d={n.stride} l'={n.selection_block} "
                  f"n={n.num_selected} w={n.window} kv={n.kv} phi={n.phi}")
    rows = [run_stage(config, stage, device) for stage in config.stages]
    table = Table(title="NSA forward+backward per stage (training arrives with issue 5)")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    return 0 if all(row["grads ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
