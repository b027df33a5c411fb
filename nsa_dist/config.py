"""One typed config tree, loaded from YAML, overridden with `--set a.b=c`, validated once at start.

Every error is a ConfigError whose message names the field, the value and the fix.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message says which field, what value, and what to do."""


@dataclass
class ModelConfig:
    num_layers: int = 2  # transformer layers
    hidden_size: int = 128  # model width
    ffn_hidden_size: int = 512  # MLP width
    num_query_heads: int = 4  # HQ
    num_kv_heads: int = 2  # HK; HQ / HK query heads share one KV head (a GQA group)
    head_dim_k: int = 32  # Dk, query/key head dim (even: RoPE rotates pairs)
    head_dim_v: int = 32  # Dv, value head dim (may differ from Dk)
    vocab_size: int = 256  # tokenizer vocabulary
    rotary_base: float = 10000.0  # RoPE base (stages may raise it as context grows)
    attention: Literal["nsa", "dense"] = "nsa"  # dense: full causal attention, for baselines
    qk_layernorm: bool = False  # RMSNorm on every query and key head (Megatron's qk-layernorm)
    init_std: float = 0.02  # std of the normal weight init (output projections scaled by 1/sqrt(2 * layers))


@dataclass
class NSAConfig:
    compress_block: int = 32  # l: tokens per compressed block (paper 32)
    stride: int = 16  # d: stride between compressed blocks; must divide l and l' (paper 16)
    selection_block: int = 64  # l': tokens per selection block (paper 64)
    num_selected: int = 16  # n: selection blocks per query, forced blocks included (paper 16)
    # how top-n scores a block for a GQA group: "sum" of its query heads' compressed-attention probabilities
    # (paper); "max", the largest single head's, so that a block one head finds is not outvoted by the
    # other heads' spread-out probability; "exact", the group's summed attention probability on the
    # block's raw keys (not in the paper: what the compressed probabilities estimate, computed by two causal
    # QK^T passes over the selection branch's keys, about a dense attention forward's FLOPs); or "bound",
    # the group's summed softmax over blocks of each block's largest possible q.k, from its keys' channel-wise
    # minimum and maximum (not in the paper; after Quest: one key that matches is not averaged away, at the
    # cost of a compressed pass over one 2Dk-wide key per block). Under context parallelism "exact" and
    # "bound" read the raw keys, so the selection gather finishes before top-n runs. "indexer": the "exact"
    # score over the learned indexer's nsa.indexer_heads queries a group instead of the G heads' (below)
    selection_score: Literal["sum", "max", "exact", "bound", "indexer"] = "sum"
    window: int = 512  # w: sliding-window length (paper 512)
    kv: Literal["separate", "shared"] = "separate"  # separate K/V per branch (paper) or one shared
    phi: Literal["mlp", "mean"] = "mlp"  # compression: MLP + intra-block position embedding, or mean
    # where the compressed keys get RoPE. "keys": phi compresses keys RoPE'd at their own positions (the
    # design's default), so an MLP phi's compressed key depends on the block's absolute position. "blocks":
    # phi compresses the keys before RoPE and each compressed key is rotated at its block's first position,
    # so compressed attention, like the other branches, depends on distances only.
    compression_rope: Literal["keys", "blocks"] = "keys"
    impl: Literal["auto", "triton", "reference"] = "auto"  # auto: Triton kernels on CUDA, reference on CPU
    # initial gate logits (cmp, slc, win). All zero (default): the gates come from the fused projection alone,
    # randomly initialized, about 0.5 each. Otherwise every token's gates start at sigmoid(gate_bias): the
    # projection's gate rows start at zero and a learned per-branch bias is added. [-2, -2, 2] starts NSA as
    # sliding-window attention (gates 0.12, 0.12, 0.88), which learns local patterns first.
    gate_bias: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    # weight of the selection alignment loss (kernels/block_selection/alignment.py; not in the NSA paper,
    # after DeepSeek-V3.2's indexer loss): per query and KV head, KL from the selected branch's attention
    # over the free blocks top-n picked (not block 0 or the local ones) to top-n's scores of them, so that
    # compressed attention learns which blocks the selected branch used. Added to each layer as weight x (mean KL) per token, beside the per-token
    # language-model loss; MLflow logs the mean as selection_loss. 0: off (the paper)
    selection_loss: float = 0.0
    # the selection alignment loss over every k-th query row of a micro-batch (on each rank) only: it gathers
    # every picked block's keys for each row it scores, so 1 (every row) costs most
    selection_loss_stride: int = 1
    # the learned indexer (kernels/block_selection/indexer.py; not in the NSA paper, after DeepSeek-V3.2's):
    # H query heads a GQA group, each a learned per-RoPE-frequency combination of the group's queries, that
    # rank blocks as the "exact" score does at about H / G of its cost (selection_score "indexer"). H must
    # divide the group; 0: no indexer (no weights). Its weights are trained in every stage, whatever the
    # score, by its own loss on detached inputs: KL from the group's exact attention mass over the blocks
    # top-n ranks to the indexer's, on every indexer_loss_stride-th query row, added as indexer_loss x (mean
    # KL) per token (MLflow: indexer_loss; indexer_recall, the share of the exact score's free picks it makes
    # too). It moves no other weight: its gradient is left out of the norm gradient clipping divides by.
    indexer_heads: int = 0
    indexer_loss: float = 1.0
    indexer_loss_stride: int = 64


