"""The crosscoder: per-source encoders and decoders around one (or, aligned, several) latent spaces.

A *source* is one (model, hook point) pair with its own width ``d_s``; a token's input is the
concatenation ``x = [x_1; …; x_S]`` of width ``D = Σ d_s``. Parameters are held concatenated,
``W_enc`` [D, L] and ``W_dec`` [L, D], so the acausal encoder is one ``x @ W_enc`` matmul and the
per-source views (``W_enc[s]`` = rows ``off_s:off_s+d_s``, ``W_dec[s]`` = the same columns) cost
nothing. Sources of different widths (models of one family at different sizes) need no padding.

Two architectures share that storage:

- ``acausal`` (Lindsey et al. 2024): ``f = σ(Σ_s x_s W_enc[s] + b_enc)``, ``x̂_s = f W_dec[s] + b_dec[s]``;
- ``aligned``: every source has its own latents ``f_s = σ(x_s W_enc[s] + b_enc[s])`` and decodes
  ``x̂_s = f_s W_dec[s] + b_dec[s]``; an alignment loss (losses.py) pulls the ``f_s`` together so
  that ``D_t(f_s)`` (:meth:`CrossCoder.cross_reconstruct`) maps one source to another.

Internally latents carry a *group* axis: activations are [B, G, L] with G = 1 (acausal) or S
(aligned), so the sparsity rules, the AuxK loss and the dead-latent tracker have one code path.

Initialisation, as the literature found to matter: each latent's decoder row is a random
direction per source with norm ``dec_init_norm`` (Anthropic's crosscoder and TopK SAE work start
decoders small and equal across sources, so no source is preferred at step 0; equal norms put
every latent at relative norm 0.5), and the encoder is the decoder's transpose (Gao et al. 2024:
it avoids early dead latents). For ``aligned``, latent i starts from the same direction in every
source (truncated or padded to the source's width): independent random starts leave the
alignment loss a permutation to find, which gradient descent does not (measured on planted data).
``b_enc`` = 0; ``b_dec`` is set by the trainer to the mean of the first batch.

The model trains on normalised inputs (each source scaled so ``E‖x_s‖ = √d_s``);
:meth:`CrossCoder.save_pretrained` folds the scales into the weights, so an export works on raw
activations, and its thresholds (BatchTopK's calibrated ones, JumpReLU's learned ``exp(log_threshold)``)
are per latent, on ``f``, which the folding leaves unchanged: inference applies either alike.

Nothing here imports Ray, DeepSpeed or torch.distributed: a latent-parallel trainer builds the
model with ``latent_range`` (its slice of the dictionary) and ``collectives`` (the reductions over
shards, collectives.py). Acausal TopK/BatchTopK/JumpReLU training runs through the active entries
only (sparse_path.py), which keeps its own buffers; this module is the math it must equal.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import precision
from .collectives import LOCAL, Collectives
from .errors import ExportUnreadable
from .metrics import decoder_norms
from .sparse_path import HINT_MARGIN, ExtraEntries, SparseCode, SparsePath
from .sparsity import ACTIVATIONS, JumpReLU, batchtopk_mask, scores, threshold_mask, topk_mask

ARCHITECTURES = ("acausal", "aligned")


@dataclass
class CrossCoderSpec:
    """What defines a crosscoder's shape and rule; stored as ``config.json`` beside the weights."""

    sources: list[str]
    widths: list[int]
    latents: int
    arch: str = "acausal"
    activation: str = "batchtopk"
    k: int = 32
    norm_scale: list[float] = field(default_factory=list)

    def __post_init__(self):
        if len(self.sources) != len(self.widths) or not self.sources:
            raise ValueError(f"need one width per source, got sources={self.sources} widths={self.widths}")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"source names must be unique: {self.sources}")
        if any(int(w) <= 0 for w in self.widths):
            raise ValueError(f"source widths must be positive: {self.widths}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.latents <= 0:
            raise ValueError(f"latents must be positive, got {self.latents}")
        if self.activation in ("topk", "batchtopk") and not 0 < self.k <= self.latents:
            raise ValueError(f"k must be in 1..latents ({self.latents}), got {self.k}")
        if self.norm_scale and len(self.norm_scale) != len(self.sources):
            raise ValueError(f"need one norm_scale per source, got {self.norm_scale}")
        self.widths = [int(w) for w in self.widths]

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def width(self) -> int:
        return sum(self.widths)

    @property
    def groups(self) -> int:
        return 1 if self.arch == "acausal" else self.n_sources

    @property
    def scales(self) -> list[float]:
        """Each source's normalisation scale (normalised = raw · scale; 1 where the data has none)."""
        return [float(c) for c in self.norm_scale] or [1.0] * self.n_sources

    def scale_vector(self, device: torch.device | str | None = None) -> Tensor:
        """[D]: each source's scale repeated over its width."""
        return torch.tensor(self.scales, device=device).repeat_interleave(torch.tensor(self.widths, device=device))

    @property
    def slices(self) -> list[slice]:
        out, start = [], 0
        for w in self.widths:
            out.append(slice(start, start + w))
            start += w
        return out


@dataclass
class ForwardOutput:
    """What one forward pass produced. ``f`` is dense for the ``relu`` rule and the aligned variant;
    TopK/BatchTopK/JumpReLU acausal codes are kept as their entries (``code``; JumpReLU's also holds
    its estimators' window below θ, at 0) and ``pre`` then has no gradient (see kernels.py)."""

    pre: Tensor  # [B, G, L] pre-activations
    x_hat: Tensor  # [B, D] reconstruction
    weights: Tensor  # [G, L] decoder norms used for selection and L1
    batch_threshold: Tensor | None  # [G] k·B-th score of the batch (batchtopk, training)
    dense_f: Tensor | None = None  # [B, G, L] latent activations, when computed densely
    code: SparseCode | None = None
    # AuxK's reconstruction [B, D] (no bias) from its dead-latent entries, decoded with the main code
    # when ``forward`` was given them (sparse path); the number of dead latents they were chosen among
    aux_hat: Tensor | None = None
    aux_dead: int = 0

    @property
    def f(self) -> Tensor:
        """[B, G, L] latent activations (materialised from the sparse code if needed)."""
        if self.code is not None:
            return self.code.dense()
        assert self.dense_f is not None, "a forward output holds a sparse code or dense activations"
        return self.dense_f

    def fired(self) -> Tensor:
        """bool [G, L]: latents active on at least one token of the batch."""
        return self.code.fired() if self.code is not None else (self.f.detach() != 0).any(0)

    def active_count(self) -> Tensor:
        """Number of non-zero activations in the batch (L0 × tokens × groups)."""
        if self.code is not None:
            return self.code.active_count()
        return (self.f.detach() != 0).sum().float()


def init_parameters(spec: CrossCoderSpec, seed: int, dec_init_norm: float, lo: int, hi: int,
                    device: torch.device | str = "cpu", chunk: int = 65536) -> Tensor:
    """Decoder rows ``lo:hi`` of the full dictionary, as a full run with ``seed`` would make them.

    Rows are drawn on the CPU in fixed chunks from one generator, so a latent shard gets exactly the
    rows a single process would (what makes latent-parallel and single-process runs comparable), on
    any device. Each chunk is shaped (per row) and copied to ``device`` on its own: the host holds one
    chunk, not the dictionary.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    W_dec = torch.empty(hi - lo, spec.width, device=device)
    for start in range(0, hi, chunk):
        stop = min(start + chunk, spec.latents)
        block = torch.randn(stop - start, spec.width, generator=gen, device="cpu")
        if stop > lo:
            first, last = max(lo, start), min(hi, stop)
            W_dec[first - lo : last - lo] = _shaped(spec, block[first - start : last - start], dec_init_norm)
    return W_dec


def _shaped(spec: CrossCoderSpec, rows: Tensor, dec_init_norm: float) -> Tensor:
    """Random decoder rows → initial ones (in place): aligned sources share directions, norms set."""
    if spec.arch == "aligned":
        # every source's latent i starts from the same direction (truncated to the source's width),
        # so the per-source latent spaces start aligned and the alignment loss only has to keep them so
        first = rows[:, : spec.widths[0]]
        for sl, w in zip(spec.slices[1:], spec.widths[1:]):
            own = rows[:, sl][:, first.shape[1]:]
            rows[:, sl] = first[:, :w] if w <= first.shape[1] else torch.cat([first, own], 1)
    for sl in spec.slices:
        rows[:, sl] *= dec_init_norm / rows[:, sl].norm(dim=1, keepdim=True).clamp_min(1e-12)
    return rows


class CrossCoder(nn.Module):
    threshold: Tensor  # buffers, declared for type checkers
    threshold_updates: Tensor

    def __init__(
        self,
        spec: CrossCoderSpec,
        seed: int = 0,
        dec_init_norm: float = 0.1,
        latent_range: tuple[int, int] | None = None,
        collectives: Collectives = LOCAL,
        sparse_kernels: bool = True,
        gradient_memory: bool = True,
        device: torch.device | str = "cpu",
        jump_threshold: float = 0.1,
        jump_bandwidth: float = 1e-3,
        drawn: bool = True,
    ):
        """``collectives``: the reductions over latent shards and data ranks (collectives.py);
        ``sparse_kernels``: train acausal TopK/BatchTopK/JumpReLU through the active entries (sparse_path.py;
        False = this module's dense math, same results); ``gradient_memory``: that path keeps its
        weight gradients' memory across steps (off for ZeRO-2/3); ``device``: where the weights live
        (drawn on the CPU whatever the device, so every device starts from the same dictionary;
        ``meta`` draws nothing); ``jump_threshold``, ``jump_bandwidth``: JumpReLU's initial threshold
        and its straight-through estimators' kernel width (sparsity.py), in units of ``f``; ``drawn``:
        False starts every weight at zero, for a resume whose checkpoint replaces them (the draw on the
        host, about 40 s at a million latents of width 2 × 2304, would be thrown away)."""
        super().__init__()
        self.spec = spec
        lo, hi = latent_range or (0, spec.latents)
        if not 0 <= lo < hi <= spec.latents:
            raise ValueError(f"latent_range {latent_range} outside 0..{spec.latents}")
        self.latent_range = (lo, hi)
        n = hi - lo
        if torch.device(device).type == "meta":  # shapes only: from_tensors fills the weights
            W_dec = torch.empty(n, spec.width, device=device)
        elif not drawn:
            W_dec = torch.zeros(n, spec.width, device=device)
        else:
            W_dec = init_parameters(spec, seed, dec_init_norm, lo, hi, device)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(spec.groups, n, device=device))
        self.b_dec = nn.Parameter(torch.zeros(spec.width, device=device))
        # BatchTopK inference threshold, per latent, in units of f (invariant to normalisation folding)
        self.register_buffer("threshold", torch.zeros(spec.groups, n, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))
        if spec.activation == "jumprelu":  # learned, per latent, as log θ (θ > 0; Adam's steps relative)
            self.log_threshold = nn.Parameter(torch.full((spec.groups, n), math.log(jump_threshold), device=device))
        self.jump_bandwidth = jump_bandwidth
        self.collectives = collectives
        sparse_rule = spec.arch == "acausal" and spec.activation in ("topk", "batchtopk", "jumprelu")
        self.sparse = SparsePath(gradient_memory) if sparse_kernels and sparse_rule else None
        # BatchTopK's threshold search starts at a fraction of the last batch's (per group): faster, same result
        self.kth_hints: list[float] | None = None

    # ----------------------------------------------------------------------------------------
    # pieces

    @property
    def n_latents(self) -> int:
        """Latents held here (the slice's size; parameter shapes may be partitioned by ZeRO-3)."""
        return self.latent_range[1] - self.latent_range[0]

    def decoder_norms(self) -> Tensor:
        """‖W_dec[s][i]‖ for every source s and (local) latent i: [S, L] (metrics.decoder_norms)."""
        return decoder_norms(self.W_dec, self.spec.slices).t()

    def selection_weights(self, norms: Tensor | None = None) -> Tensor:
        """[G, L]: per latent, the decoder norm summed over the sources it decodes to.

        Aligned: the same weight (the mean over sources of latent i's decoder norms) for every
        source's latent i, so that equal codes in two sources are selected alike; with per-source
        weights, codes that the alignment loss made equal were still kept or dropped differently
        (measured: 4% overlap of the active sets on planted cross-layer data).
        """
        norms = self.decoder_norms() if norms is None else norms
        if self.spec.arch == "acausal":
            return norms.sum(0, keepdim=True)
        return norms.mean(0, keepdim=True).expand(self.spec.groups, -1)

    def pre_activations(self, x: Tensor) -> Tensor:
        """[B, D] → [B, G, L]."""
        if self.spec.arch == "acausal":
            # bias fused: one pass over [B, L] (bf16 on a CPU without bf16 GEMM: fp32, see precision.py)
            return precision.addmm(self.b_enc[0], x, self.W_enc).unsqueeze(1)
        return torch.stack(
            [precision.matmul(x[:, sl], self.W_enc[sl]) + self.b_enc[s] for s, sl in enumerate(self.spec.slices)],
            dim=1,
        )

    def select(self, pre: Tensor, weights: Tensor, training: bool) -> tuple[Tensor, Tensor | None]:
        """The k-sparse rules' bool mask [B, G, L] of active latents (and BatchTopK's batch threshold)."""
        act = self.spec.activation
        if act == "topk":
            return topk_mask(scores(pre, weights), self.spec.k, self.collectives), None
        if training:
            mask, kth = batchtopk_mask(scores(pre, weights), self.spec.k, self.collectives, self.kth_hints)
            self.kth_hints = [HINT_MARGIN * float(v) for v in kth.detach()]
            return mask, kth
        return threshold_mask(pre, self.threshold), None

    def inference_threshold(self) -> Tensor:
        """[G, L] thresholds on ``f`` that inference applies: JumpReLU's learned ones, or BatchTopK's
        (running average, then calibrated)."""
        if self.spec.activation == "jumprelu":
            return self.log_threshold.detach().exp()
        return self.threshold

    def activate(self, pre: Tensor, weights: Tensor, training: bool) -> tuple[Tensor, Tensor | None]:
        """Apply the sparsity rule; training BatchTopK selects over the batch, inference thresholds."""
        if self.spec.activation == "relu":
            return pre.relu(), None
        if self.spec.activation == "jumprelu":
            if training:
                return JumpReLU.apply(pre, self.log_threshold.exp(), self.jump_bandwidth), None
            return torch.where(threshold_mask(pre, self.inference_threshold()), pre, 0.0), None
        mask, kth = self.select(pre, weights, training)
        return pre.relu() * mask, kth

    def decode_group(self, f_g: Tensor, target: int | None = None, bias: bool = True) -> Tensor:
        """Decode one group's activations [B, L] into source ``target`` (None: all sources)."""
        if target is None:
            out = self.collectives.sum_partial(precision.matmul(f_g, self.W_dec))
            return out + self.b_dec if bias else out
        sl = self.spec.slices[target]
        out = self.collectives.sum_partial(precision.matmul(f_g, self.W_dec[:, sl]))
        return out + self.b_dec[sl] if bias else out

    def decode(self, f: Tensor) -> Tensor:
        """[B, G, L] → [B, D]."""
        if self.spec.arch == "acausal":
            return self.decode_group(f[:, 0])
        return torch.cat([self.decode_group(f[:, s], s) for s in range(self.spec.n_sources)], dim=1)

    # ----------------------------------------------------------------------------------------
    # public API

    def forward(self, x: Tensor, aux_entries: ExtraEntries | None = None) -> ForwardOutput:
        """Encode and decode ``x`` [B, D]. Acausal TopK/BatchTopK/JumpReLU training runs through the
        sparse path (a JumpReLU step whose code is too dense for it: the dense math), which also
        decodes ``aux_entries`` (AuxK's, losses.py) with the main code; the dense math ignores them
        and the loss computes AuxK on its own."""
        weights = self.selection_weights()
        if self.sparse is not None:
            step = self.sparse.forward(self, x, weights, aux_entries)
            return ForwardOutput(pre=step.pre, x_hat=step.decoded + self.b_dec, weights=weights,
                                 batch_threshold=step.batch_threshold, dense_f=step.dense_f, code=step.code,
                                 aux_hat=step.extra_decoded, aux_dead=step.extra_among)
        pre = self.pre_activations(x)
        f, kth = self.activate(pre, weights, self.training)
        return ForwardOutput(pre=pre, x_hat=self.decode(f), weights=weights, batch_threshold=kth, dense_f=f)

    def train(self, mode: bool = True):
        if not mode and self.sparse is not None:
            self.sparse.release()
        return super().train(mode)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Latent activations [B, G, L] at inference: BatchTopK uses its threshold, so a token's code
        does not depend on the rest of its batch."""
        pre = self.pre_activations(x)
        f, _ = self.activate(pre, self.selection_weights(), training=False)
        return f

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def cross_reconstruct(self, x: Tensor, source: int, target: int) -> Tensor:
        """Aligned: ``D_target(E_source(x_source))`` [B, d_target]; acausal: decode the shared code.
        ``x`` is [B, D], every source side by side, or (aligned) [B, d_source], the read source's
        activations alone: its code reads nothing else, so the other sources are left at zero."""
        widths, width = self.spec.widths, self.spec.width
        if x.shape[-1] != width:
            if self.spec.arch == "acausal":
                raise ValueError(f"the acausal code reads every source: x must be [B, {width}], got {x.shape[-1]} wide")
            if x.shape[-1] != widths[source]:
                raise ValueError(f"x must be one source's activations or every source's: source {source} is "
                                 f"{widths[source]} wide and the sources together {width}; got {x.shape[-1]}")
            whole = x.new_zeros(x.shape[0], width)
            whole[:, self.spec.slices[source]] = x
            x = whole
        f = self.encode(x)
        g = 0 if self.spec.arch == "acausal" else source
        return self.decode_group(f[:, g], target)

    @torch.no_grad()
    def update_threshold(self, batch_threshold: Tensor, weights: Tensor, momentum: float) -> None:
        """Average the batch's k·B-th score into the per-latent inference threshold on f.

        A latent fires in training when ``f_i · w_i ≥ kth``, i.e. ``f_i ≥ kth / w_i``; the running
        mean of that quantity is the threshold :meth:`encode` uses. The mean is an exponential one
        with Adam's bias correction (``threshold`` holds the corrected value): every step's weight
        is ``(1 − m) m^age / (1 − m^t)``, so after t steps the first one weighs ``m^(t−1)`` less than
        with a mean started at the first value. The trainer replaces it at the end by a calibrated
        threshold (:meth:`calibrate_threshold`), which no average of a moving quantity matches.
        """
        current = batch_threshold.view(-1, 1) / weights.clamp_min(1e-12)
        t = self.threshold_updates.to(torch.float64)  # kept on the device: read, it would be a host sync a step
        raw = self.threshold * (1 - momentum**t)  # the uncorrected average of steps 1..t
        self.threshold.copy_((raw * momentum + current * (1 - momentum)) / (1 - momentum ** (t + 1)))
        self.threshold_updates += 1

    @torch.no_grad()
    def calibrate_threshold(self, batches, k: int, max_tokens: int) -> int:
        """Per-latent BatchTopK thresholds from ``batches`` of training inputs: with the final
        weights, the ``k·N``-th largest score over all ``N`` tokens of all the batches (per group)
        is the score a latent must reach, and ``threshold = score / w``: BatchTopK's own rule over
        one large batch, so on those tokens the mean inference L0 is k. Returns N (global).

        ``max_tokens`` bounds N (global, all ranks): every batch keeps its ``k·max_tokens`` largest
        scores as candidates, since the final ``k·N`` largest may all come from one batch (and, under
        latent parallelism, from this rank's latents). Memory: ``k·max_tokens`` floats per group.
        """
        weights = self.selection_weights().float()
        kept: Tensor | None = None  # per group, this shard's k·max_tokens largest scores so far
        tokens = 0
        for x in batches:
            # fp32 scores, as in training's selection; inputs in the weights' dtype (bf16 engines)
            scores = self.pre_activations(x.to(self.W_enc.dtype)).float().clamp_min(0).mul_(weights)  # [B, G, L]
            tokens += self.collectives.batch_tokens(x.shape[0])
            flat = scores.transpose(0, 1).reshape(scores.shape[1], -1)  # [G, B·L]
            both = flat if kept is None else torch.cat([kept, flat], 1)
            kept = both.topk(min(k * max_tokens, both.shape[1]), dim=1, sorted=False).values
        assert kept is not None, "calibration needs at least one batch"
        score = torch.stack([self.collectives.kth_largest_batch(kept[g], k * tokens) for g in range(kept.shape[0])])
        self.threshold.copy_(score.view(-1, 1) / weights.clamp_min(1e-12))
        return tokens

    # ----------------------------------------------------------------------------------------
    # export

    def export_tensors(self, norm_scale: list[float] | None = None) -> dict[str, Tensor]:
        """Named tensors of the export (docs/architecture.md), normalisation folded in (raw activation units)."""
        return {name: make() for name, make in self.export_makers(norm_scale).items()}

    def export_makers(self, norm_scale: list[float] | None = None) -> dict[str, Callable[[], Tensor]]:
        """Per export tensor, a function that makes it (fp32, on the CPU) for this model's latent
        range: a slice's export written one tensor at a time (sliced_export.py)."""
        scale = norm_scale or [1.0] * self.spec.n_sources
        out: dict[str, Callable[[], Tensor]] = {}
        for s, name in enumerate(self.spec.sources):
            for kind in ("W_enc", "W_dec", "b_dec") + (("b_enc", "threshold") if self.spec.arch == "aligned" else ()):
                out[f"{kind}.{name}"] = functools.partial(self._export_piece, kind, s, float(scale[s]))
        if self.spec.arch == "acausal":
            out["b_enc"] = functools.partial(self._export_piece, "b_enc", 0, 1.0)
            out["threshold"] = functools.partial(self._export_piece, "threshold", 0, 1.0)
        return out

    @torch.no_grad()
    def _export_piece(self, kind: str, s: int, scale: float) -> Tensor:
        """One export tensor: ``kind`` of source ``s`` (encoder rows × scale, decoder columns and bias
        ÷ scale), or group ``s``'s encoder bias / threshold; fp32, CPU, contiguous."""
        sl = self.spec.slices[s]
        piece = {"W_enc": lambda: self.W_enc[sl] * scale, "W_dec": lambda: self.W_dec[:, sl] / scale,
                 "b_dec": lambda: self.b_dec[sl] / scale, "b_enc": lambda: self.b_enc[s].clone(),
                 "threshold": lambda: self.inference_threshold()[s].clone()}[kind]()
        return piece.detach().float().cpu().contiguous()

    def save_pretrained(self, directory: str | Path, norm_scale: list[float] | None = None, extra: dict | None = None):
        """Write ``model.safetensors`` and ``config.json``; only meaningful for the full dictionary. A
        model loaded by :meth:`from_pretrained` is written as loaded (its normalisation is folded in
        already, and its config's other keys are kept)."""
        if self.latent_range != (0, self.spec.latents):
            raise ValueError("save_pretrained needs the full dictionary; gather the latent shards first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        scale = list(norm_scale or self.spec.scales)
        loaded = getattr(self, "export_config", None)
        folded = norm_scale is None and loaded is not None and loaded.get("normalization_folded")
        # loaded from an export: the weights are in raw units already; fold nothing, keep its record
        tensors = self.export_tensors([1.0] * self.spec.n_sources if folded else scale)
        partial = directory / "model.safetensors.partial"  # a process killed while writing leaves the last export
        save_file(tensors, str(partial))
        partial.replace(directory / "model.safetensors")
        if folded and loaded is not None:
            extra = {k: v for k, v in loaded.items() if k not in asdict(self.spec)} | (extra or {})
        write_export_config(self.spec, directory, scale, extra)

    @classmethod
    def from_tensors(cls, spec: CrossCoderSpec, tensors: Mapping[str, Tensor],
                     device: torch.device | str = "cpu") -> CrossCoder:
        """A model holding an export's tensors (names as :func:`export_names`), on ``device``. The
        weights are written once, into uninitialised memory: no random dictionary is drawn first."""
        missing = set(export_names(spec)) - set(tensors)
        if missing:
            raise ValueError(f"export is missing tensors: {sorted(missing)}")
        model = cls(spec, device="meta").to_empty(device=device)
        with torch.no_grad():
            for s, (name, sl) in enumerate(zip(spec.sources, spec.slices)):
                model.W_enc[sl] = _checked(tensors, f"W_enc.{name}", (spec.widths[s], spec.latents))
                model.W_dec[:, sl] = _checked(tensors, f"W_dec.{name}", (spec.latents, spec.widths[s]))
                model.b_dec[sl] = _checked(tensors, f"b_dec.{name}", (spec.widths[s],))
                if spec.arch == "aligned":
                    model.b_enc[s] = _checked(tensors, f"b_enc.{name}", (spec.latents,))
                    model.threshold[s] = _checked(tensors, f"threshold.{name}", (spec.latents,))
            if spec.arch == "acausal":
                model.b_enc[0] = _checked(tensors, "b_enc", (spec.latents,))
                model.threshold[0] = _checked(tensors, "threshold", (spec.latents,))
            model.threshold_updates.fill_(1)
            if spec.activation == "jumprelu":
                model.log_threshold.copy_(model.threshold.clamp_min(torch.finfo(model.threshold.dtype).tiny).log())
        return model.eval()

    @classmethod
    def from_pretrained(cls, name: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
                        token: str | bool | None = None, device: torch.device | str = "cpu") -> CrossCoder:
        """Load an export: a directory (``<run>/crosscoder``) or a Hugging Face Hub repo id
        (``owner/name``, at ``revision``; hub.py). It works on raw activations (scales folded in).
        ``device`` (e.g. ``cuda``): the tensors are read from the file straight onto it, one at a time
        (no host copy of the whole file, no random dictionary drawn first: 2.3× faster on the CPU)."""
        directory = Path(name)
        if not directory.exists():
            from .hub import download, is_repo_id

            if not is_repo_id(name):
                raise FileNotFoundError(f"not a crosscoder export: {directory} does not exist (nor is it a "
                                        "Hub repo id)")
            directory = download(str(name), revision=revision, cache_dir=cache_dir, token=token)
        config_path, weights_path = directory / "config.json", directory / "model.safetensors"
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"not a crosscoder export: {p} is missing")
        again = "a run's own export is written again from its last checkpoint by `crosscoder train RUN`"
        try:
            config = json.loads(config_path.read_text())
        except ValueError as error:
            raise ExportUnreadable(f"{config_path}: not an export's config ({error}); {again}") from None
        fields = {k: config[k] for k in ("sources", "widths", "latents", "arch", "activation", "k") if k in config}
        spec = CrossCoderSpec(**fields, norm_scale=config.get("norm_scale", []))
        try:
            weights = safe_open(str(weights_path), framework="pt", device=str(torch.device(device)))
        except SafetensorError as error:
            raise ExportUnreadable(f"{weights_path}: not readable weights ({error}); {again}") from None
        with weights as handle:
            model = cls.from_tensors(spec, _FileTensors(handle), device=device)
        model.export_config = config
        return model

    def push_to_hub(self, repo_id: str, revision: str | None = None, private: bool = False,
                    token: str | bool | None = None) -> str:
        """Upload this (whole) crosscoder with a model card to the Hub (hub.py); the commit's URL."""
        import tempfile

        from .hub import push

        with tempfile.TemporaryDirectory(prefix="crosscoder-export-") as tmp:
            self.save_pretrained(tmp)
            return push(tmp, repo_id, revision=revision, private=private, token=token)


def write_export_config(spec: CrossCoderSpec, directory: Path, scale: list[float], extra: dict | None) -> None:
    """The export's ``config.json``: the spec, the folded normalisation and ``extra``."""
    config = asdict(spec) | {"norm_scale": scale, "normalization_folded": True, "format_version": 1}
    config |= extra or {}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_layout(spec: CrossCoderSpec) -> dict[str, str]:
    """How each export tensor is split over latent ranks: ``columns`` ([d, L]), ``rows`` ([L, d] and
    the per-latent vectors) or ``same`` (the decoder bias, whole on every rank)."""
    kinds = {"W_enc": "columns", "W_dec": "rows", "b_dec": "same", "b_enc": "rows", "threshold": "rows"}
    return {name: kinds[name.split(".")[0]] for name in export_names(spec)}


def export_names(spec: CrossCoderSpec) -> list[str]:
    """Tensor names of an export (docs/architecture.md, "Run directory")."""
    names = [f"{kind}.{src}" for src in spec.sources for kind in ("W_enc", "W_dec", "b_dec")]
    if spec.arch == "aligned":
        return names + [f"{kind}.{src}" for src in spec.sources for kind in ("b_enc", "threshold")]
    return names + ["b_enc", "threshold"]


class _FileTensors(Mapping):
    """An open safetensors file as a mapping whose tensors are read when asked for."""

    def __init__(self, handle):
        self.handle = handle

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.handle.keys():
            raise KeyError(name)
        return self.handle.get_tensor(name)

    def __iter__(self):
        return iter(self.handle.keys())

    def __len__(self) -> int:
        return len(self.handle.keys())


def _checked(tensors: Mapping[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor:
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t
