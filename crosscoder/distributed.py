"""The distributed training loop: one DeepSpeed engine per rank around a latent slice of the crosscoder.

Runs inside each Ray Train worker (see ray_train.py), which has already set up the process group
(gloo on CPU, NCCL on GPU). What each rank does per step is the single-process loop of trainer.py
with four changes, and nothing else:

1. it builds only its slice of the dictionary (``latent_range``) and swaps the model's selection for
   :class:`~crosscoder.parallel.DistributedSelection` (global k-th values from local candidates,
   partial reconstructions summed by one all-reduce);
2. DeepSpeed owns the optimizer (Adam, ZeRO stage from config, fp32 or bf16, gradient clipping),
   told the latent/data groups through :class:`~crosscoder.parallel.ParallelLayout`; latent-sharded
   parameters are flagged ``model_parallel`` so the gradient norm counts each shard once;
3. it reads only its data partitions (stream.py), and the dead-latent "fired" mask is OR-ed over the
   data-parallel group before the tracker sees it, so every rank agrees on which latents are dead;
4. statistics are reduced before logging, so rank 0 logs the global batch's metrics.

Checkpoints are DeepSpeed checkpoints (``<run>/checkpoints/step-<n>/``) with the data positions of
every partition, the dead-latent counters and the RNG states as client state; the export gathers
the slices and writes the same ``model.safetensors`` a single process writes. A NaN/inf loss on any
rank stops every rank before the optimizer step.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig, from_dict, use_sparse_kernels
from .dead import DeadLatentTracker
from .losses import Objective
from .metrics import sums_for_fve
from .model import CrossCoder
from .parallel import CommCounter, DistributedSelection, ParallelLayout, all_gather_cat
from .shards import read_manifest
from .storage import open_root
from .stream import PartitionedStream, prefetch
from .telemetry import TrainMetrics
from .trainer import (
    learning_rate,
    loss_weights,
    positions_from,
    positions_to,
    rng_state,
    scale_vector,
    set_rng_state,
    spec_from,
)

SHARDED = ("W_enc", "W_dec", "b_enc")


def check_config(cfg: RunConfig, latents: int) -> None:
    """Every setting of the distributed trainer that needs no process group, checked the same way
    on the driver (before Ray Train starts workers it would restart on a config error) and on each
    rank. ``latents`` is the dictionary size (``train.latents`` resolved against the dataset)."""
    tc = cfg.train
    if tc.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be fp32 or bf16, got {tc.precision!r}")
    if tc.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {tc.zero_stage}")
    if tc.workers < 1:
        raise ConfigError(f"train.workers must be at least 1 for the distributed trainer, got {tc.workers}")
    if tc.latent_parallel < 1 or tc.workers % tc.latent_parallel:
        raise ConfigError(f"train.latent_parallel={tc.latent_parallel} must divide the number of workers ({tc.workers})")
    if latents % tc.latent_parallel:
        raise ConfigError(f"train.latents ({latents}) must be divisible by train.latent_parallel ({tc.latent_parallel})")
    data_parallel = tc.workers // tc.latent_parallel
    if tc.batch_size % data_parallel:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) must be divisible by the {data_parallel} data-parallel ranks")
    partitions = tc.data_partitions or data_parallel
    if partitions % data_parallel:
        raise ConfigError(f"train.data_partitions ({partitions}) must be a multiple of the data-parallel size ({data_parallel})")


def deepspeed_config(cfg: RunConfig, local_batch: int) -> dict:
    """The DeepSpeed engine's config (settings checked by :func:`check_config`)."""
    tc = cfg.train
    return {
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Adam",
            "params": {"lr": tc.lr, "betas": [tc.beta1, tc.beta2], "eps": 1e-8, "weight_decay": 0.0,
                       "torch_adam": True, "fused": True},
        },
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": tc.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        return []
    return [int(latest.read_text().strip().split("-")[1])]


def _dp_mean(value: float, selection: DistributedSelection) -> float:
    return float(selection.data_sum(torch.tensor(value, dtype=torch.float64))) / selection.layout.data_parallel


