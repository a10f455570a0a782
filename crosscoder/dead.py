"""Dead-latent tracking: a latent is dead when it fired on none of the last N tokens.

The tracker keeps, per latent, the number of tokens seen since it last fired. The caller passes
the batch's *global* fired mask and token count: in a data-parallel run the mask must be OR-ed
across ranks before the update (a latent that fired on any rank is alive everywhere), otherwise
each rank would revive, through AuxK, latents another rank saw firing. Keeping that reduction in
the caller keeps this class free of any communication.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DeadLatentTracker:
    def __init__(self, shape: tuple[int, ...], window_tokens: int, device: torch.device | str = "cpu"):
        if window_tokens <= 0:
            raise ValueError(f"dead-latent window must be positive, got {window_tokens}")
        self.window = int(window_tokens)
        self.tokens_since_fired = torch.zeros(shape, dtype=torch.long, device=device)

    def update(self, fired: Tensor, n_tokens: int) -> None:
        """``fired``: bool mask of latents that fired at least once in the batch; ``n_tokens``: its size."""
        self.tokens_since_fired += int(n_tokens)
        self.tokens_since_fired.masked_fill_(fired.to(self.tokens_since_fired.device), 0)

    @property
    def dead(self) -> Tensor:
        return self.tokens_since_fired >= self.window

    def dead_fraction(self) -> float:
        return float(self.dead.float().mean())

    def state_dict(self) -> dict:
        return {"window": self.window, "tokens_since_fired": self.tokens_since_fired.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["tokens_since_fired"].shape) != tuple(self.tokens_since_fired.shape):
            raise ValueError(
                f"dead-latent state has shape {tuple(state['tokens_since_fired'].shape)}, "
                f"expected {tuple(self.tokens_since_fired.shape)}"
            )
        self.tokens_since_fired = state["tokens_since_fired"].to(self.tokens_since_fired.device).clone()


def dead_share(metrics: dict, dead_tokens: int, digits: int = 1) -> str | None:
    """The dead share of a step's metrics as a progress line shows it, or None (the line says n/a)
    until ``train.dead_tokens`` tokens were trained on: until then no latent can have gone that long
    without firing, and 0% would read as a dictionary with every latent alive. (Result files
    written before ``tokens`` was recorded count as past the window.)"""
    if metrics.get("tokens", dead_tokens) < dead_tokens:
        return None
    return f"{metrics['dead_fraction']:.{digits}%}"
