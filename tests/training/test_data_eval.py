"""Training on an indexed corpus (tools/preprocess_data.py's output, read through Megatron-core's
GPTDataset) lowers the tiny model's validation loss; the evaluation runs at each stage's end, writes the
grid JSON and the heatmap PNG beside the checkpoint and logs them to the stage's MLflow run; `nsa-dist
eval` does the same for a checkpoint of the run. Real processes on gloo."""

import gzip
import json
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))

from corpus import stdlib_corpus  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from tiny import TINY, tiny_config  # noqa: E402

from nsa_dist.checkpoint import MARKER  # noqa: E402

DATA = ["data.source=indexed", "model.vocab_size=256", "data.split=90,10,0", "data.documents=mask",
        "eval.niah_lengths=[256]", "eval.niah_stage_length=true", "eval.niah_depths=[0,0.5,1]", "eval.niah_samples=2",
        "eval.validation_sequences=6", "eval.position_buckets=4"]
STAGES = ["stages=[{name: first, seq_len: 192, steps: 1}, {name: more, seq_len: 192, steps: 24, "
          "mix: {source: 0.75, passkey: 0.25}}]"]


def _train(rank: int, world_size: int, overrides: list) -> None:
    from nsa_dist.tracking import train_tracked
    from nsa_dist.trainer import train

    config = tiny_config(*overrides)
    if rank == 0:
        train_tracked(config, [], command="test", hardware="cpu")
    else:
        train(config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_eval")
    prefix, _ = stdlib_corpus(root / "code")
    overrides = [*DATA, f"data.path={prefix}", f"run.dir={root}/run", "tracking.enabled=true",
                 "eval.at_stage_end=true", *STAGES]
    run_distributed(_train, 1, overrides)
    return root, overrides


def _reports(run_dir: Path) -> dict:
    return {report["stage"]: report for report in
            (json.loads(path.read_text()) for path in sorted(run_dir.glob("checkpoints/step_*/eval/eval.json")))}


@pytest.mark.timeout(300)
def test_training_on_the_corpus_lowers_the_validation_loss(trained):
    root, _ = trained
    reports = _reports(root / "run")
    assert set(reports) == {"first", "more"}
    first, more = reports["first"]["validation"]["loss"], reports["more"]["validation"]["loss"]
    assert more < first - 0.5, (first, more)
    assert reports["more"]["step"] == 25 and reports["more"]["validation"]["tokens"] == 6 * 192


@pytest.mark.timeout(300)
def test_heatmap_depth_labels_keep_the_digits_a_depth_needs():
    from nsa_dist.evaluation import depth_label

    assert [depth_label(d) for d in (0.0, 0.005, 0.02, 0.1, 0.25, 1.0)] == ["0%", "0.5%", "2%", "10%", "25%", "100%"]


def test_stage_end_eval_writes_grid_and_heatmap_and_logs_to_mlflow(trained):
    from matplotlib.image import imread
    from mlflow import MlflowClient

    root, _ = trained
    report = _reports(root / "run")["more"]
    niah = report["niah"]
    # eval.niah_lengths=[256] with the stage's own 192 (eval.niah_stage_length), ascending
    assert niah["lengths"] == [192, 256] and niah["depths"] == [0, 0.5, 1]
    assert len(niah["accuracy"]) == 3 and all(len(row) == 2 and all(0 <= v <= 1 for v in row)
                                               for row in niah["accuracy"])
    buckets = report["loss_by_position"]
    assert buckets["starts"] == [0, 48, 96, 144] and len(buckets["loss"]) == 4
    assert set(report["seconds"]) == {"model", "niah", "validation"} and all(
        t > 0 for t in report["seconds"].values()), report["seconds"]
    # the NSA model's gates on the validation sequences: a mean of sigmoids per layer, branch and head.
    # After one step from the initial weights (the gate rows small, their logits near 0) every mean is near
    # 0.5; sums over tokens, or the logits, would not be
    gates = _reports(root / "run")["first"]["gates"]
    by_head = torch.tensor(gates["mean_by_layer_and_head"])
    assert gates["branches"] == ["compressed", "selected", "window"] and by_head.shape == (2, 4, 3)
    assert torch.allclose(torch.tensor(gates["mean_by_layer"]), by_head.mean(dim=1), atol=1e-6)
    assert ((by_head - 0.5).abs() < 0.2).all(), by_head
    assert torch.tensor(report["gates"]["mean_by_layer"]).shape == (2, 3)  # and after the last stage
    png = Path(report["checkpoint"]) / "eval" / "niah.png"
    assert imread(png).ndim == 3
    ids = json.loads((root / "run" / "tracking.json").read_text())
    client = MlflowClient(ids["tracking_uri"])
    run = client.get_run(ids["stages"]["more"])
    assert run.data.metrics["eval/val_loss"] == pytest.approx(report["validation"]["loss"])
    # the loss on the task answers' tokens: logged where the stage mixes in tasks, not where it has none
    assert run.data.metrics["answer_loss"] > 0
    assert "answer_loss" not in client.get_run(ids["stages"]["first"]).data.metrics
    assert "eval/niah/len192_depth0.5" in run.data.metrics
    assert run.data.metrics["eval/niah_answer_prefix"] == pytest.approx(niah["mean_answer_prefix"])
    assert run.data.metrics["eval/gate/layer2_window"] == pytest.approx(report["gates"]["mean_by_layer"][1][2])
    assert niah["mean_answer_prefix"] >= niah["mean_accuracy"]  # an exact answer is a whole prefix
    history = client.get_metric_history(run.info.run_id, "eval/loss_by_position")
    assert sorted(m.step for m in history) == [0, 48, 96, 144]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "eval/step_00000025")]
    assert artifacts == ["eval/step_00000025/eval.json", "eval/step_00000025/niah.png"]


