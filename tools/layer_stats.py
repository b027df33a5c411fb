"""Per-layer statistics of a run's first training steps: where a loss spike starts.

Trains a config's first stage for --steps steps (one process, no evaluation, a throw-away run directory)
and records, at every step and for every layer: the RMS and largest row norm of the attention's queries and
keys (and from them a bound on the largest attention logit), the NSA gates' means per branch, the RMS of the
attention's output and of the layer's output with its largest entry; and, per layer and block (attention,
MLP), the gradient norm (before clipping) and the weights' relative change by the step. Prints the loss per step and the
layers at the largest loss jump, and writes everything as JSON.

  python tools/layer_stats.py --config configs/proof_100m.yaml --set training.seed=1 --set data.seed=1 \\
      --steps 30 --out benchmarks/layer-stats-nsa-s1.json
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa_dist.attention import DenseCoreAttention, NSACoreAttention  # noqa: E402
from nsa_dist.config import ConfigError, load_config  # noqa: E402
from nsa_dist.trainer import TrainingHooks, train  # noqa: E402

LAYER = re.compile(r"layers\.(\d+)\.")


def _block(name: str) -> str:
    """A parameter's group: 'L<i>.attn' or 'L<i>.mlp' (1-based layers, as Megatron counts), else its module."""
    match = LAYER.search(name)
    if match is None:
        return ".".join(name.removeprefix("module.").split(".")[:-1])
    return f"L{int(match.group(1)) + 1}.{'attn' if 'self_attention' in name else 'mlp'}"


