"""Start the distributed trainer with Ray Train: N workers, a process group, failure retries.

``ray.train.torch.TorchTrainer`` starts ``train.workers`` workers and sets up the process group
(gloo on CPU; NCCL and one GPU per worker with ``train.device = cuda``, or ``auto`` on a cluster with a
GPU per worker); each runs :func:`train_worker`, the shared training loop
(trainer.py) with a DeepSpeed backend. The same call works against a cluster (``RAY_ADDRESS`` or
``ray job submit``) and with no cluster (a local Ray, ray_connect.py). A worker that dies makes Ray
Train restart every worker, up to ``train.max_failures`` times; the workers resume from the run
directory's last checkpoint, so the run directory must be on storage every worker sees (a shared
file system on a cluster). A NaN loss is not retried: every rank stops at the same step and the
driver raises :class:`~crosscoder.trainer.TrainingDiverged` from the result file.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from .config import RunConfig, from_dict, to_dict, validate
from .ray_connect import connect
from .trainer import RESULT_FILE, TrainingDiverged, TrainResult


def train_worker(config: dict) -> None:
    """Entry point of every rank (``config``: run config dict, run_dir, data, ...)."""
    os.environ.update(config["env"])
    cfg = from_dict(RunConfig, config["config"])  # train.device resolved by the driver: cpu or cuda
    os.environ["DS_ACCELERATOR"] = cfg.train.device  # read when DeepSpeed is imported: never CPU on a GPU
    import torch

    from .deepspeed_backend import DeepSpeedBackend
    from .trainer import train

    device = torch.device("cpu")
    if cfg.train.device == "cuda":
        from ray.train.torch import get_device

        device = get_device()  # this worker's GPU (Ray sets CUDA_VISIBLE_DEVICES)
        torch.cuda.set_device(device)
    try:
        train(cfg, config["run_dir"], config["data"], progress=config["progress"], stop_after=config["stop_after"],
              backend=DeepSpeedBackend(cfg, device))
    except TrainingDiverged:
        pass  # rank 0 wrote it to the result file; a retry would diverge again


def train_distributed(cfg: RunConfig, run_dir: str | Path, data: str, progress: bool = True,
                      stop_after: int | None = None) -> TrainResult:
    """Run the distributed trainer to the end (or ``stop_after`` steps); returns rank 0's result."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .shards import read_manifest
    from .storage import absolute_url, open_root

    validate(cfg)  # a setting the workers would reject fails here, once, not per retry
    cfg = copy.deepcopy(cfg)
    tc = cfg.train
    run_dir = Path(run_dir).absolute()
    data = absolute_url(data)  # workers run in other working directories
    read_manifest(open_root(data, cfg.storage))  # a missing dataset fails here, once, not per retry
    run_dir.mkdir(parents=True, exist_ok=True)
    ray = connect(max(tc.workers, 1))
    if tc.device == "auto":  # explicit cuda is not checked: an autoscaler may add GPU nodes
        gpus = ray.cluster_resources().get("GPU", 0)
        tc.device = "cuda" if gpus >= tc.workers else "cpu"
        print(f"train.device: auto -> {tc.device} ({gpus:g} GPUs in the Ray cluster for {tc.workers} workers)",
              file=sys.stderr)
    cuda = tc.device == "cuda"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "data": data,
                           "stop_after": stop_after, "progress": progress,
                           # the package's own switches (CROSSCODER_*: kernels, precision path, fault
                           # tests) reach workers of a cluster started before they were set
                           "env": {k: v for k, v in os.environ.items() if k.startswith("CROSSCODER_")}},
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=cuda, resources_per_worker={"CPU": 1}),
        run_config=RayRunConfig(name=f"crosscoder-{cfg.name}", storage_path=str(run_dir / "ray"),
                                failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    result = trainer.fit()
    if result.error:
        raise result.error
    finished = TrainResult.read(run_dir)  # raises TrainingDiverged when the ranks stopped on a NaN
    if finished is None:
        raise RuntimeError(f"{run_dir}: the workers finished without writing {RESULT_FILE}")
    return finished