@dataclass
class ParallelConfig:
    tensor: int = 1  # TP size: splits query heads and KV groups
    pipeline: int = 1  # PP size: splits layers
    context: int = 1  # CP size: splits the sequence (stages may override)
    # shard activations outside attention over TP; stages with TP = 1 have nothing to shard them over and
    # run without it (their layout, as logged, then lacks "SP")
    sequence_parallel: bool = False


@dataclass
class TrainingConfig:
    seed: int = 1234
    micro_batch_size: int = 1  # sequences per micro-batch
    global_batch_size: int = 1  # sequences per optimizer step over all data-parallel ranks (micro-batches fill it)
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # cosine decays to this
    warmup_steps: int = 10  # linear warmup, then cosine
    # the run-wide cosine reaches min_lr at this global step and stays there (Megatron's --lr-decay-iters);
    # None: at the last step of all stages. Set it to change later stages' steps without moving the
    # learning rate of the steps before them
    lr_decay_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    recompute: bool = False  # full activation recomputation per layer: keeps only layer inputs for backward
    loss_chunk: int = 4096  # sequence positions per output-layer + cross-entropy chunk (bounds logits memory)
    dtype: Literal["fp32", "bf16"] = "fp32"  # parameter/activation dtype (bf16 on GPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    log_interval: int = 1  # steps between log lines
    # Bitwise-repeatable steps on one kind of GPU, for A/B experiments and debugging, at some speed: PyTorch's
    # deterministic algorithms (an op without one raises, naming itself), cuBLAS's fixed workspace, Megatron's
    # deterministic_mode (its embedding backward), the compressed and window branches' backward by the split
    # path (no atomics) and their tiles fixed instead of autotuned by timing (kernels/range_attention.py)
    deterministic: bool = False
    # On a GPU, each stage's first step first compiles the Triton kernels it will launch, in parallel: a dry
    # pass of one micro-batch records them, a thread pool builds them (kernels/compile_ahead.py). Off, the
    # step compiles each kernel when it first launches it, one after another
    compile_ahead: bool = True


TASKS = ("passkey", "multikey_niah", "variable_tracking")  # the synthetic long-context tasks (nsa_dist/tasks.py)


@dataclass(frozen=True)  # held by the frozen Stage, which stays hashable
class MixConfig:
    """Shares of a stage's training sequences by kind, summing to 1: data.source's sequences and the
    synthetic long-context tasks of nsa_dist/tasks.py (each drawn from (data.seed, the sequence's index))."""

    source: float = 1.0  # sequences from data.source (the synthetic stream or the indexed dataset)
    passkey: float = 0.0  # passkey retrieval: one number hidden in filler text
    multikey_niah: float = 0.0  # several key-value needles, the value of one asked for
    variable_tracking: float = 0.0  # a chain of variable assignments, the names holding one value asked for
    # Tokens per task sample. 0: one sample fills each task sequence. L > 0: each task sequence holds
    # several samples, each ended by the EOD token, of lengths drawn log-uniformly from L up to what is
    # left of the sequence: many more questions per token, at every distance up to the sequence's length
    # (with data.documents=mask the attention sees each sample alone). A stage shorter than 2L holds one.
    task_min_length: int = 0
    # With task_min_length: the longest sample, in tokens. 0: up to what is left of the sequence. A cap
    # gives many short samples per sequence, where retrieval is learned first (README, Proof).
    task_max_length: int = 0
    # With task_min_length: the share of task sequences that hold one sample as long as the sequence
    # instead, so that some lookups reach as far back as the stage's length. Packed samples' lengths are
    # drawn log-uniformly, so few reach far: in the proof's 32K stage (task_min_length 1024) 11 of 1,207
    # lookups are 19.5K or more tokens back (NIAH depth 0.4 at 32K), 3 are 26K (tools/task_distances.py).
    task_full_share: float = 0.0

    def shares(self) -> dict[str, float]:
        return {"source": self.source} | {task: getattr(self, task) for task in TASKS}


