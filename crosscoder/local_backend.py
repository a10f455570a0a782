"""Training in this process: torch's fused Adam, gradient clipping, ``state.pt`` checkpoints.

The :class:`~crosscoder.trainer.Backend` of ``train.workers = 0``: no Ray, no DeepSpeed, no process
group. A checkpoint is ``<run>/checkpoints/step-<n>/state.pt`` (the model, Adam's state and the loop's
state) and ``position.json``, written under a temporary name and renamed, so a run killed while
saving keeps its previous checkpoint; the oldest are removed beyond ``train.keep_checkpoints``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .collectives import LOCAL
from .config import RunConfig
from .losses import forward_and_loss
from .model import CrossCoder
from .trainer import checkpoint_error, parameter_groups, prune_checkpoints, set_learning_rate, step_dirs


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return [p for p in step_dirs(run_dir) if (p / "state.pt").is_file()]


class LocalBackend:
    rank = data_rank = 0
    data_parallel = 1
    collectives = LOCAL
    keeps_whole_gradients = True

    def __init__(self, cfg: RunConfig, device: torch.device = torch.device("cpu")):
        self.tc, self.device = cfg.train, device

    def latent_range(self, latents: int) -> tuple[int, int]:
        return 0, latents

    def has_checkpoint(self, run_dir: Path) -> bool:
        return bool(checkpoint_dirs(run_dir))

    def setup(self, model: CrossCoder) -> None:
        self.model = model
        # fused: one kernel per parameter, no parameter-sized temporaries (4 B/param less at peak than foreach)
        self.optimizer = torch.optim.Adam(parameter_groups(model, self.tc), lr=self.tc.lr,
                                          betas=(self.tc.beta1, self.tc.beta2), fused=True)

    def load(self, run_dir: Path) -> dict:
        state = torch.load(checkpoint_dirs(run_dir)[-1] / "state.pt", weights_only=False, map_location="cpu")
        if state["spec"] == asdict(self.model.spec):  # else the loop refuses the run directory
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        return {"spec": state["spec"], "step": state["step"], "positions": state["position"], "dead": state["dead"],
                "rng": state["rng"]}

    def forward(self, x, dead, weights):
        return forward_and_loss(self.model, x, dead, weights)

    def step(self, loss: torch.Tensor, lr: float) -> float:
        set_learning_rate(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
                if self.tc.grad_clip > 0 else 0.0)
        self.optimizer.step()
        return float(norm)

    def save(self, run_dir: Path, state: dict, keep: int) -> None:
        root = run_dir / "checkpoints"
        final, tmp = root / f"step-{state['step']}", root / f".step-{state['step']}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            torch.save({"spec": state["spec"], "model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(), "dead": state["dead"], "rng": state["rng"],
                        "step": state["step"], "position": state["positions"]}, tmp / "state.pt")
            (tmp / "position.json").write_text(json.dumps(state["positions"]) + "\n")
        except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError of its zip writer
            kept = checkpoint_dirs(run_dir)
            stop = checkpoint_error(final, error, kept[-1] if kept else None)
            shutil.rmtree(tmp, ignore_errors=True)
            raise stop from error
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(run_dir, keep, final)

    def export(self, run_dir: Path, extra: dict) -> Path:
        self.model.save_pretrained(run_dir / "crosscoder", norm_scale=self.model.spec.norm_scale, extra=extra)
        return run_dir / "crosscoder"

    def full_weights(self):
        return contextlib.nullcontext()

    def report(self) -> dict:
        return {}
