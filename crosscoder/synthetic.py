"""Synthetic activations with planted truth: how the science is tested without a GPU.

Two "models" (sources ``base`` and ``chat``, possibly of different widths) produce activations
that are sparse non-negative combinations of known feature directions plus Gaussian noise. Every
planted feature has a class that a crosscoder must recover:

- ``shared``: the same direction in both models (the same vector when the widths are equal, as
  for a base model and its fine-tune; through a fixed near-isometry when the widths differ, as
  between models of one family at different sizes);
- ``base_only`` / ``chat_only``: present in one model only;
- ``rotated``: present in both, but the chat direction is rotated away (cosine ``rotated_cosine``);
- ``strong``: present in both, ``strong_ratio`` times stronger in the chat model.

A fraction of the chat-only features (``chat_only_parent_fraction``) can be made *children*: each
fires only together with its own shared *parent*, on half of the parent's firings (the parent
fires twice as often, so the child's rate is unchanged; with ``fixed_count`` a child drawn without
its parent is dropped, so such a token has one feature fewer). That is how a chat behaviour sits in real
data, tied to one base context (refusal to the last token of a request), and it is what a sparse
code folds into one latent with the parent (measured: BatchTopK then finds none of them chat-only).
``children_per_parent`` > 1 gives one parent several children that fire independently of each other,
as several chat decisions are made at one place (refuse or not, how long, what format, at the
reply's first token): folding them into the parent then needs a latent per combination, and
BatchTopK calls more latents chat-only the more children share a parent, but latents that mix
several children rather than one per child (measured in the README). ``parents_per_child`` > 1
ties each child instead to several parents, any of which it may fire with (one chat behaviour seen
in several base contexts, as a refusal mode over every word of a reply): folding it then needs a
latent per parent, and from eight parents on BatchTopK finds most children as chat-only latents.

The planted dictionary is written beside the shards as ``planted.npz`` (directions per source,
magnitudes, class codes) so tests and the analysis can score recovery. Shard ``n`` is a pure
function of (config, n), like a harvest's. No torch here.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np

from .config import ConfigError, SyntheticConfig, check_synthetic
from .progress import progress_bar
from .shards import Manifest, ShardError, ShardWriter, SourceInfo, shard_name, sweep_partial_shards, write_manifest
from .storage import Root

CLASSES = ("shared", "base_only", "chat_only", "rotated", "strong")
SOURCE_NAMES = ("base", "chat")
PLANTED = "planted.npz"


@dataclass
class PlantedDictionary:
    directions: list[np.ndarray]  # per source [F, d_s], unit rows (zero rows where absent)
    magnitudes: np.ndarray  # [F, S] scale of each feature in each source (0 = absent)
    classes: np.ndarray  # [F] int codes into CLASSES
    frequency: np.ndarray  # [F] firing probability per token
    parents: np.ndarray  # [F, P] the shared features each one fires only with (one of them), -1 = none

    @property
    def children(self) -> np.ndarray:
        """Indices of the features tied to parents."""
        return np.flatnonzero((self.parents >= 0).any(1))

    @property
    def class_names(self) -> list[str]:
        return [CLASSES[c] for c in self.classes]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {f"directions_{i}": d for i, d in enumerate(self.directions)}
        arrays |= {"magnitudes": self.magnitudes, "classes": self.classes, "frequency": self.frequency,
                   "parents": self.parents, "class_names": np.array(CLASSES)}
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub reads the first keyword as allow_pickle
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PlantedDictionary:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        n = sum(1 for k in z.files if k.startswith("directions_"))
        # written before parents existed: no feature has one; before parents_per_child: one column
        parents = z["parents"] if "parents" in z.files else np.full(len(z["classes"]), -1, dtype=np.int64)
        parents = parents.reshape(len(z["classes"]), -1)
        return cls([z[f"directions_{i}"] for i in range(n)], z["magnitudes"], z["classes"], z["frequency"], parents)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-12)


def plant_dictionary(cfg: SyntheticConfig) -> PlantedDictionary:
    check_synthetic(cfg)
    fractions = [cfg.shared_fraction, cfg.base_only_fraction, cfg.chat_only_fraction,
                 cfg.rotated_fraction, cfg.strong_fraction]
    rng = np.random.default_rng([cfg.seed, 0])
    F, (d0, d1) = cfg.features, cfg.widths
    counts = np.floor(np.array(fractions) * F).astype(int)
    counts[0] += F - counts.sum()
    classes = rng.permutation(np.repeat(np.arange(len(CLASSES)), counts))

    base = _unit(rng.standard_normal((F, d0)))
    # equal widths: one basis, as a fine-tune keeps its base model's residual basis (so decoder
    # cosines and Latent Scaling compare like with like); different widths: a near-isometry,
    # orthonormal columns when growing, a scaled projection otherwise
    q, _ = np.linalg.qr(rng.standard_normal((max(d0, d1), min(d0, d1))))
    mapping = np.eye(d0) if d0 == d1 else (q if d1 >= d0 else q.T)  # [d1, d0]
    chat = _unit(base @ mapping.T)
    fresh = _unit(rng.standard_normal((F, d1)))
    rotated = classes == CLASSES.index("rotated")
    ortho = _unit(fresh - (fresh * chat).sum(-1, keepdims=True) * chat)
    c = cfg.rotated_cosine
    chat[rotated] = c * chat[rotated] + np.sqrt(1 - c * c) * ortho[rotated]
    chat_only = classes == CLASSES.index("chat_only")
    chat[chat_only] = fresh[chat_only]

    magnitudes = np.ones((F, 2))
    magnitudes[classes == CLASSES.index("base_only"), 1] = 0
    magnitudes[chat_only, 0] = 0
    magnitudes[classes == CLASSES.index("strong"), 1] = cfg.strong_ratio
    base[magnitudes[:, 0] == 0] = 0
    chat[magnitudes[:, 1] == 0] = 0
    frequency = np.full(F, cfg.active_per_token / F)
    parents = np.full((F, cfg.parents_per_child), -1, dtype=np.int64)
    children = np.flatnonzero(chat_only)[: int(round(cfg.chat_only_parent_fraction * chat_only.sum()))]
    shared = np.flatnonzero(classes == CLASSES.index("shared"))
    if cfg.parents_per_child > 1:  # each child draws its own parents; their rates are left alone
        if cfg.parents_per_child > len(shared):
            raise ConfigError(f"synthetic: parents_per_child = {cfg.parents_per_child}, there are "
                              f"{len(shared)} shared features")
        for child in children:
            parents[child] = rng.choice(shared, cfg.parents_per_child, replace=False)
    else:
        n_parents = -(-len(children) // cfg.children_per_parent)
        if n_parents > len(shared):
            raise ConfigError(f"synthetic: {len(children)} chat-only children, {cfg.children_per_parent} per "
                              f"parent, need {n_parents} shared parents, there are {len(shared)}")
        parents[children, 0] = shared[np.arange(len(children)) // cfg.children_per_parent]
        frequency[shared[:n_parents]] *= 2  # each child fires on half of its parent's firings
    return PlantedDictionary([base, chat], magnitudes, classes.astype(np.int64), frequency, parents)


def sample_activations(planted: PlantedDictionary, cfg: SyntheticConfig, n_tokens: int, rng) -> np.ndarray:
    """[n_tokens, D] raw activations (float32)."""
    F = len(planted.classes)
    if cfg.fixed_count:
        # exactly round(active_per_token) features per token, drawn by frequency
        n = int(round(cfg.active_per_token))
        keys = rng.random((n_tokens, F)) ** (1.0 / planted.frequency)  # weighted sampling w/o replacement
        chosen = np.argpartition(-keys, n - 1, axis=1)[:, :n]
        fires = np.zeros((n_tokens, F), dtype=bool)
        np.put_along_axis(fires, chosen, True, axis=1)
    else:
        fires = rng.random((n_tokens, F)) < planted.frequency
    children = planted.children
    if len(children):
        parents = planted.parents[children]  # [C, P]
        # one parent: its rate was doubled, the child takes half of its firings; several: the child
        # takes the share of "any parent fires" that keeps its own rate
        any_parent = 1 - np.prod(1 - np.where(parents >= 0, planted.frequency[parents], 0.0), axis=1)
        share = np.where((parents >= 0).sum(1) == 1, 0.5, np.minimum(1.0, planted.frequency[children] / any_parent))
        with_parent = (fires[:, parents] & (parents >= 0)).any(2)
        fires[:, children] = with_parent & (rng.random((n_tokens, len(children))) < share)
    coeff = fires * rng.uniform(0.5, 1.5, size=(n_tokens, F))
    parts = []
    for s, directions in enumerate(planted.directions):
        d = directions.shape[1]
        x = coeff @ (planted.magnitudes[:, s : s + 1] * directions)
        x += rng.standard_normal((n_tokens, d)) * (cfg.noise / np.sqrt(d))
        parts.append(x * cfg.raw_scale[s])
    return np.concatenate(parts, axis=1).astype(np.float32)


def write_synthetic(cfg: SyntheticConfig, output: str, progress: bool = True, root: Root | None = None) -> Manifest:
    """Write planted-truth shards, ``planted.npz`` and the manifest to ``output`` (or ``root``)."""
    planted = plant_dictionary(cfg)  # checks the config first
    root = root or Root(output)
    sweep_partial_shards()  # what a killed run left in the temporary directory
    root.write_bytes(PLANTED, planted.to_bytes())
    samples_total = -(-cfg.tokens // cfg.seq_len)
    n_shards = -(-samples_total // cfg.samples_per_shard)
    slices = np.cumsum([0, *cfg.widths])
    norm_sum = np.zeros(len(cfg.widths))
    shards = []
    for n in progress_bar(range(n_shards), desc="synthetic shards", unit="shard", disable=not progress):
        rng = np.random.default_rng([cfg.seed, 1, n])
        with ShardWriter(root, shard_name(n), width=sum(cfg.widths), dtype=cfg.dtype) as writer:
            first = n * cfg.samples_per_shard
            for doc in range(first, min(first + cfg.samples_per_shard, samples_total)):
                acts = sample_activations(planted, cfg, cfg.seq_len, rng)
                tokens = rng.integers(0, 1000, size=cfg.seq_len, dtype=np.int32)
                writer.add(f"{doc:08d}-0000", tokens, acts, {"doc": doc, "chunk": 0, "offset": 0})
                for s in range(len(cfg.widths)):
                    norm_sum[s] += np.linalg.norm(acts[:, slices[s] : slices[s + 1]].astype(np.float64), axis=1).sum()
            shards.append(writer.commit())
    total_tokens = sum(s.tokens for s in shards)
    mean_norm = norm_sum / total_tokens
    manifest = Manifest(
        sources=[SourceInfo(name, d, model=f"synthetic:{name}", hook="planted")
                 for name, d in zip(SOURCE_NAMES, cfg.widths)],
        dtype=cfg.dtype,
        seq_len=cfg.seq_len,
        tokenizer="synthetic",
        norm_scale=[float(np.sqrt(d) / m) for d, m in zip(cfg.widths, mean_norm)],
        shards=shards,
        extra={"synthetic": asdict(cfg) | {"output": output}},
    )
    write_manifest(root, manifest)
    return manifest


def check_same_synthetic(output: str, manifest: Manifest, cfg: SyntheticConfig) -> None:
    """A root kept as complete holds synthetic data of this config (its output aside), else a
    ShardError naming what differs: training on it would test another planted truth than asked."""
    if "synthetic" not in manifest.extra:
        raise ShardError(f"{output}: holds harvested shards, not synthetic data; use another synthetic.output or "
                         "delete it")
    recorded = json.loads(json.dumps(manifest.extra["synthetic"]))
    wanted = json.loads(json.dumps(asdict(cfg)))
    differ = [key for key in wanted if key != "output" and key in recorded and recorded[key] != wanted[key]]
    if differ:
        said = ", ".join(f"synthetic.{key} = {recorded[key]} there, {wanted[key]} here" for key in differ)
        raise ShardError(f"{output}: holds synthetic data of another config ({said}); use another --run or "
                         "synthetic.output, or delete it")


def read_planted(root: Root) -> PlantedDictionary:
    return PlantedDictionary.from_bytes(root.read_bytes(PLANTED))


@dataclass
class Recovery:
    best_cosine: np.ndarray  # [F] best cosine of each planted feature with any latent's decoder
    latent: np.ndarray  # [F] index of that latent
    rel_norm: np.ndarray  # [F] that latent's relative decoder norm (0 = base only, 1 = chat only)
    predicted: list[str]  # [F] shared / base_only / chat_only from rel_norm
    expected: list[str]  # [F] planted class, with rotated and strong counted as shared

    @property
    def mean_best_cosine(self) -> float:
        return float(self.best_cosine.mean())

    @property
    def class_accuracy(self) -> float:
        return float(np.mean([p == e for p, e in zip(self.predicted, self.expected)]))


def score_recovery(W_dec: np.ndarray, widths: list[int], planted: PlantedDictionary, raw_scale: list[float],
                   norm_scale: list[float], exclusive_threshold: float = 0.1) -> Recovery:
    """Match every planted feature to its best latent of an export's decoder ``W_dec`` [L, D] (raw units).

    Cosines and relative norms are taken in normalised units (each source scaled by its
    ``norm_scale``), where the crosscoder was trained and where the sources are comparable; the
    norms per dimension, as the analysis takes them.
    """
    slices = np.cumsum([0, *widths])
    W_dec = np.concatenate([W_dec[:, slices[s] : slices[s + 1]] * norm_scale[s] for s in range(len(widths))], 1)
    truth = np.concatenate(
        [planted.directions[s] * planted.magnitudes[:, s : s + 1] * raw_scale[s] * norm_scale[s]
         for s in range(len(widths))], axis=1
    )
    cos = _unit(truth) @ _unit(W_dec).T
    latent = cos.argmax(1)
    # per dimension, as the analysis compares them (analysis.py): width-neutral
    norms = [np.linalg.norm(W_dec[latent, slices[s] : slices[s + 1]], axis=1) / np.sqrt(widths[s]) for s in range(2)]
    rel = norms[1] / (norms[0] + norms[1]).clip(1e-12)
    predicted = np.where(rel < exclusive_threshold, "base_only",
                         np.where(rel > 1 - exclusive_threshold, "chat_only", "shared")).tolist()
    expected = ["shared" if c in ("rotated", "strong") else c for c in planted.class_names]
    return Recovery(cos.max(1), latent, rel, predicted, expected)
