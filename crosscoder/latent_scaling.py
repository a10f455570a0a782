"""Latent Scaling (Minder, Dumas et al., arXiv 2504.02922): is a "chat-only" latent really absent
from the base model?

A crosscoder trained with an L1 penalty can call a latent chat-only (its base decoder row has norm
~0) although its concept is present in the base model, in two ways:

- *Complete Shrinkage*: the base decoder row shrank to zero, so the base model's **error**
  ``x_base − x̂_base`` still holds the concept;
- *Latent Decoupling*: the concept is reconstructed in the base model by **other** latents, so the
  base **reconstruction** ``x̂_base`` holds it.

For latent ``j`` with direction ``d`` (its decoder row in the model that owns it) and activation
``f_j``, the least-squares scalar that best explains a target ``y`` by ``β f_j d`` is::

    β = Σ_t f_j(t) ⟨d, y(t)⟩ / (‖d‖² Σ_t f_j(t)²)

computed once for the other model and once for the owner, on two targets each:

- error: ``y = x_m − x̂_m + f_j W_dec[m][j]`` (what the rest of the dictionary leaves unexplained in
  model ``m``, with the latent's own contribution put back);
- reconstruction: ``y = x̂_m − f_j W_dec[m][j]`` in the other model (what the *other* latents
  reconstruct) and ``y = x̂_owner`` in the owner (the reference scale, ≈ 1 for a well-fitted latent).

The ratios ``ν_ε = β_ε(other) / β_ε(owner)`` and ``ν_r = β_r(other) / β_r(owner)`` are ≈ 0 for a
latent that is really exclusive and ≈ 1 when the other model carries the concept as strongly. A
high ``ν_ε`` flags Complete Shrinkage, a high ``ν_r`` Latent Decoupling.

Everything is accumulated in sums over streamed batches (float64), so any number of tokens can be
used at the memory cost of a few numbers per candidate latent. The cost: one extra ``[B, d] × [d, C]``
product per model and batch for ``C`` candidate latents. Only sources of equal width can be
compared (the direction of one model is applied to the other's activations). Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ScalingResult:
    """Per candidate latent: the four betas and the two ratios (NaN where a latent never fired)."""

    latents: Tensor  # [C] latent indices
    beta_error_other: Tensor
    beta_error_owner: Tensor
    beta_recon_other: Tensor
    beta_recon_owner: Tensor

    @property
    def nu_error(self) -> Tensor:
        return self.beta_error_other / self.beta_error_owner

    @property
    def nu_recon(self) -> Tensor:
        return self.beta_recon_other / self.beta_recon_owner


class LatentScaling:
    """Streaming least-squares betas for candidate latents of a two-source crosscoder.

    ``decoders`` are the two sources' decoder matrices [L, d] (in the units of ``x``), ``latents``
    the candidate indices and ``owner`` (0 or 1, per candidate) the source each candidate is
    exclusive to.
    """

    def __init__(self, decoders: tuple[Tensor, Tensor], latents: Tensor, owner: Tensor):
        if decoders[0].shape != decoders[1].shape:
            raise ValueError(
                f"Latent Scaling needs two sources of equal width, got decoders {tuple(decoders[0].shape)} "
                f"and {tuple(decoders[1].shape)}"
            )
        self.latents = latents.long()
        self.owner = owner.long()
        rows = [dec[self.latents].double() for dec in decoders]  # per model [C, d]
        self.direction = torch.where(self.owner[:, None] == 0, rows[0], rows[1])  # [C, d]
        self.norm_sq = self.direction.pow(2).sum(1)
        # ⟨W_dec[m][j], d_j⟩: the latent's own contribution along its direction, per model
        self.self_dot = torch.stack([(r * self.direction).sum(1) for r in rows])  # [2, C]
        C, device = len(self.latents), self.direction.device
        self.f_sq = torch.zeros(C, dtype=torch.float64, device=device)
        self.error_num = torch.zeros(2, C, dtype=torch.float64, device=device)
        self.recon_num = torch.zeros(2, C, dtype=torch.float64, device=device)  # other latents only
        self.recon_full_num = torch.zeros(2, C, dtype=torch.float64, device=device)  # the whole reconstruction

    def update(self, x: tuple[Tensor, Tensor], x_hat: tuple[Tensor, Tensor], f: Tensor) -> None:
        """One batch: per model activations ``x[m]`` and reconstructions ``x_hat[m]`` [B, d], and the
        latent activations ``f`` [B, L] (or already restricted to the candidates, [B, C])."""
        fc = (f if f.shape[1] == len(self.latents) else f[:, self.latents]).double()
        self.f_sq += fc.pow(2).sum(0)
        for m in range(2):
            along_x = x[m].double() @ self.direction.T  # [B, C]
            along_xh = x_hat[m].double() @ self.direction.T
            own = fc * self.self_dot[m]
            self.error_num[m] += (fc * (along_x - along_xh + own)).sum(0)
            self.recon_num[m] += (fc * (along_xh - own)).sum(0)
            self.recon_full_num[m] += (fc * along_xh).sum(0)

    def result(self) -> ScalingResult:
        denom = self.norm_sq * self.f_sq
        denom = torch.where(denom > 0, denom, torch.full_like(denom, float("nan")))
        idx = torch.arange(len(self.latents), device=denom.device)
        other = 1 - self.owner
        return ScalingResult(
            latents=self.latents.cpu(),
            beta_error_other=(self.error_num[other, idx] / denom).cpu(),
            beta_error_owner=(self.error_num[self.owner, idx] / denom).cpu(),
            beta_recon_other=(self.recon_num[other, idx] / denom).cpu(),
            beta_recon_owner=(self.recon_full_num[self.owner, idx] / denom).cpu(),
        )


def artifact_labels(result: ScalingResult, threshold: float) -> list[str]:
    """``complete_shrinkage``, ``latent_decoupling``, both (joined by ``+``) or ``""`` per latent."""
    out = []
    for ne, nr in zip(result.nu_error.tolist(), result.nu_recon.tolist()):
        flags = []
        if ne == ne and ne > threshold:
            flags.append("complete_shrinkage")
        if nr == nr and nr > threshold:
            flags.append("latent_decoupling")
        out.append("+".join(flags))
    return out
