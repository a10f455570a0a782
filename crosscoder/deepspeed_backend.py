"""One rank of distributed training: a DeepSpeed engine around this rank's latent slice.

The :class:`~crosscoder.trainer.Backend` of ``train.workers > 0``, run inside each Ray Train worker
(ray_train.py), whose process group is already set up. What it adds to the shared loop:

1. the rank owns a slice of the dictionary (``latent_range`` of :class:`~crosscoder.parallel.ParallelLayout`)
   and hands the model :class:`~crosscoder.parallel.DistributedCollectives` (global k-th values from
   local candidates, partial reconstructions summed by one all-reduce);
2. DeepSpeed owns the optimizer (Adam, ZeRO stage, fp32 or bf16, gradient clipping) and is told the
   latent/data groups through the layout ("mpu"); latent-sharded parameters are flagged
   ``model_parallel`` so the gradient norm counts each shard once;
3. checkpoints are DeepSpeed checkpoints (``<run>/checkpoints/step-<n>/``, ``latest``) whose client
   state holds every partition's data position, each latent slice's dead-latent counters and
   threshold, and the RNG states, gathered so any rank can load them; resuming needs the same
   latent × data layout (refused with a message otherwise);
4. the export is written slice by slice and assembled by streaming (sliced_export.py): the file a
   single process writes, without any process holding the whole dictionary.

:class:`Objective` exists for ZeRO-3, which gathers a module's own parameters around its forward:
every use of the weights, the AuxK decode and the L1 norms included, must happen inside one forward
of the module that owns them.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .config import RunConfig
from .losses import LossWeights, forward_and_loss
from .model import CrossCoder, export_layout, write_export_config
from .parallel import CommCounter, DistributedCollectives, ParallelLayout
from .sliced_export import assemble, write_slice

SHARDED = ("W_enc", "W_dec", "b_enc")


class Objective(torch.nn.Module):
    """The crosscoder's parameters and its training loss as one module (for ZeRO-3, see above).

    The parameters are registered here directly (the model itself is a plain attribute, not a
    submodule), so nothing is released half-way through the loss.
    """

    model: CrossCoder

    def __init__(self, model: CrossCoder):
        super().__init__()
        object.__setattr__(self, "model", model)
        for name, param in model.named_parameters():
            self.register_parameter(name, param)

    def forward(self, x: Tensor, dead: Tensor | None, weights: LossWeights):
        x = x.to(self.model.W_enc.dtype)  # bf16 engines cast the parameters, not the inputs
        out, loss, terms = forward_and_loss(self.model, x, dead, weights)
        return loss, terms, out


def deepspeed_config(cfg: RunConfig, local_batch: int) -> dict:
    """The DeepSpeed engine's config (its settings are checked by config.validate)."""
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