@dataclass
class DataConfig:
    """Where training sequences come from. synthetic: each sequence repeats one random segment drawn from a
    fixed sparse Markov chain, so a model can lower its loss by learning the chain (bigrams) and by copying
    (induction). indexed: a Megatron-core indexed dataset (tools/preprocess_data.py, tools/build_code_corpus.py)
    read through its GPTDataset."""

    source: Literal["synthetic", "indexed"] = "synthetic"
    period: int = 64  # synthetic: tokens in the segment that each sequence repeats
    successors: int = 4  # synthetic: possible next tokens of every token in the Markov chain
    seed: int = 0  # picks the chain, the segments, the tasks' sequences and the dataset's shuffle
    path: str = ""  # indexed: the prefix of <path>.bin and <path>.idx, e.g. data/code/code
    tokenizer: str = ""  # a local HF tokenizer.json; empty: byte-level (vocabulary 256, EOD byte 0)
    eod_token: str = ""  # the tokenizer.json's end-of-document token; empty: <|endoftext|>, </s>, ... if present
    split: str = "98,2,0"  # indexed: train, validation, test shares of the documents (Megatron's split)
    # indexed: pack: documents packed end to end with EOD, attention across them (GPT pretraining);
    # mask: packed, and the attention sees each document alone (cu_seqlens, Megatron's PackedSeqParams);
    # within: every sequence lies inside one document (documents shorter than a stage's seq_len + 1 unused)
    documents: Literal["pack", "mask", "within"] = "pack"
    # processes that generate training sequences ahead of the training thread (torch's DataLoader workers);
    # 0: on the training thread. On a GPU a short step is host-bound, and task samples cost host time.
    workers: int = 0
    mix: MixConfig = field(default_factory=MixConfig)  # stages' shares of sequences by kind (stages may override)


@dataclass
class StageConfig:
    """One step of the context-extension curriculum. Fields left empty (null) take the value of the
    matching field in parallel: or training: (or model.rotary_base)."""

    name: str = "stage0"
    seq_len: int = 1024  # tokens per sequence in this stage
    steps: int = 20  # optimizer steps in this stage
    tensor_parallel: int | None = None  # TP size for this stage; None: parallel.tensor
    pipeline_parallel: int | None = None  # PP size for this stage; None: parallel.pipeline
    context_parallel: int | None = None  # CP size for this stage; None: parallel.context
    rotary_base: float | None = None  # RoPE base for this stage; None: model.rotary_base
    # NSA's n, the blocks each query attends in the selected branch (forced ones included), for this
    # stage: n has no weights, so stages may differ; None: nsa.num_selected. Dense attention ignores it.
    num_selected: int | None = None
    # the selection alignment loss's weight (nsa.selection_loss) in this stage: a weight, not a shape, so
    # stages may differ (e.g. off while sequences fit the window, on once lookups reach past it); None:
    # nsa.selection_loss
    selection_loss: float | None = None
    # how top-n scores blocks (nsa.selection_score) in this stage: a rule, not a weight, so stages may differ
    # (e.g. the paper's "sum" while short lookups are learned, "exact" once they reach past the window);
    # None: nsa.selection_score
    selection_score: Literal["sum", "max", "exact", "bound", "indexer"] | None = None
    global_batch_size: int | None = None  # sequences per step; None: training.global_batch_size
    micro_batch_size: int | None = None  # sequences per micro-batch; None: training.micro_batch_size
    # continue: the run-wide schedule (training.warmup_steps, then cosine from training.lr to
    # training.min_lr over the steps of all stages) at this stage's global steps; restart: a fresh
    # warmup, peak and decay over this stage's own steps
    lr_schedule: Literal["continue", "restart"] = "continue"
    lr: float | None = None  # restart only: peak learning rate; None: training.lr
    min_lr: float | None = None  # restart only: the cosine decays to this; None: training.min_lr
    warmup_steps: int | None = None  # restart only: linear warmup steps; None: training.warmup_steps
    # keep: Adam's moments carry over from the previous stage (resharded); reset: start them at zero
    optimizer_state: Literal["keep", "reset"] = "keep"
    mix: MixConfig | None = None  # shares of sequences by kind in this stage; None: data.mix


@dataclass(frozen=True)
class Stage:
    """A stage with every default filled in: what the trainer runs."""

    index: int
    name: str
    seq_len: int
    steps: int
    first_step: int  # optimizer steps taken by the stages before this one
    tensor: int
    pipeline: int
    context: int
    sequence_parallel: bool  # parallel.sequence_parallel, where this stage has TP > 1
    rotary_base: float
    num_selected: int
    selection_loss: float
    selection_score: str
    global_batch_size: int
    micro_batch_size: int
    lr_schedule: str
    lr: float
    min_lr: float
    warmup_steps: int
    optimizer_state: str
    mix: MixConfig

    @property
    def model_parallel(self) -> int:
        """Processes that hold one copy of the model: TP x PP x CP."""
        return self.tensor * self.pipeline * self.context

    def layout(self) -> str:
        return f"TP={self.tensor}{' SP' if self.sequence_parallel else ''} PP={self.pipeline} CP={self.context}"


