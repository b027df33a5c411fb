"""How far back a curriculum's task lookups reach: per stage, how many of its training task samples put
the asked-for fact at least 20%, 40%, 60%, 80% and 90% of the stage's length before the question.

    python tools/task_distances.py --config configs/proof_100m.yaml
    python tools/task_distances.py --config configs/proof_100m.yaml --set stages.3.mix.task_full_share=0.5

It replays the sampler's own draws for every sequence each stage trains on (which sequences are task
samples, their lengths, the fact's depth: nsa_dist.data and nsa_dist.tasks), without building any text,
so it takes seconds. A fact at depth d of a sample of n tokens sits about (1 - d) * n tokens before the
question (the filler around it makes up nearly all of the sample); NIAH at depth d of length L asks for
(1 - d) * L, so the columns are NIAH's depths 0.8, 0.6, 0.4, 0.2 and about 0 (0.1). Lookups that the
curriculum never trains at some distance are lookups a model has not learned there: the proof's 32K
stage trains 11 at 19.5K tokens back or more (README, Proof).
Prints one table; --out writes it as JSON too.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa_dist.config import Config, ConfigError, load_config  # noqa: E402
from nsa_dist.data import MixedSequences, one_sample, packed_sizes  # noqa: E402
from nsa_dist.tasks import drawn_depth  # noqa: E402


def lookup_distances(config: Config, stage) -> list[int]:
    """About how many tokens before its question each task sample of `stage`'s training sequences puts its
    asked-for fact, in the order the stage draws them. The stage's sequences are numbered on from the
    earlier stages' (the trainer's consumed_sequences)."""
    first = sum(s.steps * s.global_batch_size for s in config.resolved_stages()[: stage.index])
    mix, seed, length = stage.mix, config.data.seed, stage.seq_len + 1
    if mix.source == 1:
        return []
    kinds = MixedSequences(None, mix, None, stage.seq_len, seed)  # kind() reads only the seed and the shares
    distances = []
    for index in range(first, first + stage.steps * stage.global_batch_size):
        task = kinds.kind(index)
        if task == "source":
            continue
        if one_sample(task, length, seed, index, mix.task_min_length, mix.task_full_share):
            samples = [(index, length)]
        else:  # as task_samples numbers them: (index << 24) + the sample's offset // min_length
            sizes = packed_sizes(task, length, seed, index, mix.task_min_length, mix.task_max_length)
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            samples = [((index << 24) + offset // mix.task_min_length, size - 1)
                       for offset, size in zip(offsets, sizes)]
        distances += [round((1 - drawn_depth(task, seed, sample, n)) * n) for sample, n in samples]
    return distances


FRACTIONS = (0.2, 0.4, 0.6, 0.8, 0.9)  # of the stage's length


def report(config: Config) -> list[dict]:
    """Per stage: its task samples, and how many reach back at least each fraction of its length."""
    rows = []
    for stage in config.resolved_stages():
        distances = lookup_distances(config, stage)
        reach = {f"{f:g}": sum(d >= f * stage.seq_len for d in distances) for f in FRACTIONS}
        rows.append({"stage": stage.name, "seq_len": stage.seq_len, "task_samples": len(distances), "at_least": reach})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="JSON path for the table")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    rows = report(config)
    print("task samples of each stage's training sequences, and how many put the fact at least f * seq_len "
          "tokens before the question (NIAH depth 1 - f)")
    print(f"{'stage':>12} {'seq_len':>8} {'samples':>8} " + " ".join(f"{'f=' + f'{f:g}':>8}" for f in FRACTIONS))
    for row in rows:
        print(f"{row['stage']:>12} {row['seq_len']:>8} {row['task_samples']:>8} "
              + " ".join(f"{row['at_least'][f'{f:g}']:>8}" for f in FRACTIONS))
    if args.out:
        command = "python tools/task_distances.py " + " ".join(argv or sys.argv[1:])
        Path(args.out).write_text(json.dumps({"command": command, "stages": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
