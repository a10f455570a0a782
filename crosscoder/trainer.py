"""Single-process crosscoder training: Adam, schedules, checkpoints with exact resume, export.

The loop is deliberately plain (nanoGPT-style): read a batch, normalise it, forward, loss, backward,
clip, step, update the BatchTopK threshold and the dead-latent tracker, log. What makes it more
than a notebook loop:

- exact resume: a checkpoint holds the model, Adam's state, the step, the data position (see
  stream.py), the dead-latent counters and the RNG states, and is written under a temporary name
  and renamed, so a run killed at any moment resumes from the last complete checkpoint and sees the
  same tokens and the same updates as an uninterrupted run;
- a NaN or inf loss stops the run before the optimizer step with :class:`TrainingDiverged`, naming
  the step and the terms, and leaves the last good checkpoint untouched;
- no decoder-norm constraint is imposed: the L1 penalty and the TopK/BatchTopK selection are both
  weighted by the decoder norms, which makes the objective invariant to moving scale between a
  latent's encoder and decoder, so the norms carry meaning (the relative norm between sources)
  instead of being fixed by a projection.

The distributed trainer (Ray Train + DeepSpeed) reuses the same forward and loss
(:func:`crosscoder.losses.forward_and_loss`, through ``Objective``) and the data stream; this
module imports neither Ray nor DeepSpeed.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .config import RunConfig, TrainConfig, dumps_toml, use_sparse_kernels
from .dead import DeadLatentTracker
from .losses import LossWeights, forward_and_loss
from .metrics import fve_per_source
from .model import CrossCoder, CrossCoderSpec, ForwardOutput, default_aux_k
from .shards import Manifest, read_manifest
from .storage import open_root
from .stream import PartitionedStream, Position, prefetch
from .telemetry import TrainMetrics


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class RunDirError(ValueError):
    """The run directory holds state that does not fit this run."""


# ---------------------------------------------------------------------------------------------
# pieces shared with the distributed trainer


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


def scale_vector(spec: CrossCoderSpec) -> torch.Tensor:
    """[D]: each source's normalisation scale repeated over its width."""
    scale = spec.norm_scale or [1.0] * spec.n_sources
    return torch.cat([torch.full((w,), float(c)) for w, c in zip(spec.widths, scale)])


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last ``lr_decay_fraction``."""
    lr = cfg.lr
    if cfg.lr_warmup_steps > 0:
        lr *= min(1.0, (step + 1) / cfg.lr_warmup_steps)
    decay_steps = int(cfg.lr_decay_fraction * cfg.steps)
    if decay_steps > 0 and step >= cfg.steps - decay_steps:
        lr *= (cfg.steps - step) / decay_steps
    return lr


def loss_weights(cfg: TrainConfig, spec: CrossCoderSpec, step: int) -> LossWeights:
    l1 = cfg.l1_coeff * (min(1.0, (step + 1) / cfg.l1_warmup_steps) if cfg.l1_warmup_steps > 0 else 1.0)
    return LossWeights(
        l1=l1,
        aux=cfg.aux_coeff,
        aux_k=cfg.aux_k or default_aux_k(spec),
        align=cfg.align_coeff,
        align_loss=cfg.align_loss,
    )


def check_finite(step: int, terms: dict[str, torch.Tensor]) -> None:
    bad = {k: float(v) for k, v in terms.items() if not math.isfinite(float(v))}
    if bad:
        raise TrainingDiverged(
            f"loss is not finite at step {step}: {bad}; the optimizer step was not taken and the last "
            "checkpoint is intact. Lower train.lr, check the data for inf/NaN, or raise train.grad_clip."
        )


def step_metrics(spec: CrossCoderSpec, x: torch.Tensor, out: ForwardOutput) -> dict:
    fve = fve_per_source(x, out.x_hat.detach(), spec.slices)
    return {
        "fve": {name: float(v) for name, v in zip(spec.sources, fve)},
        "l0": float(out.active_count()) / (x.shape[0] * out.pre.shape[1]),
    }


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.pt").is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    (tmp / "position.json").write_text(json.dumps(state["position"]) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def positions_to(positions: dict[int, Position]) -> dict:
    return {str(p): pos.to_dict() for p, pos in positions.items()}


def positions_from(data: dict) -> dict[int, Position]:
    return {int(p): Position.from_dict(pos) for p, pos in data.items()}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # total loss per step run in this call
    last_metrics: dict = field(default_factory=dict)
    export_dir: Path | None = None


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    data: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train (or resume) a crosscoder in this process.

    ``stop_after`` ends the call after that many steps of this call (a checkpoint is written), as an
    interrupted run would; the next call resumes. ``on_step(step, metrics)`` is called every step.
    """
    tc = cfg.train
    run_dir = Path(run_dir)
    data = data or tc.data
    if not data:
        raise RunDirError("no training data: set train.data in the config or pass --data ROOT")
    root = open_root(data, cfg.storage)
    manifest = read_manifest(root)
    spec = spec_from(tc, manifest)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dumps_toml(cfg))

    torch.manual_seed(tc.seed)
    model = CrossCoder(spec, seed=tc.seed, dec_init_norm=tc.dec_init_norm)
    model.sparse_kernels = use_sparse_kernels(tc)
    # fused: one kernel per parameter, no parameter-sized temporaries (4 B/param less at peak than foreach)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    tracker = DeadLatentTracker((spec.groups, spec.latents), tc.dead_tokens)
    start, positions = 0, {}

    existing = checkpoint_dirs(run_dir)
    if existing:
        state = torch.load(existing[-1] / "state.pt", weights_only=False)
        if state["spec"] != asdict(spec):
            raise RunDirError(
                f"{run_dir}: its checkpoint was trained with {state['spec']}, this config asks for "
                f"{asdict(spec)}; use another --run directory or delete {run_dir / 'checkpoints'}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        tracker.load_state_dict(state["dead"])
        set_rng_state(state["rng"])
        start, positions = state["step"], positions_from(state["position"])

    partitions = tc.data_partitions or 1
    stream = PartitionedStream(root, manifest, tc.batch_size, partitions, list(range(partitions)),
                               tc.shuffle_samples, seed=tc.seed, max_epochs=tc.max_epochs)
    batches = prefetch(stream.batches(positions))
    scale = scale_vector(spec)
    result = TrainResult(run_dir=run_dir, steps=start)
    log_path = run_dir / "train_log.jsonl"
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    started = time.time()
    step = start
    model.train()
    telemetry = TrainMetrics(cfg.metrics.port, 0, host=cfg.metrics.host)
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            batch = next(batches)
            t_data = time.perf_counter() - t0
            x = torch.from_numpy(batch.acts).float() * scale
            if step == 0:
                with torch.no_grad():
                    model.b_dec.copy_(x.mean(0))
            lr = learning_rate(tc, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out, loss, terms = forward_and_loss(model, x, tracker.dead, loss_weights(tc, spec, step))
            check_finite(step, terms)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                if tc.grad_clip > 0 else torch.tensor(0.0)
            )
            optimizer.step()
            if out.batch_threshold is not None:
                model.update_threshold(out.batch_threshold, out.weights.detach(), tc.threshold_momentum)
            tracker.update(out.fired(), x.shape[0])
            positions = batch.positions

            metrics = step_metrics(spec, x, out) | {
                "step": step + 1,
                "lr": lr,
                "loss": {k: float(v) for k, v in terms.items()},
                "dead_fraction": tracker.dead_fraction(),
                "grad_norm": float(grad_norm),
                "tokens": (step + 1) * tc.batch_size,
                "epoch": batch.epoch,
            }
            result.losses.append(float(terms["total"]))
            telemetry.step(metrics, x.shape[0], time.perf_counter() - t0, t_data)
            result.last_metrics = metrics
            if on_step:
                on_step(step + 1, metrics)
            if (step + 1) % tc.log_every == 0 or step + 1 == end:
                with log_path.open("a") as fh:
                    fh.write(json.dumps(metrics | {"elapsed_s": time.time() - started}) + "\n")
            bar.update(1)
            bar.set_postfix(
                loss=f"{float(terms['total']):.4g}",
                fve=f"{np.mean(list(metrics['fve'].values())):.3f}",
                l0=f"{metrics['l0']:.1f}",
                dead=f"{metrics['dead_fraction']:.2%}",
                refresh=False,
            )
            done = step + 1
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == end:
                save_checkpoint(
                    run_dir,
                    done,
                    {
                        "spec": asdict(spec),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "dead": tracker.state_dict(),
                        "rng": rng_state(),
                        "step": done,
                        "position": positions_to(positions),
                    },
                    tc.keep_checkpoints,
                )
            result.steps = done
    finally:
        bar.close()
        batches.close()
        telemetry.close()

    if result.steps >= tc.steps:
        result.export_dir = run_dir / "crosscoder"
        model.save_pretrained(
            result.export_dir,
            norm_scale=spec.norm_scale,
            extra={"trained_steps": result.steps, "data": data, "tokens": result.steps * tc.batch_size},
        )
    return result


def export_from_checkpoint(run_dir: str | Path) -> Path:
    """Re-export the latest checkpoint of a run (e.g. after an interrupted run)."""
    run_dir = Path(run_dir)
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise RunDirError(f"{run_dir}: no checkpoints")
    state = torch.load(dirs[-1] / "state.pt", weights_only=False)
    spec = CrossCoderSpec(**state["spec"])
    model = CrossCoder(spec)
    model.load_state_dict(state["model"])
    model.save_pretrained(run_dir / "crosscoder", norm_scale=spec.norm_scale, extra={"trained_steps": state["step"]})
    return run_dir / "crosscoder"