class DeepSpeedBackend:
    def __init__(self, cfg: RunConfig, device: torch.device = torch.device("cpu")):
        """One rank; the process group (gloo on CPU, NCCL on CUDA) exists already, and on CUDA
        ``device`` is this rank's GPU (every collective's tensors live there)."""
        self.cfg, self.tc, self.device = cfg, cfg.train, device
        self.layout = ParallelLayout.create(self.tc.latent_parallel)
        self.rank, self.data_rank = self.layout.rank, self.layout.dp_rank
        self.data_parallel = self.layout.data_parallel
        self.counter = CommCounter()
        self.collectives = DistributedCollectives(self.layout, self.counter, device)
        # ZeRO-2/3 partition gradients: memory kept for whole ones would undo that
        self.keeps_whole_gradients = self.tc.zero_stage < 2

    def latent_range(self, latents: int) -> tuple[int, int]:
        return self.layout.latent_range(latents)

    def has_checkpoint(self, run_dir: Path) -> bool:
        return (run_dir / "checkpoints" / "latest").is_file()

    def setup(self, model: CrossCoder) -> None:
        from .builds import use_for_torch_extensions

        use_for_torch_extensions()  # DeepSpeed's CPU comm op: this install's build, no stale-lock wait
        import deepspeed

        self.model = model
        objective = Objective(model)
        for name, param in objective.named_parameters():
            if name in SHARDED and self.layout.latent_parallel > 1:
                setattr(param, "model_parallel", True)  # noqa: B010 - DeepSpeed reads this flag
        self.engine, _, _, _ = deepspeed.initialize(
            model=objective, model_parameters=list(objective.parameters()),
            config=deepspeed_config(self.cfg, self.tc.batch_size // self.data_parallel),
            mpu=self.layout, dist_init_required=False)

    def load(self, run_dir: Path) -> dict:
        layout = self.layout
        _, client = self.engine.load_checkpoint(str(run_dir / "checkpoints"), load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise RuntimeError(f"{run_dir / 'checkpoints'}: the latest checkpoint could not be loaded")
        if client["layout"] != [layout.latent_parallel, layout.data_parallel]:
            from .trainer import RunDirError

            raise RunDirError(f"{run_dir}: its checkpoint was written on latent×data {client['layout']} ranks, this "
                              f"run has {[layout.latent_parallel, layout.data_parallel]}; resume with the same "
                              "shape or use another --run directory")
        if client["spec"] == asdict(self.model.spec):  # else the loop refuses the run directory
            self.model.threshold.copy_(client["threshold"][layout.lp_rank])
            self.model.threshold_updates.fill_(client["threshold_updates"])
        return {"spec": client["spec"], "step": client["step"], "positions": client["positions"],
                "dead": client["dead"][layout.lp_rank], "rng": client["rng"]}

    def forward(self, x, dead, weights):
        loss, terms, out = self.engine(x, dead, weights)
        return out, loss, terms

    def step(self, loss: Tensor, lr: float) -> float:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save(self, run_dir: Path, state: dict, keep: int) -> None:
        """A DeepSpeed checkpoint plus everything else resume needs, gathered so any rank can load it."""
        layout, model = self.layout, self.model
        everyone: list = [None] * layout.world
        dist.all_gather_object(everyone, state["positions"])
        positions: dict = {}
        for part in everyone:
            positions |= part
        slices: list = [None] * layout.world
        dist.all_gather_object(slices, (state["dead"], model.threshold.detach().cpu()))
        client = {"spec": state["spec"], "layout": [layout.latent_parallel, layout.data_parallel],
                  "step": state["step"], "positions": positions,
                  "dead": [slices[r][0] for r in range(layout.latent_parallel)],
                  "threshold": [slices[r][1] for r in range(layout.latent_parallel)],
                  "threshold_updates": int(model.threshold_updates), "rng": state["rng"]}
        root = run_dir / "checkpoints"
        self.engine.save_checkpoint(str(root), tag=f"step-{state['step']}", client_state=client)
        dist.barrier()
        if layout.rank == 0:
            (root / f"step-{state['step']}" / "position.json").write_text(json.dumps(positions) + "\n")
            tags = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")),
                          key=lambda p: int(p.name.split("-")[1]))
            for old in tags[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def export(self, run_dir: Path, extra: dict) -> Path | None:
        """``<run>/crosscoder`` without gathering (sliced_export.py): one rank per latent slice writes
        it, rank 0 assembles the file by streaming the slices; returns the path on rank 0."""
        layout, model = self.layout, self.model
        export_dir = run_dir / "crosscoder"
        scale = list(model.spec.norm_scale or [1.0] * model.spec.n_sources)
        if layout.dp_rank == 0:  # the data-parallel replicas of a slice hold the same weights
            with self.full_weights():
                write_slice(model.export_makers(scale), export_dir, layout.lp_rank)
        dist.barrier()
        if layout.rank == 0:
            assemble(export_dir, layout.latent_parallel, export_layout(model.spec))
            write_export_config(model.spec, export_dir, scale, extra | {
                "workers": layout.world, "latent_parallel": layout.latent_parallel})
        dist.barrier()
        return export_dir if layout.rank == 0 else None

    def full_weights(self):
        """This rank's slice of the weights, whole: ZeRO-3 partitions them outside the engine's forward."""
        if self.tc.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()))
        return contextlib.nullcontext()

    def report(self) -> dict:
        # the process's peak resident memory so far: training and the export (on rank 0, the assembly)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"comm_bytes": self.counter.bytes, "memory_bytes": self.resident_bytes() | {"peak_rss": peak}}

    def resident_bytes(self) -> dict:
        """This rank's parameter and optimizer memory: module parameters (their ZeRO-3 partitions),
        the optimizer's own parameter copies (ZeRO's fp32 partitions) and its state (Adam moments)."""
        def size(t):
            t = getattr(t, "ds_tensor", t)
            return t.numel() * t.element_size()

        module = {id(p): size(p) for p in self.engine.module.parameters()}
        opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        copies = sum(size(p) for g in opt.param_groups for p in g["params"] if id(p) not in module)
        state = sum(size(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
        return {"parameters": sum(module.values()), "optimizer_copies": copies, "optimizer_state": state,
                "total": sum(module.values()) + copies + state}
