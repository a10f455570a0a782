"""Training and analysis metrics: per-source FVE, L0, relative decoder norm, decoder cosine.

All functions are pure tensor maths with no state. Per-source metrics take the source slices so
sources of different widths are reported at their own width.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fve_per_source(x: Tensor, x_hat: Tensor, slices: list[slice]) -> Tensor:
    """Fraction of variance explained per source: 1 − Σ‖x_s − x̂_s‖² / Σ‖x_s − mean(x_s)‖²; [S]."""
    out = []
    for sl in slices:
        xs, xh = x[:, sl].float(), x_hat[:, sl].float()
        residual = (xs - xh).pow(2).sum()
        total = (xs - xs.mean(0)).pow(2).sum().clamp_min(1e-12)
        out.append(1 - residual / total)
    return torch.stack(out)


class StreamingFVE:
    """FVE per source over many batches, equal to :func:`fve_per_source` on their concatenation:
    the total variance is taken around each dimension's mean over every token seen, so it keeps
    per-source column sums ([d_s] each) besides the squared error and squared norm. ``device`` has no
    default: the sums must live where the activations do (a CPU default once broke training on CUDA
    at its first step, which no CPU run can show)."""

    def __init__(self, slices: list[slice], device: torch.device | str):
        self.slices = slices
        self.sse = torch.zeros(len(slices), dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(len(slices), dtype=torch.float64, device=device)
        self.column_sums = [torch.zeros(sl.stop - sl.start, dtype=torch.float64, device=device) for sl in slices]
        self.tokens = 0

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        for s, sl in enumerate(self.slices):
            xs = x[:, sl].double()
            self.sse[s] += (xs - x_hat[:, sl].double()).pow(2).sum()
            self.sum_sq[s] += xs.pow(2).sum()
            self.column_sums[s] += xs.sum(0)
        self.tokens += x.shape[0]

    def statistics(self) -> Tensor:
        """The sums so far as one float64 vector (sse [S], squared norms [S], column sums [Σ d_s]), so a
        data-parallel run sums them over ranks in one collective; :meth:`fve_of` reads it back."""
        return torch.cat([self.sse, self.sum_sq, *self.column_sums])

    def fve_of(self, statistics: Tensor, tokens: int) -> Tensor:
        """[S] from :meth:`statistics` (this stream's, or their sum over ranks with ``tokens`` the
        tokens of them all)."""
        S = len(self.slices)
        sse, sum_sq, column_sums = statistics[:S], statistics[S:2 * S], statistics[2 * S:]
        widths = [sl.stop - sl.start for sl in self.slices]
        total = sum_sq - torch.stack([c.pow(2).sum() for c in column_sums.split(widths)]) / tokens
        return 1 - sse / total.clamp_min(1e-12)

    def result(self) -> Tensor:
        """[S] of the tokens this stream saw; needs at least one update."""
        return self.fve_of(self.statistics(), self.tokens)


def decoder_norms(W_dec: Tensor, slices: list[slice], per_dimension: bool = False) -> Tensor:
    """Each latent's decoder norm in each source: [L, S]; ``per_dimension`` divides each by √(the
    source's width). With activations normalised to ``E‖x_s‖ = √d_s``, a direction as strong in two
    sources of different widths has norms in the ratio √(d_b/d_a), and equal norms per dimension.

    Slices of one width that cover ``W_dec``'s columns in order (every source of a model diff): one
    norm over ``W_dec`` as [L, S, d], the same values in half the time of a norm per slice, backward
    included (at L = 64k, d = 256 × 2: 12 → 6 ms, with backward 187 → 88 ms)."""
    widths = [sl.stop - sl.start for sl in slices]
    if len(set(widths)) == 1 and slices == [slice(s * widths[0], (s + 1) * widths[0]) for s in range(len(slices))] \
            and sum(widths) == W_dec.shape[1]:
        norms = W_dec.reshape(W_dec.shape[0], len(slices), widths[0]).norm(dim=2)
        return norms / widths[0] ** 0.5 if per_dimension else norms
    return torch.stack([W_dec[:, sl].norm(dim=1) / ((sl.stop - sl.start) ** 0.5 if per_dimension else 1)
                        for sl in slices], 1)


def relative_decoder_norm(W_dec: Tensor, slices: list[slice], a: int = 0, b: int = 1,
                          per_dimension: bool = False) -> Tensor:
    """Δ_i = n_b / (n_a + n_b) with n_s = ‖W_dec[s][i]‖ (per dimension: / √d_s), in [0, 1]: 0 = only
    source a, 1 = only b."""
    norms = decoder_norms(W_dec, [slices[a], slices[b]], per_dimension)
    return norms[:, 1] / norms.sum(1).clamp_min(1e-12)


def decoder_cosine(W_dec: Tensor, slices: list[slice], a: int = 0, b: int = 1) -> Tensor:
    """Cosine between a latent's decoder rows for sources a and b (same width required): [L]."""
    da, db = W_dec[:, slices[a]], W_dec[:, slices[b]]
    if da.shape[1] != db.shape[1]:
        raise ValueError(
            f"decoder cosine needs sources of equal width, got {da.shape[1]} and {db.shape[1]}"
        )
    return torch.nn.functional.cosine_similarity(da, db, dim=1, eps=1e-12)
