"""Exports for other tools: a checkpoint that science-of-finetuning/dictionary_learning's
``BatchTopKCrossCoder.from_pretrained`` loads (the model-diffing toolkit's crosscoders).

Layout (read from that repository at commit 173f7fa, ``dictionary_learning/dictionary.py``; the
package on PyPI, ``dictionary-learning 0.1.0``, has no crosscoder, so it is not installed here): a
torch state dict with ``encoder.weight`` [S, d, L], ``encoder.bias`` [L], ``decoder.weight``
[S, L, d], ``decoder.bias`` [S, d], ``code_normalization_id`` (1 = CROSSCODER: a latent's score is
its activation × the sum over sources of its decoder norms), ``k``, a scalar ``threshold`` on that
score, and the activation normaliser's buffers (``activation_mean``/``activation_std`` NaN = none,
``activation_global_scale`` 1, ``target_rms`` 1). Inputs are ``[B, S, d]``: the sources stacked,
so every source must have the same width.

What does not carry over exactly: our threshold is per latent on the activation; theirs is one
number on the score. After the end-of-training calibration our thresholds are ``t_i = c / w_i``
with ``w_i`` the decoder-norm sum in normalised units, while their score uses the raw decoder norms
``n_i`` (our export folds the normalisation in): a single ``T`` reproduces every ``t_i`` only when
``n_i / w_i`` is the same for all latents (sources with equal normalisation scales). The export
takes ``T`` as the median of ``t_i · n_i`` over live latents and reports how far the per-latent
values spread around it (:class:`ThresholdFit`); the measured agreement on activations is in the
README.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CrosscoderError
from .model import CrossCoder

CROSSCODER_CODE_NORMALIZATION = 1  # dictionary_learning's CodeNormalization.CROSSCODER


class ExportError(CrosscoderError, ValueError):
    """The crosscoder cannot be written in the asked format; the message says why."""


@dataclass
class ThresholdFit:
    threshold: float  # the scalar written
    relative_spread: float  # median |t_i·n_i − T| / T over live latents: 0 when one number is exact
    max_relative_error: float


def dictionary_learning_state(model: CrossCoder) -> tuple[dict[str, torch.Tensor], ThresholdFit]:
    """The state dict ``BatchTopKCrossCoder.from_pretrained`` loads, and how well its scalar threshold
    fits; ``model`` as :meth:`CrossCoder.from_pretrained` loads an export (raw activation units)."""
    spec = model.spec
    if spec.arch != "acausal" or spec.activation not in ("batchtopk", "topk"):
        raise ExportError(f"dictionary_learning's BatchTopKCrossCoder is an acausal BatchTopK crosscoder; this one "
                          f"is {spec.arch} {spec.activation}")
    if len(set(spec.widths)) != 1:
        raise ExportError(f"dictionary_learning stacks the sources as [B, S, d]: they need one width, not "
                          f"{spec.widths}")
    tensors = model.export_tensors([1.0] * spec.n_sources)  # already raw: the export folded the scales in
    S, d, L = spec.n_sources, spec.widths[0], spec.latents
    W_dec = torch.stack([tensors[f"W_dec.{s}"] for s in spec.sources])  # [S, L, d], raw units
    score_weight = W_dec.norm(dim=2).sum(0)  # what their CROSSCODER code normalisation multiplies by
    per_latent = tensors["threshold"] * score_weight
    live = per_latent[torch.isfinite(per_latent) & (per_latent > 0)]
    T = float(live.median()) if len(live) else 0.0
    error = (live - T).abs() / max(T, 1e-30)
    fit = ThresholdFit(T, float(error.median()) if len(live) else 0.0, float(error.max()) if len(live) else 0.0)
    state = {
        "encoder.weight": torch.stack([tensors[f"W_enc.{s}"] for s in spec.sources]).contiguous(),  # [S, d, L]
        "encoder.bias": tensors["b_enc"].contiguous(),
        "decoder.weight": W_dec.contiguous(),
        "decoder.bias": torch.stack([tensors[f"b_dec.{s}"] for s in spec.sources]).contiguous(),
        "code_normalization_id": torch.tensor(CROSSCODER_CODE_NORMALIZATION),
        "k": torch.tensor(spec.k, dtype=torch.int),
        "threshold": torch.tensor(T, dtype=torch.float32),
        "target_rms": torch.tensor(1.0),
        "activation_mean": torch.full((S, d), float("nan")),
        "activation_std": torch.full((S, d), float("nan")),
        "activation_global_scale": torch.ones(S),
    }
    assert state["encoder.weight"].shape == (S, d, L)
    return state, fit


def export_dictionary_learning(export_dir: str | Path, out: str | Path) -> ThresholdFit:
    """Write ``out`` (a ``.pt`` state dict) from the crosscoder exported in ``export_dir``."""
    if not (Path(export_dir) / "model.safetensors").is_file():  # a local run's: never looked up on the Hub
        raise ExportError(f"{export_dir}: no crosscoder export; train the run first")
    state, fit = dictionary_learning_state(CrossCoder.from_pretrained(export_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return fit
