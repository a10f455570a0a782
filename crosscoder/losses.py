"""Loss terms of crosscoder training: reconstruction, decoder-norm-weighted L1, L0, AuxK, alignment.

Each term is a small function of the model's :class:`ForwardOutput`, so the trainer (one process or
many) composes them and logs every term by name. Conventions:

- reconstruction: squared error summed over all sources' dimensions, mean over tokens (the sum
  over sources of ``‖x_s − x̂_s‖²``, as in Lindsey et al.);
- L1 (``relu`` only): ``Σ_g Σ_i f_gi · w_gi``, mean over tokens, with ``w`` the latent's decoder norm
  summed over the sources it decodes to; its coefficient warms up linearly from 0;
- L0 (``jumprelu`` only, Rajamanoharan et al. 2024): ``Σ_g Σ_i H(pre_gi − θ_gi)``, mean over tokens,
  the number of active latents itself, its gradient reaching the thresholds only (sparsity.py's
  straight-through estimator); warms up like L1. It reads no decoder norm, so, as with BatchTopK,
  the sparsity term gives a latent no reason to shrink its decoder in one source (the Complete
  Shrinkage that the decoder-norm-weighted L1 drives, arXiv 2504.02922);
- AuxK (Gao et al. 2024): the latents that are dead (per the tracker) try to reconstruct the
  residual ``e = x − x̂`` with their own top ``k_aux`` per token; the squared error is normalised by
  the residual's variance and scaled by ``min(#dead / k_aux, 1)``; exactly zero with nothing dead;
- alignment (``aligned`` only): for each pair of sources s<t, ``‖a_s − a_t‖²`` over the latents
  active in either source, where ``a = relu(pre)`` is the code before the sparsity rule; raw and
  averaged over tokens (``mse``) or divided by ``(‖a_s‖² + ‖a_t‖²)/2`` (``normalized``, which a
  shrinking code cannot game). Why not ``‖f_s − f_t‖²`` on the sparse codes: the TopK mask passes
  no gradient to a latent that is off in one source, so that loss can only silence the mismatched
  latent, never switch on its partner. Why not all of ``relu(pre)``: the many small values off the
  support dominate it, and codes that match there still select different latents (measured on
  planted cross-layer data: cross-reconstruction FVE < 0 with either, ≈ own FVE with this one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .collectives import Collectives
from .model import CrossCoder, CrossCoderSpec, ForwardOutput
from .sparse_path import ExtraEntries, SparsePath
from .sparsity import Heaviside, topk_entries


@dataclass
class LossWeights:
    l1: float = 0.0
    l0: float = 0.0
    aux: float = 0.0
    aux_k: int = 1
    align: float = 0.0
    align_loss: str = "normalized"


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    return (x_hat - x).pow(2).sum(-1).mean()


def l1_penalty(model: CrossCoder, out: ForwardOutput) -> Tensor:
    """Σ_i f_i · Σ_s ‖W_dec[s][i]‖, mean over tokens (summed over latent shards)."""
    return model.collectives.sum_partial((out.f * out.weights).sum(dim=(1, 2)).mean())


def l0_penalty(model: CrossCoder, out: ForwardOutput) -> Tensor:
    """Active latents per token, Σ_g Σ_i H(pre − θ), mean over tokens (summed over latent shards);
    its gradient goes to the JumpReLU thresholds only. On the sparse path, over the code's entries:
    every entry off them lies below the window, where H and its estimator are both 0."""
    threshold = model.log_threshold.exp()
    if out.code is not None:
        code = out.code
        pre = out.pre[code.token, code.group, code.latent]
        active = Heaviside.apply(pre, threshold[code.group, code.latent], model.jump_bandwidth)
        return model.collectives.sum_partial(active.sum() / out.pre.shape[0])
    active = Heaviside.apply(out.pre, threshold, model.jump_bandwidth)
    return model.collectives.sum_partial(active.sum(dim=(1, 2)).mean())


def _variance(target: Tensor, model: CrossCoder) -> Tensor:
    """Σ over the global batch of ‖e − mean(e)‖² (a constant: e is detached)."""
    stats = torch.stack([target.sum(0), target.pow(2).sum(0)])
    stats = model.collectives.data_sum(stats.double())
    n = model.collectives.batch_tokens(target.shape[0])
    return (stats[1] - stats[0].pow(2) / n).sum().clamp_min(1e-12).to(target.dtype)


def auxk_loss(model: CrossCoder, x: Tensor, out: ForwardOutput, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK loss; ``dead`` is a bool [G, L] mask of this model's (local) latents.

    Uses ``out.aux_hat`` when the forward decoded AuxK's entries with the main code (the sparse
    kernels, given the same ``dead`` and ``k_aux``); otherwise selects and decodes them here.
    """
    spec = model.spec
    residual = (x - out.x_hat).detach()
    # normalised by the global batch's residual variance; × dp size because data-parallel
    # gradient averaging divides by it (the loss of one rank is its share of the global sum)
    dp = model.collectives.batch_tokens(x.shape[0]) // x.shape[0]

    def term(e_hat: Tensor, target: Tensor, n_dead: int) -> Tensor:
        error = (e_hat - target).pow(2).sum() * dp
        return min(n_dead / k_aux, 1.0) * error / _variance(target, model)

    if out.aux_hat is not None:
        return term(out.aux_hat, residual, out.aux_dead) if out.aux_dead else x.new_zeros(())
    losses = []
    for g in range(spec.groups):
        target = residual if spec.arch == "acausal" else residual[:, spec.slices[g]]
        token, latent, n_dead = auxk_entries(out.pre[:, g].detach(), dead[g], k_aux, model.collectives)
        if n_dead == 0:
            continue
        if out.code is not None:  # sparse path: gradient only into the chosen dead latents
            e_hat = SparsePath.decode(model, SparsePath.code(model, x, out.pre, token, torch.zeros_like(token), latent))
        else:
            chosen = torch.zeros_like(out.pre[:, g], dtype=torch.bool)
            chosen[token, latent] = True
            e_hat = model.decode_group(out.pre[:, g].relu() * chosen, None if spec.arch == "acausal" else g,
                                       bias=False)
        losses.append(term(e_hat, target, n_dead))
    return torch.stack(losses).sum() if losses else x.new_zeros(())