def global_metrics(spec, x, out, terms, tracker, selection: DistributedSelection) -> dict:
    stats = selection.data_sum(sums_for_fve(x, out.x_hat.detach(), spec.slices))
    fve = {}
    for name, (sse, s1, s2, n) in zip(spec.sources, stats.tolist()):
        # total variance of the global batch = Σx² − (Σx)²/n over every dim; n counts tokens × width
        width = spec.widths[spec.sources.index(name)]
        tokens = n / width
        sst = s2 - _sum_sq_over_dims(x, spec, name, selection, tokens)
        fve[name] = 1 - sse / max(sst, 1e-12)
    active = selection.sum_count(out.active_count().to(torch.float64))
    l0 = float(selection.data_sum(active)) / (selection.batch_tokens(x.shape[0]) * out.pre.shape[1])
    dead = float(selection.sum_count(tracker.dead.sum().to(torch.float64))) / (spec.groups * spec.latents)
    return {
        "fve": fve,
        "l0": l0,
        "loss": {k: _dp_mean(float(v), selection) for k, v in terms.items()},
        "dead_fraction": dead,
    }


def _sum_sq_over_dims(x, spec, name, selection, tokens) -> float:
    sl = spec.slices[spec.sources.index(name)]
    column_sums = selection.data_sum(x[:, sl].double().sum(0))
    return float(column_sums.pow(2).sum() / tokens)


def gather_full_model(model: CrossCoder, layout: ParallelLayout) -> CrossCoder | None:
    """The whole dictionary on global rank 0 (None elsewhere); every rank must call it."""
    tensors = {
        "W_enc": all_gather_cat(model.W_enc.detach().float(), layout.lp_group, dim=1),
        "W_dec": all_gather_cat(model.W_dec.detach().float(), layout.lp_group, dim=0),
        "b_enc": all_gather_cat(model.b_enc.detach().float(), layout.lp_group, dim=1),
        "threshold": all_gather_cat(model.threshold.detach().float(), layout.lp_group, dim=1),
    }
    if layout.rank != 0:
        return None
    full = CrossCoder(model.spec, dec_init_norm=1.0)
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(full, name).copy_(value)
        full.b_dec.copy_(model.b_dec.detach().float())
        full.threshold_updates.copy_(model.threshold_updates)
    return full


