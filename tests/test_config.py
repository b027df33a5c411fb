"""The typed config: presets load, overrides apply, and every invalid value is named in its error."""

import typing
from pathlib import Path

import pytest

from nsa_dist.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    config = load_config(str(ROOT / preset))
    assert isinstance(config, Config)
    assert config.stages and config.stages[0].seq_len > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_fit_the_trainers_layout_checks(preset, tmp_path):
    """A preset must start: every stage's layout and batch fit the default process count (the widest stage's)."""
    from nsa_dist.trainer import plan

    # the layouts, not the data: presets on an indexed corpus are planned on the synthetic stream here
    config = load_config(str(ROOT / preset), ["training.device=cpu", "training.dtype=fp32", f"run.dir={tmp_path}",
                                  "data.source=synthetic"])
    widest = max(stage.model_parallel for stage in config.resolved_stages())
    resume, stages = plan(config, widest)
    assert resume is None and [s.name for s in stages] == [s.name for s in config.stages]


def test_the_proof_runs_dense_twin_differs_only_in_its_attention():
    """The proof compares two runs: everything but the attention (and the run directory) must match."""
    from dataclasses import asdict

    nsa, dense = (asdict(load_config(str(ROOT / "configs" / f"{name}.yaml")))
                  for name in ("proof_100m", "proof_100m_dense"))
    assert (nsa["model"].pop("attention"), dense["model"].pop("attention")) == ("nsa", "dense")
    assert nsa.pop("run")["dir"] != dense.pop("run")["dir"]
    assert nsa == dense


def test_config_knows_which_scores_read_the_raw_keys():
    from kernels.block_selection.naive import RAW_KEY_SCORES, SELECTION_SCORES
    from nsa_dist import config

    assert config.RAW_KEY_SCORES == RAW_KEY_SCORES
    assert typing.get_args(config.NSAConfig.__annotations__["selection_score"]) == SELECTION_SCORES


def test_defaults_are_valid():
    assert load_config(None).nsa.selection_block == 64


def test_overrides_reach_nested_fields_and_stage_entries():
    config = load_config("configs/quickstart.yaml",
                         ["nsa.window=32", "model.rotary_base=5e5", "stages.1.steps=3", "nsa.kv=shared"])
    assert config.nsa.window == 32
    assert config.model.rotary_base == 500000.0
    assert config.stages[1].steps == 3
    assert config.nsa.kv == "shared"


def test_int_is_accepted_where_float_is_expected():
    assert load_config(None, ["training.lr=1"]).training.lr == 1.0


def test_stages_inherit_unset_fields():
    config = load_config(None, ["parallel.context=2", "parallel.tensor=2", "training.global_batch_size=4",
                                "training.warmup_steps=2",
                                "stages=[{name: a, seq_len: 2048, steps: 3}, {name: b, seq_len: 4096, steps: 5, "
                                "context_parallel: 4, tensor_parallel: 1, rotary_base: 5e5, micro_batch_size: 2, "
                                "lr_schedule: restart, lr: 1e-4, warmup_steps: 1}]"])
    a, b = config.resolved_stages()
    assert (a.tensor, a.pipeline, a.context, a.global_batch_size, a.micro_batch_size) == (2, 1, 2, 4, 1)
    assert (a.rotary_base, a.lr, a.first_step) == (10000.0, 3e-4, 0)
    assert (b.tensor, b.context, b.micro_batch_size, b.rotary_base, b.first_step) == (1, 4, 2, 5e5, 3)
    assert (b.lr_schedule, b.lr, b.min_lr, b.warmup_steps, b.optimizer_state) == ("restart", 1e-4, 3e-5, 1, "keep")
    assert (a.num_selected, b.num_selected) == (16, 16)  # nsa.num_selected; a stage may set its own
    own = load_config(None, ["training.warmup_steps=1", "stages=[{name: a, seq_len: 2048, steps: 1}, "
                             "{name: b, seq_len: 2048, steps: 1, num_selected: 4}]"])
    assert [s.num_selected for s in own.resolved_stages()] == [16, 4]
    weights = load_config(None, ["training.warmup_steps=1", "nsa.selection_loss=0.5",
                                 "stages=[{name: a, seq_len: 2048, steps: 1}, "
                                 "{name: b, seq_len: 2048, steps: 1, selection_loss: 0}]"])
    assert [s.selection_loss for s in weights.resolved_stages()] == [0.5, 0.0]  # nsa.selection_loss, its own
    scores = load_config(None, ["training.warmup_steps=1", "stages=[{name: a, seq_len: 2048, steps: 1}, "
                                "{name: b, seq_len: 2048, steps: 1, selection_score: exact}]"])
    assert [s.selection_score for s in scores.resolved_stages()] == ["sum", "exact"]  # nsa.selection_score, its own
    assert b.model_parallel == 4 and config.total_steps == 8


