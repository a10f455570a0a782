"""The training loop, one for a single process and for every DeepSpeed rank.

The loop is deliberately plain (nanoGPT-style): read a batch, normalise it, forward, loss, check it
is finite, backward and step, update the BatchTopK threshold and the dead-latent tracker, log,
checkpoint. What differs between one process and many ranks is a :class:`Backend`
(local_backend.py: torch Adam in this process; deepspeed_backend.py: a DeepSpeed engine per rank
around a latent slice, ZeRO, latent/data groups): the optimizer step, checkpoint files, export. The
rest is shared, so one change to the step lands in one place. What makes it more than a notebook
loop:

- exact resume: a checkpoint holds the model, the optimizer state, the step, every data partition's
  position (stream.py), the dead-latent counters and the RNG states, written atomically, so a run
  killed at any moment resumes from the last complete checkpoint and sees the same tokens and the
  same updates as an uninterrupted run; the log is cut back to that step, so each step is logged once;
- a NaN or inf loss on any rank stops every rank before the optimizer step with
  :class:`TrainingDiverged`, naming the step and the terms, and leaves the last good checkpoint;
- every statistic is reduced over ranks (collectives.py) before it is logged, so rank 0 logs the
  global batch's metrics, and the dead-latent "fired" mask is OR-ed over data ranks first;
- no decoder-norm constraint: the L1 penalty and the TopK/BatchTopK selection are both weighted by
  the decoder norms, which makes the objective invariant to moving scale between a latent's encoder
  and decoder, so the norms carry meaning (the relative norm between sources).

This module imports neither Ray nor DeepSpeed.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from . import faults
from .collectives import Collectives
from .config import (
    ConfigError,
    LoggingConfig,
    RunConfig,
    TrainConfig,
    dumps_toml,
    load_config,
    use_sparse_kernels,
    validate,
)
from .dead import DeadLatentTracker, dead_share
from .device import DeviceBatches
from .device import resolve as resolve_device
from .errors import CrosscoderError
from .experiment_log import ExperimentLog
from .interrupts import StepBoundary
from .losses import LossWeights, default_aux_k
from .metrics import StreamingFVE
from .model import CrossCoder, CrossCoderSpec, ForwardOutput
from .progress import progress_bar, say
from .relocation import RESULT_FILE
from .shards import Manifest, ShardError, check_sizes, read_manifest
from .sparsity import count_firing
from .storage import open_root, read_json_object, replace_text
from .stream import SCALE_DRIFT, DataExhausted, PartitionBatch, PartitionedStream, Position, prefetch, scale_drift
from .telemetry import TrainMetrics

STOP_FILE = ".stop"  # the driver asks its workers to checkpoint and stop (ray_train.py)
LOG_FILE = "train_log.jsonl"
LOCAL_CHECKPOINT = "state.pt"  # one process's checkpoint file in checkpoints/step-<n>/ (local_backend.py)


class TrainingDiverged(CrosscoderError, RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class RunDirError(CrosscoderError, ValueError):
    """The run directory holds state that does not fit this run."""


class CheckpointError(CrosscoderError, OSError):
    """A checkpoint could not be written (a full disk, a quota); the last complete one is kept."""


class TrainingStopped(RuntimeError):
    """Another rank stopped (its data failed); this rank stops with it."""


class TrainingFailed(CrosscoderError, RuntimeError):
    """The distributed trainer failed after its retries; the message says why."""


STOPS = {"TrainingDiverged": TrainingDiverged, "ShardError": ShardError, "DataExhausted": DataExhausted,
         "CheckpointError": CheckpointError, "RunDirError": RunDirError}


def record_stop(run_dir: Path, error: Exception) -> None:
    """Record why training stopped, for the driver and for a re-run. Any rank may write it, several
    at once (a checkpoint every rank failed to write): the file is one rank's whole record."""
    replace_text(run_dir / RESULT_FILE, json.dumps({"error": str(error), "kind": type(error).__name__}) + "\n")


