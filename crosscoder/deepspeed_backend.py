"""One rank of distributed training: a DeepSpeed engine around this rank's latent slice.

The :class:`~crosscoder.trainer.Backend` of ``train.workers > 0``, run inside each Ray Train worker
(ray_train.py), whose process group is already set up. What it adds to the shared loop:

1. the rank owns a slice of the dictionary (``latent_range`` of :class:`~crosscoder.parallel.ParallelLayout`)
   and hands the model :class:`~crosscoder.parallel.DistributedCollectives` (global k-th values from
   local candidates, partial reconstructions summed by one all-reduce);
2. DeepSpeed owns the optimizer (Adam, ZeRO stage, fp32 or bf16, gradient clipping) and is told the
   latent/data groups through the layout ("mpu"); latent-sharded parameters are flagged
   ``model_parallel`` so the gradient norm counts each shard once;
3. checkpoints reshard: ``<run>/checkpoints/step-<n>/`` holds a ``torch.distributed.checkpoint``
   (``dcp/``) of every latent-shaped tensor as a DTensor on the (data, latent) mesh — the fp32
   weights and Adam's moments as DeepSpeed holds them (ZeRO partitions gathered with DeepSpeed's
   ``safe_get_full_*``), the inference thresholds and the dead-latent counters, each sharded along
   the latent axis and replicated over data ranks — plus ``loop.pt`` (step, Adam's step count,
   every data partition's position, RNG states). DCP reshards on load, so a run resumes on another
   number of workers or latent ranks (or another ZeRO stage ≤ 2) and continues the same
   trajectory, as long as ``train.data_partitions`` is unchanged (the global batch is the same
   tokens then); one process's ``state.pt`` (``train.workers = 0`` before) is read whole and each
   rank keeps its slice (checkpoint_handoff.py). Loading needs Adam's state to exist, which torch
   creates at the first step: one step with learning rate 0 on zero gradients makes it, then every
   value is overwritten. ZeRO-3
   keeps DeepSpeed's own checkpoint (its partitioned low-precision weights are not reachable
   through those calls), so it resumes on the same layout only (refused with a message otherwise).
   Either way ``checkpoints/latest`` names a checkpoint only once every rank's files are written:
   a full disk on one rank leaves the previous one named (DeepSpeed's own ``latest`` did not wait);
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
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from . import faults
from .checkpoint_handoff import MOMENTS, check_zero3_loads, read_whole, saved_spec
from .config import RunConfig
from .losses import LossWeights, forward_and_loss
from .model import CrossCoder, export_layout, write_export_config
from .parallel import CommCounter, DistributedCollectives, ParallelLayout
from .sliced_export import assemble, write_slice
from .storage import replace_text
from .trainer import (
    LOCAL_CHECKPOINT,
    RESULT_FILE,
    CheckpointError,
    RunDirError,
    checkpoint_error,
    newest_checkpoint,
    parameter_groups,
    prune_checkpoints,
    record_stop,
    set_learning_rate,
)

# torch 2.13 deprecates the collective that DeepSpeed's ZeRO and torch's own checkpoint code call; the
# warning names no step of ours and would be printed by every rank through Ray's log
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)

SHARDED = ("W_enc", "W_dec", "b_enc", "log_threshold")
# b_dec: whole on every rank
LATENT_AXIS = {"W_enc": 1, "W_dec": 0, "b_enc": 1, "log_threshold": 1, "threshold": 1, "dead": 1}


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


@contextlib.contextmanager
def _without_the_comm_op_line():
    """DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" with a
    bare print() in every rank on a CPU, even when it only loaded this install's build (builds.py).
    ``print`` itself is wrapped, not stdout: Ray Train's workers send print() to its logger (which
    writes to the driver's console) whatever sys.stdout is. Every other print passes through."""
    import builtins

    shown = builtins.print

    def print_but_that(*objects, **kwargs):
        text = " ".join(map(str, objects))
        if not (text.startswith("DeepSpeed ") and text.endswith("built successfully")):
            shown(*objects, **kwargs)

    builtins.print = print_but_that
    try:
        yield
    finally:
        builtins.print = shown


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
        self.states_linked = False  # see _link_every_group_state

    def latent_range(self, latents: int) -> tuple[int, int]:
        return self.layout.latent_range(latents)

    def setup(self, model: CrossCoder) -> None:
        from .builds import use_for_torch_extensions

        use_for_torch_extensions()  # DeepSpeed's CPU comm op: this install's build, no stale-lock wait
        import deepspeed

        self.model = model
        objective = Objective(model)
        for name, param in objective.named_parameters():
            if name in SHARDED and self.layout.latent_parallel > 1:
                setattr(param, "model_parallel", True)  # noqa: B010 - DeepSpeed reads this flag
        with _without_the_comm_op_line():
            self.engine, _, _, _ = deepspeed.initialize(
                model=objective, model_parameters=parameter_groups(model, self.tc),
                config=deepspeed_config(self.cfg, self.tc.batch_size // self.data_parallel),
                mpu=self.layout, dist_init_required=False)

    def load(self, folder: Path) -> dict:
        check_zero3_loads(folder, self.tc.zero_stage)
        if (folder / LOCAL_CHECKPOINT).is_file():  # one process's (checkpoint_handoff.py): read whole, sliced
            return self._load_slices(read_whole(folder, self.model, self.tc))
        if not (folder / "loop.pt").is_file():  # ZeRO-3's (or an older release's) DeepSpeed checkpoint
            then = saved_spec(folder)
            if then is not None and then != asdict(self.model.spec):  # DeepSpeed would fail on the shapes:
                return {"spec": then}  # the loop refuses the run directory by this alone
            return self._load_deepspeed(folder.parent.parent)
        loop = torch.load(folder / "loop.pt", weights_only=False, map_location="cpu")
        out = {"spec": loop["spec"], "step": loop["step"], "positions": loop["positions"], "dead": None,
               "rng": loop["rng"][self.rank] if len(loop["rng"]) == self.layout.world else loop["rng"][0]}
        if loop["spec"] != asdict(self.model.spec):  # the loop refuses the run directory
            return out
        import torch.distributed.checkpoint as dcp

        self._create_optimizer_state()
        targets = {name: torch.empty(shape, dtype=dtype, device=self.device)
                   for name, (shape, dtype) in self._latent_state_shapes().items()}
        shards = {name: self._on_mesh(name, t) for name, t in targets.items()}
        dcp.load(shards, checkpoint_id=str(folder / "dcp"))
        return out | self._restore({name: t.to_local() for name, t in shards.items()}, loop["adam_step"],
                                   loop["threshold_updates"])

    def _load_slices(self, whole: dict) -> dict:
        """A whole state (checkpoint_handoff.read_whole), this rank's latent slice of it loaded."""
        out = {key: whole[key] for key in ("spec", "step", "positions", "rng")} | {"dead": None}
        if whole["tensors"] is None:  # another dictionary: the loop refuses the run directory
            return out
        self._create_optimizer_state()
        start, end = self.layout.latent_range(self.model.spec.latents)
        local = {}
        for name, tensor in whole["tensors"].items():
            axis = LATENT_AXIS.get(name.rsplit(".", 1)[-1])
            local[name] = (tensor if axis is None else tensor.narrow(axis, start, end - start)).to(self.device)
        return out | self._restore(local, whole["adam_step"], whole["threshold_updates"])

    def _restore(self, local: dict[str, Tensor], adam_step: float, threshold_updates: int) -> dict:
        """This rank's weights, moments, thresholds from ``local``; the dead-latent counters to return."""
        self._set_weights_and_moments(local, adam_step)
        self.model.threshold.copy_(local["threshold"])
        self.model.threshold_updates.fill_(threshold_updates)
        return {"dead": {"window": self.tc.dead_tokens, "tokens_since_fired": local["dead"].cpu()}}

    # ------------------------------------------------------------------------------------------
    # the resharding checkpoint (see the module docstring)

    def _on_mesh(self, name: str, local: Tensor):
        """``local`` as this rank's piece of a DTensor on the (data, latent) mesh: sharded along the
        latent axis of tensors that have one, replicated over data ranks."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if getattr(self, "mesh", None) is None:  # rank r = data rank × latent_parallel + latent rank
            ranks = torch.arange(self.layout.world, device="cpu").view(self.layout.data_parallel, -1)
            self.mesh = DeviceMesh(self.device.type, ranks, mesh_dim_names=("data", "latent"))
        axis = LATENT_AXIS.get(name.rsplit(".", 1)[-1])
        placements = [Replicate(), Shard(axis) if axis is not None else Replicate()]
        return DTensor.from_local(local.contiguous(), self.mesh, placements, run_check=False)

    def _inner_optimizer(self):
        """The torch optimizer under DeepSpeed's wrapper (ZeRO, bf16), or the one it uses directly."""
        optimizer = self.engine.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    def _latent_state_shapes(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        shapes = {}
        for name, param in self.engine.module.named_parameters():
            for key in ("weight",) + MOMENTS:
                shapes[f"{key}.{name}"] = (param.shape, torch.float32)
        shapes["threshold"] = (self.model.threshold.shape, self.model.threshold.dtype)
        shapes["dead"] = (self.model.threshold.shape, torch.long)
        return shapes

    def _weights_and_moments(self) -> dict[str, Tensor]:
        """This rank's fp32 weights and Adam moments, whole for its latent slice (collective: ZeRO
        partitions are summed over the data group)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        state = self._inner_optimizer().state
        out = {}
        for name, param in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is None:  # fp32 without ZeRO: torch's Adam holds the parameter itself
                out[f"weight.{name}"] = param.detach().float()
                out |= {f"{key}.{name}": state[param][key] for key in MOMENTS}
            else:
                out[f"weight.{name}"] = full
                out |= {f"{key}.{name}": safe_get_full_optimizer_state(param, key) for key in MOMENTS}
        return out

    def _adam_step(self) -> float:
        steps = {float(st["step"]) for st in self._inner_optimizer().state.values() if "step" in st}
        if len(steps) != 1:
            raise RuntimeError(f"Adam's step counts differ between parameter groups: {sorted(steps)}")
        return steps.pop()

    def _create_optimizer_state(self) -> None:
        """Adam's state, which torch creates at the first step: one step with learning rate 0 on zero
        gradients makes it without changing a weight (the values are overwritten next)."""
        self.step(sum((param * 0.0).sum() for param in self.engine.module.parameters()), 0.0)

    def _set_weights_and_moments(self, local: dict[str, Tensor], adam_step: float) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        state = self._inner_optimizer().state
        with torch.no_grad():
            for name, param in self.engine.module.named_parameters():
                weight = local[f"weight.{name}"]
                if not hasattr(param, "_hp_mapping"):  # fp32 without ZeRO: the parameter is Adam's own
                    for key in MOMENTS:
                        state[param][key].copy_(local[f"{key}.{name}"])
                else:
                    safe_set_full_fp32_param(param, weight)
                    for key in MOMENTS:
                        safe_set_full_optimizer_state(param, local[f"{key}.{name}"], key)
                param.data.copy_(weight.to(param.dtype))  # the low-precision copy DeepSpeed makes after a step
            for st in state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"].fill_(adam_step)
                elif "step" in st:
                    st["step"] = adam_step

    def _load_deepspeed(self, run_dir: Path) -> dict:
        layout = self.layout
        _, client = self.engine.load_checkpoint(str(run_dir / "checkpoints"), load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise RuntimeError(f"{run_dir / 'checkpoints'}: the latest checkpoint could not be loaded")
        if client["layout"] != [layout.latent_parallel, layout.data_parallel]:
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
        set_learning_rate(self.engine.optimizer, lr)
        self.engine.backward(loss)
        self.engine.step()
        self._link_every_group_state()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def _link_every_group_state(self) -> None:
        """Once, after the first step: DeepSpeed 0.19's ZeRO-1/2 optimizer steps its parameter groups
        one by one and links each parameter to its Adam state (what ``safe_get_full_optimizer_state``
        reads) right after stepping the first group, when a second group (JumpReLU's thresholds) has
        no state yet, and never again; linked again here, every group has its state."""
        optimizer = self.engine.optimizer
        if self.states_linked or len(optimizer.param_groups) < 2:
            return
        if getattr(optimizer, "_hp_optimizer_states_linked", False):
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()
        self.states_linked = True

    def save(self, run_dir: Path, state: dict, keep: int) -> None:
        """The resharding checkpoint (ZeRO ≤ 2) or DeepSpeed's own (ZeRO-3); see the module docstring."""
        if self.tc.zero_stage == 3:
            return self._save_deepspeed(run_dir, state, keep)
        import torch.distributed.checkpoint as dcp

        layout, model = self.layout, self.model
        root = run_dir / "checkpoints"
        folder = root / f"step-{state['step']}"
        everyone = self._gathered((state["positions"], state["rng"]))
        positions = {p: pos for part, _ in everyone for p, pos in part.items()}  # every data partition's
        local = self._weights_and_moments() | {
            "threshold": model.threshold.detach(),
            "dead": state["dead"]["tokens_since_fired"].to(self.device)}
        adam_step = self._adam_step()
        if layout.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # a step saved again after a restart
        dist.barrier()
        failed: BaseException | None = None
        try:  # a full disk or a quota: every rank learns it below and stops alike, the last checkpoint kept
            dcp.save({name: self._on_mesh(name, t) for name, t in local.items()}, checkpoint_id=str(folder / "dcp"))
            if layout.rank == 0:
                faults.point("checkpoint", f"rank 0 step {state['step']}")
                torch.save({"spec": state["spec"], "layout": [layout.latent_parallel, layout.data_parallel],
                            "step": state["step"], "adam_step": adam_step, "positions": positions,
                            "threshold_updates": int(model.threshold_updates), "rng": [rng for _, rng in everyone]},
                           folder / "loop.pt")
                (folder / "position.json").write_text(json.dumps(positions) + "\n")
        except (OSError, RuntimeError, CheckpointException) as error:  # DCP raises the last on every rank
            failed = error
        if self.collectives.worst(1 if failed is not None else 0):
            # every rank raises, and records, the first failing rank's cause and its disk's free space: a
            # rank whose own part was written said only "another rank could not write its part", and
            # whichever rank's record came last was the one the driver read (a race a test met)
            mine = None if failed is None else str(checkpoint_error(folder, failed, newest_checkpoint(run_dir)))
            causes = [said for said in self._gathered(mine) if said is not None]  # after every rank measured
            stop = CheckpointError(causes[0])
            if layout.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            raise stop
        if layout.rank == 0:
            replace_text(root / "latest", folder.name)  # the checkpoint counts from here on
            prune_checkpoints(run_dir, keep, folder)
        dist.barrier()
        return None

    def _gathered(self, mine) -> list:
        """Every rank's ``mine``, in rank order (collective)."""
        everyone: list = [None] * self.layout.world
        dist.all_gather_object(everyone, mine)
        return everyone

    def _save_deepspeed(self, run_dir: Path, state: dict, keep: int) -> None:
        """A DeepSpeed checkpoint plus everything else resume needs, gathered so any rank can load it."""
        layout, model = self.layout, self.model
        positions = {p: pos for part in self._gathered(state["positions"]) for p, pos in part.items()}
        slices = self._gathered((state["dead"], model.threshold.detach().cpu()))
        client = {"spec": state["spec"], "layout": [layout.latent_parallel, layout.data_parallel],
                  "step": state["step"], "positions": positions,
                  "dead": [slices[r][0] for r in range(layout.latent_parallel)],
                  "threshold": [slices[r][1] for r in range(layout.latent_parallel)],
                  "threshold_updates": int(model.threshold_updates), "rng": state["rng"]}
        root = run_dir / "checkpoints"
        folder = root / f"step-{state['step']}"
        try:  # DeepSpeed's `latest` is written by rank 0 whether or not the other ranks' files were: not used
            if layout.rank == 0:
                faults.point("checkpoint", f"rank 0 step {state['step']}")
            self.engine.save_checkpoint(str(root), tag=folder.name, client_state=client, save_latest=False)
        except (OSError, RuntimeError) as error:
            # a full disk on this rank, or on the others its end (they wait in DeepSpeed's barrier until its
            # process exits): not reduced over the ranks, as a collective after DeepSpeed's failed save could
            # hang. The first rank to fail records the cause, then exits as a worker failure: Ray Train's
            # restart finds the record and stops (ray_train.train_worker), `latest` still the last whole one
            stop = checkpoint_error(folder, error, newest_checkpoint(run_dir))
            if not (run_dir / RESULT_FILE).exists():  # the others fail after the first, on its exit
                record_stop(run_dir, stop)
            if layout.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(str(stop)) from error
        dist.barrier()
        if layout.rank == 0:
            (folder / "position.json").write_text(json.dumps(positions) + "\n")
            replace_text(root / "latest", folder.name)  # every rank's files are written: it counts from here on
            prune_checkpoints(run_dir, keep, folder)
        dist.barrier()

    def export(self, run_dir: Path, extra: dict) -> Path | None:
        """``<run>/crosscoder`` without gathering (sliced_export.py): one rank per latent slice writes
        it, rank 0 assembles the file by streaming the slices; returns the path on rank 0."""
        layout, model = self.layout, self.model
        export_dir = run_dir / "crosscoder"
        scale = model.spec.scales
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