@pytest.mark.timeout(300)
def test_nsa_dist_eval_end_to_end(trained, tmp_path):
    from launch.cli import main

    root, overrides = trained
    config = tmp_path / "tiny.yaml"
    config.write_text("stages:\n  - {name: first, seq_len: 192, steps: 1}\n  - {name: more, seq_len: 192, steps: 24}\n")
    sets = [arg for override in [*TINY, *overrides[:-1]] for arg in ("--set", override)]
    out = tmp_path / "eval"
    assert main(["eval", str(config), *sets, "--set", "eval.niah_lengths=[256]", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["stage"] == "more" and report["niah"]["lengths"] == [192, 256]  # and the stage's own
    assert (out / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))


@pytest.mark.timeout(300)
def test_compare_runs_reports_the_tracked_figures(trained, tmp_path):
    """tools/compare_runs.py (the proof's report) reads the run's MLflow store and stage-end evaluations:
    its table holds the tracked losses and evaluation, its plot and heatmaps are real images. A copy of
    the run directory without its weights, moved elsewhere (as the proof's runs come back from the GPU
    machine), gives the same report."""
    from matplotlib.image import imread

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import compare_runs

    root, _ = trained
    runs = compare_runs.main([str(root / "run"), "--names", "tiny", "--out", str(tmp_path / "report")])
    stages = runs["tiny"]["stages"]
    assert list(stages) == ["first", "more"]
    assert [step for step, _ in stages["more"]["loss"]] == list(range(2, 26))
    report = _reports(root / "run")["more"]
    assert stages["more"]["val_loss"] == pytest.approx(report["validation"]["loss"])
    # NIAH at the stage's own length (192, the grid's first column), not over the whole grid
    at_192 = [row[0] for row in report["niah"]["accuracy"]]
    assert stages["more"]["niah_accuracy"] == pytest.approx(sum(at_192) / 3)
    assert stages["more"]["niah_worst_depth"] == min(at_192)
    assert stages["more"]["train_seconds"] > 0 and stages["more"]["tokens_per_s"] > 0
    # the job's wall time: both stages' steps, and start-up, checkpoints and evaluations besides
    assert runs["tiny"]["wall_seconds"] > sum(s["train_seconds"] for s in stages.values())
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| tiny | more | 24 | " in table and f"{report['validation']['loss']:.4f}" in table
    # one row per run: each stage's answer loss over its last 10 steps with answers ("first" mixed in
    # no tasks), NIAH at each stage's length, by depth at the last stage's, NIAH at the last evaluation's
    # other lengths, val loss
    def percent(value):
        return "-" if value is None else f"{100 * value:.0f}%"

    last_answers = [value for _, value in stages["more"]["answer_loss"][-10:]]
    grid = report["niah"]
    others = " / ".join(f"{n:,}: {percent(sum(row[i] for row in grid['accuracy']) / len(grid['accuracy']))}"
                        for i, n in enumerate(grid["lengths"]) if n != report["seq_len"])
    assert others, "the fixture's grid holds lengths besides the stage's own"
    by_depth = " / ".join(f"{depth:g}: {percent(row[0])} ({percent(part[0])})"
                          for depth, row, part in zip(grid["depths"], grid["accuracy"], grid["answer_prefix"]))
    onset = compare_runs.onset_step(stages["more"]["answer_loss"])
    assert (f"| tiny | - / {sum(last_answers) / len(last_answers):.2f} | {'-' if onset is None else onset} | "
            f"{percent(stages['first']['niah_accuracy'])} / "
            f"{percent(stages['more']['niah_accuracy'])} | {by_depth} | {others} | {report['validation']['loss']:.4f} | "
            ) in table
    # the answer loss at each stage's start and end: "first" mixed in no tasks
    answers = [value for _, value in stages["more"]["answer_loss"]]
    first, last = answers[:10], answers[-10:]
    assert len(answers) > 10
    assert (f"| tiny | - | {sum(first) / len(first):.2f} -> {sum(last) / len(last):.2f} |\n"
            in table.split("| run | first: first -> last 10 | more: first -> last 10 |\n| --- | --- | --- |\n")[1])
    # the training loss on the steps without task samples, over each stage's second half of them
    def without_tasks(stage):
        with_tasks = {step for step, _ in stages[stage]["answer_loss"]}
        values = [value for step, value in stages[stage]["loss"] if step not in with_tasks]
        half = values[len(values) // 2:]
        return f"{sum(half) / len(half):.3f} ({len(half)})" if half else "-"

    assert not stages["first"]["answer_loss"] and len(stages["first"]["loss"]) == 1
    assert f"| tiny | {without_tasks('first')} | {without_tasks('more')} |\n" in table
    # each stage-end evaluation's wall seconds by part
    timed = {stage: _reports(root / "run")[stage]["seconds"] for stage in stages}
    assert all(seconds[part] > 0 for seconds in timed.values() for part in ("model", "niah", "validation"))
    assert ("| tiny | " + " | ".join(" / ".join(f"{timed[stage][part]:.1f}" for part in ("model", "niah", "validation"))
                                     for stage in stages) + " |\n") in table
    # each checkpoint save's seconds (the tracker's checkpoint/save_s), the last of a stage its final one's
    for stage in stages:
        final = json.loads((Path(_reports(root / "run")[stage]["checkpoint"]) / MARKER).read_text())
        assert stages[stage]["save_seconds"][-1] == pytest.approx(final["save_seconds"])
    assert ("| tiny | " + " | ".join(" / ".join(f"{seconds:.1f}" for seconds in stages[stage]["save_seconds"])
                                     for stage in stages) + " |\n") in table
    # each stage's gates, one c/s/w cell per layer
    gates = report["gates"]["mean_by_layer"]
    assert f"| tiny | more | {' | '.join('/'.join(f'{g:.2f}' for g in layer) for layer in gates)} |" in table
    assert imread(tmp_path / "report" / "loss.png").ndim == 3
    assert imread(tmp_path / "report" / "answers.png").ndim == 3  # stage "more" mixed in passkey samples
    assert stages["more"]["answer_loss"] and not stages["first"]["answer_loss"]
    assert imread(tmp_path / "report" / "niah_tiny_more.png").ndim == 3
    assert json.loads((tmp_path / "report" / "report.json").read_text())["tiny"]["stages"]["more"]["steps"] == 24

    # --evals: a later evaluation of the same checkpoint (here at another length) joins the stage-end one
    # in a table of NIAH by length: mean over depths (worst-best)
    later = dict(report, niah=dict(report["niah"], lengths=[320], accuracy=[[1.0], [0.5], [0.0]]))
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "eval.json").write_text(json.dumps(later))
    compare_runs.main([str(root / "run"), "--names", "tiny", "--out", str(tmp_path / "with_evals"),
                       "--evals", str(tmp_path / "later")])
    by_length = (tmp_path / "with_evals" / "report.md").read_text().split("| run | after stage |")[1]
    grid = report["niah"]["accuracy"]
    at_192 = [row[0] for row in grid]
    assert f"| tiny | more | {report['step']} | {100 * sum(at_192) / 3:.0f}% " in by_length
    assert by_length.rstrip().endswith("| 50% (0-100%) |")
    stray = dict(report, checkpoint="/elsewhere/other_run/checkpoints/step_00000025")
    (tmp_path / "stray.json").write_text(json.dumps(stray))
    with pytest.raises(SystemExit, match="is under none of the run directories"):
        compare_runs.main([str(root / "run"), "--out", str(tmp_path / "stray"),
                           "--evals", str(tmp_path / "stray.json")])

    # --course: one stage's answer loss per span of steps; a stage no run has is refused with the ones there are
    with pytest.raises(SystemExit, match="--course 8k: no run has a stage called that; give one of first, more"):
        compare_runs.main([str(root / "run"), "--out", str(tmp_path / "typo"), "--course", "8k"])
    course = compare_runs.main([str(root / "run"), "--names", "tiny", "--out", str(tmp_path / "course"),
                                "--course", "more", "--course-width", "12"])
    assert "| run | more: steps 1-12 | 13-24 |" in (tmp_path / "course" / "report.md").read_text()
    assert course["tiny"]["stages"]["more"]["steps"] == 24

    copy = tmp_path / "copied" / "run"
    shutil.copytree(root / "run", copy, ignore=lambda folder, names: [n for n in names if n.startswith("__")
                                                                      or n.endswith((".distcp", ".pt"))])

    # --against: a copy whose last evaluation says 10% more validation loss and 10% less in the first
    # position bucket, set against the run; its training losses are the run's
    edited = tmp_path / "edited" / "run"
    shutil.copytree(copy, edited)
    eval_json = edited / "checkpoints" / Path(report["checkpoint"]).name / "eval" / "eval.json"
    changed = json.loads(eval_json.read_text())
    changed["validation"]["loss"] *= 1.1
    changed["loss_by_position"]["loss"][0] *= 0.9
    eval_json.write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="--against edited:tiny2: give RUN:BASELINE, two of the run names"):
        compare_runs.main([str(root / "run"), str(edited), "--names", "tiny", "edited", "--out", str(tmp_path / "x"),
                           "--against", "edited:tiny2"])
    compare_runs.main([str(root / "run"), str(edited), "--names", "tiny", "edited", "--out", str(tmp_path / "against"),
                       "--against", "edited:tiny"])
    def same_training(stage):  # the loss without tasks, where the stage has steps without tasks
        return "-" if compare_runs.source_half_mean(stages[stage]) is None else "+0.0%"

    assert (f"| edited | tiny | +0.0% / +0.0% / {same_training('first')} | +10.0% / -10.0% / {same_training('more')} |"
            in (tmp_path / "against" / "report.md").read_text())

    moved = compare_runs.main([str(copy), "--names", "tiny", "--out", str(tmp_path / "moved")])
    a, b = json.loads(json.dumps(moved)), json.loads(json.dumps(runs).replace(str(root / "run"), str(copy)))
    assert a == b
    # archived as the proof's earlier runs are: the MLflow store gzipped (one loss marked, to tell that the
    # archive is what was read, not the original store the run recorded)
    with sqlite3.connect(copy / "mlflow.db") as db:
        db.execute("UPDATE metrics SET value = 123.5 WHERE key = 'loss' AND step = 2")
    with open(copy / "mlflow.db", "rb") as source, gzip.open(copy / "mlflow.db.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    (copy / "mlflow.db").unlink()
    archived = compare_runs.main([str(copy), "--names", "tiny", "--out", str(tmp_path / "archived")])
    marked = json.loads(json.dumps(archived))
    assert marked["tiny"]["stages"]["more"]["loss"][0] == [2, 123.5]
    marked["tiny"]["stages"]["more"]["loss"][0] = b["tiny"]["stages"]["more"]["loss"][0]
    assert marked == b
    # renamed: its store and checkpoints are still found under it (the original run directory still exists,
    # so reading that store instead would show the unmarked loss)
    renamed = copy.rename(copy.parent / "renamed_run")
    again = json.loads(json.dumps(compare_runs.main([str(renamed), "--names", "tiny", "--out", str(tmp_path / "renamed")])))
    assert again["tiny"]["trained_as"] == "run" and again["tiny"]["stages"]["more"]["loss"][0] == [2, 123.5]
    again["tiny"]["stages"]["more"]["loss"][0] = b["tiny"]["stages"]["more"]["loss"][0]
    assert again == json.loads(json.dumps(b).replace(str(copy), str(renamed)).replace('"trained_as": null', '"trained_as": "run"'))


def _train_layouts(rank: int, world_size: int, runs: dict, out_path: str) -> None:
    from nsa_dist.data import document_eod, packed_seq_params, stage_sequences
    from nsa_dist.trainer import train

    results = {name: [(log.loss, log.grad_norm, log.answer_loss) for log in train(tiny_config(*overrides)).history]
               for name, overrides in runs.items()}
    # what the test trained on: the documents of its 12 sequences (on every rank: the dataset builder syncs)
    config = tiny_config(*next(iter(runs.values())))
    stage = config.resolved_stages()[0]
    sequences = stage_sequences(config, stage.seq_len, stage.mix)
    results["bounds"] = [packed_seq_params(sequences(i)[None, :-1], document_eod(config)).cu_seqlens_q.tolist()
                         for i in range(12)]
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))


