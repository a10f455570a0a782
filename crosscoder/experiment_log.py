"""Training curves for the experiment trackers researchers use, beside ``train_log.jsonl``.

Why: the JSONL log and the Prometheus series are this project's own; TensorBoard is what most
users open. The scalars are exactly the JSONL's (loss terms, FVE per source, L0, inference L0, dead
fraction, learning rate, gradient norm) plus throughput, written by rank 0 at the same steps, with
the training step as the x axis. Event files are written with ``tensorboardX`` (pinned; it needs
no TensorBoard or TensorFlow install), into ``<run>/tensorboard``. The cost: one more writer
thread on rank 0; a resumed run appends a new event file, and TensorBoard shows the steps redone
after a resume as a second point at the same step.
"""

from __future__ import annotations

import time
from pathlib import Path


class ExperimentLog:
    """``backend`` "none" writes nothing; "tensorboard" writes event files into ``<run_dir>/tensorboard``."""

    def __init__(self, backend: str, run_dir: Path):
        self.writer = None
        self.last: tuple[float, int] | None = None  # (time, tokens) at the previous log, for throughput
        if backend == "tensorboard":
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=str(Path(run_dir) / "tensorboard"), flush_secs=10)

    def log(self, metrics: dict) -> None:
        if self.writer is None:
            return
        step = int(metrics["step"])
        scalars = {f"loss/{term}": value for term, value in metrics["loss"].items()}
        scalars |= {f"fve/{source}": value for source, value in metrics["fve"].items()}
        for key in ("l0", "inference_l0", "dead_fraction", "lr", "grad_norm"):
            if metrics.get(key) is not None:
                scalars[key] = metrics[key]
        now = time.perf_counter()
        if self.last is not None and metrics["tokens"] > self.last[1]:
            scalars["tokens_per_s"] = (metrics["tokens"] - self.last[1]) / max(now - self.last[0], 1e-9)
        self.last = (now, metrics["tokens"])
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