def _inputs(batches, collectives: Collectives, count: int):
    """Up to ``count`` more inputs from ``batches``, fewer when the data ends on any rank."""
    for _ in range(count):
        try:
            _, x = next(batches)
            code = 0
        except DataExhausted:
            code = 1
        if collectives.worst(code):
            return
        yield x


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or the driver's stop file): every rank checkpointed at a step boundary and stopped."""


def _next_batch(batches, collectives: Collectives, run_dir: Path, step: int, stop_requested: bool):
    """The next batch, or every rank stops together at this step boundary (the others would wait in
    a collective): on a corrupt shard or the data's end on any rank, without retries (code 2: the
    error, recorded by its rank, or TrainingStopped on the others), or on a Ctrl-C or the driver's
    stop file seen by any rank (code 1: None). Either way the loop checkpoints the steps done."""
    try:
        batch, error = next(batches), None
    except (ShardError, DataExhausted) as failed:
        batch, error = None, failed
    code = collectives.worst(2 if error is not None else 1 if stop_requested or (run_dir / STOP_FILE).exists() else 0)
    if code == 2:
        if error is None:
            raise TrainingStopped(f"step {step}: another rank stopped on its data")
        record_stop(run_dir, error)  # the rank that holds the cause records it
        raise error
    return batch if code == 0 else None


class Backend(Protocol):
    """What one process contributes to training; the loop calls these in this order."""

    @property
    def rank(self) -> int: ...  # global rank: 0 writes the log, the result and the progress bar
    @property
    def data_rank(self) -> int: ...
    @property
    def data_parallel(self) -> int: ...
    @property
    def collectives(self) -> Collectives: ...
    @property
    def keeps_whole_gradients(self) -> bool: ...  # False under ZeRO-2/3: the sparse path keeps no gradient memory
    @property
    def device(self) -> torch.device: ...  # the model, optimizer state, batches and counters live there
    def full_weights(self) -> AbstractContextManager: ...  # this rank's whole slice at hand (ZeRO-3 gathers)

    def latent_range(self, latents: int) -> tuple[int, int]: ...
    def setup(self, model: CrossCoder) -> None: ...  # optimizer or engine, after b_dec is set
    def load(self, folder: Path) -> dict: ...  # either backend's checkpoint restored; returns the loop's state
    def forward(self, x: torch.Tensor, dead: torch.Tensor, weights: LossWeights
                ) -> tuple[ForwardOutput, torch.Tensor, dict[str, torch.Tensor]]: ...
    def step(self, loss: torch.Tensor, lr: float) -> float: ...  # backward, clip, update; the grad norm
    def save(self, run_dir: Path, state: dict, keep: int) -> None: ...
    def export(self, run_dir: Path, extra: dict) -> Path | None: ...  # the path on rank 0
    def report(self) -> dict: ...  # figures for the result: bytes sent, memory


@dataclass
class TrainResult:
    """What a training call did; rank 0 writes it to ``<run>/train_result.json`` when it ends."""

    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # total loss per step run in this call
    last_metrics: dict = field(default_factory=dict)
    export_dir: Path | None = None
    spec: dict = field(default_factory=dict)
    comm_bytes: int = 0
    memory_bytes: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    def write(self) -> None:
        data = asdict(self) | {"run_dir": str(self.run_dir.absolute()),  # where it was trained: relocation.py
                               "export_dir": str(self.export_dir) if self.export_dir else None}
        (self.run_dir / RESULT_FILE).write_text(json.dumps(data) + "\n")

    @classmethod
    def read(cls, run_dir: Path) -> TrainResult | None:
        """The result a finished call left, or None; raises TrainingDiverged if it diverged."""
        path = Path(run_dir) / RESULT_FILE
        if not path.is_file():
            return None
        try:
            data = read_json_object(path)
        except ValueError as error:  # cut short, or edited: derived from the checkpoint, written again by training
            raise RunDirError(f"{path}: not a readable training record ({error}); `crosscoder train {run_dir}` "
                              "writes it again from the last checkpoint") from None
        if "error" in data:
            raise STOPS.get(data.get("kind", "TrainingDiverged"), TrainingFailed)(data["error"])
        # where it is read from: a run directory moved or copied elsewhere (archived, fetched from a
        # cluster) holds its export there, not at the path it was trained under
        data["run_dir"] = Path(run_dir)
        data["export_dir"] = Path(run_dir) / "crosscoder" if data["export_dir"] else None
        return cls(**data)

    def is_finished(self, tc: TrainConfig, spec: CrossCoderSpec) -> bool:
        """Trained to ``tc.steps`` with this dictionary, and the export is there."""
        return (self.steps >= tc.steps and self.spec == asdict(spec) and self.export_dir is not None
                and _export_readable(self.export_dir))