@dataclass
class CheckpointConfig:
    interval: int = 0  # optimizer steps between checkpoints; 0: only at the end of each stage
    keep_last: int = 2  # newest checkpoints kept; each stage's final checkpoint is always kept
    async_save: bool = False  # write shards in background processes while training goes on
    init_from: str = ""  # a checkpoint directory whose weights start a new run; empty: random init


@dataclass
class RunConfig:
    dir: str = "runs/default"  # checkpoints live under <dir>/checkpoints; a rerun resumes from there


@dataclass
class TrackingConfig:
    enabled: bool = True  # rank 0 records the run in MLflow (nsa_dist/tracking.py)
    # the MLflow store, e.g. a server's http://host:5000; empty: $MLFLOW_TRACKING_URI, else <run.dir>/mlflow.db
    tracking_uri: str = ""
    experiment: str = "nsa-dist"  # MLflow experiment the runs go to


@dataclass
class EvalConfig:
    """Evaluation (nsa_dist/evaluation.py): `nsa-dist eval`, and after each stage when at_stage_end."""

    at_stage_end: bool = False  # evaluate each stage's final checkpoint when the stage ends
    niah_task: Literal["passkey", "multikey_niah"] = "passkey"  # the needle of the NIAH grid
    niah_lengths: list[int] = field(default_factory=list)  # the grid's lengths, ascending; empty: the stage's seq_len
    niah_stage_length: bool = False  # with niah_lengths: the stage's seq_len too (e.g. [256, 1024] and each stage's)
    niah_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depths, 0..1
    niah_samples: int = 4  # prompts per grid cell (context length x depth)
    validation_sequences: int = 8  # held-out sequences of the stage's seq_len for the validation loss
    position_buckets: int = 8  # equal-width position buckets of the loss-by-position curve


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    nsa: NSAConfig = field(default_factory=NSAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def resolved_stages(self) -> list[Stage]:
        """The stages with their defaults filled in from parallel:, training: and model:."""
        par, tr = self.parallel, self.training
        stages, first_step = [], 0

        def pick(value, default):
            return default if value is None else value

        for index, s in enumerate(self.stages):
            stages.append(Stage(
                index=index, name=s.name, seq_len=s.seq_len, steps=s.steps, first_step=first_step,
                tensor=pick(s.tensor_parallel, par.tensor), pipeline=pick(s.pipeline_parallel, par.pipeline),
                context=pick(s.context_parallel, par.context),
                sequence_parallel=par.sequence_parallel and pick(s.tensor_parallel, par.tensor) > 1,
                rotary_base=pick(s.rotary_base, self.model.rotary_base),
                num_selected=pick(s.num_selected, self.nsa.num_selected),
                selection_loss=pick(s.selection_loss, self.nsa.selection_loss),
                selection_score=pick(s.selection_score, self.nsa.selection_score),
                global_batch_size=pick(s.global_batch_size, tr.global_batch_size),
                micro_batch_size=pick(s.micro_batch_size, tr.micro_batch_size),
                lr_schedule=s.lr_schedule, lr=pick(s.lr, tr.lr), min_lr=pick(s.min_lr, tr.min_lr),
                warmup_steps=pick(s.warmup_steps, tr.warmup_steps), optimizer_state=s.optimizer_state,
                mix=pick(s.mix, self.data.mix)))
            first_step += s.steps
        return stages

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- loading


def _describe(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, where: str):
    """Checks `value` against the annotation `tp` and builds nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [a for a in options if a is not type(None)]
        return _convert(value, inner, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}={value!r} is not allowed: use {_describe(tp)}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r} must be a list (YAML '- item' entries)")
        return [_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping of {tp.__name__} fields")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value} must be a finite number: set it to a finite value (inf and nan "
                              "are not allowed)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config annotation {tp} at {where}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where} is not a config field: use one of {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            where = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _convert(data[name], hints[name], where)
    return cls(**kwargs)


def apply_override(data: dict, override: str) -> None:
    """Applies one `a.b=c` (or `stages.0.seq_len=4096`) to the raw YAML mapping; c is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r} must look like key=value, e.g. --set nsa.window=256")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {override!r} has an empty key: use dotted names like model.hidden_size")
    node = data
    for i, key in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {path}: {where} must index an existing list entry (0..{len(node) - 1})")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {path}: {where} is a value, not a section")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(node, list):
        if not keys[-1].isdigit() or int(keys[-1]) >= len(node):
            raise ConfigError(f"--set {path}: the last key must index an existing list entry")
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Reads a YAML preset (or the defaults when path is None), applies overrides, validates."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist: pass a YAML file, e.g. configs/quickstart.yaml")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not a text file (byte {exc.start} is not UTF-8): "
                              "pass a YAML file, e.g. configs/quickstart.yaml") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if data is None:
            raise ConfigError(f"config file {str(path)!r} is empty: write the sections to change (model:, nsa:, "
                              "stages:, ...) into it, or start from a preset such as configs/quickstart.yaml")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (model:, nsa:, ...)")
    if "stages" not in data and any(o.split("=", 1)[0].startswith("stages.") for o in overrides):
        data["stages"] = [dataclasses.asdict(StageConfig())]
    for override in overrides:
        apply_override(data, override)
    config = _build(Config, data)
    validate(config)
    return config


