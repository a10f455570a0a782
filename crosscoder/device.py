"""Where training runs, and how batches get there without the device waiting on the host.

``train.device`` is ``auto`` (CUDA when this process sees a GPU, else the CPU, said in one line),
``cpu`` or ``cuda`` (an error naming the setting when there is no GPU). Everything a step touches
(the model, optimizer state, batches, the scale vector, dead-latent counters, tensors handed to
collectives) lives on that one device; tests/test_device.py checks, on CPU, that our code creates
no tensor without saying where.

:class:`DeviceBatches` feeds the loop. Shards store fp16, so on CUDA a batch crosses the bus as
fp16 from pinned memory (half the bytes of fp32), with ``non_blocking`` on a copy stream one batch
ahead, and is converted to fp32 and scaled on the device; the step never waits for a copy it did
not need yet. On the CPU a batch is converted and scaled where it is, as before. The cost on CUDA:
two batches of pinned host memory and one in flight on the device.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError


def settle_deepspeed_accelerator() -> None:
    """transformers imports DeepSpeed when it is installed, and DeepSpeed's accelerator probe then
    warns that it "was unable to detect" a GPU on every machine without one: on a CPU machine, say
    ``cpu`` (what it would pick) before anything imports it. This command's own device line says
    the same, in its words. A ``DS_ACCELERATOR`` already set is left alone."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def resolve(setting: str, key: str = "train.device", quiet: bool = False) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` (or ``cuda:N``) → the device this process uses."""
    if setting == "cpu":
        return torch.device("cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} = {setting!r}, but this machine has no CUDA device (torch "
                              f"{torch.__version__}); use auto or cpu")
        return torch.device(setting if ":" in setting else f"cuda:{torch.cuda.current_device()}")
    if setting != "auto":
        raise ConfigError(f"{key} must be auto, cpu or cuda, got {setting!r}")
    if torch.cuda.is_available():
        return torch.device(f"cuda:{torch.cuda.current_device()}")
    if not quiet:
        print(f"{key}: auto -> cpu (no CUDA device in this process)", file=sys.stderr)
    return torch.device("cpu")


class DeviceBatches:
    """Batches ``[B, D]`` (numpy, stored dtype) → fp32 tensors on ``device``, multiplied by ``scale``."""

    def __init__(self, batches: Iterator, device: torch.device, scale: Tensor):
        self.batches, self.device, self.scale = batches, device, scale.to(device)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        # (batch, device tensor, copy event) of the next step, or the exception reading it raised
        self.ahead: tuple | BaseException | None = None

    def _send(self, batch) -> tuple:
        host = torch.from_numpy(np.ascontiguousarray(batch.acts))
        if not self.cuda:
            return batch, host, None
        host = host.pin_memory()
        with torch.cuda.stream(self.stream):
            moved = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return batch, moved, event

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Any, Tensor]:
        ahead, self.ahead = self.ahead, None
        if isinstance(ahead, BaseException):
            raise ahead  # met while reading ahead: raised when that batch is asked for
        batch, acts, event = ahead if ahead is not None else self._send(next(self.batches))
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            acts.record_stream(torch.cuda.current_stream(self.device))
            try:
                self.ahead = self._send(next(self.batches))  # the next copy overlaps this step
            except (StopIteration, Exception) as error:  # noqa: BLE001 - re-raised at the next batch
                self.ahead = error
        return batch, acts.float() * self.scale

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
