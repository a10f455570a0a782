"""Training curves for the experiment trackers researchers use, beside ``train_log.jsonl``.

Why: the JSONL log and the Prometheus series are this project's own; TensorBoard and Weights &
Biases are what most users open. The scalars are exactly the JSONL's (loss terms, FVE per source,
L0, inference L0, dead fraction, learning rate, gradient norm) plus throughput, written by rank 0 at
the same steps, with the training step as the x axis and the same names in both trackers.

- ``tensorboard``: event files in ``<run>/tensorboard``, written with ``tensorboardX`` (pinned; it
  needs no TensorBoard or TensorFlow install). A resumed run appends a new event file, and
  TensorBoard shows the steps redone after a resume as a second point at the same step.
- ``wandb``: a W&B run whose id is derived from the run directory, so a resumed run continues the
  same W&B run (``resume="allow"``); its files go to ``<run>/wandb``. ``wandb_mode = "offline"``
  needs no account or network (``wandb sync <run>/wandb/offline-run-*`` uploads it later). W&B
  refuses a step lower than one it has seen, so the steps redone after a resume are dropped there
  (the JSONL keeps them). The run's config is the whole RunConfig.

The cost: one more writer thread (TensorBoard) or the W&B service process, on rank 0 only.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from .config import LoggingConfig


def wandb_run_id(run_dir: Path) -> str:
    """A W&B run id that is the same on every call for one run directory (and differs between them)."""
    path = str(Path(run_dir).resolve())
    name = re.sub(r"[^A-Za-z0-9_-]", "-", Path(path).name)[:40]
    return f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"


def scalars_of(metrics: dict) -> dict[str, float]:
    """The JSONL row's scalars under the trackers' names (``loss/<term>``, ``fve/<source>``, ...)."""
    scalars = {f"loss/{term}": value for term, value in metrics["loss"].items()}
    scalars |= {f"fve/{source}": value for source, value in metrics["fve"].items()}
    for key in ("l0", "inference_l0", "dead_fraction", "lr", "grad_norm"):
        if metrics.get(key) is not None:
            scalars[key] = metrics[key]
    return {tag: float(value) for tag, value in scalars.items()}


class ExperimentLog:
    """Writes nothing for backend "none"; see the module docstring for the others."""

    def __init__(self, logging: LoggingConfig, run_dir: Path, config: dict | None = None):
        self.writer = None
        self.wandb_run = None
        self.last: tuple[float, int] | None = None  # (time, tokens) at the previous log, for throughput
        self.last_step = -1
        if logging.backend == "tensorboard":
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=str(Path(run_dir) / "tensorboard"), flush_secs=10)
        elif logging.backend == "wandb":
            import wandb

            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(project=logging.project, dir=str(run_dir), id=wandb_run_id(run_dir),
                                        name=run_dir.name, resume="allow", mode=logging.wandb_mode,
                                        config=config or {}, settings=wandb.Settings(silent=True))
            self.last_step = int(getattr(self.wandb_run, "step", 0) or 0) - 1

    def log(self, metrics: dict) -> None:
        if self.writer is None and self.wandb_run is None:
            return
        step = int(metrics["step"])
        scalars = scalars_of(metrics)
        now = time.perf_counter()
        if self.last is not None and metrics["tokens"] > self.last[1]:
            scalars["tokens_per_s"] = (metrics["tokens"] - self.last[1]) / max(now - self.last[0], 1e-9)
        self.last = (now, metrics["tokens"])
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb_run is not None and step > self.last_step:
            self.wandb_run.log(scalars, step=step)
            self.last_step = step

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
