"""Sparsity rules (relu, per-token TopK, BatchTopK) and the selection primitives they rest on.

Why it looks like this: every k-sparse rule here is written as "find the k-th largest score, keep
what is at or above it". The k-th largest value is the only thing that must be known globally, so a
latent-sharded or data-parallel trainer replaces :class:`Selection` with one whose
``kth_largest_*`` gathers each shard's *local candidates* (its own top-k values) and takes the k-th
largest of those: the bytes exchanged grow with ``k·B``, never with the dictionary size ``L``.
The model stays a plain single-process module; parallelism is applied from outside by swapping
this object (and :class:`Selection.sum_partial` for the decoder's partial sums).

Scores are ``relu(pre) · w`` with ``w`` the latent's decoder norm (summed over the sources the
latent decodes to). Selecting on the score instead of the raw activation makes the rule invariant
to moving scale between a latent's encoder and decoder, as in the BatchTopK crosscoder of
arXiv 2504.02922. The cost: the decoder norms are computed once per step (one read of ``W_dec``).

Ties at the k-th value are all kept, so with exactly repeated scores (practically only exact
zeros, which are never kept) a rule may keep more than k; continuous activations never tie.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native

ACTIVATIONS = ("relu", "topk", "batchtopk")


class Selection:
    """Global views needed by sparse selection; this default sees one whole dictionary and batch."""

    def kth_largest_rows(self, values: Tensor, k: int) -> Tensor:
        """Per row of ``values`` [R, n_local], the k-th largest over all latent shards: [R, 1]."""
        k = min(k, values.shape[-1])
        return torch.topk(values, k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values

    def kth_largest_batch(self, values: Tensor, k: int, hint: float | None = None) -> Tensor:
        """The k-th largest of ``values`` (any shape) over all shards and data-parallel ranks: scalar.

        ``hint``, a value believed to be at most the answer (e.g. a fraction of the previous batch's),
        lets the search look only at the values ≥ hint: exact whenever at least k values are ≥ hint
        (then the k-th largest is one of them), and it falls back to the whole tensor otherwise.
        """
        flat = values.reshape(-1)
        k = min(k, flat.numel())
        if hint is not None and hint > 0:
            above = flat.ge(hint)
            count = int(above.sum())
            if count >= k:
                candidates = flat[above]  # boolean indexing: ~10× faster than masked_select on CPU
                return torch.kthvalue(candidates, count - k + 1).values
        # k-th largest = (n-k+1)-th smallest; kthvalue is a selection, cheaper than a sort
        return torch.kthvalue(flat, flat.numel() - k + 1).values

    def sum_partial(self, partial: Tensor) -> Tensor:
        """Sum of partial decoder outputs over latent shards (identity in one process)."""
        return partial

    def sum_count(self, value: Tensor) -> Tensor:
        """Sum of a statistic over latent shards (identity in one process)."""
        return value

    def batch_tokens(self, local_tokens: int) -> int:
        """Tokens in the global batch (data-parallel ranks included)."""
        return local_tokens

    def data_sum(self, value: Tensor) -> Tensor:
        """Sum of a constant (no gradient) over data-parallel ranks (identity in one process)."""
        return value


LOCAL = Selection()


def scores(pre: Tensor, weights: Tensor) -> Tensor:
    """Selection scores ``relu(pre) · w``: pre [B, G, L], weights [G, L]."""
    return pre.clamp_min(0).mul_(weights)


def topk_mask(score: Tensor, k: int, selection: Selection) -> Tensor:
    """Per token and group, keep the k largest scores. score [B, G, L] → bool mask."""
    B, G, L = score.shape
    kth = selection.kth_largest_rows(score.reshape(B * G, L), k).reshape(B, G, 1)
    return (score >= kth) & (score > 0)


def batchtopk_mask(score: Tensor, k: int, selection: Selection, hints: list[float] | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Per group, keep the ``k · B_global`` largest scores of the whole batch.

    Returns the mask [B, G, L] and the k·B-th score of each group [G] (the batch threshold, which
    training averages into the inference threshold). ``hints`` (per group, a lower guess of the
    threshold) only make the search faster; the result does not depend on them.
    """
    B, G, _ = score.shape
    n_keep = k * selection.batch_tokens(B)
    kth = torch.stack([selection.kth_largest_batch(score[:, g], n_keep, hints[g] if hints else None)
                       for g in range(G)])
    if bool((kth > 0).all()):  # then score ≥ kth implies score > 0: one comparison pass
        return score >= kth.view(1, G, 1), kth
    return (score >= kth.view(1, G, 1)) & (score > 0), kth


def batchtopk_entries(pre: Tensor, weights: Tensor, k: int, selection: Selection, hint: float | None
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
    n_keep = k * selection.batch_tokens(pre.shape[0])
    found = native.scores_at_least(pre, weights, hint) if hint is not None and hint > 0 else None
    if found is None or found[1].numel() < n_keep:  # no hint, or the threshold fell below it
        hint = float(native.row_topk_scores(pre, weights, min(k, pre.shape[-1])).min())
        found = native.scores_at_least(pre, weights, hint) if hint > 0 else None
    if found is None or found[1].numel() < n_keep:
        return None
    flat, score = found
    kth = selection.kth_largest_batch(score, n_keep)
    return flat[score >= kth], kth


def topk_entries(pre: Tensor, weights: Tensor, k: int, selection: Selection) -> Tensor | None:
    """Per-token TopK for one group as its kept entries (flat indices into pre [B, L], row-major),
    through the compiled kernels; None when they cannot run (then use :func:`topk_mask`). Same
    result as ``topk_mask``: each rank's own top-k scores per row are its candidates."""
    if not native.usable(pre):
        return None
    local = native.row_topk_scores(pre, weights, min(k, pre.shape[-1]))
    kth = selection.kth_largest_rows(local, k)
    return native.scores_at_least(pre, weights, kth.reshape(-1))[0]


def auxk_entries(pre: Tensor, dead: Tensor, k_aux: int, selection: Selection) -> tuple[Tensor, Tensor, int]:
    """AuxK's entries for one group: per token, the ``min(k_aux, #dead)`` largest pre-activations
    among the ``dead`` latents (bool [L]), as (token, latent) sorted by token; and the number of
    dead latents over all latent shards (0: no entries).

    Compiled: :func:`topk_entries` with weight 1 on dead latents and 0 on live ones, i.e. one read
    of ``pre`` and no copy of the dead columns; it ranks ``relu(pre)`` and keeps positive scores
    only, which changes nothing: the chosen values are relu'd, so a non-positive entry would add
    zero and receive no gradient. Otherwise the dead columns are gathered ([B, n_dead]) and searched.
    """
    n_dead = int(selection.sum_count(dead.sum().to(torch.long)))
    empty = torch.zeros(0, dtype=torch.long, device=pre.device)
    if n_dead == 0:
        return empty, empty, 0
    k = min(k_aux, n_dead)
    flat = topk_entries(pre, dead.to(pre.dtype), k, selection)
    if flat is not None:
        return flat // pre.shape[1], flat % pre.shape[1], n_dead
    dead_idx = dead.nonzero().squeeze(1)
    if len(dead_idx) == 0:  # dead latents only on other shards: take part in the global k-th search
        selection.kth_largest_rows(pre.new_full((len(pre), 1), -torch.inf), k)
        return empty, empty, n_dead
    sub = pre.index_select(1, dead_idx)
    kth = selection.kth_largest_rows(sub, k)
    token, column = (sub >= kth).nonzero(as_tuple=True)
    return token, dead_idx[column], n_dead


def threshold_mask(pre: Tensor, threshold: Tensor) -> Tensor:
    """Inference rule of BatchTopK: a latent fires when its pre-activation exceeds its threshold."""
    return (pre > threshold) & (pre > 0)