# ---------------------------------------------------------------------------------------------
# the step's pieces


def _export_readable(export: Path) -> bool:
    """The export's ``config.json`` is a JSON object and its weights file's header reads (a file cut
    short does not, nor an edited one): else a re-run writes the export again from the checkpoint."""
    try:
        read_json_object(export / "config.json")
        with safe_open(str(export / "model.safetensors"), framework="pt"):
            return True
    except (OSError, ValueError, SafetensorError):
        return False


def another_dictionary(run_dir: Path, old: dict, new: dict) -> RunDirError | None:
    """The refusal of a run directory whose checkpoint holds another dictionary than ``new`` asks
    for (both as :class:`CrossCoderSpec` fields, or the part of them a config sets); None if alike."""
    differ = [key for key in new if old.get(key) != new[key]]
    if not differ:
        return None
    asked = {"this config asks for": [k for k in differ if k not in DATA_SPEC_KEYS],
             "its data has": [k for k in differ if k in DATA_SPEC_KEYS]}
    said = "; ".join(f"{who} {', '.join(f'{k}={new[k]}' for k in keys)}" for who, keys in asked.items() if keys)
    return RunDirError(f"{run_dir}: its checkpoint was trained with {', '.join(f'{k}={old.get(k)}' for k in differ)}; "
                       f"{said}; use another --run directory or delete {run_dir / 'checkpoints'}")


DATA_SPEC_KEYS = ("sources", "widths", "norm_scale")  # the spec's fields the shards' manifest sets


def with_saved_scale(spec: CrossCoderSpec, then: dict | None) -> tuple[CrossCoderSpec, float]:
    """``spec`` with the ``norm_scale`` its checkpoint (``then``: the saved spec) was trained with,
    where the sources are the same and the data's scale is within ``SCALE_DRIFT`` of it: a harvest
    grown since (a larger harvest.tokens, documents appended) estimates the scale again from more
    tokens (0.1% apart on the demo pair), and the weights go on in the units they were trained in.
    Further apart, the data is other data, and :func:`another_dictionary` refuses it. Also returns
    the relative move of the scale that was kept (0 where none was)."""
    if not then or then.get("sources") != spec.sources or then.get("widths") != spec.widths:
        return spec, 0.0
    drift = scale_drift(then.get("norm_scale") or [], spec.norm_scale)
    return (replace(spec, norm_scale=list(then["norm_scale"])), drift) if 0 < drift <= SCALE_DRIFT else (spec, 0.0)


def spec_from(cfg: TrainConfig, manifest: Manifest) -> CrossCoderSpec:
    return CrossCoderSpec(
        sources=manifest.source_names,
        widths=[s.d for s in manifest.sources],
        latents=cfg.latents,
        arch=cfg.arch,
        activation=cfg.activation,
        k=cfg.k,
        norm_scale=list(manifest.norm_scale) or [1.0] * len(manifest.sources),
    )


# JumpReLU's thresholds are learned as log θ, which Adam moves by about its learning rate per step
# (train.lr × train.jumprelu_lr_scale): below this many units in all they cannot grow past e^4 ≈ 55×
# their start (measured on the demo pair, θ from 1e-3: 400 steps at 2e-3, scale 1, left L0 at 590)
JUMPRELU_MIN_TRAVEL = 4.0