# (overrides, the field the message must name, a phrase of the fix)
INVALID = [
    (["model.num_layers=0"], "model.num_layers", "positive"),
    (["model.hidden_size=-8"], "model.hidden_size", "positive"),
    (["model.num_query_heads=6", "model.num_kv_heads=4"], "model.num_query_heads", "multiple"),
    (["model.num_kv_heads=0"], "model.num_kv_heads", "positive"),
    (["model.head_dim_k=33"], "model.head_dim_k", "even"),
    (["model.head_dim_v=0"], "model.head_dim_v", "positive"),
    (["model.vocab_size=1"], "model.vocab_size", "at least 2"),
    (["model.rotary_base=0"], "model.rotary_base", "positive"),
    (["eval.niah_lengths=[64,32]"], "eval.niah_lengths[1]=32", "at least 64"),
    (["eval.niah_lengths=[1024,256,1024]"], "eval.niah_lengths[2]=1024", "give each length once"),
    (["model.attention=flash"], "model.attention", "'nsa', 'dense'"),
    (["model.hidden_size=abc"], "model.hidden_size", "integer"),
    (["model.hidden_size=1.5"], "model.hidden_size", "integer"),
    (["model.colour=red"], "model.colour", "not a config field"),
    (["model.qk_layernorm=maybe"], "model.qk_layernorm", "true or false"),
    (["parallel.sequence_parallel=1"], "parallel.sequence_parallel", "true or false"),
    (["data.documents=mask", "parallel.context=2", "stages.0.seq_len=4096", "training.micro_batch_size=2",
      "training.global_batch_size=4"], "micro_batch_size=2", "set it to 1"),
    (["data.workers=-1"], "data.workers=-1", "background processes"),
    (["nsa.stride=24"], "nsa.compress_block=32 must be a multiple of nsa.stride=24", "multiple"),
    (["nsa.stride=32", "nsa.compress_block=32", "nsa.selection_block=48"], "nsa.selection_block", "multiple"),
    (["nsa.compress_block=128"], "nsa.compress_block", "must not exceed nsa.selection_block"),
    (["nsa.num_selected=2"], "nsa.num_selected", "at least 3"),
    (["nsa.gate_bias=[1.0, 2.0]"], "nsa.gate_bias=[1.0, 2.0]", "(cmp, slc, win)"),
    (["nsa.selection_loss=-0.5"], "nsa.selection_loss=-0.5", "finite weight >= 0"),
    (["nsa.selection_loss_stride=0"], "nsa.selection_loss_stride=0", "must be positive"),
    (["nsa.window=0"], "nsa.window", "positive"),
    (["nsa.stride=0"], "nsa.stride", "positive"),
    (["nsa.kv=both"], "nsa.kv", "'separate', 'shared'"),
    (["nsa.phi=conv"], "nsa.phi", "'mlp', 'mean'"),
    (["nsa.selection_score=mean"], "nsa.selection_score", "'sum', 'max', 'exact', 'bound'"),
    (["nsa.selection_score=exact", "nsa.selection_loss=1"], "nsa.selection_loss", "score to 'sum'"),
    (["nsa.selection_score=exact", "nsa.stride=4", "nsa.compress_block=8", "nsa.selection_block=8"],
     "nsa.selection_block=8", "power of two >= 16"),
    (["nsa.compression_rope=tokens"], "nsa.compression_rope", "'keys', 'blocks'"),
    (["nsa.impl=cuda"], "nsa.impl", "one of"),
    (["nsa.selection_block=512", "nsa.impl=triton"], "nsa.selection_block=512", "nsa.impl=reference"),
    (["model.num_query_heads=64", "model.num_kv_heads=1"], "model.num_query_heads=64", "exceeds the Triton"),
    (["model.head_dim_v=320"], "model.head_dim_v=320", "nsa.impl=reference"),
    (["parallel.tensor=0"], "parallel.tensor", "positive"),
    (["parallel.tensor=4"], "parallel.tensor", "num_kv_heads"),
    (["parallel.pipeline=3"], "parallel.pipeline", "num_layers"),
    (["training.lr=0"], "training.lr", "positive"),
    (["training.min_lr=1.0"], "training.min_lr", "between"),
    (["training.warmup_steps=-1"], "training.warmup_steps", ">= 0"),
    (["training.grad_clip=-1"], "training.grad_clip", ">= 0"),
    (["training.dtype=fp8"], "training.dtype", "'fp32', 'bf16'"),
    (["training.micro_batch_size=0"], "training.micro_batch_size", "positive"),
    (["training.global_batch_size=0"], "training.global_batch_size", "positive"),
    (["training.global_batch_size=3", "training.micro_batch_size=2"], "training.global_batch_size=3", "multiple"),
    (["training.loss_chunk=0"], "training.loss_chunk", "positive"),
    (["training.warmup_steps=20"], "training.warmup_steps=20", "less than the 20 steps"),
    (["training.lr_decay_steps=10"], "training.lr_decay_steps=10", "more than training.warmup_steps=10"),
    (["training.recompute=3"], "training.recompute", "true or false"),
    (["model.init_std=0"], "model.init_std", "positive"),
    (["model.vocab_size=255", "parallel.tensor=2"], "model.vocab_size=255", "multiple of parallel.tensor"),
    (["data.period=0"], "data.period", "positive"),
    (["data.successors=0"], "data.successors", "positive"),
    (["data.successors=300"], "data.successors=300", "must not exceed model.vocab_size"),
    (["tracking.enabled=maybe"], "tracking.enabled", "true or false"),
    (["stages=[]"], "stages", "at least one stage"),
    (["stages=4"], "stages", "list"),
    (["stages.0.steps=0"], "stages[0].steps", "positive"),
    (["stages.0.seq_len=0"], "stages[0].seq_len", "positive"),
    (["stages.0.rotary_base=-1"], "stages[0].rotary_base", "positive"),
    (["stages.0.num_selected=2"], "stages[0].num_selected", "at least 3"),
    (["stages.0.selection_loss=-1"], "stages[0].selection_loss=-1", "finite weight >= 0"),
    (["nsa.selection_score=exact", "stages.0.selection_loss=1"], "stages[0].selection_loss", "score to 'sum'"),
    (["stages.0.selection_score=exact", "nsa.selection_loss=1"], "nsa.selection_loss=1.0 with stages[0].selection_score",
     "set nsa.selection_loss to 0 or stages[0].selection_score to 'sum'"),
    (["stages.0.selection_score=mean"], "stages[0].selection_score", "'sum', 'max', 'exact', 'bound'"),
    (["nsa.indexer_heads=3"], "nsa.indexer_heads=3", "divide the 2 query heads a KV head serves"),
    (["nsa.indexer_heads=-1"], "nsa.indexer_heads=-1", "0 (no indexer)"),
    (["nsa.indexer_loss=-1"], "nsa.indexer_loss=-1", "finite weight >= 0"),
    (["nsa.indexer_loss_stride=0"], "nsa.indexer_loss_stride=0", "must be positive"),
    (["nsa.selection_score=indexer"], "nsa.selection_score='indexer'", "set nsa.indexer_heads"),
    (["stages.0.selection_score=indexer"], "stages[0].selection_score='indexer'", "set nsa.indexer_heads"),
    (["nsa.indexer_heads=2", "nsa.selection_score=indexer", "nsa.selection_loss=1"],
     "nsa.selection_loss=1.0 with nsa.selection_score='indexer'", "set nsa.selection_loss to 0"),
    (["nsa.selection_score=bound", "nsa.selection_loss=1"], "nsa.selection_loss=1.0 with nsa.selection_score='bound'",
     "set nsa.selection_loss to 0 or nsa.selection_score to 'sum'"),
    (["nsa.selection_score=bound", "model.head_dim_k=256", "model.head_dim_v=64", "nsa.impl=triton"],
     "model.head_dim_k=256", "(nsa.selection_score) scores keys twice as wide"),
    (["stages.0.selection_score=bound", "model.head_dim_k=192", "nsa.impl=triton"], "model.head_dim_k=192",
     "(stages[0].selection_score) scores keys twice as wide"),
    (["stages.0.selection_score=exact", "nsa.stride=4", "nsa.compress_block=8", "nsa.selection_block=8"],
     "nsa.selection_block=8", "(stages[0].selection_score) has a kernel that takes a power of two >= 16"),
    (["stages.0.context_parallel=2", "stages.0.seq_len=1000"], "stages[0].seq_len=1000", "multiple of 2 * context_parallel"),
    (["stages.0.context_parallel=4", "stages.0.seq_len=512", "nsa.window=512"], "nsa.window=512", "context-parallel chunk"),
    (["stages.0.context_parallel=0"], "stages[0].context_parallel", "positive"),
    (["stages.0.tensor_parallel=4"], "stages[0].tensor_parallel=4", "num_kv_heads"),
    (["stages.0.pipeline_parallel=3"], "stages[0].pipeline_parallel=3", "num_layers"),
    (["stages.0.global_batch_size=3", "stages.0.micro_batch_size=2"], "stages[0].global_batch_size=3", "multiple"),
    (["stages.0.micro_batch_size=0"], "stages[0].micro_batch_size", "positive"),
    (["stages.0.name="], "stages[0].name", "empty"),
    (["stages.0.lr=1e-4"], "stages[0].lr=0.0001", "lr_schedule=restart"),
    (["stages.0.warmup_steps=2"], "stages[0].warmup_steps=2", "lr_schedule=restart"),
    (["stages.0.lr_schedule=restart", "stages.0.warmup_steps=20"], "stages[0].warmup_steps=20", "less than"),
    (["stages.0.lr_schedule=restart", "stages.0.lr=1e-4", "stages.0.min_lr=1e-3"], "stages[0].min_lr", "between"),
    (["stages.0.lr_schedule=cosine"], "stages[0].lr_schedule", "'continue', 'restart'"),
    (["stages.0.optimizer_state=drop"], "stages[0].optimizer_state", "'keep', 'reset'"),
    (["checkpoint.interval=-1"], "checkpoint.interval", ">= 0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", "at least 1"),
    (["checkpoint.async_save=sometimes"], "checkpoint.async_save", "true or false"),
    (["run.dir= "], "run.dir", "empty"),
    (["training.lr=inf"], "training.lr=inf", "must be a finite number"),
    (["training.lr=nan"], "training.lr=nan", "must be a finite number"),
    (["training.lr=1e400"], "training.lr=inf", "must be a finite number"),
    (["training.min_lr=-.inf"], "training.min_lr=-inf", "must be a finite number"),
    (["training.weight_decay=.nan"], "training.weight_decay=nan", "must be a finite number"),
    (["training.grad_clip=inf"], "training.grad_clip=inf", "must be a finite number"),
    (["model.rotary_base=inf"], "model.rotary_base=inf", "must be a finite number"),
    (["model.init_std=nan"], "model.init_std=nan", "must be a finite number"),
    (["stages.0.lr=inf"], "stages[0].lr=inf", "must be a finite number"),
    (["stages.0.min_lr=nan"], "stages[0].min_lr=nan", "must be a finite number"),
    (["stages.0.rotary_base=inf"], "stages[0].rotary_base=inf", "must be a finite number"),
    (["stages.0.seq_len=512"], "nsa.num_selected=16 is more than the 8 selection blocks of stage 'stage0'",
     "lower nsa.num_selected to at most 8, or raise stages[0].seq_len to at least 1024"),
    (["stages.0.seq_len=900"], "stages[0].seq_len=900 / nsa.selection_block=64, rounded up",
     "at most 15"),
    (["stages=[{name: a, seq_len: 512, steps: 1, num_selected: 9}]", "nsa.num_selected=4"],
     "stages[0].num_selected=9 is more than the 8 selection blocks of stage 'a'",
     "lower stages[0].num_selected to at most 8, or raise stages[0].seq_len to at least 576"),
    (["stages=[{name: a, seq_len: 1024, steps: 1}, {name: b, seq_len: 2048, steps: 1}]", "nsa.num_selected=20"],
     "nsa.num_selected=20 is more than the 16 selection blocks of stage 'a'", "stages[0].seq_len to at least 1280"),
]


