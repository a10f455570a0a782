"""Start the distributed trainer with Ray Train: N workers, a process group, failure retries.

``ray.train.torch.TorchTrainer`` starts ``train.workers`` workers and sets up the process group
(gloo on CPU, NCCL with ``train.use_gpu``); each runs :func:`crosscoder.distributed.train_worker`.
The same call works against a cluster (``RAY_ADDRESS`` or ``ray job submit``) and with no cluster
(a local ``ray.init()``). A worker that dies makes Ray Train restart every worker, up to
``train.max_failures`` times; the workers resume from the run directory's last checkpoint, so the
run directory must be on storage every worker sees (a shared file system on a cluster).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import RunConfig, to_dict
from .ray_connect import connect


def train_distributed(cfg: RunConfig, run_dir: str | Path, data: str, progress: bool = True,
                      stop_after: int | None = None) -> dict:
    """Run the distributed trainer to the end (or ``stop_after`` steps); returns rank 0's result."""
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .distributed import check_config, train_worker
    from .shards import read_manifest
    from .storage import absolute_url, open_root
    from .trainer import spec_from

    tc = cfg.train
    run_dir = Path(run_dir).absolute()
    data = absolute_url(data)  # workers run in other working directories
    # a missing or bad dataset, or a setting the workers would reject, fails here, once, not per retry
    manifest = read_manifest(open_root(data, cfg.storage))
    check_config(cfg, spec_from(tc, manifest).latents)
    run_dir.mkdir(parents=True, exist_ok=True)
    connect(max(tc.workers, 1))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "data": data,
                           "stop_after": stop_after, "progress": progress,
                           # the package's own switches (CROSSCODER_*: kernels, precision path, fault
                           # tests) reach workers of a cluster started before they were set
                           "env": {k: v for k, v in os.environ.items() if k.startswith("CROSSCODER_")}},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": 1}),
        run_config=RayRunConfig(name=f"crosscoder-{cfg.name}", storage_path=str(run_dir / "ray"),
                                failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    result_file = run_dir / "train_result.json"
    result_file.unlink(missing_ok=True)
    result = trainer.fit()
    if result.error:
        raise result.error
    out = json.loads(result_file.read_text())
    if "error" in out:
        from .trainer import TrainingDiverged

        raise TrainingDiverged(out["error"])
    return out
