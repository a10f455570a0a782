"""Start the distributed trainer with Ray Train: N workers, a process group, failure retries.

``ray.train.torch.TorchTrainer`` starts ``train.workers`` workers and sets up the process group
(gloo on CPU; NCCL and one GPU per worker with ``train.device = cuda``, or ``auto`` on a cluster with a
GPU per worker); each runs :func:`train_worker`, the shared training loop
(trainer.py) with a DeepSpeed backend. The same call works against a cluster (``RAY_ADDRESS`` or
``ray job submit``) and with no cluster (a local Ray, ray_connect.py). A worker that dies makes Ray
Train restart every worker, up to ``train.max_failures`` times; the workers resume from the run
directory's last checkpoint, so the run directory must be on storage every worker sees (a shared
file system on a cluster). A stop is not retried: on a NaN loss, a corrupt shard or a checkpoint
the disk refused, every rank stops at the same step and the driver raises the stop (e.g.
:class:`~crosscoder.trainer.TrainingDiverged`) from the result file; where one rank's stop ends its
process instead (ZeRO-3's checkpoint), the restart that follows finds the stop recorded and ends.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from .checkpoint_handoff import check_zero3_loads, saved_spec
from .config import RunConfig, data_layout, from_dict, to_dict, validate
from .interrupts import StepBoundary
from .ray_connect import (
    check_code,
    code_fingerprint,
    connect,
    first_line,
    lost_a_peer,
    memory_request,
    note_gpu_wait,
    process_died,
    worker_env,
)
from .shards import Manifest, ShardError, check_sizes, read_manifest
from .shared_paths import check_nodes_see
from .stream import DataExhausted
from .trainer import (
    RESULT_FILE,
    STOP_FILE,
    CheckpointError,
    Interrupted,
    RunDirError,
    TrainingDiverged,
    TrainingFailed,
    TrainingStopped,
    TrainResult,
    another_dictionary,
    check_partitions,
    newest_checkpoint,
    record_stop,
    spec_from,
    with_saved_scale,
)


def train_worker(config: dict) -> None:
    """Entry point of every rank (``config``: run config dict, run_dir, data, ...)."""
    os.environ.update(config["env"])
    check_code(config["code"], "training worker")
    cfg = from_dict(RunConfig, config["config"])  # train.device resolved by the driver: cpu or cuda
    os.environ["DS_ACCELERATOR"] = cfg.train.device  # read when DeepSpeed is imported: never CPU on a GPU
    import torch

    from .deepspeed_backend import DeepSpeedBackend
    from .trainer import train

    if (Path(config["run_dir"]) / RESULT_FILE).exists():
        return  # a restart after a stop an attempt recorded (the driver removes the file before fit): it stands
    device = torch.device("cpu")
    if cfg.train.device == "cuda":
        from ray.train.torch import get_device

        device = get_device()  # this worker's GPU (Ray sets CUDA_VISIBLE_DEVICES)
        torch.cuda.set_device(device)
    try:
        train(cfg, config["run_dir"], config["data"], progress=config["progress"], stop_after=config["stop_after"],
              backend=DeepSpeedBackend(cfg, device))
    except (ShardError, DataExhausted, RunDirError) as stop:  # a retry would stop the same way
        if not (Path(config["run_dir"]) / RESULT_FILE).exists():  # met before the loop, which records it: by
            record_stop(Path(config["run_dir"]), stop)  # every rank alike (a manifest that lists no shards)
    except (TrainingDiverged, TrainingStopped):
        pass  # written to the result file, which the driver reads: a retry would stop the same way
    except CheckpointError as stop:  # every rank raises it; a retry would fill the same disk
        record_stop(Path(config["run_dir"]), stop)
    except Interrupted:
        pass  # the driver asked (Ctrl-C): every rank checkpointed at the same step


def workers_failed(error: BaseException, max_failures: int, kept: Path | None, workers: int) -> TrainingFailed:
    """Ray Train's error after the last restart it was allowed, in one line: the ranks whose process
    died (the others' broken connections follow from it), else each failed rank's own error line.
    Ray Train reports the first poll that finds an error; on a busy host the survivors' broken
    connections can be found before Ray has noticed the death, which then goes unreported: when
    every reported error is a lost connection, the ranks of the ``workers`` not reported are named."""
    failures = sorted((getattr(error, "worker_failures", None) or {}).items())
    died = [rank for rank, cause in failures if process_died(cause)]
    reported = [rank for rank, _ in failures]
    silent = [rank for rank in range(workers) if rank not in reported]
    if died:
        said = f"the process of {_ranks(died)} died: killed, out of memory or crashed"
    elif failures and silent and all(lost_a_peer(cause) for _, cause in failures):
        which = "whose process" if len(silent) == 1 else "a process of which"
        said = f"{_ranks(reported)} lost {'its' if len(reported) == 1 else 'their'} connection to " \
               f"{_ranks(silent)}, {which} most likely died: killed, out of memory or crashed"
    else:
        said = "; ".join(f"rank {rank}: {first_line(cause)[:200]}" for rank, cause in failures) or first_line(error)
    then = f"re-run the same command to resume from {kept.name}" if kept else "no checkpoint was complete yet"
    return TrainingFailed(f"the workers failed after train.max_failures = {max_failures} restarts ({said}); {then}")


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}"


STOP_WAIT_S = 300.0  # how long the driver waits for the workers' checkpoint after a Ctrl-C


def _fit_stopping_on_ctrl_c(trainer, run_dir: Path):
    """``trainer.fit()``, where a Ctrl-C asks the workers to checkpoint at the end of their step and
    stop (the stop file), instead of Ray Train's own handler, which aborts them and loses every step
    since the last checkpoint (a SIGTERM, as Kubernetes or Slurm stop a process, the same); a second
    Ctrl-C, or no answer within STOP_WAIT_S, stops at once.
    fit() runs in a thread, so Ray Train leaves the main thread's signal handling alone."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = error

    # StepBoundary's handler (installed also when the process started with SIGINT ignored, as a
    # non-interactive shell starts a background command) records the first Ctrl-C instead of raising:
    # a KeyboardInterrupt raised inside Thread.join makes CPython 3.11 take the running thread for
    # finished (bpo-45274's cleanup releases the lock the thread holds), which ended the wait at once
    # and shut Ray down before the workers' checkpoint whenever the signal reached the main thread
    thread = threading.Thread(target=fit, name="crosscoder-fit", daemon=True)
    with StepBoundary("the workers' step") as stop:
        thread.start()
        _wait_stopping_on_ctrl_c(thread, run_dir, stop)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _wait_stopping_on_ctrl_c(thread: threading.Thread, run_dir: Path, stop: StepBoundary) -> None:
    """Join ``thread``; after a first Ctrl-C (``stop.requested``) the stop file asks the workers to
    checkpoint and stop, and KeyboardInterrupt follows when they have (or STOP_WAIT_S later); a
    second Ctrl-C raises at once, from the handler."""
    asked = None
    while thread.is_alive():
        thread.join(0.5)
        if stop.requested and asked is None:
            asked = time.time()
            (run_dir / STOP_FILE).touch()
        if asked is not None and time.time() - asked > STOP_WAIT_S:
            raise KeyboardInterrupt
    if stop.requested:
        raise KeyboardInterrupt


def estimated_worker_memory(cfg: RunConfig, manifest: Manifest) -> float:
    """Host bytes a worker needs: its slice of the dictionary with gradient and Adam state (and bf16
    copies), its encoder product, its shuffle window and prefetch, and 1.5 GiB for torch, DeepSpeed
    and Ray. On a GPU (``train.device = cuda``) the slice, its state and the product live on the
    device: the host holds the window and one fp32 copy of the slice while a checkpoint or the
    export is written, so a GPU node's RAM is not asked for what its GPUs hold."""
    tc = cfg.train
    spec = spec_from(tc, manifest)
    data_parallel = tc.workers // tc.latent_parallel
    params = (2 * spec.width + spec.groups) * spec.latents / tc.latent_parallel
    window = 3 * tc.shuffle_samples * max(manifest.seq_len, 1) * spec.width * 4
    if tc.device == "cuda":
        return params * 4 + window + 1.5 * 2**30
    per_param = 16 + (6 if tc.precision == "bf16" else 0)  # weights, gradient, two moments (+ bf16 copies)
    product = 2 * 4 * tc.batch_size / data_parallel * spec.groups * spec.latents / tc.latent_parallel
    return params * per_param + product + window + 1.5 * 2**30


def train_distributed(cfg: RunConfig, run_dir: str | Path, data: str, progress: bool = True,
                      stop_after: int | None = None) -> TrainResult:
    """Run the distributed trainer to the end (or ``stop_after`` steps); returns rank 0's result."""
    from ray.train import FailureConfig, LoggingConfig, ScalingConfig, TrainingFailedError
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .storage import absolute_url, open_root

    validate(cfg)  # a setting the workers would reject fails here, once, not per retry
    cfg = copy.deepcopy(cfg)
    tc = cfg.train
    run_dir = Path(run_dir).absolute()
    data = absolute_url(data)  # workers run in other working directories
    root = open_root(data, cfg.storage)
    manifest = read_manifest(root)  # a missing dataset or shard fails here, once, not per retry
    check_sizes(root, manifest)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = newest_checkpoint(run_dir)  # a resume the workers would refuse fails here, once, not per retry
    if saved is not None:
        check_zero3_loads(saved, tc.zero_stage)
        # another dictionary or other sources: every worker would refuse it, after Ray Train started them
        then = saved_spec(saved)
        spec = asdict(with_saved_scale(spec_from(tc, manifest), then)[0])  # a grown harvest's
        if then is not None and (refusal := another_dictionary(run_dir, then, spec)) is not None:
            raise refusal
        if (saved / "position.json").is_file():
            data_parallel, partitions = data_layout(tc)
            check_partitions(run_dir, len(json.loads((saved / "position.json").read_text())), partitions,
                             data_parallel)
    ray = connect(max(tc.workers, 1))
    if tc.device == "auto":  # explicit cuda is not refused (an autoscaler may add GPU nodes), only said to wait
        gpus = ray.cluster_resources().get("GPU", 0)
        tc.device = "cuda" if gpus >= tc.workers else "cpu"
        print(f"train.device: auto -> {tc.device} ({gpus:g} GPUs in the Ray cluster for {tc.workers} workers)",
              file=sys.stderr)
    elif tc.device == "cuda":
        note_gpu_wait(ray, 1, tc.workers, "train.device = cuda")
    cuda = tc.device == "cuda"
    # the workers write the run directory and read the data: every node that may run one must see both
    # (a manifest that lists no shards is the workers' ShardError to say, by name)
    data_file = {f"the training data {data}": Path(root.path) / manifest.shards[0].name
                 } if root.is_local and manifest.shards else {}
    check_nodes_see(ray, "GPU" if cuda else "CPU", "training workers", files=data_file,
                    directories={f"the run directory {run_dir}": run_dir})
    memory = memory_request(ray, tc.memory_per_worker * 2**30 or estimated_worker_memory(cfg, manifest), tc.workers,
                            "train.memory_per_worker")
    resources = {"CPU": 1} | ({"memory": memory} if memory else {})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "data": data,
                           "stop_after": stop_after, "progress": progress,
                           # the package's own switches (CROSSCODER_*: kernels, precision path, fault
                           # tests) reach workers of a cluster started before they were set
                           "env": worker_env(),
                           "code": code_fingerprint()},
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=cuda, resources_per_worker=resources),
        run_config=RayRunConfig(name=f"crosscoder-{cfg.name}", storage_path=str(run_dir / "ray"),  # type: ignore[call-arg]
                                failure_config=FailureConfig(max_failures=tc.max_failures),
                                # --quiet: without Ray Train's lines on each worker group's start (its
                                # files under the Ray session keep them); a retry or failure is still said.
                                # (mypy reads Ray Train v1's RunConfig; v2's, used at run time, takes it)
                                logging_config=LoggingConfig(log_level="INFO" if progress else "WARNING")),
    )
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    try:
        result = _fit_stopping_on_ctrl_c(trainer, run_dir)
        error = result.error
    except TrainingFailedError as failed:  # a worker failed once more than train.max_failures allows
        error = failed
    if error:
        TrainResult.read(run_dir)  # a stop the workers recorded (a NaN, a corrupt shard) says it best
        raise workers_failed(error, tc.max_failures, newest_checkpoint(run_dir), tc.workers) from None
    finished = TrainResult.read(run_dir)  # raises TrainingDiverged, ShardError, … when the ranks stopped
    if finished is None:
        raise RuntimeError(f"{run_dir}: the workers finished without writing {RESULT_FILE}")
    return finished
