"""CE loss recovered: how much of a model's next-token loss survives when a hooked activation is
replaced by the crosscoder's reconstruction.

FVE measures reconstruction in activation space, where a small error in a direction the model
relies on counts as little as one it ignores. Splicing the reconstruction back into the forward
at the hook point and measuring the language-model loss weighs errors by what they do downstream::

    recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)

1 for a perfect reconstruction, 0 for one as bad as zero-ablating the hooked activation (the
usual reference; mean-ablation is gentler and gives lower numbers). Positions before ``start``
(the BOS that harvests exclude) keep their clean activation, because the crosscoder never saw them.

The ratio means something only when zero-ablation hurts: in a model that barely uses the hooked
activation (an untrained one, or a layer the loss does not depend on) the gap ``CE_zero − CE_clean``
is within noise and the ratio is noise over noise (a random tiny pair gives 1.5 and 5.5). Below
:data:`MIN_ABLATION_GAP` of the clean loss the result says so instead of standing as a score.

The splice is a forward hook that returns the replacement, so any ``transformers`` causal LM works
without modification. The cost is three forwards per batch (clean, spliced, zero-ablated), all the
way through the unembedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .language_models import resolve_module

MIN_ABLATION_GAP = 0.01  # zero-ablation must raise the loss by 1% of the clean loss for the ratio to mean anything


def meaningful(clean: float, zero_ablated: float) -> bool:
    """Zero-ablating the hooked activation hurts enough for ``recovered`` to be a score."""
    return zero_ablated - clean >= MIN_ABLATION_GAP * clean


def why_not_meaningful(clean: float, zero_ablated: float) -> str:
    """What zero-ablation did to the loss, against the rise a score needs (a fall counts as no rise)."""
    return (f"zero-ablating the hooked activation moves the loss by {zero_ablated - clean:+.4f} of {clean:.3f} "
            f"nats, not the rise of at least {MIN_ABLATION_GAP:.0%} that makes the ratio a score")


def describe(ce: dict) -> str:
    """``recovered`` of a summary entry (clean, spliced, zero_ablated, recovered), or why it is not a score."""
    if meaningful(ce["clean"], ce["zero_ablated"]):
        return f"{ce['recovered']:.3f}"
    return (f"{ce['recovered']:.3f}, not meaningful: {why_not_meaningful(ce['clean'], ce['zero_ablated'])}, "
            "so the model barely uses it (an untrained model?)")


@dataclass
class CERecovered:
    clean: float  # mean next-token cross-entropy, nats
    spliced: float
    zero_ablated: float

    @property
    def recovered(self) -> float:
        gap = self.zero_ablated - self.clean
        return float("nan") if abs(gap) < 1e-12 else (self.zero_ablated - self.spliced) / gap

    @property
    def meaningful(self) -> bool:
        return meaningful(self.clean, self.zero_ablated)


@torch.no_grad()
def next_token_loss(model: nn.Module, input_ids: Tensor, hook: str | None = None,
                    replace: Callable[[Tensor], Tensor] | None = None) -> float:
    """Mean next-token cross-entropy of ``input_ids`` [B, T]; with ``replace``, the output of module
    ``hook`` is replaced by ``replace(output)`` during the forward."""
    handle = None
    if hook is not None and replace is not None:
        def swap(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                return type(output)([replace(output[0]), *output[1:]])
            return replace(output)

        handle = resolve_module(model, hook).register_forward_hook(swap)
    try:
        device = next(model.parameters()).device
        ids = input_ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    return float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))


def ce_loss_recovered(model: nn.Module, input_ids: Tensor, hook: str, reconstruction: Tensor,
                      start: int = 0) -> CERecovered:
    """Splice ``reconstruction`` [B, T − start, d] into ``hook``'s output at positions ``start:``."""

    def spliced(out: Tensor) -> Tensor:
        if out.shape[1] - start != reconstruction.shape[1] or out.shape[-1] != reconstruction.shape[-1]:
            raise ValueError(
                f"reconstruction {tuple(reconstruction.shape)} does not fit {hook!r} output {tuple(out.shape)} "
                f"from position {start}"
            )
        return torch.cat([out[:, :start], reconstruction.to(out.dtype).to(out.device)], dim=1)

    def zeroed(out: Tensor) -> Tensor:
        return torch.cat([out[:, :start], torch.zeros_like(out[:, start:])], dim=1)

    return CERecovered(
        clean=next_token_loss(model, input_ids),
        spliced=next_token_loss(model, input_ids, hook, spliced),
        zero_ablated=next_token_loss(model, input_ids, hook, zeroed),
    )