@pytest.mark.timeout(300)
def test_packed_documents_train_the_same_under_context_parallelism(trained, tmp_path):
    """data.documents=mask with CP=2 (each rank a zigzag shard of the packed documents) gives DP=2's
    losses and gradient norms, for NSA and dense attention: cu_seqlens honoured under CP (and the rows
    made by a DataLoader worker are the training thread's)."""
    root, overrides = trained
    data = [o for o in overrides if o.startswith("data.")] + ["model.vocab_size=256"]
    # passkey samples of 144-160 tokens (the shortest there are): several documents in each 384-token
    # sequence, across CP chunks (96 tokens each)
    stage = ["stages=[{name: docs, seq_len: 384, steps: 3, mix: {source: 0.4, passkey: 0.6, task_min_length: 144, "
             "task_max_length: 160}}]"]
    # the CP runs take their rows from a DataLoader worker process (data.workers), the DP runs make them
    runs = {f"{attention} {layout}": [*data, *stage, f"model.attention={attention}", f"parallel.context={cp}",
                                      f"data.workers={cp - 1}", f"run.dir={tmp_path}/{attention}-{layout}"]
            for attention in ("nsa", "dense") for layout, cp in (("DP2", 1), ("CP2", 2))}
    out = tmp_path / "results.json"
    run_distributed(_train_layouts, 2, runs, str(out))
    results = json.loads(out.read_text())
    bounds = results.pop("bounds")
    # documents start inside CP chunks, several to a sequence
    assert sum(len(b) - 2 for b in bounds) >= 6 and any(b % 96 for row in bounds for b in row), bounds
    for attention in ("nsa", "dense"):
        dp, cp = results[f"{attention} DP2"], results[f"{attention} CP2"]
        assert len(dp) == len(cp) == 3
        for step, ((loss, norm, answers), (ref_loss, ref_norm, ref_answers)) in enumerate(zip(cp, dp), start=1):
            assert loss == pytest.approx(ref_loss, rel=1e-6), f"{attention} step {step} loss"
            assert norm == pytest.approx(ref_norm, rel=1e-6), f"{attention} step {step} grad norm"
            # the loss on the passkey answers' tokens alone, over sharded and packed rows alike
            assert answers == pytest.approx(ref_answers, rel=1e-6), f"{attention} step {step} answer loss"
            assert ref_answers > 0 and ref_answers != pytest.approx(ref_loss, rel=1e-3)