def auxk_entries(pre: Tensor, dead: Tensor, k_aux: int, collectives: Collectives) -> tuple[Tensor, Tensor, int]:
    """AuxK's entries for one group: per token, the ``min(k_aux, #dead)`` largest pre-activations
    among the ``dead`` latents (bool [L]), as (token, latent) sorted by token; and the number of
    dead latents over all latent shards (0: no entries).

    Compiled: :func:`topk_entries` with weight 1 on dead latents and 0 on live ones, i.e. one read
    of ``pre`` and no copy of the dead columns; it ranks ``relu(pre)`` and keeps positive scores
    only, which changes nothing: the chosen values are relu'd, so a non-positive entry would add
    zero and receive no gradient. Otherwise the dead columns are gathered ([B, n_dead]) and searched.
    """
    n_dead = int(collectives.sum_count(dead.sum().to(torch.long)))
    empty = torch.zeros(0, dtype=torch.long, device=pre.device)
    if n_dead == 0:
        return empty, empty, 0
    k = min(k_aux, n_dead)
    flat = topk_entries(pre, dead.to(pre.dtype), k, collectives)
    if flat is not None:
        return flat // pre.shape[1], flat % pre.shape[1], n_dead
    dead_idx = dead.nonzero().squeeze(1)
    if len(dead_idx) == 0:  # dead latents only on other shards: take part in the global k-th search
        collectives.kth_largest_rows(pre.new_full((len(pre), 1), -torch.inf), k)
        return empty, empty, n_dead
    sub = pre.index_select(1, dead_idx)
    kth = collectives.kth_largest_rows(sub, k)
    token, column = (sub >= kth).nonzero(as_tuple=True)
    return token, dead_idx[column], n_dead


def default_aux_k(spec: CrossCoderSpec) -> int:
    """Half the input width a group decodes to, as in Gao et al. 2024's AuxK."""
    width = spec.width if spec.arch == "acausal" else max(spec.widths)
    return max(1, math.ceil(width / 2))


def alignment_loss(a: Tensor, active: Tensor, kind: str = "normalized", reduce=lambda t: t) -> Tensor:
    """Mean over source pairs of the distance between their pre-sparsity codes ``a`` [B, S, L],
    counted where either source's sparse code is ``active`` [B, S, L]; ``reduce`` sums a partial
    sum over latent shards."""
    S = a.shape[1]
    if S < 2:
        return a.new_zeros(())
    terms = []
    for s in range(S):
        for t in range(s + 1, S):
            union = active[:, s] | active[:, t]
            a_s, a_t = a[:, s] * union, a[:, t] * union
            diff = reduce((a_s - a_t).pow(2).sum())
            if kind == "normalized":
                diff = diff / (reduce(a_s.pow(2).sum() + a_t.pow(2).sum()) / 2).clamp_min(1e-12)
            elif kind == "mse":
                diff = diff / a.shape[0]
            else:
                raise ValueError(f"align_loss must be mse or normalized, got {kind!r}")
            terms.append(diff)
    return torch.stack(terms).mean()


def total_loss(
    model: CrossCoder, x: Tensor, out: ForwardOutput, dead: Tensor | None, w: LossWeights
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training objective and each of its terms (detached, for logging)."""
    terms = {"mse": reconstruction_loss(x, out.x_hat)}
    loss = terms["mse"]
    if model.spec.activation == "relu":
        terms["l1"] = l1_penalty(model, out)
        loss = loss + w.l1 * terms["l1"]
    if model.spec.activation == "jumprelu":
        terms["l0"] = l0_penalty(model, out)
        loss = loss + w.l0 * terms["l0"]
    if w.aux > 0 and dead is not None:
        terms["auxk"] = auxk_loss(model, x, out, dead, w.aux_k)
        loss = loss + w.aux * terms["auxk"]
    if model.spec.arch == "aligned":
        terms["align"] = alignment_loss(out.pre.relu(), out.f != 0, w.align_loss, model.collectives.sum_partial)
        loss = loss + w.align * terms["align"]
    terms = {k: v.detach() for k, v in terms.items()}
    terms["total"] = loss.detach()
    return loss, terms


def forward_and_loss(
    model: CrossCoder, x: Tensor, dead: Tensor | None, w: LossWeights
) -> tuple[ForwardOutput, Tensor, dict[str, Tensor]]:
    """One training forward and its loss. With AuxK on, the forward is given AuxK's entries, so the
    sparse path decodes them with the main code (sparse_path.py)."""
    out = model(x, auxk_selector(model, dead, w.aux_k) if w.aux > 0 and dead is not None else None)
    loss, terms = total_loss(model, x, out, dead, w)
    return out, loss, terms


def auxk_selector(model: CrossCoder, dead: Tensor, k_aux: int) -> ExtraEntries:
    """AuxK's entries as the sparse path asks for them (``pre`` → entries), to decode with the main code."""
    return lambda pre: auxk_entries(pre, dead[0], k_aux, model.collectives)
