"""A run continues on the other backend: one process's checkpoint resumed on Ray Train workers, and back.

The backends write different checkpoints, each what its optimizer holds most directly: one process a
``state.pt`` (local_backend.py), the ranks a resharding ``dcp/`` plus ``loop.pt``
(deepspeed_backend.py). Both hold the same things — fp32 weights, Adam's two moments and step count,
the inference thresholds, the dead-latent counters, the loop's step, data positions and RNG — so
either reads as one *whole* state here: every tensor whole, keyed as the resharding checkpoint keys
them (``weight.<param>``, ``exp_avg.<param>``, ``exp_avg_sq.<param>``, ``threshold``, ``dead``), which
the other backend loads (a rank takes its latent slice). So a run started with ``train.workers = 0``
continues on workers, or back, on the same trajectory instead of starting again over its
checkpoints. What it costs: at start-up, one process reads the workers' checkpoint whole into host
memory (it holds the dictionary whole anyway), and each rank maps one process's ``state.pt`` into
memory and copies its slice out (the host's page cache holds the file once); DeepSpeed's own
ZeRO-3 checkpoint is not handed over (its partitioned weights are readable only by DeepSpeed on the
layout that wrote it), and ZeRO-3 loads none but its own.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from .config import TrainConfig
from .model import CrossCoder
from .trainer import LOCAL_CHECKPOINT, RunDirError, parameter_groups

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's state per parameter, besides its step count


def check_zero3_loads(folder: Path, zero_stage: int) -> None:
    """ZeRO-3 resumes DeepSpeed's own checkpoint only: one process's, or a resharding one, is refused."""
    if zero_stage != 3 or not ((folder / LOCAL_CHECKPOINT).is_file() or (folder / "loop.pt").is_file()):
        return
    written = ("by one process (train.workers = 0)" if (folder / LOCAL_CHECKPOINT).is_file()
               else "with ZeRO stage ≤ 2 (a resharding one)")
    raise RunDirError(f"{folder}: a checkpoint written {written}, which ZeRO-3 cannot load; resume with "
                      "train.zero_stage ≤ 2")


def saved_spec(folder: Path) -> dict | None:
    """The dictionary (``CrossCoderSpec`` fields) a checkpoint was trained with, read without its
    tensors (a file that holds them is mapped, not read): one process's ``state.pt``, a resharding
    checkpoint's ``loop.pt``, or the client state DeepSpeed keeps in each rank's model-states file
    of its own (ZeRO-3) checkpoint, whose weights DeepSpeed loads before anything can compare
    shapes. None where the folder holds none of them."""
    if (folder / LOCAL_CHECKPOINT).is_file():
        return torch.load(folder / LOCAL_CHECKPOINT, weights_only=False, map_location="cpu", mmap=True)["spec"]
    if (folder / "loop.pt").is_file():
        return torch.load(folder / "loop.pt", weights_only=False, map_location="cpu")["spec"]
    states = sorted(folder.glob("*model_states.pt"))
    if states:
        return torch.load(states[0], weights_only=False, map_location="cpu", mmap=True).get("spec")
    return None


def read_whole(folder: Path, model: CrossCoder, tc: TrainConfig) -> dict:
    """The checkpoint in ``folder``, of either backend: the loop's state (``spec``, ``step``,
    ``positions``, ``rng`` of one process, ``adam_step``, ``threshold_updates``) and, when it was
    trained with ``model``'s dictionary, ``tensors`` (whole; None otherwise: the loop refuses it)."""
    if (folder / LOCAL_CHECKPOINT).is_file():
        return _read_local(folder, model, tc)
    if (folder / "loop.pt").is_file():
        return _read_resharding(folder, model)
    raise RunDirError(f"{folder}: DeepSpeed's own ZeRO-3 checkpoint, which only train.zero_stage = 3 on the "
                      "workers and latent ranks that wrote it resumes; continue the run so, or use another --run")


def _read_local(folder: Path, model: CrossCoder, tc: TrainConfig) -> dict:
    state = torch.load(folder / LOCAL_CHECKPOINT, weights_only=False, map_location="cpu", mmap=True)
    out = {"spec": state["spec"], "step": state["step"], "positions": state["position"], "rng": state["rng"],
           "tensors": None}
    if state["spec"] != asdict(model.spec):
        return out
    weights = state["model"]
    name_of = {id(param): name for name, param in model.named_parameters()}
    order = [name_of[id(param)] for group in parameter_groups(model, tc) for param in group["params"]]
    adam = state["optimizer"]["state"]  # by the parameter's place in the optimizer's groups
    tensors = {"threshold": weights["threshold"], "dead": state["dead"]["tokens_since_fired"]}
    for index, name in enumerate(order):
        tensors[f"weight.{name}"] = weights[name]
        for key in MOMENTS:  # a parameter that never had a gradient has no state yet
            tensors[f"{key}.{name}"] = adam.get(index, {}).get(key, torch.zeros_like(weights[name]))
    steps = [float(st["step"]) for st in adam.values() if "step" in st]
    return out | {"tensors": tensors, "adam_step": max(steps, default=0.0),
                  "threshold_updates": int(weights["threshold_updates"])}


def _read_resharding(folder: Path, model: CrossCoder) -> dict:
    import torch.distributed.checkpoint as dcp

    loop = torch.load(folder / "loop.pt", weights_only=False, map_location="cpu")
    out = {"spec": loop["spec"], "step": loop["step"], "positions": loop["positions"], "rng": loop["rng"][0],
           "tensors": None}
    if loop["spec"] != asdict(model.spec):
        return out
    reader = dcp.FileSystemReader(str(folder / "dcp"))
    tensors = {name: torch.empty(meta.size, dtype=meta.properties.dtype)  # type: ignore[union-attr]
               for name, meta in reader.read_metadata().state_dict_metadata.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return out | {"tensors": tensors, "adam_step": loop["adam_step"], "threshold_updates": loop["threshold_updates"]}