def test_onset_step_finds_where_the_answer_loss_falls():
    """compare_runs' onset: the first step whose trailing 20-step mean answer loss is below 0.1 (the
    steps with task answers only, so the history may skip steps), and None where it never gets there."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import compare_runs

    # 2.0 before step 300, then 0.0: one 2.0 in the window makes its mean 0.1, not below, so the first
    # window below is steps 300-319
    history = [(step, 2.0 if step < 300 else 0.0) for step in range(1, 400)]
    assert compare_runs.onset_step(history) == 319
    # recorded at odd steps only: the window counts recorded steps (301, 303, ..., 339), not step numbers
    assert compare_runs.onset_step(history[::2]) == 339
    assert compare_runs.onset_step([(step, 0.2) for step in range(1, 100)]) is None
    assert compare_runs.onset_step([(1, 0.0)] * 5) is None  # fewer points than the window
    assert compare_runs.onset_step(history, threshold=1.5, window=4) == 301  # steps 298-301: (2 x 2.0 + 2 x 0.0) / 4 = 1.0; at 300, 1.5


def test_answer_loss_by_span_follows_a_stage_in_steps_from_its_start():
    """compare_runs --course: per run, the mean answer loss over each `width` steps of the stage, counted
    from its first step (the steps with answers among them); a run without the stage, or a span without
    answers, is "-"."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import compare_runs

    def run(first, answers):
        return {"stages": {"8k": {"loss": [(step, 3.0) for step in range(first, first + 10)], "answer_loss": answers}}}

    runs = {"a": run(101, [(101, 2.0), (102, 1.0), (104, 0.5), (110, 0.25)]),
            "b": run(51, [(51, 1.0), (60, 3.0)]),  # nothing in steps 5-8 of the stage
            "c": {"stages": {"2k": run(1, [(1, 1.0)])["stages"]["8k"]}}}
    table = compare_runs.answer_loss_by_span(runs, "8k", width=4)
    assert table.splitlines() == ["| run | 8k: steps 1-4 | 5-8 | 9-12 |", "| --- | --- | --- | --- |",
                                  "| a | 1.17 | - | 0.25 |", "| b | 1.00 | - | 3.00 |", "| c | - | - | - |"]
    assert "no run has answer losses" in compare_runs.answer_loss_by_span(runs, "32k")


