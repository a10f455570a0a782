"""Sparsity rules (relu, per-token TopK, BatchTopK, JumpReLU) and the selection primitives they rest on.

Why it looks like this: every k-sparse rule here is written as "find the k-th largest score, keep
what is at or above it". The k-th largest value is the only thing that must be known globally, so
it is asked of :class:`~crosscoder.collectives.Collectives`, which in a latent-sharded or
data-parallel run gathers each shard's *local candidates* (its own top-k values) and takes the k-th
largest of those: the bytes exchanged grow with ``k·B``, never with the dictionary size ``L``.

Scores are ``relu(pre) · w`` with ``w`` the latent's decoder norm (summed over the sources the
latent decodes to). Selecting on the score instead of the raw activation makes the rule invariant
to moving scale between a latent's encoder and decoder, as in the BatchTopK crosscoder of
arXiv 2504.02922. The cost: the decoder norms are computed once per step (one read of ``W_dec``).

Ties at the k-th value are all kept, so with exactly repeated scores (practically only exact
zeros, which are never kept) a rule may keep more than k; continuous activations never tie.

JumpReLU (Rajamanoharan et al. 2024, arXiv 2407.14435) is the one rule with no k: each latent has a
learned threshold θ_i and ``f_i = pre_i · H(pre_i − θ_i)``, the same rule BatchTopK's inference
applies with its calibrated thresholds (:func:`threshold_mask`), so an export of either is read
alike. The step function has no useful derivative, so θ learns through straight-through
estimators with a rectangle kernel of width ε (the bandwidth): :class:`JumpReLU` passes the
gradient to ``pre`` where the latent fired and gives θ ``−(θ/ε)·K((pre−θ)/ε)``, and
:class:`Heaviside` (the L0 penalty's count of active latents) gives ``pre`` nothing and θ
``−(1/ε)·K((pre−θ)/ε)``, ``K(u) = 1`` for ``|u| < ½``. Only entries with ``pre > θ − ε/2`` (the
fired ones and the kernel's window below θ) take part in either, so the sparse path (sparse_path.py)
trains JumpReLU through those entries alone; the dense math pays one more pass over ``[B, L]`` in the
backward for the window.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native
from .collectives import Collectives

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


def scores(pre: Tensor, weights: Tensor) -> Tensor:
    """Selection scores ``relu(pre) · w``: pre [B, G, L], weights [G, L]."""
    return pre.clamp_min(0).mul_(weights)


def topk_mask(score: Tensor, k: int, collectives: Collectives) -> Tensor:
    """Per token and group, keep the k largest scores. score [B, G, L] → bool mask."""
    B, G, L = score.shape
    kth = collectives.kth_largest_rows(score.reshape(B * G, L), k).reshape(B, G, 1)
    return (score >= kth) & (score > 0)


def batchtopk_mask(score: Tensor, k: int, collectives: Collectives, hints: list[float] | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Per group, keep the ``k · B_global`` largest scores of the whole batch.

    Returns the mask [B, G, L] and the k·B-th score of each group [G] (the batch threshold, which
    training averages into the inference threshold). ``hints`` (per group, a lower guess of the
    threshold) only make the search faster; the result does not depend on them.
    """
    B, G, _ = score.shape
    n_keep = k * collectives.batch_tokens(B)
    kth = torch.stack([collectives.kth_largest_batch(score[:, g], n_keep, hints[g] if hints else None)
                       for g in range(G)])
    if bool((kth > 0).all()):  # then score ≥ kth implies score > 0: one comparison pass
        return score >= kth.view(1, G, 1), kth
    return (score >= kth.view(1, G, 1)) & (score > 0), kth