def train_worker(config: dict) -> dict:
    """Entry point of every rank (``config``: run config dict, run_dir, data)."""
    os.environ.update(config.get("env", {}))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    cfg = from_dict(RunConfig, config["config"])
    tc = cfg.train
    run_dir, data = Path(config["run_dir"]), config["data"]
    stop_after = config.get("stop_after")
    layout = ParallelLayout.create(tc.latent_parallel)
    rank = layout.rank
    root = open_root(data, cfg.storage)
    manifest = read_manifest(root)
    spec = spec_from(tc, manifest)
    check_config(cfg, spec.latents)
    partitions = tc.data_partitions or layout.data_parallel

    torch.manual_seed(tc.seed)
    model = CrossCoder(spec, seed=tc.seed, dec_init_norm=tc.dec_init_norm,
                       latent_range=layout.latent_range(spec.latents))
    model.sparse_kernels = use_sparse_kernels(tc)
    if tc.zero_stage >= 2:  # ZeRO-2/3 partition gradients: memory kept for whole ones would undo that
        model.gradient_memory = None
    counter = CommCounter()
    selection = DistributedSelection(layout, counter)
    model.selection = selection
    mine = [p for p in range(partitions) if p % layout.data_parallel == layout.dp_rank]
    stream = PartitionedStream(root, manifest, tc.batch_size, partitions, mine, tc.shuffle_samples,
                               seed=tc.seed, max_epochs=tc.max_epochs)
    scale = scale_vector(spec)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    resuming = bool(checkpoint_steps(run_dir))
    first = None
    if not resuming:
        # b_dec starts at the global batch mean; set before DeepSpeed copies the parameters into
        # its optimizer's master weights (a later in-place change would be overwritten)
        batches = stream.batches()
        first = next(batches)
        x0 = torch.from_numpy(first.acts).float() * scale
        with torch.no_grad():
            model.b_dec.copy_((selection.data_sum(x0.double().sum(0)) / tc.batch_size).float())

    objective = Objective(model)
    for name, param in objective.named_parameters():
        if name in SHARDED and layout.latent_parallel > 1:
            param.model_parallel = True
    local_batch = tc.batch_size // layout.data_parallel
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=[p for p in objective.parameters()],
        config=deepspeed_config(cfg, local_batch),
        mpu=layout,
        dist_init_required=False,
    )
    tracker = DeadLatentTracker((spec.groups, model.n_latents), tc.dead_tokens)
    start, positions = 0, {}
    ckpt_root = run_dir / "checkpoints"
    if resuming:
        _, client = engine.load_checkpoint(str(ckpt_root), load_optimizer_states=True, load_lr_scheduler_states=False)
        if client is None:
            raise RuntimeError(f"{ckpt_root}: the latest checkpoint could not be loaded")
        if client["spec"] != asdict(spec) or client["layout"] != [layout.latent_parallel, layout.data_parallel]:
            raise ValueError(
                f"{run_dir}: its checkpoint was written for {client['spec']} on latent×data "
                f"{client['layout']} ranks; resume with the same shape or use another --run directory"
            )
        start = client["step"]
        positions = positions_from(client["positions"])
        tracker.load_state_dict(client["dead"][layout.lp_rank])
        model.threshold.copy_(client["threshold"][layout.lp_rank])
        model.threshold_updates.fill_(client["threshold_updates"])
        set_rng_state(client["rng"])
        batches = stream.batches({p: pos for p, pos in positions.items() if p in mine})

    def with_first(first, rest):
        if first is not None:
            yield first
        yield from rest

    batches = prefetch(with_first(first, batches))
    telemetry = TrainMetrics(cfg.metrics.port, rank, host=cfg.metrics.host)
    log_path = run_dir / "train_log.jsonl"
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    history, metrics = [], {}
    started = time.time()
    progress = None
    if rank == 0 and config.get("progress", True):
        from tqdm import tqdm

        progress = tqdm(total=tc.steps, initial=start, desc="train", unit="step", mininterval=1.0)
    fault = os.environ.get("CROSSCODER_FAULT_INJECT", "")  # "rank:step": die once there (fault tests)
    diverged = None
    try:
        for step in range(start, end):
            if fault and fault == f"{rank}:{step}" and not (run_dir / f".fault-{fault}").exists():
                (run_dir / f".fault-{fault}").touch()
                os._exit(17)
            t0 = time.perf_counter()
            batch = next(batches)
            t_data = time.perf_counter() - t0
            x = torch.from_numpy(batch.acts).float() * scale
            lr = learning_rate(tc, step)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            loss, terms, out = engine(x, tracker.dead, loss_weights(tc, spec, step))
            finite = torch.tensor([float(all(torch.isfinite(v) for v in terms.values()))])
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:
                diverged = (
                    f"loss is not finite at step {step} (on at least one rank; rank {rank}: "
                    f"{ {k: float(v) for k, v in terms.items()} }); the optimizer step was not taken and "
                    "the last checkpoint is intact"
                )
                break
            engine.backward(loss)
            engine.step()
            if out.batch_threshold is not None:
                model.update_threshold(out.batch_threshold, out.weights.detach(), tc.threshold_momentum)
            fired = out.fired().to(torch.uint8)
            if layout.data_parallel > 1:
                dist.all_reduce(fired, op=dist.ReduceOp.MAX, group=layout.dp_group)
            tracker.update(fired.bool(), tc.batch_size)
            positions.update(batch.positions)
            metrics = global_metrics(spec, x, out, terms, tracker, selection) | {
                "step": step + 1, "lr": lr, "tokens": (step + 1) * tc.batch_size, "epoch": batch.epoch,
                "comm_bytes": counter.bytes,
            }
            history.append(metrics["loss"]["total"])
            telemetry.step(metrics, local_batch, time.perf_counter() - t0, t_data)
            done = step + 1
            if rank == 0 and ((done % tc.log_every == 0) or done == end):
                with log_path.open("a") as fh:
                    fh.write(json.dumps(metrics | {"elapsed_s": time.time() - started}) + "\n")
            if progress:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']['total']:.4g}",
                                     fve=f"{np.mean(list(metrics['fve'].values())):.3f}",
                                     l0=f"{metrics['l0']:.1f}", dead=f"{metrics['dead_fraction']:.2%}", refresh=False)
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == end:
                save(engine, run_dir, done, spec, layout, tracker, model, positions, tc.keep_checkpoints)
            start = done
    finally:
        batches.close()
        telemetry.close()
        if progress:
            progress.close()

    if diverged:
        if rank == 0:
            (run_dir / "train_result.json").write_text(json.dumps({"error": diverged}) + "\n")
        dist.barrier()
        return {"error": diverged}
    export_dir = None
    if start >= tc.steps:
        export_dir = export(engine, model, layout, run_dir, spec, data, tc)
    dist.barrier()
    result = {"steps": start, "losses": history, "last_metrics": metrics,
              "export_dir": str(export_dir) if export_dir else None, "comm_bytes": counter.bytes,
              "memory_bytes": resident_bytes(engine), "elapsed_s": time.time() - started}
    if rank == 0:
        (run_dir / "train_result.json").write_text(json.dumps(result) + "\n")
    return result


