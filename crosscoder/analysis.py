"""Model-diffing analysis of a trained crosscoder: per-latent statistics streamed over the shards.

What it computes, for the two compared sources (``base``, ``chat``: the first two by default):

- from the weights: relative decoder norm ``Δ_i = ‖d_chat‖ / (‖d_base‖ + ‖d_chat‖)`` and decoder
  cosine, both in normalised units (each source scaled so ``E‖x_s‖ = √d_s``, where the sources are
  comparable even when the raw scales of the two models differ), and the class from ``Δ``. Norms
  are compared per dimension (each source's divided by ``√d_s``): in normalised units a concept
  that carries the same share of two sources' variance has decoder norms in the ratio
  ``√(d_b/d_a)``, which for models of different widths (scaling transfer; 512 vs 2048 puts a
  shared concept at Δ = 0.67) would shift every latent toward the wider one;
- from one pass over up to ``analyze.tokens`` harvested tokens, in manifest order: firing frequency
  (a latent that never fires is ``dead``), FVE per source, the top-``n`` max-activating tokens of
  every latent (merged per batch with one ``topk`` over ``[L, n + B]``), token attribution per class
  (firings by token id against the token's base rate), each latent's share of firings on the
  tokenizer's special tokens (base-only latents above one half are labelled ``untrained_tokens``:
  the base never trained the chat template's embeddings), and Latent Scaling (latent_scaling.py)
  of every exclusive latent;
- CE loss recovered (ce_recovered.py) when the shards were harvested from models that can be loaded.

Why one streaming pass: shards can be far larger than memory, and every statistic above is a sum
or a running top-n. What it costs: the activations are encoded once more (at inference, with the
BatchTopK threshold), and the top-n buffers hold ``2·n·L`` numbers (for L = 64k, n = 20: 20 MB).
Token ids of the analysed tokens are kept (4 bytes each) so examples can show their context.

The results are written as ``analysis/latents.csv`` (docs/architecture.md), ``analysis/summary.json``
and, by report.py, ``analysis/report.html``. No Ray, DeepSpeed or S3 code here: shards come through
the storage layer.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import AnalyzeConfig, model_name
from .errors import AnalysisError
from .latent_scaling import LatentScaling, artifact_labels
from .metrics import StreamingFVE, decoder_cosine, decoder_norms, relative_decoder_norm
from .model import CrossCoder
from .progress import progress_bar
from .relocation import shards_locator
from .shards import Manifest, ShardError, SourceInfo, check_compatible, iter_samples, read_manifest
from .storage import Root, read_json_object, replace_text

CLASSES = ("shared", "base_only", "chat_only", "dead")
CSV_COLUMNS = ("index", "frequency", "mean_activation", "max_activation", "special_share", "rel_norm", "cosine",
               "class", "beta_error_base", "beta_error_chat", "beta_recon_base", "beta_recon_chat", "nu_error",
               "nu_recon",
               "artifact")


@dataclass
class Example:
    value: float
    tokens: list[str]  # the context, decoded token by token
    position: int  # index of the activating token within ``tokens``


@dataclass
class Analysis:
    sources: tuple[str, str]
    tokens: int
    columns: dict[str, np.ndarray]  # CSV_COLUMNS → [L]
    fve: dict[str, float]
    examples: dict[int, list[Example]]  # latent → its max-activating examples (for the report)
    attribution: dict[str, list[dict]]  # class → top tokens by share of that class's firings
    ce_recovered: dict[str, dict] = field(default_factory=dict)  # source → clean/spliced/zero/recovered
    scaling_threshold: float = 0.3
    exclusive_threshold: float = 0.1
    notes: list[str] = field(default_factory=list)
    scaling_skipped: str = ""  # why Latent Scaling did not run (aligned, or unequal widths); "" when it ran
    inference_l0: float = float("nan")  # mean active latents per token and group, encoded as at inference
    cross_fve: dict[str, float] = field(default_factory=dict)  # aligned: "from->to" → FVE of decoding across
    # every latent's top-n activations ([L, n], descending) and the global index of each one's token in
    # the analysed stream (manifest order; -1 = none), saved for per-latent dashboards (dashboard.py)
    top_values: np.ndarray | None = None
    top_index: np.ndarray | None = None
    data_fingerprint: str = ""  # Manifest.fingerprint() of the analysed shards
    trained_steps: int | None = None  # the analysed export's (its config.json), to tell a stale analysis
    export_fingerprint: str = ""  # the analysed export's (export_fingerprint), likewise

    @property
    def classes(self) -> np.ndarray:
        return self.columns["class"]

    def class_counts(self) -> dict[str, int]:
        return {c: int((self.classes == c).sum()) for c in CLASSES}

    def artifact_counts(self) -> dict[str, dict[str, int]]:
        """Per exclusive class: how many latents Latent Scaling flags, by artifact."""
        out = {}
        for cls in ("base_only", "chat_only"):
            art = self.columns["artifact"][self.classes == cls]
            out[cls] = {"latents": int(len(art)),
                        "complete_shrinkage": int(sum("complete_shrinkage" in a for a in art)),
                        "latent_decoupling": int(sum("latent_decoupling" in a for a in art)),
                        "untrained_tokens": int(sum("untrained_tokens" in a for a in art)),
                        "flagged": int(sum(bool(a) for a in art))}
        return out

    def special_token_counts(self) -> dict[str, dict[str, int]]:
        """Per live class: how many latents fire mostly on the tokenizer's special tokens (the chat
        template), and for the exclusive classes how many of those Latent Scaling keeps (not counted
        where it did not run); arXiv 2504.02922 counts chat-only latents this way (40% of its robust
        ones on Gemma 2). Empty without a tokenizer."""
        share = self.columns["special_share"]
        if not np.isfinite(share).any():
            return {}
        mostly = np.nan_to_num(share, nan=0.0) > MOSTLY_SPECIAL
        kept = self.columns["artifact"] == ""
        out = {}
        for cls in ("chat_only", "base_only", "shared"):
            member = self.classes == cls
            out[cls] = {"latents": int(member.sum()), "mostly_special": int((mostly & member).sum())}
            if cls != "shared" and not self.scaling_skipped:  # Latent Scaling looks at exclusive latents only
                out[cls]["kept_mostly_special"] = int((mostly & kept & member).sum())
        return out

    def present_counts(self) -> dict[str, int]:
        """Live latents per set of sources they decode into (``present``), most common first."""
        present = self.columns.get("present")
        if present is None:
            return {}
        sets, counts = np.unique(present[self.classes != "dead"].astype(str), return_counts=True)
        return {str(s): int(c) for s, c in sorted(zip(sets, counts), key=lambda p: -p[1])}

    def summary(self) -> dict:
        return {"sources": list(self.sources), "tokens": self.tokens, "latents": len(self.classes),
                "classes": self.class_counts(), "artifacts": self.artifact_counts(),
                "special_tokens": self.special_token_counts(), "fve": self.fve, "inference_l0": self.inference_l0,
                "cross_fve": self.cross_fve, "present": self.present_counts(),
                "ce_loss_recovered": self.ce_recovered, "attribution": self.attribution,
                "scaling_threshold": self.scaling_threshold, "exclusive_threshold": self.exclusive_threshold,
                "latent_scaling_skipped": self.scaling_skipped, "notes": self.notes,
                "data_fingerprint": self.data_fingerprint, "trained_steps": self.trained_steps,
                "export_fingerprint": self.export_fingerprint}


TOP_FILE = "top_activations.npz"  # the top-n buffers, for dashboard.py


def read_top_activations(run_dir: Path) -> dict[str, np.ndarray]:
    """The analysis's top-n buffers (``values``, ``index``, ``tokens``, ``fingerprint``), read whole;
    an AnalysisError naming the file where it is not the archive :func:`save` wrote."""
    path = Path(run_dir) / "analysis" / TOP_FILE
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in ("values", "index", "tokens", "fingerprint")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise AnalysisError(f"{path}: not a readable top-activations archive ({type(error).__name__}: {error}); "
                            f"`crosscoder analyze {run_dir}` writes it again") from None
MOSTLY_SPECIAL = 0.5  # "fires mostly on special tokens": more than this share of a latent's firings


def untrained_token_labels(cls: np.ndarray, special_share: np.ndarray, artifact: np.ndarray,
                           share: float = MOSTLY_SPECIAL) -> np.ndarray:
    """``artifact`` with ``untrained_tokens`` added to every base-only latent that fires mostly
    (> ``share`` of its firings) on the tokenizer's special tokens.

    Why base-only: a base model never trained the chat template's tokens, so its activations there
    come from untrained embeddings, and a latent that explains them has no counterpart in the chat
    model — an artifact of the vocabulary, not a concept the fine-tune removed. Chat-only latents on
    those tokens are left alone: dialogue format is one of the things chat tuning genuinely adds.
    """
    out = artifact.copy()
    hit = (cls == "base_only") & (np.nan_to_num(special_share, nan=0.0) > share)
    for i in np.flatnonzero(hit):
        out[i] = "+".join(filter(None, [out[i], "untrained_tokens"]))
    return out


def class_names(sources: tuple[str, str] | list[str]) -> dict[str, str]:
    """How the pairwise classes are named: by the two compared sources (base/chat only when they are
    called that), since a cross-layer run compares layers, not models."""
    first, second = sources
    return {"shared": "shared", "base_only": f"{first}-only", "chat_only": f"{second}-only", "dead": "dead"}


def classify(rel_norm: np.ndarray, frequency: np.ndarray, threshold: float) -> np.ndarray:
    """shared / base_only / chat_only from the relative norm; dead where a latent never fired."""
    cls = np.where(rel_norm < threshold, "base_only", np.where(rel_norm > 1 - threshold, "chat_only", "shared"))
    return np.where(frequency == 0, "dead", cls).astype(object)


def _source_pair(model: CrossCoder, names: list[str], infos: list[SourceInfo]) -> tuple[int, int]:
    """The compared pair: ``analyze.sources``, or by default the first source and the first of
    another model at its hook (base and chat at one layer when both models are read at several),
    else the first of another model, else the first two (one model's layers)."""
    sources = model.spec.sources
    if len(sources) < 2:
        raise AnalysisError(f"model diffing compares two sources; this crosscoder has only {sources}")
    if not names:
        first, others = infos[0], list(enumerate(infos))[1:]
        partners = ([i for i, s in others if s.model != first.model and s.hook == first.hook]
                    + [i for i, s in others if s.model != first.model] + [1])
        return 0, partners[0]
    if len(names) != 2 or any(n not in sources for n in names):
        raise AnalysisError(f"analyze.sources must name two of the crosscoder's sources {sources}, got {names}")
    return sources.index(names[0]), sources.index(names[1])


def where_now(root: Root, manifest: Manifest) -> Callable[[str], str]:
    """Where the models and tokenizer ``manifest`` names are now: moved with a local root's folder
    since the harvest wrote it (``relocation.shards_locator``), else where it says."""
    if not root.is_local:
        return str
    return shards_locator(root.path, manifest.extra.get("harvest", {}).get("output"))


class _Decoder:
    """Token ids → text pieces: the harvest's tokenizer when it loads, ``#id`` otherwise."""

    def __init__(self, manifest: Manifest, root: Root):
        self.tokenizer = None
        if "harvest" in manifest.extra and manifest.tokenizer:
            try:
                from .language_models import load_tokenizer

                self.tokenizer = load_tokenizer(where_now(root, manifest)(manifest.tokenizer))
            except Exception:  # noqa: BLE001 - examples fall back to ids; the report says so
                self.tokenizer = None

    def pieces(self, ids) -> list[str]:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return [f"#{i}" for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]


class _TopExamples:
    """Running top-n activations of every latent with the global index of the token."""

    def __init__(self, latents: int, n: int, device: torch.device):
        self.n = n
        self.values = torch.full((latents, n), -math.inf, device=device)
        self.index = torch.full((latents, n), -1, dtype=torch.long, device=device)

    def update(self, f: torch.Tensor, offset: int) -> None:
        take = min(self.n, f.shape[0])
        vals, idx = f.T.topk(take, dim=1)
        values = torch.cat([self.values, vals], 1)
        index = torch.cat([self.index, idx + offset], 1)
        best = values.topk(self.n, dim=1).indices
        self.values, self.index = values.gather(1, best), index.gather(1, best)


@torch.no_grad()
def analyze(model: CrossCoder, root: Root, cfg: AnalyzeConfig, progress: bool = True) -> Analysis:
    """Stream up to ``cfg.tokens`` tokens of ``root`` through ``model`` and compute every statistic,
    on the model's device."""
    manifest = read_manifest(root)
    spec, device = model.spec, model.W_dec.device
    check_compatible(manifest, spec.sources, spec.widths, root.url)
    a, b = _source_pair(model, cfg.sources, manifest.sources)
    slices, scale, scale_vector = spec.slices, spec.scales, spec.scale_vector(device)
    W_dec = model.W_dec.detach()
    dec = [W_dec[:, sl] * scale[s] for s, sl in enumerate(slices)]  # normalised units
    W_dec_normalised = torch.cat(dec, 1)
    rel_norm = relative_decoder_norm(W_dec_normalised, slices, a, b, per_dimension=True).cpu().numpy()
    # every source's share of each latent's decoder norm (per dimension): the latent's profile
    norms = decoder_norms(W_dec_normalised, slices, per_dimension=True).double()
    profile = (norms / norms.sum(1, keepdim=True).clamp_min(1e-12)).cpu().numpy()  # [L, S]
    notes, skipped = [], ""
    if spec.widths[a] == spec.widths[b]:
        cosine = decoder_cosine(W_dec_normalised, slices, a, b).cpu().numpy()
    else:
        cosine = np.full(spec.latents, np.nan)
        skipped = "it needs sources of equal width"
        notes.append("decoder cosine and Latent Scaling need sources of equal width; left empty")
    exclusive = (rel_norm < cfg.exclusive_threshold) | (rel_norm > 1 - cfg.exclusive_threshold)
    candidates = torch.from_numpy(np.flatnonzero(exclusive)).to(device)
    scaling = None
    if spec.arch != "acausal":
        skipped = "it needs one shared latent space (acausal)"
        notes.append("Latent Scaling needs one shared latent space (acausal); the aligned variant has one per source")
    elif spec.widths[a] == spec.widths[b] and len(candidates):
        owner = torch.from_numpy((rel_norm[np.flatnonzero(exclusive)] > 0.5).astype(np.int64)).to(device)
        scaling = LatentScaling((dec[a], dec[b]), candidates, owner)

    L = spec.latents
    decoder = _Decoder(manifest, root)
    special_ids = np.array(sorted(decoder.tokenizer.all_special_ids), dtype=np.int64) if decoder.tokenizer else None
    special_count = torch.zeros(L, dtype=torch.float64, device=device)
    count = torch.zeros(L, dtype=torch.float64, device=device)
    act_sum = torch.zeros(L, dtype=torch.float64, device=device)
    active = torch.zeros((), dtype=torch.float64, device=device)
    fired_shown = torch.zeros(L, dtype=torch.float64, device=device)  # firings outside chunk starts
    excluded = [0]  # chunk-start positions left out of the examples and token statistics
    top = _TopExamples(L, cfg.top_examples, device)
    fve_stream = StreamingFVE(slices, device)
    # aligned: each source's code decoded into every source (cross-layer mapping), FVE per (from, to)
    cross = [StreamingFVE(slices, device) for _ in spec.sources] if spec.arch == "aligned" else []
    token_ids: list[np.ndarray] = []
    sample_of: list[np.ndarray] = []
    budget = min(cfg.tokens, manifest.tokens) if cfg.tokens > 0 else manifest.tokens
    bar = progress_bar(total=budget, desc="analyze", unit="tok", disable=not progress, unit_scale=True)
    seen, n_samples = 0, 0
    pending: list[np.ndarray] = []
    pending_ids: list[np.ndarray] = []
    # class membership of each latent is known from the weights, except dead (known at the end)
    static_class = classify(rel_norm, np.ones(L), cfg.exclusive_threshold)
    fires_by_token = {c: np.zeros(0, dtype=np.int64) for c in ("shared", "base_only", "chat_only")}
    masks = {c: torch.from_numpy(static_class == c).to(device) for c in fires_by_token}

    def flush():
        nonlocal seen
        acts = np.concatenate(pending)
        ids = np.concatenate(pending_ids)
        # the first stored position of every chunk: an attention sink with a few times the usual norm,
        # left out of the examples and token statistics unless analyze.chunk_starts
        starts = np.zeros(len(ids), dtype=bool)
        starts[np.cumsum([0] + [len(p) for p in pending_ids[:-1]])] = not cfg.chunk_starts
        shown = torch.from_numpy(~starts).to(device)
        x = torch.from_numpy(acts).to(device).float()
        if not torch.isfinite(x).all():
            raise AnalysisError(f"{root.url}: non-finite activations among tokens {seen}..{seen + len(x)}")
        f_groups = model.encode(x)
        x_hat = model.decode(f_groups)
        f = f_groups.amax(1)  # acausal: the one group; aligned: a latent is active if active in any source
        xn, xhn = x * scale_vector, x_hat * scale_vector  # normalised units
        fve_stream.update(xn, xhn)
        for s, stream in enumerate(cross):
            stream.update(xn, model.decode_group(f_groups[:, s]) * scale_vector)
        fired = f > 0
        active.add_((f_groups > 0).sum().double())
        count.add_(fired.sum(0).double())
        counted = fired & shown[:, None]  # the token statistics and examples skip chunk starts
        fired_shown.add_(counted.sum(0).double())
        if special_ids is not None:
            special_count.add_(counted[torch.from_numpy(np.isin(ids, special_ids)).to(device)].sum(0).double())
        act_sum.add_(f.sum(0).double())
        top.update(f * shown[:, None], seen)
        excluded[0] += int(starts.sum())
        for c, mask in masks.items():
            per_token = counted[:, mask].sum(1).cpu().numpy()
            grown = np.bincount(ids, weights=per_token, minlength=len(fires_by_token[c])).astype(np.int64)
            grown[: len(fires_by_token[c])] += fires_by_token[c]
            fires_by_token[c] = grown
        if scaling is not None:
            scaling.update((xn[:, slices[a]], xn[:, slices[b]]), (xhn[:, slices[a]], xhn[:, slices[b]]), f)
        seen += len(x)
        bar.update(len(x))
        pending.clear()
        pending_ids.clear()

    for sample in iter_samples(root, manifest):
        waiting = sum(p.shape[0] for p in pending)
        if seen + waiting >= budget:
            break
        room = budget - seen - waiting
        tokens, acts = sample.tokens[:room], sample.acts[:room]
        pending.append(acts)
        pending_ids.append(tokens)
        token_ids.append(tokens)
        sample_of.append(np.full(len(tokens), n_samples, dtype=np.int64))
        n_samples += 1
        if waiting + len(tokens) >= cfg.batch_tokens:
            flush()
    if pending:
        flush()
    bar.close()
    if seen == 0:
        raise AnalysisError(f"{root.url}: no tokens to analyse")

    frequency = (count / seen).cpu().numpy()
    cls = classify(rel_norm, frequency, cfg.exclusive_threshold)
    fired_counts = count.cpu().numpy()
    mean_act = np.where(fired_counts > 0, act_sum.cpu().numpy() / np.maximum(fired_counts, 1), 0.0)
    top.values, top.index = top.values.cpu(), top.index.cpu()
    max_act = top.values[:, 0].clamp_min(0).numpy()
    nan = np.full(L, np.nan)
    shown_counts = fired_shown.cpu().numpy()
    special_share = (np.where(shown_counts > 0, special_count.cpu().numpy() / np.maximum(shown_counts, 1), np.nan)
                     if special_ids is not None else np.full(L, np.nan))
    columns = {"index": np.arange(L), "frequency": frequency, "mean_activation": mean_act, "max_activation": max_act,
               "special_share": special_share, "rel_norm": rel_norm, "cosine": cosine, "class": cls,
               "beta_error_base": nan.copy(), "beta_error_chat": nan.copy(), "beta_recon_base": nan.copy(),
               "beta_recon_chat": nan.copy(), "nu_error": nan.copy(), "nu_recon": nan.copy(),
               "artifact": np.array([""] * L, dtype=object)}
    if scaling is not None:
        r = scaling.result()
        idx = r.latents.numpy()
        chat_owned = scaling.owner.cpu().numpy() == 1
        # "base" = the first compared source, "chat" = the second, whichever owns the latent
        columns["beta_error_base"][idx] = np.where(chat_owned, r.beta_error_other, r.beta_error_owner)
        columns["beta_error_chat"][idx] = np.where(chat_owned, r.beta_error_owner, r.beta_error_other)
        columns["beta_recon_base"][idx] = np.where(chat_owned, r.beta_recon_other, r.beta_recon_owner)
        columns["beta_recon_chat"][idx] = np.where(chat_owned, r.beta_recon_owner, r.beta_recon_other)
        columns["nu_error"][idx] = r.nu_error.numpy()
        columns["nu_recon"][idx] = r.nu_recon.numpy()
        labels = np.array(artifact_labels(r, cfg.scaling_threshold), dtype=object)
        columns["artifact"][idx] = np.where(cls[idx] == "dead", "", labels)

    columns["artifact"] = untrained_token_labels(cls, special_share, columns["artifact"])
    for s, name in enumerate(spec.sources):
        columns[f"norm.{name}"] = profile[:, s]
    holds = profile >= cfg.exclusive_threshold
    columns["present"] = np.array(["+".join(n for n, h in zip(spec.sources, row) if h) for row in holds], dtype=object)
    columns["present"][cls == "dead"] = ""
    cross_fve = {f"{spec.sources[s]}->{spec.sources[t]}": value
                 for s, stream in enumerate(cross) for t, value in enumerate(stream.result().tolist())}
    all_ids = np.concatenate(token_ids)
    sample_index = np.concatenate(sample_of)
    if decoder.tokenizer is None:
        notes.append("token ids shown as #id: the shards name no tokenizer that loads here")
    if excluded[0]:
        notes.append(f"{excluded[0]:,} chunk-start positions (the first stored token of each chunk, an attention sink "
                     "with a few times the usual norm) are left out of the examples, the token attribution and the "
                     "special-token shares; analyze.chunk_starts = true keeps them")
    examples = _examples(cls, top, all_ids, sample_index, decoder, cfg)
    attribution = _attribution(fires_by_token, all_ids, decoder)
    fve = dict(zip(spec.sources, fve_stream.result().tolist()))
    return Analysis(sources=(spec.sources[a], spec.sources[b]), tokens=seen, columns=columns, fve=fve,
                    inference_l0=float(active) / (seen * spec.groups), cross_fve=cross_fve,
                    examples=examples, attribution=attribution, scaling_threshold=cfg.scaling_threshold,
                    exclusive_threshold=cfg.exclusive_threshold, notes=notes, scaling_skipped=skipped,
                    top_values=top.values.numpy(), top_index=top.index.numpy(), data_fingerprint=manifest.fingerprint())


CONTEXT_AFTER = 3  # tokens shown after a max-activating one (``analyze.context`` is the count before)


def context_window(index, start, end, context: int):
    """``[lo, hi)``: the tokens shown around token ``index`` of the document ``[start, end)`` (global
    indices; numbers or arrays of them), ``context`` before it and CONTEXT_AFTER after."""
    return np.maximum(index - context, start), np.minimum(index + CONTEXT_AFTER + 1, end)


def _examples(cls, top: _TopExamples, ids: np.ndarray, sample_index: np.ndarray, decoder: _Decoder,
              cfg: AnalyzeConfig) -> dict[int, list[Example]]:
    """Max-activating examples of the latents the report shows: the most frequent of each class."""
    freq_order = np.argsort(-top.values[:, 0].numpy())
    chosen = []
    for c in ("chat_only", "base_only", "shared"):
        members = [int(i) for i in freq_order if cls[i] == c]
        chosen += members[: cfg.report_latents]
    starts = np.concatenate([[0], np.cumsum(np.bincount(sample_index))])
    out = {}
    for latent in chosen:
        rows = []
        for value, index in zip(top.values[latent].tolist(), top.index[latent].tolist()):
            if index < 0 or value <= 0:
                continue
            start, end = starts[sample_index[index]], starts[sample_index[index] + 1]
            lo, hi = (int(v) for v in context_window(index, start, end, cfg.context))
            rows.append(Example(value, decoder.pieces(ids[lo:hi]), index - lo))
        out[latent] = rows
    return out


def _attribution(fires_by_token: dict[str, np.ndarray], ids: np.ndarray, decoder: _Decoder, top: int = 12):
    """Per class: the tokens its latents fire on most, with lift = share of firings / share of tokens."""
    base = np.bincount(ids)
    out: dict[str, list[dict]] = {}
    for c, fires in fires_by_token.items():
        total = fires.sum()
        if total == 0:
            out[c] = []
            continue
        n = max(len(base), len(fires))
        fires_n = np.pad(fires, (0, n - len(fires)))
        base_n = np.pad(base, (0, n - len(base)))
        order = np.argsort(-fires_n)[:top]
        out[c] = [{"token": decoder.pieces([t])[0], "id": int(t), "share": float(fires_n[t] / total),
                   "lift": float((fires_n[t] / total) / max(base_n[t] / len(ids), 1e-12)), "firings": int(fires_n[t])}
                  for t in order if fires_n[t] > 0]
    return out


def write_latents_csv(analysis: Analysis, path: Path) -> None:
    """CSV_COLUMNS, then per source ``norm.<source>`` (its share of the latent's decoder norm) and
    ``present`` (the sources holding at least exclusive_threshold of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [*CSV_COLUMNS, *(c for c in analysis.columns if c not in CSV_COLUMNS)]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        cols = [analysis.columns[c] for c in names]
        for row in zip(*cols):
            writer.writerow([_fmt(v) for v in row])


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):.6g}"
    return str(v)


def read_latents_csv(path: Path) -> dict[str, np.ndarray]:
    """latents.csv back as columns (numbers as float, NaN where empty; class and artifact as str);
    an AnalysisError naming the file and row where it is not one this module wrote (cut short,
    edited), which ``crosscoder analyze`` writes again."""
    again = f"`crosscoder analyze {Path(path).parent.parent}` writes it again"
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        missing = [c for c in ("index", "class") if c not in (reader.fieldnames or [])]
    if missing:
        raise AnalysisError(f"{path}: not a latents table (no column {', '.join(missing)}); {again}")
    out = {}
    for c in rows[0] if rows else CSV_COLUMNS:
        values = [r[c] for r in rows]
        try:
            out[c] = np.array(values, dtype=object) if c in ("class", "artifact", "present") else \
                np.array([float(v) if v != "" else np.nan for v in values])
        except (TypeError, ValueError):  # a row cut short (None) or a value that is not a number
            row = next(i for i, v in enumerate(values) if not isinstance(v, str) or not _is_number(v))
            what = f" ends before column {c!r}" if values[row] is None else \
                f", column {c!r}: {values[row]!r} is not a number"
            raise AnalysisError(f"{path}: line {row + 2}{what} (the file was cut short or edited); {again}") from None
    return out


def _is_number(text: str) -> bool:
    try:
        float(text or "nan")
        return True
    except ValueError:
        return False


def export_of(run_dir: Path) -> Path:
    """``<run>/crosscoder``, the run's export; an AnalysisError when training has not written it."""
    export = run_dir / "crosscoder"
    if not (export / "model.safetensors").is_file():
        raise AnalysisError(f"{export}: no crosscoder export; train first (crosscoder train --run {run_dir})")
    return export


def export_config(export: Path) -> dict:
    """The export's ``config.json`` (``export``: ``<run>/crosscoder``), {} where there is none; an
    error naming it where it is not a JSON object (the training writes it again)."""
    config = export / "config.json"
    if not config.is_file():
        return {}
    try:
        return read_json_object(config)
    except ValueError as error:
        raise AnalysisError(f"{config}: not a readable export config ({error}); `crosscoder train {export.parent}` "
                            "writes the export again from the last checkpoint") from None


def trained_steps_of(export: Path) -> int | None:
    """The steps the export in ``export`` (``<run>/crosscoder``) was trained for, from its config.json."""
    return export_config(export).get("trained_steps")


def export_fingerprint(export: Path) -> str:
    """A cheap identity of the weights in ``export`` (``<run>/crosscoder``): its ``model.safetensors``'s
    size and 16 slices of 64 KiB spread over it (the header first), hashed; at most 1 MiB read, whatever
    the size. A training to the same step count with other weights (another seed; checkpoints deleted
    and trained again) changes it; a copy does not."""
    path = export / "model.safetensors"
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for part in range(16):
            f.seek(size * part // 16)
            digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def read_summary(run_dir: Path) -> dict:
    """The run's ``analysis/summary.json``, with an error naming it where it is not a JSON object
    (a write cut short before it was written whole and renamed into place, an edit by hand): it is
    derived, and ``crosscoder analyze`` writes it again (``crosscoder run`` does so by itself)."""
    path = Path(run_dir) / "analysis" / "summary.json"
    try:
        return read_json_object(path)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, another JSON value
        raise AnalysisError(f"{path}: not a readable analysis summary ({error}); `crosscoder analyze {run_dir}` "
                            "writes it again") from None


def staleness(run_dir: Path) -> str:
    """Why the run's analysis describes another dictionary than its export, "" when it does not (or
    either is missing): "trained further since" (``crosscoder train`` alone, past the analysed steps)
    or "retrained since" (other weights). Told by what ``summary.json`` recorded of the export (its
    ``trained_steps`` and :func:`export_fingerprint`), so a copied run directory (new file times) is
    not stale; a summary written before those were recorded is stale when older than the export."""
    summary, export = run_dir / "analysis" / "summary.json", run_dir / "crosscoder"
    if not summary.is_file() or not (export / "model.safetensors").is_file():
        return ""
    analysed = read_summary(run_dir)
    steps, now = analysed.get("trained_steps"), trained_steps_of(export)
    if steps is None:
        newer = (export / "model.safetensors").stat().st_mtime > summary.stat().st_mtime
        return "trained further since" if newer else ""
    if now != steps:
        return "trained further since" if now is not None and now > steps else "retrained since"
    fingerprint = analysed.get("export_fingerprint")
    return "retrained since" if fingerprint and fingerprint != export_fingerprint(export) else ""


def is_analysed(run_dir: Path) -> bool:
    """The run's report and summary describe its export as it is now (no :func:`staleness`); the
    summary is written last (``pipeline.analyze_here``), so an analysis stopped half way is not,
    nor one whose summary is unreadable."""
    out = run_dir / "analysis"
    if not ((out / "report.html").is_file() and (out / "summary.json").is_file()
            and (run_dir / "crosscoder" / "model.safetensors").is_file()):
        return False
    try:
        return not staleness(run_dir)
    except AnalysisError:
        return False


def load_for_run(run_dir: Path, data: str, storage, device: torch.device | str = "cpu"
                 ) -> tuple[CrossCoder, Root]:
    """The run's export (on ``device``) and its shard root, with clear errors for what is missing."""
    from .storage import open_root

    model = CrossCoder.from_pretrained(export_of(run_dir), device=device)
    root = open_root(data, storage)
    try:
        read_manifest(root)
    except ShardError as e:
        own = run_dir / "shards"
        hint = (f"; {own} holds shards: `--data {own}` analyses those (was the run directory moved?)"
                if (own / "manifest.json").is_file() and Path(data).absolute() != own.absolute() else "")
        raise AnalysisError(f"cannot analyse {run_dir}: {e}{hint}") from None
    return model, root


def save(analysis: Analysis, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_latents_csv(analysis, out_dir / "latents.csv")
    if analysis.top_values is not None and analysis.top_index is not None:
        np.savez(out_dir / TOP_FILE, values=analysis.top_values.astype(np.float32), index=analysis.top_index,
                 tokens=np.int64(analysis.tokens), fingerprint=np.str_(analysis.data_fingerprint))
    # whole or not there: a re-run reads it to skip the analysis
    replace_text(out_dir / "summary.json", json.dumps(analysis.summary(), indent=2, default=float) + "\n")


@torch.no_grad()
def ce_recovered_for_harvest(model: CrossCoder, root: Root, cfg: AnalyzeConfig, announce: bool = False
                             ) -> dict[str, dict]:
    """CE loss recovered per source on the first ``cfg.ce_sequences`` full-length harvested chunks.

    Each model table of the harvest is loaded once, as the harvest loaded it (path, revision,
    dtype, ``device_map``), on the crosscoder's device; two tables with one path and different
    dtypes are two models. Each chunk is run as the harvest ran it (BOS prepended, unless the
    harvest stored it), every source's activation is read, the crosscoder reconstructs all sources
    from all of them, and each source's reconstruction is spliced into its own model at its own
    hook, one source at a time. The models and tokenizer are read where they are now
    (:func:`where_now`).
    """
    from .ce_recovered import CERecovered, ce_loss_recovered
    from .language_models import ActivationReader, ModelSpec, load_model, load_tokenizer

    manifest = read_manifest(root)
    harvest = manifest.extra.get("harvest")
    if not harvest or cfg.ce_sequences <= 0:
        return {}
    if announce:
        print(f"analyze: CE loss recovered on {cfg.ce_sequences} sequences (loads the models)")
    from .harvest import prefix_token

    locate = where_now(root, manifest)
    token = prefix_token(load_tokenizer(locate(manifest.tokenizer)), harvest.get("prefix", "bos"))
    # run as harvested: a document's first chunk behind the prefix token (before harvest.prefix existed,
    # every chunk); only chunks that were run alike go in one batch, the first chunks when there is a prefix
    prefix = [] if harvest.get("keep_bos") or token is None else [token]
    # full-length chunks, as one batch; when the documents are all shorter than seq_len (short
    # conversations), the first chunks of any length instead, run in batches of equal length
    full: list[np.ndarray] = []
    short: list[np.ndarray] = []
    for sample in iter_samples(root, manifest):
        if not prefix or "prefix" not in harvest or sample.meta.get("chunk", 0) == 0:
            if len(sample.tokens) == manifest.seq_len:
                full.append(sample.tokens)
            elif len(sample.tokens) >= 2 and len(short) < cfg.ce_sequences:
                short.append(sample.tokens)
        if len(full) >= cfg.ce_sequences:
            break
    chunks = full or short
    if not chunks:
        return {}
    device = model.W_dec.device
    start = len(prefix)
    tables = {model_name(m, i): m | {"name": model_name(m, i)} for i, m in enumerate(harvest.get("models", []))}

    def table_of(src) -> dict:  # sources are named <model> or <model>@<hook> (harvest.source_names)
        name = src.name.split("@", 1)[0]
        return tables.get(name) or next((m for m in tables.values() if m["path"] == src.model),
                                        {"name": name, "path": src.model})

    models: dict[str, Any] = {}
    hooks_of: dict[str, list[str]] = {}
    for src in manifest.sources:
        table = table_of(src)
        hooks_of.setdefault(table["name"], []).append(src.hook)
        if table["name"] not in models:
            models[table["name"]] = load_model(ModelSpec(
                name=table["name"], path=locate(table["path"]), revision=src.revision,
                dtype=table.get("dtype", "float32"), device_map=table.get("device_map"),
                max_memory=table.get("max_memory"), device=str(device)))
    by_length: dict[int, list] = {}
    for c in chunks:
        by_length.setdefault(len(c), []).append(c)
    sums = {src.name: np.zeros(3) for src in manifest.sources}  # clean, spliced, zero-ablated × predictions
    predictions = 0
    for group in by_length.values():
        ids = torch.tensor([prefix + c.tolist() for c in group], dtype=torch.long, device=device)
        acts = {}
        for name, hooks in hooks_of.items():
            for hook, a in zip(hooks, ActivationReader(models[name], hooks, name).read(ids)):
                acts[(name, hook)] = a[:, start:].float().to(device)
        B, T = ids.shape[0], ids.shape[1] - start
        x = torch.cat([acts[(table_of(s)["name"], s.hook)].reshape(B * T, -1) for s in manifest.sources], 1)
        x_hat = model.reconstruct(x)
        weight = B * (ids.shape[1] - 1)  # next-token predictions in this batch
        predictions += weight
        for src, sl in zip(manifest.sources, model.spec.slices):
            r = ce_loss_recovered(models[table_of(src)["name"]], ids, src.hook, x_hat[:, sl].reshape(B, T, -1), start)
            sums[src.name] += weight * np.array([r.clean, r.spliced, r.zero_ablated])
    out = {}
    for name, total in sums.items():
        r = CERecovered(*(float(v) for v in total / predictions))
        out[name] = {"clean": r.clean, "spliced": r.spliced, "zero_ablated": r.zero_ablated,
                     "recovered": r.recovered, "sequences": len(chunks)}
    return out