@pytest.mark.parametrize("overrides,field,fix", INVALID, ids=[" ".join(o) for o, _, _ in INVALID])
def test_invalid_config_names_the_field(overrides, field, fix):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides)
    message = str(excinfo.value)
    assert field in message, message
    assert fix in message, message


def test_dense_attention_has_no_blocks_to_select():
    """The sequence that is too short for NSA's n selected blocks is fine for the dense model."""
    config = load_config(None, ["model.attention=dense", "stages.0.seq_len=512"])
    assert config.resolved_stages()[0].seq_len == 512


def test_invalid_stage_order_and_duplicate_names(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - {name: a, seq_len: 512, steps: 1}\n  - {name: b, seq_len: 256, steps: 1}\n")
    with pytest.raises(ConfigError, match=r"stages\[1\].seq_len=256 is shorter"):
        load_config(path)
    path.write_text("stages:\n  - {name: a, seq_len: 256, steps: 1}\n  - {name: a, seq_len: 512, steps: 1}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\].name='a' is used by two stages"):
        load_config(path)


@pytest.mark.parametrize("override,phrase", [
    ("nsa.window", "key=value"),
    ("=3", "empty key"),
    ("stages.7.steps=1", "existing list entry"),
    ("nsa.window.x=1", "nsa.window"),
])
def test_malformed_overrides(override, phrase):
    with pytest.raises(ConfigError, match=phrase):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_a_binary_file_is_named_not_decoded(tmp_path):
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\x80\x02PK\x03\x04\xff\xfe")
    with pytest.raises(ConfigError) as excinfo:
        load_config(binary)
    assert f"config file '{binary}' is not a text file (byte 0 is not UTF-8)" in str(excinfo.value)
    assert "pass a YAML file" in str(excinfo.value)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_an_empty_file_is_an_error_not_the_defaults(tmp_path, content):
    empty = tmp_path / "empty.yaml"
    empty.write_text(content)
    with pytest.raises(ConfigError) as excinfo:
        load_config(empty)
    assert f"config file '{empty}' is empty" in str(excinfo.value)
    assert "configs/quickstart.yaml" in str(excinfo.value)


def test_sequence_parallel_shows_in_the_layout_of_stages_that_use_it():
    """parallel.sequence_parallel applies where a stage has TP > 1; the layout says which stages run it."""
    config = load_config(None, ["parallel.sequence_parallel=true", "nsa.num_selected=4", "training.warmup_steps=1",
                                "stages=[{name: a, seq_len: 256, steps: 1}, "
                                "{name: b, seq_len: 256, steps: 1, tensor_parallel: 2}]"])
    a, b = config.resolved_stages()
    assert (a.sequence_parallel, a.layout()) == (False, "TP=1 PP=1 CP=1")
    assert (b.sequence_parallel, b.layout()) == (True, "TP=2 SP PP=1 CP=1")


def _probe_runs():
    """(spec, run name, config, overrides) of every line of benchmarks/proof/probes/*.spec, split as a shell
    splits them (benchmarks/proof/run_many.sh reads them with bash)."""
    import shlex

    runs = []
    for spec in sorted((ROOT / "benchmarks" / "proof" / "probes").glob("*.spec")):
        for line in spec.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, config, *overrides = shlex.split(line)
                runs.append(pytest.param(spec.name, name, config, overrides, id=f"{spec.stem}-{name}"))
    return runs


@pytest.mark.parametrize("spec, name, config, overrides", _probe_runs())
def test_probe_specs_load(spec, name, config, overrides):
    """Each probe run's config and overrides load and validate here, before a device call is spent on it."""
    loaded = load_config(str(ROOT / config), overrides)
    assert loaded.stages, f"{spec}: run {name} has no stages"


def test_probe_spec_names_are_unique():
    names = [(param.values[0], param.values[1]) for param in _probe_runs()]
    assert names and len(names) == len(set(names))