def resident_bytes(engine) -> dict:
    """This rank's parameter and optimizer memory: module parameters (their ZeRO-3 partitions),
    the optimizer's own parameter copies (ZeRO's fp32 partitions) and its state (Adam moments)."""
    def size(t):
        t = getattr(t, "ds_tensor", t)
        return t.numel() * t.element_size()

    module = {id(p): size(p) for p in engine.module.parameters()}
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    copies = sum(size(p) for g in opt.param_groups for p in g["params"] if id(p) not in module)
    state = sum(size(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"parameters": sum(module.values()), "optimizer_copies": copies, "optimizer_state": state,
            "total": sum(module.values()) + copies + state}


def save(engine, run_dir: Path, step: int, spec, layout, tracker, model, positions, keep: int) -> None:
    """A DeepSpeed checkpoint plus everything else resume needs, gathered so any rank can load it."""
    everyone = [None] * layout.world
    dist.all_gather_object(everyone, positions_to(positions))
    merged = {}
    for part in everyone:
        merged |= part
    lp = [None] * layout.world
    dist.all_gather_object(lp, (tracker.state_dict(), model.threshold.detach().clone()))
    client = {
        "spec": asdict(spec),
        "layout": [layout.latent_parallel, layout.data_parallel],
        "step": step,
        "positions": merged,
        "dead": [lp[r][0] for r in range(layout.latent_parallel)],
        "threshold": [lp[r][1] for r in range(layout.latent_parallel)],
        "threshold_updates": int(model.threshold_updates),
        "rng": rng_state(),
    }
    ckpt_root = run_dir / "checkpoints"
    engine.save_checkpoint(str(ckpt_root), tag=f"step-{step}", client_state=client)
    dist.barrier()
    if layout.rank == 0:
        (ckpt_root / f"step-{step}" / "position.json").write_text(json.dumps(merged) + "\n")
        tags = sorted((p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-")),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def export(engine, model: CrossCoder, layout: ParallelLayout, run_dir: Path, spec, data: str, tc) -> Path:
    params = list(engine.module.parameters())
    if tc.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            full = gather_full_model(model, layout)
    else:
        full = gather_full_model(model, layout)
    export_dir = run_dir / "crosscoder"
    if full is not None:
        full.save_pretrained(export_dir, norm_scale=spec.norm_scale,
                             extra={"trained_steps": tc.steps, "data": data, "tokens": tc.steps * tc.batch_size,
                                    "workers": layout.world, "latent_parallel": layout.latent_parallel})
    return export_dir