def batchtopk_entries(pre: Tensor, weights: Tensor, k: int, collectives: Collectives, hint: float | None
                      ) -> tuple[Tensor, Tensor] | None:
    """BatchTopK for one group as its kept entries: (flat indices into pre [B, L], threshold).

    The compiled kernel (native.py) returns the entries whose score reaches ``hint`` in one read of
    ``pre``; the threshold is then found among them, and the kept entries are a subset of them. Exact
    whenever this rank has at least ``k·B_global`` entries above the hint: its own top ``k·B_global``
    are then all candidates, and the global threshold is at least this rank's own k-th largest,
    hence at least the hint, on every latent or data shard. Without a hint (the first batch), the
    smallest of the rows' k-th largest scores is one: every row has k scores at or above it, so at
    least ``k·B`` entries reach it; it is also the fallback when too few entries reach the given
    hint (the threshold fell by more than the hint's margin). Returns None (use
    :func:`batchtopk_mask`) without the kernels, or when too few entries reach either.
    """
    if not native.usable(pre):
        return None
    n_keep = k * collectives.batch_tokens(pre.shape[0])
    found = native.scores_at_least(pre, weights, hint) if hint is not None and hint > 0 else None
    if found is None or found[1].numel() < n_keep:  # no hint, or the threshold fell below it
        hint = float(native.row_topk_scores(pre, weights, min(k, pre.shape[-1])).min())
        found = native.scores_at_least(pre, weights, hint) if hint > 0 else None
    if found is None or found[1].numel() < n_keep:
        return None
    flat, score = found
    kth = collectives.kth_largest_batch(score, n_keep)
    return flat[score >= kth], kth


def topk_entries(pre: Tensor, weights: Tensor, k: int, collectives: Collectives) -> Tensor | None:
    """Per-token TopK for one group as its kept entries (flat indices into pre [B, L], row-major),
    through the compiled kernels; None when they cannot run (then use :func:`topk_mask`). Same
    result as ``topk_mask``: each rank's own top-k scores per row are its candidates. One read of
    ``pre`` gives them and the entries that reach this rank's k-th largest; the k-th largest over
    every latent shard is at least that, so the kept entries are among those (on one rank: all)."""
    if not native.usable(pre):
        return None
    local, flat, score = native.row_topk_entries(pre, weights, min(k, pre.shape[-1]))
    kth = collectives.kth_largest_rows(local, k).reshape(-1)
    return flat[score >= kth[flat // pre.shape[-1]]]


def threshold_mask(pre: Tensor, threshold: Tensor) -> Tensor:
    """Inference rule of BatchTopK: a latent fires when its pre-activation exceeds its threshold (and
    0): one comparison with ``max(threshold, 0)``, one pass over ``[B, L]``."""
    return pre > threshold.clamp_min(0)


def count_firing(pre: Tensor, threshold: Tensor) -> Tensor:
    """How many entries :func:`threshold_mask` keeps (int64 scalar): through the compiled kernel on
    CPU (one read of ``pre``, no mask) when both have one dtype, else ``count_nonzero`` of the mask."""
    if pre.dtype == threshold.dtype and native.usable(pre, threshold):
        count = native.count_above(pre.reshape(pre.shape[0], -1), threshold.reshape(-1))
        return torch.tensor(count, dtype=torch.long, device=pre.device)
    return torch.count_nonzero(threshold_mask(pre, threshold))


def _window(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """The rectangle kernel ``K((pre − θ)/ε) / ε`` [B, G, L]."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class JumpReLU(torch.autograd.Function):
    """``pre · H(pre − θ)``: pre [B, G, L] with θ [G, L], or entries pre [N] with their latents' θ [N]
    (the sparse path); θ positive, its gradient straight-through (above)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return torch.where(pre > threshold, pre, 0.0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold * _window(pre, threshold, ctx.bandwidth) * grad).sum_to_size(threshold.shape)
        return grad_pre, grad_threshold, None


class Heaviside(torch.autograd.Function):
    """``H(pre − θ)`` as 0/1 in pre's dtype, shapes as :class:`JumpReLU`'s; θ's gradient
    straight-through (above), none to pre."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        return None, -(_window(pre, threshold, ctx.bandwidth) * grad).sum_to_size(threshold.shape), None
