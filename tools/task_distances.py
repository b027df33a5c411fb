"""How far back a curriculum's task lookups reach: per stage, how many of its training task samples put
the asked-for fact at least 20%, 40%, 60%, 80% and 90% of the stage's length before the question.

    python tools/task_distances.py --config configs/proof_100m.yaml
    python tools/task_distances.py --config configs/proof_100m.yaml --set stages.3.mix.task_full_share=0.5
    python tools/task_distances.py --config configs/proof_100m.yaml --set ... --store RUN_DIR

It replays the sampler's own draws for every sequence each stage trains on (which sequences are task
samples, their lengths, the fact's depth: nsa_dist.data and nsa_dist.tasks), without building any text,
so it takes seconds. A fact at depth d of a sample of n tokens sits about (1 - d) * n tokens before the
question (the filler around it makes up nearly all of the sample); NIAH at depth d of length L asks for
(1 - d) * L, so the columns are NIAH's depths 0.8, 0.6, 0.4, 0.2 and about 0 (0.1). Lookups that the
curriculum never trains at some distance are lookups a model has not learned there: the proof's 32K
stage trains 11 at 19.5K tokens back or more (README, Proof).
Prints one table; --out writes it as JSON too. With --store (a run trained with that config, its MLflow store
as tools/compare_runs.py reads it), also the run's answer loss in each stage that trains one sequence a
step, by that step's lookup: how far back a whole-sequence sample puts its fact, or packed samples, in
the stage's first and second half. It tells a lookup the run learned at some distance from one it did not.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare_runs, beside this file

from nsa_dist.config import Config, ConfigError, load_config  # noqa: E402
from nsa_dist.data import MixedSequences, one_sample, packed_sizes  # noqa: E402
from nsa_dist.tasks import drawn_depth  # noqa: E402


def first_of(config: Config, stage) -> tuple[int, int]:
    """(sequences, steps) the stages before `stage` train: its sequences are numbered on from the first
    (the trainer's consumed_sequences), its steps from the second plus one (MLflow's step of its first)."""
    before = config.resolved_stages()[: stage.index]
    return sum(s.steps * s.global_batch_size for s in before), sum(s.steps for s in before)


def sequence_lookups(config: Config, stage, index: int) -> tuple[bool, list[int]] | None:
    """Training sequence `index` of `stage`: whether it is one task sample as long as the sequence, and about
    how many tokens before its question each of its task samples puts the asked-for fact; None for a
    sequence of source text."""
    mix, seed, length = stage.mix, config.data.seed, stage.seq_len + 1
    task = MixedSequences(None, mix, None, stage.seq_len, seed).kind(index)  # reads only the seed and shares
    if task == "source":
        return None
    whole = one_sample(task, length, seed, index, mix.task_min_length, mix.task_full_share)
    if whole:
        samples = [(index, length)]
    else:  # as task_samples numbers them: (index << 24) + the sample's offset // min_length
        sizes = packed_sizes(task, length, seed, index, mix.task_min_length, mix.task_max_length)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        samples = [((index << 24) + offset // mix.task_min_length, size - 1) for offset, size in zip(offsets, sizes)]
    return whole, [round((1 - drawn_depth(task, seed, sample, n)) * n) for sample, n in samples]


def lookup_distances(config: Config, stage) -> list[int]:
    """About how many tokens before its question each task sample of `stage`'s training sequences puts its
    asked-for fact, in the order the stage draws them."""
    if stage.mix.source == 1:
        return []
    first, _ = first_of(config, stage)
    distances = []
    for index in range(first, first + stage.steps * stage.global_batch_size):
        lookups = sequence_lookups(config, stage, index)
        distances += lookups[1] if lookups else []
    return distances


# (label, lower and upper bound as a fraction of the stage's length) of a whole-sequence sample's lookup
DISTANCE_BINS = (("< 0.1 L", 0.0, 0.1), ("0.1-0.25 L", 0.1, 0.25), ("0.25-0.5 L", 0.25, 0.5), (">= 0.5 L", 0.5, 1.01))
PACKED = "packed samples"


def answer_loss_by_distance(config: Config, stage, answer_loss: dict[int, float]) -> dict[str, dict[str, list]]:
    """The answer losses a run logged (step -> loss) in `stage`, one sequence a step, sorted by that step's
    lookup: the fact's distance before the question, binned by DISTANCE_BINS, for a sequence that is one
    task sample, or PACKED for one of several samples; each split into the stage's first and second
    half. A stage of several sequences a step mixes their lookups in one figure, so it cannot be split."""
    if stage.global_batch_size != 1:
        raise ValueError(f"stage {stage.name!r} trains {stage.global_batch_size} sequences a step, and its steps' "
                         "answer loss mixes their lookups: only stages with global_batch_size 1 can be split")
    first_sequence, first_step = first_of(config, stage)
    outside = sorted(step for step in answer_loss if not first_step < step <= first_step + stage.steps)
    if outside:
        raise ValueError(f"the run logged stage {stage.name!r}'s answer loss at step {outside[0]}, outside its steps "
                         f"{first_step + 1}-{first_step + stage.steps} in this config: the store is not from this "
                         "config (give the run's own --config and --set)")
    table = {label: {"first half": [], "second half": []} for label in [b[0] for b in DISTANCE_BINS] + [PACKED]}
    for i in range(stage.steps):
        step, lookups = first_step + i + 1, sequence_lookups(config, stage, first_sequence + i)
        if lookups is None:
            if step in answer_loss:
                raise ValueError(f"step {step} trains source text, yet the run logged an answer loss there: the "
                                 "store is not from this config (give the run's own --config and --set)")
            continue
        if step not in answer_loss:
            continue
        whole, (distance, *_) = lookups
        label = PACKED if not whole else next(
            name for name, lo, hi in DISTANCE_BINS if lo * stage.seq_len <= distance < hi * stage.seq_len)
        table[label]["first half" if i < stage.steps // 2 else "second half"].append(answer_loss[step])
    return table


FRACTIONS = (0.2, 0.4, 0.6, 0.8, 0.9)  # of the stage's length


def report(config: Config) -> list[dict]:
    """Per stage: its task samples, and how many reach back at least each fraction of its length."""
    rows = []
    for stage in config.resolved_stages():
        distances = lookup_distances(config, stage)
        reach = {f"{f:g}": sum(d >= f * stage.seq_len for d in distances) for f in FRACTIONS}
        rows.append({"stage": stage.name, "seq_len": stage.seq_len, "task_samples": len(distances), "at_least": reach})
    return rows


def store_report(config: Config, run_dir: Path) -> dict[str, dict]:
    """answer_loss_by_distance for each stage of the run in run_dir (its MLflow store, as compare_runs
    reads it) that trains one sequence a step and mixes in task samples."""
    from compare_runs import read_run

    stages = read_run(run_dir)["stages"]
    tables = {}
    for stage in config.resolved_stages():
        if stage.global_batch_size == 1 and stage.mix.source < 1 and stage.name in stages:
            tables[stage.name] = answer_loss_by_distance(config, stage, dict(stages[stage.name]["answer_loss"]))
    return tables


def print_store_report(tables: dict[str, dict]) -> None:
    for stage, table in tables.items():
        print(f"\nstage {stage}: answer loss of each step (one sequence) by its lookup: a whole-sequence "
              "sample's distance from fact to question (L: the stage's length), or several packed samples")
        print(f"{'lookup':>16} {'steps':>6} {'first half':>11} {'steps':>6} {'second half':>12}")
        for label, halves in table.items():
            cells = [f"{len(v):>6} {(sum(v) / len(v) if v else float('nan')):>{w}.3f}"
                     for v, w in ((halves["first half"], 11), (halves["second half"], 12))]
            print(f"{label:>16} " + " ".join(cells))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--store", type=Path, metavar="RUN_DIR",
                        help="a run trained with this config (and --set): its answer loss by lookup, per stage of "
                             "one sequence a step")
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
    result = {"command": "python tools/task_distances.py " + " ".join(argv or sys.argv[1:]), "stages": rows}
    if args.store:
        try:
            result["answer_loss_by_lookup"] = store_report(config, args.store)
        except ValueError as exc:
            sys.exit(f"error: --store {args.store}: {exc}")
        if not result["answer_loss_by_lookup"]:
            sys.exit(f"error: --store {args.store}: no stage of this config both trains one sequence a step "
                     "(global_batch_size 1) and mixes in task samples, so no answer loss can be split by lookup; "
                     "give the config (and --set) the run was trained with")
        print_store_report(result["answer_loss_by_lookup"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return rows


if __name__ == "__main__":
    main()