def jumprelu_travel_note(tc: TrainConfig) -> str | None:
    """Why a JumpReLU run's L0 may stay high, when its thresholds cannot travel far; None otherwise."""
    travel = tc.lr * tc.jumprelu_lr_scale * tc.steps
    if tc.activation != "jumprelu" or travel >= JUMPRELU_MIN_TRAVEL:
        return None
    return (f"train: note: jumprelu learns log θ, which Adam moves by about train.lr × train.jumprelu_lr_scale per "
            f"step: {tc.steps} steps at {tc.lr:g} × {tc.jumprelu_lr_scale:g} let a threshold grow at most about "
            f"e^{travel:.2g} = {math.exp(travel):.3g}× from train.jumprelu_threshold ({tc.jumprelu_threshold:g}); if "
            "L0 stays high, train longer, raise train.jumprelu_lr_scale or start from a higher threshold")


def parameter_groups(model: CrossCoder, tc: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: every weight at train.lr, JumpReLU's thresholds at
    ``lr_scale`` times it (:func:`set_learning_rate`); one group when there are none."""
    named = dict(model.named_parameters())
    thresholds = named.pop("log_threshold", None)
    groups = [{"params": list(named.values()), "lr_scale": 1.0}]
    if thresholds is not None:
        groups.append({"params": [thresholds], "lr_scale": tc.jumprelu_lr_scale})
    return groups


def set_learning_rate(optimizer, lr: float) -> None:
    """This step's learning rate in every parameter group, times the group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last ``lr_decay_fraction``."""
    lr = cfg.lr
    if cfg.lr_warmup_steps > 0:
        lr *= min(1.0, (step + 1) / cfg.lr_warmup_steps)
    decay_steps = int(cfg.lr_decay_fraction * cfg.steps)
    if decay_steps > 0 and step >= cfg.steps - decay_steps:
        lr *= (cfg.steps - step) / decay_steps
    return lr


SCHEDULE_KEYS = ("steps", "lr", "lr_warmup_steps", "lr_decay_fraction")


def schedule_change_note(before: TrainConfig, now: TrainConfig, start: int) -> str | None:
    """Resuming with another schedule (most often a finished run given more ``train.steps``): the
    learning rate follows the new one from ``start``, e.g. back to the peak where the old one had
    decayed to 0, and the loss moves with it. An interrupted run resumed as it was says nothing."""
    changed = [f"train.{k} {getattr(before, k)} -> {getattr(now, k)}" for k in SCHEDULE_KEYS
               if getattr(before, k) != getattr(now, k)]
    last, next_ = learning_rate(before, max(start - 1, 0)), learning_rate(now, start)
    if not changed or abs(next_ - last) <= 0.01 * max(abs(last), abs(next_)):
        return None
    return (f"train: the learning-rate schedule changed ({', '.join(changed)}): step {start + 1} runs at "
            f"{next_:.3g}, step {start} ran at {last:.3g}")


def _schedule_change(run_dir: Path, now: TrainConfig, start: int) -> str | None:
    """:func:`schedule_change_note` against the config the run directory last trained with."""
    try:
        before = load_config(run_dir / "config.toml").train
    except ConfigError:  # none yet (a checkpoint handed over), or one this version cannot read: nothing to say
        return None
    return schedule_change_note(before, now, start)


def loss_weights(cfg: TrainConfig, spec: CrossCoderSpec, step: int) -> LossWeights:
    def warm(coeff: float, steps: int) -> float:
        return coeff * (min(1.0, (step + 1) / steps) if steps > 0 else 1.0)

    return LossWeights(l1=warm(cfg.l1_coeff, cfg.l1_warmup_steps), l0=warm(cfg.l0_coeff, cfg.l0_warmup_steps),
                       aux=cfg.aux_coeff, aux_k=cfg.aux_k or default_aux_k(spec), align=cfg.align_coeff,
                       align_loss=cfg.align_loss)


def step_metrics(spec: CrossCoderSpec, x: torch.Tensor, out: ForwardOutput, terms: dict[str, torch.Tensor],
                 tracker: DeadLatentTracker, collectives: Collectives) -> dict:
    """FVE per source, L0, loss terms and dead fraction of the global batch (every rank agrees).

    They come off the device together: one collective and one host read a step. A read per figure
    (and per loss term, twice, for the finite check) was a dozen host synchronisations a step, each
    of which empties a GPU's queue (README, "Running on GPUs"). A loss term that is not finite on
    any rank is not finite in the sums every rank reads, so every rank takes the same branch."""
    fve = StreamingFVE(spec.slices, x.device)
    fve.update(x, out.x_hat.detach())
    tokens = collectives.batch_tokens(x.shape[0])
    sums = collectives.sum_figures(
        by_data_rank=torch.cat([torch.stack([v.double() for v in terms.values()]), fve.statistics()]),
        by_latent_shard=tracker.dead.sum().to(torch.float64).view(1),
        by_rank=out.active_count().to(torch.float64).view(1))
    n = len(terms)
    values = torch.cat([sums[:n] / (tokens // x.shape[0]), fve.fve_of(sums[n:-2], tokens), sums[-2:]]).tolist()
    losses, fve_values, (dead, active) = values[:n], values[n:-2], values[-2:]
    return {
        "fve": dict(zip(spec.sources, fve_values)),
        "l0": active / (tokens * out.pre.shape[1]),
        "loss": dict(zip(terms, losses)),
        "dead_fraction": dead / (spec.groups * spec.latents),
    }


def positions_to(positions: dict[int, Position]) -> dict:
    return {str(p): pos.to_dict() for p, pos in positions.items()}


def positions_from(data: dict) -> dict[int, Position]:
    return {int(p): Position.from_dict(pos) for p, pos in data.items()}


def check_partitions(run_dir: Path, saved: int, partitions: int, data_parallel: int) -> None:
    """A checkpoint resumes only with the data partitions it was saved with (the global batches differ
    otherwise); the number of ranks may change as long as the data ranks divide them."""
    if saved == partitions:
        return
    how = f"set train.data_partitions = {saved} to resume it"
    if saved % data_parallel:  # that setting alone would be refused: the data ranks must divide it
        how = (f"resume it with data-parallel ranks that divide {saved} (train.workers / train.latent_parallel, "
               f"{data_parallel} here: raise train.latent_parallel) and train.data_partitions = {saved}")
    raise RunDirError(
        f"{run_dir}: its checkpoint streams the data as {saved} partitions, this run as {partitions}; {how} (any "
        "number of data-parallel ranks that divides it reads the same global batches)")


def step_dirs(run_dir: Path) -> list[Path]:
    """The ``<run>/checkpoints/step-<n>`` folders, oldest first (both backends write these)."""
    root = Path(run_dir) / "checkpoints"
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")] if root.is_dir() else []
    return sorted(steps, key=_step_of)


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def checkpoint_error(folder: Path, error: BaseException, kept: Path | None) -> CheckpointError:
    """The stop for a checkpoint ``folder`` the filesystem refused (a full disk, a quota): the cause,
    the free space (measured before the half-written folder is removed) and what a re-run resumes from."""
    failures = getattr(error, "failures", None)  # torch.distributed.checkpoint's CheckpointException: per rank
    rank, cause = next(iter(failures.items())) if failures else (None, error)
    if isinstance(cause, tuple):  # (exception, its traceback)
        cause = cause[0]
    said = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
    said = f"rank {rank}: {said}" if rank is not None else said
    free = shutil.disk_usage(folder.parent).free
    then = (f"{kept.name} is kept: free space (or lower train.keep_checkpoints) and re-run the same command to "
            "resume from it" if kept else "no checkpoint was complete yet: free space and re-run")
    return CheckpointError(f"{folder}: the checkpoint could not be written ({said}; {free / 2**20:.0f} MiB were free "
                           f"there); {then}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``<run>/checkpoints/latest`` names (the DeepSpeed backend's last complete
    checkpoint) while it is there, or None."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    folder = latest.parent / latest.read_text().strip() if latest.is_file() else None
    return folder if folder is not None and folder.is_dir() else None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint, written by either backend, or None: a folder holding
    one process's ``state.pt`` (complete once renamed into place) or the one ``checkpoints/latest``
    names (complete once every rank wrote its part). A run continues from it on either backend
    (checkpoint_handoff.py), so switching ``train.workers`` between 0 and more loses no step."""
    named = latest_checkpoint(run_dir)
    return max(local_checkpoints(run_dir) + ([named] if named is not None else []), key=_step_of, default=None)


def local_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints one process wrote, oldest first."""
    return [p for p in step_dirs(run_dir) if (p / LOCAL_CHECKPOINT).is_file()]


def prune_checkpoints(run_dir: Path, keep: int, written: Path) -> None:
    """After ``written`` is saved: keep the newest ``keep`` checkpoints up to it (0 = all) and remove
    every folder of a later step. Such a folder is what a process killed while saving left (the run
    resumed from an earlier checkpoint since): counted among the newest, it would have the
    checkpoint just written removed in its place."""
    folders = step_dirs(run_dir)
    current = sum(1 for f in folders if _step_of(f) <= _step_of(written))
    for old in folders[current:] + (folders[:current][:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _cut_log(path: Path, last_step: int) -> None:
    """Keep the log's lines up to ``last_step``: the steps after the checkpoint are run again."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: RunConfig, run_dir: str | Path, data: str | None = None, progress: bool = True,
          stop_after: int | None = None, backend: Backend | None = None) -> TrainResult:
    """Train (or resume) a crosscoder: in this process, or as one rank of ``backend``.

    ``stop_after`` ends the call after that many steps of this call (a checkpoint is written), as an
    interrupted run would; the next call resumes.
    """
    validate(cfg)
    if backend is None:
        from .local_backend import LocalBackend

        backend = LocalBackend(cfg, resolve_device(cfg.train.device))
        (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)  # a stop request is for the run that got it
    tc = cfg.train
    run_dir = Path(run_dir)
    data = data or tc.data
    if not data:
        raise RunDirError("no training data: set train.data in the config or pass --data ROOT")
    root = open_root(data, cfg.storage)
    manifest = read_manifest(root)
    check_sizes(root, manifest)  # a missing or truncated shard stops here, not steps later
    from .checkpoint_handoff import saved_spec  # which imports this module

    saved = newest_checkpoint(run_dir)
    spec, moved = with_saved_scale(spec_from(tc, manifest), saved_spec(saved) if saved is not None else None)
    is_main = backend.rank == 0
    if is_main and moved:
        say(f"train: the data's norm_scale is {moved:.2%} from the checkpoint's (the shards changed since, as a grown "
            "harvest's do); going on with the checkpoint's")
    if is_main:
        harvested = manifest.extra.get("harvest", {})
        if harvested.get("complete") is False:  # stopped, or still being written by another run
            say(f"train: {data} holds {len(manifest.shards)} of the harvest's {harvested.get('planned_shards', '?')} "
                "shards (the harvest has not finished; running it again completes it); training on those")
        run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(tc.seed)
    collectives, device = backend.collectives, backend.device
    model = CrossCoder(spec, seed=tc.seed, dec_init_norm=tc.dec_init_norm,
                       latent_range=backend.latent_range(spec.latents), collectives=collectives,
                       sparse_kernels=use_sparse_kernels(tc, device.type),
                       gradient_memory=backend.keeps_whole_gradients, device=device,
                       jump_threshold=tc.jumprelu_threshold, jump_bandwidth=tc.jumprelu_bandwidth,
                       drawn=saved is None)
    partitions = tc.data_partitions or backend.data_parallel
    mine = [p for p in range(partitions) if p % backend.data_parallel == backend.data_rank]
    stream = PartitionedStream(root, manifest, tc.batch_size, partitions, mine, tc.shuffle_samples,
                               seed=tc.seed, max_epochs=tc.max_epochs)
    scale = spec.scale_vector(device)
    tracker = DeadLatentTracker((spec.groups, model.n_latents), tc.dead_tokens, device)

    if is_main and (note := jumprelu_travel_note(tc)):
        say(note)
    start, positions, first = 0, {}, []
    if saved is None:
        # b_dec starts at the global batch mean, set before the optimizer copies the parameters
        # (DeepSpeed keeps master weights: a later in-place change would be overwritten)
        rest = stream.batches()
        first = [_next_batch(rest, collectives, run_dir, 0, False)]
        if first[0] is None:
            raise Interrupted("stopped before the first step")
        x0 = torch.from_numpy(first[0].acts).to(device).float() * scale
        with torch.no_grad():
            model.b_dec.copy_((collectives.data_sum(x0.double().sum(0)) / tc.batch_size).float())
    backend.setup(model)
    if saved is not None:
        state = backend.load(saved)
        if (refusal := another_dictionary(run_dir, state["spec"], asdict(spec))) is not None:
            raise refusal
        start, positions = state["step"], positions_from(state["positions"])
        check_partitions(run_dir, len(positions), partitions, backend.data_parallel)
        tracker.load_state_dict(state["dead"])
        set_rng_state(state["rng"])
        rest = stream.batches({p: pos for p, pos in positions.items() if p in mine})
        if is_main:
            _cut_log(run_dir / LOG_FILE, start)
            say(f"train: resuming {run_dir.absolute()} from step {start} of {tc.steps}")
            if (note := _schedule_change(run_dir, tc, start)) is not None:
                say(note)
    if is_main:  # once the run directory took this config: a refused one leaves the run's record as it was
        replace_text(run_dir / "config.toml", dumps_toml(cfg))

    def chained(head: list, tail: Iterator[PartitionBatch]) -> Iterator[PartitionBatch]:
        yield from head
        yield from tail

    batches = DeviceBatches(prefetch(chained(first, rest)), device, scale)
    result = TrainResult(run_dir=run_dir, steps=start, spec=asdict(spec))
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    bar = progress_bar(total=tc.steps, initial=start, desc="train", unit="step",
                       disable=not (progress and is_main), dynamic_ncols=True, mininterval=1.0)
    telemetry = TrainMetrics(cfg.metrics.port, backend.rank, host=cfg.metrics.host, run=cfg.name)
    experiment = ExperimentLog(cfg.logging if is_main else LoggingConfig(), run_dir, asdict(cfg))  # rank 0 only
    started = time.time()
    model.train()

    def checkpoint(done: int) -> None:
        backend.save(run_dir, {"spec": asdict(spec), "step": done, "positions": positions_to(positions),
                               "dead": tracker.state_dict(), "rng": rng_state()}, tc.keep_checkpoints)

    boundary = StepBoundary("this training step")
    said_at_the_end = ""
    try:
        with boundary:
            for step in range(start, end):
                faults.point("train", f"rank {backend.rank} step {step}")
                t0 = time.perf_counter()
                try:
                    fed = _next_batch(batches, collectives, run_dir, step, boundary.requested)
                except (ShardError, DataExhausted, TrainingStopped) as stopped:
                    if step > start:  # the steps so far are kept: mend the shard or add data, and re-run
                        checkpoint(step)
                        stopped.args = (f"{stopped} (stopped at step {step} with a checkpoint; a re-run resumes "
                                        "there)",)
                        if not isinstance(stopped, TrainingStopped):
                            record_stop(run_dir, stopped)
                    raise
                if fed is None:  # Ctrl-C or the driver's stop file: the steps so far are kept, none redone
                    if step > start:
                        checkpoint(step)
                    raise Interrupted(f"stopped at step {step} with a checkpoint; re-run the same command to resume")
                batch, x = fed
                t_data = time.perf_counter() - t0
                lr = learning_rate(tc, step)
                out, loss, terms = backend.forward(x, tracker.dead, loss_weights(tc, spec, step))
                # counted before the step, which changes no latent's firing here: the dead share comes
                # off the device with the loss, in the one read that also decides the finite check
                tracker.update(collectives.any_over_data(out.fired()), tc.batch_size)
                metrics = step_metrics(spec, x, out, terms, tracker, collectives)
                if not all(math.isfinite(v) for v in metrics["loss"].values()):
                    # over every rank: the message rank 0 records must name an inf another rank's batch held
                    data_bad = collectives.worst(0 if bool(torch.isfinite(x).all()) else 1)
                    cause = ("a batch of this step holds inf or NaN activations: `crosscoder validate DATA --full` "
                             "names the shards" if data_bad else "lower train.lr, or raise train.grad_clip")
                    kept = ("the last checkpoint is intact" if newest_checkpoint(run_dir) is not None
                            else "no checkpoint was written yet")
                    message = (f"loss is not finite at step {step} (rank {backend.rank}: "
                               f"{ {k: float(v) for k, v in terms.items()} }); the optimizer step was not taken and "
                               f"{kept}; {cause}.")
                    if is_main:
                        record_stop(run_dir, TrainingDiverged(message))
                    raise TrainingDiverged(message)
                grad_norm = backend.step(loss, lr)
                if out.batch_threshold is not None:
                    model.update_threshold(out.batch_threshold, out.weights.detach(), tc.threshold_momentum)
                positions.update(batch.positions)
                done = step + 1
                metrics |= {"step": done, "lr": lr, "grad_norm": grad_norm, "tokens": done * tc.batch_size,
                            "epoch": batch.epoch}
                if spec.activation == "batchtopk" and (done % tc.log_every == 0 or done == end):
                    # what encode() would keep with the running thresholds: the drift training cannot see
                    fired = count_firing(out.pre.detach(), model.threshold).to(torch.float64)
                    metrics["inference_l0"] = float(collectives.data_sum(collectives.sum_count(fired))) / (
                        collectives.batch_tokens(x.shape[0]) * out.pre.shape[1])
                elif spec.activation == "jumprelu":  # inference applies the thresholds training learns
                    metrics["inference_l0"] = metrics["l0"]
                result.losses.append(metrics["loss"]["total"])
                result.last_metrics = metrics
                telemetry.step(metrics, x.shape[0], time.perf_counter() - t0, t_data)
                if is_main and (done % tc.log_every == 0 or done == end):
                    with (run_dir / LOG_FILE).open("a") as fh:
                        fh.write(json.dumps(metrics | {"elapsed_s": time.time() - started}) + "\n")
                    experiment.log(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']['total']:.4g}", l0=f"{metrics['l0']:.1f}",
                                fve=f"{np.mean(list(metrics['fve'].values())):.3f}",
                                dead=dead_share(metrics, tc.dead_tokens, digits=2) or "n/a", refresh=False)
                if done == tc.steps and spec.activation == "batchtopk" and tc.calibration_batches:
                    with backend.full_weights():  # before the last checkpoint: a re-run exports the same
                        calibrated = model.calibrate_threshold(_inputs(batches, collectives, tc.calibration_batches),
                                                               spec.k, tc.calibration_batches * tc.batch_size)
                    if is_main:  # said once the bar is closed (a redrawn bar is one more line in a Ray worker's log)
                        said_at_the_end = (f"train: inference thresholds calibrated on {calibrated} tokens (mean "
                                           f"inference L0 {spec.k} there)")
                if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == end:
                    checkpoint(done)
                result.steps = done
    finally:
        bar.close()
        if said_at_the_end:
            say(said_at_the_end)
        batches.close()
        telemetry.close()
        experiment.close()

    if result.steps >= tc.steps:
        result.export_dir = backend.export(run_dir, {
            "trained_steps": result.steps, "data": data, "tokens": result.steps * tc.batch_size,
            "data_fingerprint": manifest.fingerprint(),
            "source_models": {s.name: {"model": s.model, "hook": s.hook} for s in manifest.sources}})
    report = backend.report()
    result.comm_bytes, result.memory_bytes = report.get("comm_bytes", 0), report.get("memory_bytes", {})
    result.elapsed_s = time.time() - started
    if is_main:
        result.write()
    return result