# ------------------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(section, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value > 0, f"{prefix}.{name}={value} must be positive")


def validate(config: Config) -> None:
    """All cross-field rules, checked once at start."""
    m, nsa, par, tr, data = config.model, config.nsa, config.parallel, config.training, config.data
    _positive(m, "model", "num_layers", "hidden_size", "ffn_hidden_size", "num_query_heads", "num_kv_heads",
              "head_dim_k", "head_dim_v", "rotary_base", "init_std")
    _require(m.vocab_size >= 2, f"model.vocab_size={m.vocab_size} must be at least 2")
    _require(m.num_query_heads % m.num_kv_heads == 0,
             f"model.num_query_heads={m.num_query_heads} must be a multiple of model.num_kv_heads="
             f"{m.num_kv_heads} (each KV head serves a whole GQA group)")
    _require(m.head_dim_k % 2 == 0, f"model.head_dim_k={m.head_dim_k} must be even: RoPE rotates pairs of dims")

    _positive(nsa, "nsa", "compress_block", "stride", "selection_block", "num_selected", "window")
    _require(nsa.compress_block % nsa.stride == 0,
             f"nsa.compress_block={nsa.compress_block} must be a multiple of nsa.stride={nsa.stride}")
    _require(nsa.selection_block % nsa.stride == 0,
             f"nsa.selection_block={nsa.selection_block} must be a multiple of nsa.stride={nsa.stride}")
    _require(nsa.compress_block <= nsa.selection_block,
             f"nsa.compress_block={nsa.compress_block} must not exceed nsa.selection_block={nsa.selection_block}")
    _require(len(nsa.gate_bias) == 3,
             f"nsa.gate_bias={nsa.gate_bias} must hold 3 initial gate logits, one per branch in the order "
             "(cmp, slc, win), e.g. [-2.0, -2.0, 2.0]")
    _require(nsa.num_selected >= 3,
             f"nsa.num_selected={nsa.num_selected} must be at least 3: block 0 and the two local blocks are "
             "always selected and count toward it")
    _positive(nsa, "nsa", "selection_loss_stride")
    _require(math.isfinite(nsa.selection_loss) and nsa.selection_loss >= 0,
             f"nsa.selection_loss={nsa.selection_loss} must be a finite weight >= 0 (0 turns the loss off)")
    _require(nsa.selection_loss == 0 or nsa.selection_score not in RAW_KEY_SCORES,
             _RAW_KEYS_WITHOUT_LOSS.format(loss="nsa.selection_loss", value=nsa.selection_loss,
                                           score="nsa.selection_score", name=nsa.selection_score))
    group = m.num_query_heads // m.num_kv_heads
    _require(nsa.indexer_heads >= 0 and (nsa.indexer_heads == 0 or group % nsa.indexer_heads == 0),
             f"nsa.indexer_heads={nsa.indexer_heads} must be 0 (no indexer) or divide the {group} query heads a KV "
             f"head serves (model.num_query_heads / model.num_kv_heads), e.g. {max(1, group // 4)}")
    _positive(nsa, "nsa", "indexer_loss_stride")
    _require(math.isfinite(nsa.indexer_loss) and nsa.indexer_loss >= 0,
             f"nsa.indexer_loss={nsa.indexer_loss} must be a finite weight >= 0")
    _require(nsa.selection_score != "indexer" or nsa.indexer_heads > 0, _INDEXER_NEEDS_HEADS.format(
        field="nsa.selection_score"))
    if nsa.impl != "reference":
        _require_score_fits_kernels(config, nsa.selection_score, "nsa.selection_score")
    if nsa.impl != "reference":  # the kernels' limits ("auto" takes the kernels on every GPU)
        fix = "or set nsa.impl=reference (pure PyTorch, slow)"
        _require(nsa.selection_block <= 256,
                 f"nsa.selection_block={nsa.selection_block} exceeds the Triton kernels' 256: use a smaller block {fix}")
        _require(m.num_query_heads // m.num_kv_heads <= 32,
                 f"model.num_query_heads={m.num_query_heads} / model.num_kv_heads={m.num_kv_heads} = "
                 f"{m.num_query_heads // m.num_kv_heads} query heads per KV head exceeds the Triton kernels' 32: "
                 f"add KV heads {fix}")
        for name in ("head_dim_k", "head_dim_v"):
            _require(getattr(m, name) <= 256,
                     f"model.{name}={getattr(m, name)} exceeds the Triton kernels' 256 {fix}")

    _positive(par, "parallel", "tensor", "pipeline", "context")
    _positive(tr, "training", "micro_batch_size", "global_batch_size", "lr", "log_interval", "loss_chunk")
    _require(0 <= tr.min_lr <= tr.lr, f"training.min_lr={tr.min_lr} must be between 0 and training.lr={tr.lr}")
    _require(tr.warmup_steps >= 0, f"training.warmup_steps={tr.warmup_steps} must be >= 0")
    _require(tr.weight_decay >= 0, f"training.weight_decay={tr.weight_decay} must be >= 0")
    _require(tr.grad_clip >= 0, f"training.grad_clip={tr.grad_clip} must be >= 0 (0 disables clipping)")

    _positive(data, "data", "period", "successors")
    _require(data.workers >= 0, f"data.workers={data.workers} must be >= 0 (0 generates sequences on the training "
             "thread; 1 or 2 generate them in background processes)")
    _require(data.successors <= m.vocab_size,
             f"data.successors={data.successors} must not exceed model.vocab_size={m.vocab_size}")
    _require(data.source != "indexed" or data.path.strip() != "",
             "data.source='indexed' needs data.path, the prefix of <path>.bin and <path>.idx: prepare one with "
             "tools/preprocess_data.py or tools/build_code_corpus.py (data/code/code)")
    _validate_split(data.split)
    _validate_mix(data.mix, "data.mix")
    for index, stage in enumerate(config.stages):
        if stage.mix is not None:
            _validate_mix(stage.mix, f"stages[{index}].mix")

    ev = config.eval
    _positive(ev, "eval", "niah_samples", "validation_sequences", "position_buckets")
    _require(ev.niah_depths != [], "eval.niah_depths is empty: give needle depths between 0 and 1, e.g. [0, 0.5, 1]")
    for i, depth in enumerate(ev.niah_depths):
        _require(0 <= depth <= 1, f"eval.niah_depths[{i}]={depth} must be between 0 (start) and 1 (end)")
    for i, length in enumerate(ev.niah_lengths):
        _require(length >= 64, f"eval.niah_lengths[{i}]={length} is too short to hold a needle and a question: "
                 "use at least 64 tokens")
        _require(length not in ev.niah_lengths[:i], f"eval.niah_lengths[{i}]={length} repeats an earlier length "
                 f"(eval.niah_lengths={ev.niah_lengths}): give each length once (they are evaluated in ascending order)")

    ck = config.checkpoint
    _require(ck.interval >= 0, f"checkpoint.interval={ck.interval} must be >= 0 (0: save at stage ends only)")
    _require(ck.keep_last >= 1, f"checkpoint.keep_last={ck.keep_last} must be at least 1: resuming needs the "
             "newest checkpoint")
    _require(bool(config.run.dir.strip()), "run.dir is empty: give the directory that holds this run's "
             "checkpoints, e.g. runs/my-run")

    _require(len(config.stages) > 0, "stages is empty: give at least one stage with seq_len and steps")
    names = [s.name for s in config.stages]
    for raw, stage in zip(config.stages, config.resolved_stages()):
        _validate_stage(config, raw, stage, names)
    for stage in config.resolved_stages():
        # the attention takes a micro-batch's documents as one packed sequence, and CP shards each row
        _require(config.data.documents != "mask" or stage.context == 1 or stage.micro_batch_size == 1,
                 f"data.documents=mask under context parallelism packs one sequence per micro-batch, and stage "
                 f"{stage.name!r} has CP={stage.context} with stages[{stage.index}].micro_batch_size="
                 f"{stage.micro_batch_size}: set it to 1 (gradient accumulation keeps the global batch)")
        # with n above a stage's block count every query takes all its blocks (dense attention), while the
        # kernels still walk n slots per query; dense attention has no blocks to select
        blocks = -(-stage.seq_len // nsa.selection_block)
        n = (f"stages[{stage.index}].num_selected" if config.stages[stage.index].num_selected is not None
             else "nsa.num_selected")
        _require(config.model.attention != "nsa" or stage.num_selected <= blocks,
                 f"{n}={stage.num_selected} is more than the {blocks} selection blocks of stage "
                 f"{stage.name!r} (stages[{stage.index}].seq_len={stage.seq_len} / nsa.selection_block="
                 f"{nsa.selection_block}, rounded up): lower {n} to at most {blocks}, or raise "
                 f"stages[{stage.index}].seq_len to at least {stage.num_selected * nsa.selection_block}")
    continuing = sum(s.steps for s in config.stages if s.lr_schedule == "continue")
    if continuing:
        _require(tr.warmup_steps < config.total_steps,
                 f"training.warmup_steps={tr.warmup_steps} must be less than the {config.total_steps} steps "
                 "of all stages: lower the warmup or add steps")
    if tr.lr_decay_steps is not None:
        _require(tr.lr_decay_steps > tr.warmup_steps,
                 f"training.lr_decay_steps={tr.lr_decay_steps} must be more than training.warmup_steps="
                 f"{tr.warmup_steps}: the cosine starts after the warmup (or leave lr_decay_steps unset: the "
                 f"run's {config.total_steps} steps)")


def _validate_split(split: str) -> None:
    try:
        shares = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        shares = []
    _require(len(shares) in (1, 2, 3) and all(x >= 0 for x in shares) and sum(shares) > 0,
             f"data.split={split!r} must be up to three non-negative shares of the documents for train, "
             "validation and test, e.g. '98,2,0'")


def _validate_mix(mix: MixConfig, where: str) -> None:
    _require(mix.task_min_length >= 0, f"{where}.task_min_length={mix.task_min_length} must be >= 0 (0: one "
             "task sample per sequence)")
    _require(mix.task_max_length == 0 or mix.task_max_length >= mix.task_min_length > 0,
             f"{where}.task_max_length={mix.task_max_length} needs task_min_length > 0 and must be 0 (no cap) "
             f"or at least task_min_length={mix.task_min_length}: set it to 0, or to at least task_min_length")
    _require(0 <= mix.task_full_share <= 1, f"{where}.task_full_share={mix.task_full_share} must be between 0 "
             "and 1 (the share of task sequences that hold one sample as long as the sequence)")
    _require(mix.task_full_share == 0 or mix.task_min_length > 0,
             f"{where}.task_full_share={mix.task_full_share} needs task_min_length > 0 (without it every task "
             "sequence already holds one sample as long as itself): set task_min_length, or task_full_share to 0")
    shares = mix.shares()
    for name, share in shares.items():
        _require(share >= 0, f"{where}.{name}={share} must be >= 0")
    total = sum(shares.values())
    terms = " + ".join(f"{name} {share:g}" for name, share in shares.items() if share)
    _require(abs(total - 1) < 1e-6, f"{where} shares must sum to 1 and sum to {total:g} ({terms or 'all 0'}): "
             f"adjust them, e.g. {where}.source={max(0.0, 1 - (total - mix.source)):g}")


# the selection scores that read the selection branch's raw keys (kernels.block_selection.naive.RAW_KEY_SCORES;
# not imported, so that loading a config needs no torch)
RAW_KEY_SCORES = ("exact", "bound", "indexer")
_INDEXER_NEEDS_HEADS = ("{field}='indexer' ranks blocks by the learned indexer, and nsa.indexer_heads=0 builds "
                        "none: set nsa.indexer_heads to a divisor of the group's query heads (e.g. 4), or "
                        "another score")
# the selection alignment loss trains the compressed scores, which the raw-key scores do not read
_RAW_KEYS_WITHOUT_LOSS = ("{loss}={value} with {score}='{name}': the selection alignment loss trains the "
                          "compressed-attention scores that top-n ranks by, and the '{name}' score ranks by the raw "
                          "keys instead; set {loss} to 0 or {score} to 'sum'")


def _require_score_fits_kernels(config: Config, score: str, field: str) -> None:
    """The Triton kernels' limits on a selection score (field names where it was set)."""
    nsa, m = config.nsa, config.model
    if score in ("exact", "indexer"):  # its kernel takes l' keys per dot
        ok = nsa.selection_block >= 16 and nsa.selection_block & (nsa.selection_block - 1) == 0
        _require(ok, f"nsa.selection_block={nsa.selection_block}: the '{score}' selection score ({field}) has a "
                     "kernel that takes a power of two >= 16 (e.g. 64); set nsa.selection_block so, or "
                     "nsa.impl=reference")
    if score == "bound":  # its queries and keys are twice as wide
        _require(2 * m.head_dim_k <= 256,
                 f"model.head_dim_k={m.head_dim_k}: the 'bound' selection score ({field}) scores keys twice as "
                 "wide, and the Triton kernels take 256 at most; use heads of 128 or less, another score, or "
                 "nsa.impl=reference")


def _validate_stage(config: Config, raw: StageConfig, stage: Stage, names: list[str]) -> None:
    """One stage's rules, checked on its resolved values; errors name the stage field, or the
    parallel:/training: field it inherited."""
    m, nsa = config.model, config.nsa
    where = f"stages[{stage.index}]"

    def field_name(stage_field: str, section_field: str) -> str:
        explicit = getattr(raw, stage_field) is not None
        return f"{where}.{stage_field}" if explicit else section_field

    tp = field_name("tensor_parallel", "parallel.tensor")
    pp = field_name("pipeline_parallel", "parallel.pipeline")
    cp_name = field_name("context_parallel", "parallel.context")
    gbs = field_name("global_batch_size", "training.global_batch_size")
    mbs = field_name("micro_batch_size", "training.micro_batch_size")
    _require(names.count(stage.name) == 1, f"{where}.name={stage.name!r} is used by two stages: names must be unique")
    _require(stage.name.strip() != "", f"{where}.name is empty: give each stage a name, e.g. ctx8k")
    _require(stage.steps > 0, f"{where}.steps={stage.steps} must be positive")
    _require(stage.seq_len > 0, f"{where}.seq_len={stage.seq_len} must be positive")
    for name, value in ((tp, stage.tensor), (pp, stage.pipeline), (cp_name, stage.context),
                        (gbs, stage.global_batch_size), (mbs, stage.micro_batch_size)):
        _require(value > 0, f"{name}={value} must be positive")
    _require(stage.rotary_base > 0, f"{where}.rotary_base={stage.rotary_base} must be positive")
    _require(raw.num_selected is None or raw.num_selected >= 3,
             f"{where}.num_selected={raw.num_selected} must be at least 3: block 0 and the two local blocks are "
             "always selected and count toward it")
    _require(math.isfinite(stage.selection_loss) and stage.selection_loss >= 0,
             f"{where}.selection_loss={raw.selection_loss} must be a finite weight >= 0 (0 turns the loss off in "
             "this stage; leave it out for nsa.selection_loss)")
    score = field_name("selection_score", "nsa.selection_score")
    _require(stage.selection_loss == 0 or stage.selection_score not in RAW_KEY_SCORES,
             _RAW_KEYS_WITHOUT_LOSS.format(loss=field_name("selection_loss", "nsa.selection_loss"),
                                           value=stage.selection_loss, score=score, name=stage.selection_score))
    _require(stage.selection_score != "indexer" or nsa.indexer_heads > 0, _INDEXER_NEEDS_HEADS.format(field=score))
    if nsa.impl != "reference":
        _require_score_fits_kernels(config, stage.selection_score, score)

    _require(m.num_kv_heads % stage.tensor == 0,
             f"{tp}={stage.tensor} must divide model.num_kv_heads={m.num_kv_heads}: tensor parallelism "
             "splits whole GQA groups")
    _require(m.vocab_size % stage.tensor == 0,
             f"model.vocab_size={m.vocab_size} must be a multiple of {tp}={stage.tensor}: the embedding "
             "and output layer split the vocabulary evenly over TP ranks")
    _require(m.num_layers % stage.pipeline == 0,
             f"{pp}={stage.pipeline} must divide model.num_layers={m.num_layers}")
    _require(stage.global_batch_size % stage.micro_batch_size == 0,
             f"{gbs}={stage.global_batch_size} must be a multiple of {mbs}={stage.micro_batch_size}: a "
             "step is a whole number of micro-batches")

    if stage.lr_schedule == "continue":
        for name in ("lr", "min_lr", "warmup_steps"):
            _require(getattr(raw, name) is None,
                     f"{where}.{name}={getattr(raw, name)} applies only to a fresh schedule: set "
                     f"{where}.lr_schedule=restart, or drop {where}.{name} to continue the run-wide schedule")
    else:
        _require(stage.lr > 0, f"{field_name('lr', 'training.lr')}={stage.lr} must be positive")
        _require(0 <= stage.min_lr <= stage.lr,
                 f"{field_name('min_lr', 'training.min_lr')}={stage.min_lr} must be between 0 and the "
                 f"stage's peak lr {stage.lr}")
        warmup = field_name("warmup_steps", "training.warmup_steps")
        _require(0 <= stage.warmup_steps < stage.steps,
                 f"{warmup}={stage.warmup_steps} must be >= 0 and less than {where}.steps={stage.steps}: "
                 "a restarted schedule warms up inside its own stage")

    if stage.index > 0:
        previous = config.stages[stage.index - 1].seq_len
        _require(stage.seq_len >= previous,
                 f"{where}.seq_len={stage.seq_len} is shorter than the previous stage's {previous}: "
                 "a curriculum extends context, so order stages by growing seq_len")
    cp = stage.context
    if cp > 1:
        chunk = 2 * cp * nsa.selection_block
        _require(stage.seq_len % chunk == 0,
                 f"{where}.seq_len={stage.seq_len} must be a multiple of 2 * context_parallel * "
                 f"nsa.selection_block = {chunk} (CP={cp} from {cp_name}): the sequence splits into 2*CP "
                 "chunks of whole selection blocks")
        chunk_len = stage.seq_len // (2 * cp)
        _require(max(nsa.window, nsa.compress_block - nsa.stride) <= chunk_len,
                 f"{where}: nsa.window={nsa.window} is longer than one context-parallel chunk "
                 f"({chunk_len} tokens at seq_len={stage.seq_len}, CP={cp}): lower the window or CP")