@pytest.mark.timeout(300)
def test_task_distances_splits_a_runs_answer_loss_by_lookup(trained, tmp_path):
    """tools/task_distances.py --store: a tracked run of one sequence a step, its answer loss by each step's
    lookup (a whole-sequence sample's distance, or packed samples). Every step that trained task samples
    is counted once, under the kind its sequence is; a step of source text that logged an answer loss
    (steps and sequences misaligned) is an error, as is a stage of several sequences a step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import compare_runs
    import task_distances

    _, overrides = trained
    data_path = next(o for o in overrides if o.startswith("data.path="))
    stage = ("stages=[{name: one, seq_len: 320, steps: 20, global_batch_size: 1, micro_batch_size: 1, "
             "mix: {source: 0.25, passkey: 0.75, task_min_length: 144, task_full_share: 0.5}}]")
    run_overrides = [*DATA, data_path, f"run.dir={tmp_path}/run", "tracking.enabled=true", stage]
    run_distributed(_train, 1, run_overrides)
    config = tiny_config(*run_overrides)
    one = config.resolved_stages()[0]
    lookups = [task_distances.sequence_lookups(config, one, index) for index in range(20)]
    whole = sum(1 for x in lookups if x and x[0])
    packed = sum(1 for x in lookups if x and not x[0])
    assert whole > 0 and packed > 0
    assert any(lookups[i] is None and lookups[i - 1] for i in range(1, 20))  # source text after a task step
    table = task_distances.store_report(config, tmp_path / "run")["one"]
    counts = {label: len(halves["first half"]) + len(halves["second half"]) for label, halves in table.items()}
    assert counts.pop(task_distances.PACKED) == packed and sum(counts.values()) == whole
    logged = dict(compare_runs.read_run(tmp_path / "run")["stages"]["one"]["answer_loss"])
    assert sorted(v for halves in table.values() for part in halves.values() for v in part) == sorted(logged.values())
    shifted = {step + 1: loss for step, loss in logged.items()}  # as if step numbers were off by one
    with pytest.raises(ValueError, match="trains source text, yet the run logged an answer loss"):
        task_distances.answer_loss_by_distance(config, one, {s: v for s, v in shifted.items() if s <= 20})
    with pytest.raises(ValueError, match="answer loss at step 21, outside its steps 1-20"):
        task_distances.answer_loss_by_distance(config, one, {**logged, 21: 1.0})
    two = tiny_config(*run_overrides[:-1], stage.replace("global_batch_size: 1, micro_batch_size: 1",
                                                         "global_batch_size: 2"))
    with pytest.raises(ValueError, match="trains 2 sequences a step"):
        task_distances.answer_loss_by_distance(two, two.resolved_stages()[0], logged)
