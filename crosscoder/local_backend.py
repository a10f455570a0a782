"""Training in this process: torch's fused Adam, gradient clipping, ``state.pt`` checkpoints.

The :class:`~crosscoder.trainer.Backend` of ``train.workers = 0``: no Ray, no DeepSpeed, no process
group. A checkpoint is ``<run>/checkpoints/step-<n>/state.pt`` (the model, Adam's state and the loop's
state) and ``position.json``, written under a temporary name and renamed, so a run killed while
saving keeps its previous checkpoint; the oldest are removed beyond ``train.keep_checkpoints``. A
checkpoint the workers wrote (a run that trained with ``train.workers > 0`` before) is read whole
through checkpoint_handoff.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoint_handoff import MOMENTS, read_whole
from .collectives import LOCAL
from .config import RunConfig
from .losses import forward_and_loss
from .model import CrossCoder
from .trainer import (
    LOCAL_CHECKPOINT,
    checkpoint_error,
    newest_checkpoint,
    parameter_groups,
    prune_checkpoints,
    set_learning_rate,
)


class LocalBackend:
    rank = data_rank = 0
    data_parallel = 1
    collectives = LOCAL
    keeps_whole_gradients = True

    def __init__(self, cfg: RunConfig, device: torch.device = torch.device("cpu")):
        self.tc, self.device = cfg.train, device

    def latent_range(self, latents: int) -> tuple[int, int]:
        return 0, latents

    def setup(self, model: CrossCoder) -> None:
        self.model = model
        # fused: one kernel per parameter, no parameter-sized temporaries (4 B/param less at peak than foreach)
        self.optimizer = torch.optim.Adam(parameter_groups(model, self.tc), lr=self.tc.lr,
                                          betas=(self.tc.beta1, self.tc.beta2), fused=True)

    def load(self, folder: Path) -> dict:
        if not (folder / LOCAL_CHECKPOINT).is_file():  # the workers': handed over
            return self._load_whole(read_whole(folder, self.model, self.tc))
        state = torch.load(folder / LOCAL_CHECKPOINT, weights_only=False, map_location="cpu")
        if state["spec"] == asdict(self.model.spec):  # else the loop refuses the run directory
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        return {"spec": state["spec"], "step": state["step"], "positions": state["position"], "dead": state["dead"],
                "rng": state["rng"]}

    def _load_whole(self, whole: dict) -> dict:
        out = {key: whole[key] for key in ("spec", "step", "positions", "rng")} | {"dead": None}
        tensors = whole["tensors"]
        if tensors is None:  # another dictionary: the loop refuses the run directory
            return out
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(tensors[f"weight.{name}"])
                # fused Adam keeps its step count as a float32 tensor beside the parameter
                self.optimizer.state[param] = {
                    "step": torch.tensor(float(whole["adam_step"]), dtype=torch.float32, device=param.device)
                } | {key: tensors[f"{key}.{name}"].to(param.device, torch.float32).clone() for key in MOMENTS}
            self.model.threshold.copy_(tensors["threshold"])
            self.model.threshold_updates.fill_(whole["threshold_updates"])
        return out | {"dead": {"window": self.tc.dead_tokens, "tokens_since_fired": tensors["dead"]}}

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
                        "step": state["step"], "position": state["positions"]}, tmp / LOCAL_CHECKPOINT)
            (tmp / "position.json").write_text(json.dumps(state["positions"]) + "\n")
        except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError of its zip writer
            stop = checkpoint_error(final, error, newest_checkpoint(run_dir))
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