def _rms(x: torch.Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()


class LayerStats(TrainingHooks):
    """Module hooks on the attention and transformer layers; per-step records of them and of the weights."""

    def __init__(self):
        self.records: list[dict] = []
        self.layers: dict[int, dict] = defaultdict(dict)  # this step's statistics by 1-based layer

    def model_built(self, model, stage) -> None:
        self.params = {name: p for name, p in model.named_parameters()}
        self.before = {name: p.detach().clone() for name, p in self.params.items()}
        for name, module in model.named_modules():
            match = LAYER.search(name + ".")
            if match is None:
                continue
            layer = int(match.group(1)) + 1
            if isinstance(module, (NSACoreAttention, DenseCoreAttention)):
                module.register_forward_pre_hook(self._attention_inputs(layer, module), with_kwargs=True)
                module.register_forward_hook(self._attention_output(layer))
            elif name.endswith(f"layers.{layer - 1}"):
                module.register_forward_hook(self._layer_output(layer))

    def _attention_inputs(self, layer: int, module):
        def hook(_, args, kwargs):
            query, key = (args + (kwargs.get("query"), kwargs.get("key")))[:2]
            dk = key.shape[-1] if isinstance(module, DenseCoreAttention) else module.model.head_dim_k
            q, k = query[..., :dk].float(), key[..., :dk].float()
            scale = module.softmax_scale or 1 / math.sqrt(dk)
            q_max, k_max = q.norm(dim=-1).max().item(), k.norm(dim=-1).max().item()
            stats = {"q_rms": _rms(q), "k_rms": _rms(k), "q_max_norm": q_max, "k_max_norm": k_max,
                     "logit_bound": q_max * k_max * scale}
            if isinstance(module, NSACoreAttention):
                logits = query[..., dk:].float()
                if module.gate_bias is not None:
                    logits = logits + module.gate_bias.float()
                gates = torch.sigmoid(logits).flatten(0, -2).mean(0)
                stats |= {"gate_cmp": gates[0].item(), "gate_slc": gates[1].item(), "gate_win": gates[2].item()}
            self.layers[layer].update(stats)
        return hook

    def _attention_output(self, layer: int):
        def hook(_, args, output):
            self.layers[layer]["attn_out_rms"] = _rms(output)
        return hook

    def _layer_output(self, layer: int):
        def hook(_, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.layers[layer] |= {"out_rms": _rms(hidden), "out_max": hidden.detach().abs().max().float().item()}
        return hook

    @torch.no_grad()
    def step(self, log) -> None:
        change, weight, grad = defaultdict(float), defaultdict(float), defaultdict(float)
        for name, p in self.params.items():
            block = _block(name)
            change[block] += (p.float() - self.before[name].float()).pow(2).sum().item()
            weight[block] += self.before[name].float().pow(2).sum().item()
            main_grad = getattr(p, "main_grad", None)
            if main_grad is not None:
                grad[block] += main_grad.float().pow(2).sum().item()
            self.before[name].copy_(p)
        # Megatron clips the gradient buffers in place, all by one factor: undo it, so that each block's norm
        # is its share of the step's grad_norm (the norm before clipping)
        clipped = math.sqrt(sum(grad.values()))
        unclip = log.grad_norm / clipped if clipped > 0 and log.grad_norm > clipped else 1.0
        blocks = {block: {"update": math.sqrt(change[block] / max(weight[block], 1e-30)),
                          "grad_norm": math.sqrt(grad[block]) * unclip} for block in change}
        self.records.append({"step": log.step, "loss": log.loss, "grad_norm": log.grad_norm, "lr": log.lr,
                             "layers": {str(i): dict(s) for i, s in sorted(self.layers.items())},
                             "blocks": blocks})
        self.layers.clear()


def print_report(records: list[dict]) -> None:
    print(f"{'step':>4} {'loss':>8} {'grad':>7} {'max logit bound':>16} {'largest out':>12} {'largest update':>16}")
    for r in records:
        layers = r["layers"]
        bound = max(layers.items(), key=lambda kv: kv[1].get("logit_bound", 0))
        out = max(layers.items(), key=lambda kv: kv[1].get("out_max", 0))
        upd = max(r["blocks"].items(), key=lambda kv: kv[1]["update"])
        print(f"{r['step']:>4} {r['loss']:>8.4f} {r['grad_norm']:>7.2f} {bound[1].get('logit_bound', 0):>9.1f} (L{bound[0]:>2})"
              f" {out[1].get('out_max', 0):>7.1f} (L{out[0]:>2}) {upd[1]['update']:>9.2e} ({upd[0]})")
    jumps = [(records[i]["loss"] - records[i - 1]["loss"], i) for i in range(1, len(records))]
    if not jumps:
        return
    rise, at = max(jumps)
    print(f"\nlargest loss rise: {rise:+.4f} at step {records[at]['step']} (the update of step "
          f"{records[at - 1]['step']} made it); per layer at steps {records[at - 1]['step']} -> {records[at]['step']}:")
    keys = [k for k in ("q_rms", "k_rms", "logit_bound", "gate_cmp", "gate_slc", "gate_win", "attn_out_rms",
                        "out_rms", "out_max") if k in records[at]["layers"].get("1", {})]
    print("layer " + " ".join(f"{k:>21}" for k in keys) + f" {'attn update':>21} {'mlp update':>21}")
    for layer, now in records[at]["layers"].items():
        before = records[at - 1]["layers"][layer]
        cells = [f"{before[k]:>9.3g} -> {now[k]:<9.3g}" for k in keys]
        for block in ("attn", "mlp"):
            b, a = records[at - 1]["blocks"][f"L{layer}.{block}"], records[at]["blocks"][f"L{layer}.{block}"]
            cells.append(f"{b['update']:>9.2e} -> {a['update']:<9.2e}")
        print(f"L{layer:<4} " + " ".join(cells))
    others = [block for block in records[at]["blocks"] if not block.startswith("L")]
    print("updates elsewhere: " + ", ".join(f"{block} {records[at - 1]['blocks'][block]['update']:.2e} -> "
                                            f"{records[at]['blocks'][block]['update']:.2e}" for block in others))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=30, help="steps of the first stage to train")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the records")
    args = parser.parse_args(argv)
    if args.steps < 1:
        print(f"error: --steps {args.steps} must be at least 1 (the first stage's steps to record)", file=sys.stderr)
        return 2
    run_dir = tempfile.mkdtemp(prefix="layer-stats-")
    try:
        config = load_config(args.config, args.overrides + [f"run.dir={run_dir}", "eval.at_stage_end=false",
                                                            f"stages.0.steps={args.steps}"])
    except ConfigError as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    stats = LayerStats()
    try:
        train(config, [stats], last_stage=config.stages[0].name)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoint: the statistics are the result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "steps": args.steps,
                                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                    "records": stats.records}, indent=1))
    print_report(stats.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
