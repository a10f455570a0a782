"""Typed configuration: one dataclass per stage, loaded from TOML, overridden by dotted keys.

Why: one TOML file drives every stage (DESIGN.md, "Configuration"), and users' scripts rely on the
key names, so the dataclasses below *are* the schema. Every field carries its documentation in
``metadata["help"]``, which the CLI prints and the README mirrors. Unknown keys are errors that name
the file and the key, because a misspelt ``lattents = ...`` silently falling back to a default
wastes a GPU-day. The cost: adding a key means adding a field here (which is the point).

This module parses no command line: :func:`apply_overrides` takes ``("train.k", "64")`` pairs that
the CLI collected, and converts each value to the declared field type.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and key."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSource:
    """One model to harvest from."""

    name: str = opt("base", "short name of the model, used in source names (`<name>@<hook>`)")
    path: str = opt("", "Hugging Face id or local directory of the model")
    revision: str | None = opt(None, "model revision (branch, tag or commit); None = default")
    dtype: str = opt("float32", "dtype the model runs in: float32 | bfloat16 | float16")


@dataclass
class HarvestConfig:
    models: list[dict] = opt(
        [], "models to harvest, each a table {name, path, revision, dtype, device_map}; sources = models × hooks"
    )
    tiny_models: bool = opt(
        False, "with models empty: make the demo base/chat pair (demo_pair.py: a small Llama trained on a word "
        "grammar, and its chat fine-tune with refusals and length control) and documents in <run>/tiny, with no "
        "download, and harvest those; the embedded default uses it"
    )
    tiny_steps: int = opt(500, "training steps of the demo base model, and again of its chat fine-tune")
    hooks: list[str] = opt(["model.layers.1"], "module paths whose outputs are harvested (residual stream)")
    data: str = opt("", "JSONL ({text} or {messages}) or .txt file of documents, or hf:<dataset>[:<split>] "
                        "(a save_to_disk or data-file directory, or a hub name)")
    output: str = opt("", "shard root: a path, file://… or s3://bucket/prefix")
    actors: int = opt(2, "number of Ray harvest actors")
    cpus_per_actor: float = opt(1.0, "CPUs reserved by each actor")
    gpus_per_actor: float = opt(0.0, "GPUs reserved by each actor (a model larger than one is split with device_map)")
    tokens: int = opt(1_000_000, "stop after this many harvested tokens")
    seq_len: int = opt(128, "tokens per chunk (one sample); longer documents are cut into several chunks")
    samples_per_shard: int = opt(64, "samples (chunks) per shard file")
    batch_size: int = opt(8, "chunks per forward pass")
    dtype: str = opt("float16", "dtype activations are stored in: float16 | float32")
    keep_bos: bool = opt(False, "store the BOS position too (excluded by default: an attention sink with outlier norms)")
    max_retries: int = opt(3, "times a shard is retried after its actor died or failed")


@dataclass
class SyntheticConfig:
    """Planted-truth activations (crosscoder/synthetic.py): how the science is tested without a GPU."""

    output: str = opt("", "shard root to write; default <run dir>/shards")
    widths: list[int] = opt([64, 64], "width of each synthetic source (model); two sources = base, chat")
    features: int = opt(512, "number of planted features")
    shared_fraction: float = opt(0.6, "fraction of features present in both models with the same direction")
    base_only_fraction: float = opt(0.1, "fraction present only in the first model")
    chat_only_fraction: float = opt(0.1, "fraction present only in the second model")
    rotated_fraction: float = opt(0.1, "fraction shared but with a different direction in the second model")
    rotated_cosine: float = opt(0.5, "cosine between the two directions of a rotated feature")
    strong_fraction: float = opt(0.1, "fraction shared but far stronger in the second model")
    strong_ratio: float = opt(3.0, "magnitude ratio second/first of a strong feature")
    chat_only_parent_fraction: float = opt(
        0.0, "fraction of chat-only features that fire only with a shared 'parent' feature (on half of its "
        "firings), as a chat behaviour tied to one base context, e.g. refusal to the request's last token"
    )
    children_per_parent: int = opt(
        1, "chat-only children that share one parent, each firing on half of its firings independently of the "
        "others: several chat behaviours decided at one base context (refusal, length, format at the reply's start)"
    )
    parents_per_child: int = opt(
        1, "shared parents of each chat-only child, drawn at random: it fires only when one of them does, at its "
        "usual rate; > 1 = one chat behaviour showing in several base contexts (not together with children_per_parent)"
    )
    active_per_token: float = opt(8.0, "expected number of active features per token")
    fixed_count: bool = opt(
        True, "every token has exactly round(active_per_token) features (else each fires independently)"
    )
    noise: float = opt(0.05, "std of isotropic Gaussian noise, relative to a unit feature")
    raw_scale: list[float] = opt([1.0, 1.0], "raw activation scale of each source (tests normalisation)")
    tokens: int = opt(400_000, "tokens to write")
    seq_len: int = opt(128, "tokens per sample")
    samples_per_shard: int = opt(64, "samples per shard")
    dtype: str = opt("float16", "stored dtype: float16 | float32")
    seed: int = opt(0, "seed of the planted dictionary and of the samples")


@dataclass
class TrainConfig:
    data: str = opt("", "shard root (default: harvest.output or synthetic.output)")
    arch: str = opt("acausal", "acausal (one shared dictionary) | aligned (per-source latents + alignment loss)")
    activation: str = opt("batchtopk", "relu (+ decoder-norm-weighted L1) | topk | batchtopk")
    latents: int = opt(4096, "dictionary size L")
    k: int = opt(32, "active latents per token (topk, batchtopk); for aligned: per source")
    batch_size: int = opt(4096, "global batch size, in tokens")
    lr: float = opt(1e-4, "peak learning rate (Adam)")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.999, "Adam beta2")
    lr_warmup_steps: int = opt(100, "linear warm-up of the learning rate from 0, in steps")
    lr_decay_fraction: float = opt(0.2, "the learning rate decays linearly to 0 over this last fraction of steps")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value; 0 = off")
    steps: int = opt(1000, "optimizer steps")
    l1_coeff: float = opt(2.0, "relu only: coefficient of the decoder-norm-weighted L1 penalty")
    l1_warmup_steps: int = opt(200, "relu only: the L1 coefficient rises linearly from 0 over these steps")
    aux_coeff: float = opt(1 / 32, "coefficient of the AuxK loss on dead latents; 0 = off")
    aux_k: int = opt(0, "latents per token the AuxK loss may use; 0 = half the total input width")
    dead_tokens: int = opt(1_000_000, "a latent that fired on none of the last N tokens is dead")
    align_coeff: float = opt(10.0, "aligned only: coefficient of the alignment loss (10: cross FVE ≈ own FVE on planted data)")
    align_loss: str = opt("normalized", "aligned only: mse | normalized (scale-invariant ‖f_s−f_t‖²/mean ‖f‖²)")
    threshold_momentum: float = opt(0.99, "batchtopk: EMA momentum of the inference threshold")
    dec_init_norm: float = opt(0.1, "initial norm of each latent's decoder row, per source")
    sparse_kernels: str = opt(
        "auto", "acausal topk/batchtopk: gradients and decoding only through the active latents (kernels.py): "
        "on | off (the dense reference computation: same results) | auto (on from 4096 latents; below, the "
        "dense matmuls are faster on CPU)"
    )
    seed: int = opt(0, "seed of initialisation and data order")
    shuffle_samples: int = opt(64, "token shuffle window, in samples: tokens are shuffled within each window")
    data_partitions: int = opt(
        0, "independent token streams the global batch is cut into (0 = one per data-parallel rank); "
        "fixing it makes the token order independent of the number of workers"
    )
    max_epochs: int = opt(0, "stop with an error when the data is exhausted after this many epochs (0 = cycle)")
    checkpoint_every: int = opt(500, "save a checkpoint every N steps (and at the end); 0 = only at the end")
    keep_checkpoints: int = opt(2, "how many checkpoints to keep")
    log_every: int = opt(10, "write a metrics line to <run>/train_log.jsonl every N steps")
    workers: int = opt(0, "Ray Train workers with DeepSpeed (0 = one process, no Ray, no DeepSpeed)")
    latent_parallel: int = opt(1, "ranks sharing one dictionary (latent parallelism)")
    zero_stage: int = opt(1, "DeepSpeed ZeRO stage 0-3 (distributed trainer)")
    precision: str = opt("fp32", "distributed trainer: fp32 | bf16 (DeepSpeed mixed precision; on a CPU "
                                 "without bf16 GEMM units the dense products run in fp32, see precision.py)")
    max_failures: int = opt(2, "distributed trainer: Ray Train restarts after a worker failure (resuming from the last checkpoint)")
    use_gpu: bool = opt(False, "distributed trainer: one GPU per worker (NCCL) instead of CPU (gloo)")


@dataclass
class AnalyzeConfig:
    top_examples: int = opt(20, "max-activating examples kept per latent")
    tokens: int = opt(200_000, "harvested tokens to stream through for statistics")
    exclusive_threshold: float = opt(
        0.1, "a latent is base-only if rel_norm < t, chat-only if rel_norm > 1 - t, shared otherwise"
    )
    data: str = opt("", "shard root to analyse (default: the training data)")
    sources: list[str] = opt(
        [], "the two sources compared, [base, chat] (rel_norm 0 = only the first); empty = the first two"
    )
    scaling_threshold: float = opt(
        0.3, "Latent Scaling: an exclusive latent is flagged as Complete Shrinkage if nu_error > t and as "
        "Latent Decoupling if nu_recon > t (nu ≈ 0: really exclusive, ≈ 1: as present in the other model)"
    )
    batch_tokens: int = opt(4096, "tokens encoded per batch while streaming")
    context: int = opt(12, "tokens of context shown before a max-activating token (and 3 after)")
    report_latents: int = opt(12, "latents per class shown with their max-activating examples in the report")
    ce_sequences: int = opt(
        16, "sequences for CE loss recovered (harvested data only; needs the models); 0 = skip"
    )


@dataclass
class StorageConfig:
    """How shard roots on object storage are reached; credentials come from the usual AWS variables
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE), never from this file."""

    endpoint_url: str = opt("", "S3 endpoint (MinIO, moto, …); empty = AWS_ENDPOINT_URL or AWS itself")


@dataclass
class MetricsConfig:
    port: int = opt(0, "Prometheus port; 0 = off; harvest actors and train ranks add their index")
    host: str = opt("0.0.0.0", "address the metrics endpoint listens on (0.0.0.0 so Prometheus can scrape pods)")


@dataclass
class RunConfig:
    name: str = opt("default", "run name; default run directory runs/<name>")
    harvest: HarvestConfig = field(default_factory=HarvestConfig, metadata={"help": "[harvest] table"})
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig, metadata={"help": "[synthetic] table"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "[train] table"})
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig, metadata={"help": "[analyze] table"})
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata={"help": "[metrics] table"})
    storage: StorageConfig = field(default_factory=StorageConfig, metadata={"help": "[storage] table"})


# ---------------------------------------------------------------------------------------------
# loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) a TOML value against a declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
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
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(types_)}"
        )
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
    if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)):
        if not isinstance(value, str) and text.lower() not in ("none", "null"):
            value = text
        if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
            value = None
    if tp is bool and isinstance(value, str):
        value = {"true": True, "false": False, "1": True, "0": False}.get(value.lower(), value)
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
            if part not in types_:
                raise ConfigError(
                    f"override --{key}: unknown key {part!r}; known keys: {', '.join(types_)}"
                )
            if i == len(parts) - 1:
                tp = types_[part]
                if _is_dataclass_type(tp):
                    raise ConfigError(f"override --{key}: is a table; set one of its keys")
                setattr(target, part, _parse_override_value(text, tp, f"--{key}"))
            else:
                target = getattr(target, part)
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    return str(value)


def dumps_toml(cfg: RunConfig) -> str:
    """The resolved configuration as TOML (written to <run dir>/config.toml); None values are left out."""
    lines = []
    tables = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value))
        elif value is not None:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        for f in dataclasses.fields(table):
            value = getattr(table, f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field: what ``crosscoder <cmd> --help-config`` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, json.dumps(default), f.metadata.get("help", "")))
    return rows


SPARSE_KERNELS_MIN_LATENTS = 4096


def use_sparse_kernels(tc: TrainConfig) -> bool:
    """Resolve ``train.sparse_kernels`` (on | off | auto) for this dictionary size."""
    if tc.sparse_kernels not in ("on", "off", "auto"):
        raise ConfigError(f"train.sparse_kernels must be on, off or auto, got {tc.sparse_kernels!r}")
    if tc.sparse_kernels == "auto":
        return tc.latents >= SPARSE_KERNELS_MIN_LATENTS
    return tc.sparse_kernels == "on"
