"""Device cleanliness, checked on the CPU: our code creates no tensor without saying on which device.

A tensor made with ``torch.zeros(n)`` lands on the CPU whatever device the model is on; on a GPU the
first operation mixing it with the model's tensors fails (or, for a collective, NCCL refuses it).
On a CPU-only machine nothing fails, so these tests run a training step (one process, and two real
gloo ranks with DeepSpeed) and a harvest batch under a torch function mode that records every
factory call (``zeros``, ``full``, ``tensor``, ``randn``, …) made from the ``crosscoder`` package
without an explicit ``device``. Another mode counts the training loop's reads of a tensor's value on
the host, each of which waits for a GPU's queue to empty. What only a GPU run shows (NCCL itself, pinned-memory copies,
kernels that differ by device) is in tests/gpu/ (README, "Running on GPUs").
"""

from __future__ import annotations

import collections
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from .conftest import free_port, small_run_config

PACKAGE = str(Path(__file__).resolve().parents[1] / "crosscoder") + os.sep
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.arange,
             torch.randn, torch.rand, torch.randint, torch.eye, torch.linspace, torch.scalar_tensor}


# torch modules whose factory calls build index metadata on the CPU by design (DCP's save plan asks
# DTensor for each shard's offsets as an arange): the checkpoint calls them, they are not ours
LIBRARY_BOOKKEEPING = (f"distributed{os.sep}checkpoint{os.sep}", f"distributed{os.sep}tensor{os.sep}_utils.py")


class ExplicitDevices(TorchFunctionMode):
    """Records ``file:line function`` of every factory call from the package without ``device=``."""

    def __init__(self):
        super().__init__()
        self.violations: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE) \
                    and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                if any(part in frame.f_code.co_filename for part in LIBRARY_BOOKKEEPING):
                    return func(*args, **kwargs)  # torch's own metadata (shard offsets), not our tensors
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                where = frame.f_code.co_filename[len(PACKAGE):]
                self.violations.add(f"{where}:{frame.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)


def test_the_mode_catches_a_factory_call_without_a_device():
    mode = ExplicitDevices()
    with mode:
        from crosscoder.dead import DeadLatentTracker

        DeadLatentTracker((1, 4), 10, device="cpu")
    assert not mode.violations
    import crosscoder.dead as dead

    code = compile("def leak():\n    return torch.zeros(3)\n", dead.__file__, "exec")
    namespace = {"torch": torch}
    exec(code, namespace)  # a function whose code lives in the package, as a regression would
    with mode:
        namespace["leak"]()
    assert mode.violations == {"dead.py:2 torch.zeros"}


@pytest.mark.parametrize("arch, activation", [("acausal", "batchtopk"), ("acausal", "topk"), ("aligned", "topk"),
                                              ("acausal", "relu")])
def test_a_training_step_in_one_process_names_every_device(small_shards, tmp_path, arch, activation):
    from crosscoder.trainer import train

    cfg = small_run_config(arch=arch, activation=activation, steps=2, checkpoint_every=1, sparse_kernels="on",
                           dead_tokens=200, device="cpu")
    mode = ExplicitDevices()
    with mode:
        train(cfg, tmp_path / "run", data=small_shards, progress=False)
        train(cfg, tmp_path / "run2", data=small_shards, progress=False, stop_after=1)
        cfg.train.steps = 3
        train(cfg, tmp_path / "run2", data=small_shards, progress=False)  # resumed
    assert not mode.violations, sorted(mode.violations)


HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy}
TRAINING_LOOP = ("trainer.py", "dead.py", "metrics.py", "local_backend.py")


class HostReads(TorchFunctionMode):
    """Counts, by file, the reads of a tensor's value on the host (``float(t)``, ``t.item()``,
    ``t.tolist()``, ``if t``, ``t.numpy()``) that the training loop's own modules make, directly or
    through torch. On a GPU each read waits until the device's queue is empty."""

    def __init__(self):
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename[len(PACKAGE):] in TRAINING_LOOP:
                self.reads[frame.f_code.co_filename[len(PACKAGE):]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation", ["batchtopk", "relu"])
def test_a_training_step_reads_the_device_once_for_its_loss_and_metrics(small_shards, tmp_path, activation):
    """The finite-loss check and the step's figures (loss terms, FVE, L0, dead share) come off the
    device in one read, and the gradient norm in one more; BatchTopK's inference L0 adds one on the
    steps that are logged. (The step read each loss term twice and each figure once: 12 reads.)"""
    from crosscoder.trainer import train

    steps, log_every = 12, 4
    cfg = small_run_config(activation=activation, steps=steps, log_every=log_every, checkpoint_every=0,
                           dead_tokens=500, device="cpu")
    mode = HostReads()
    with mode:
        result = train(cfg, tmp_path / "run", data=small_shards, progress=False)
    assert result.steps == steps
    logged = 0
    if activation == "batchtopk":
        logged = steps // log_every
        assert result.last_metrics["dead_fraction"] > 0  # dead latents were counted, and read with the rest
    assert dict(mode.reads) == {"trainer.py": steps + logged, "local_backend.py": steps}


RANK = """
import os, sys, json
os.environ["DS_ACCELERATOR"] = "cpu"
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from tests.test_device import ExplicitDevices
from tests.conftest import small_run_config
from crosscoder.deepspeed_backend import DeepSpeedBackend
from crosscoder.trainer import train
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
cfg = small_run_config(steps=2, checkpoint_every=1, sparse_kernels="on", dead_tokens=200, workers=2,
                       latent_parallel=2, zero_stage={stage}, device="cpu")
mode = ExplicitDevices()
with mode:
    train(cfg, {run!r}, data={data!r}, progress=False, backend=DeepSpeedBackend(cfg))
print("VIOLATIONS " + json.dumps(sorted(mode.violations)), flush=True)
dist.destroy_process_group()
sys.stderr.flush()
os._exit(0)  # what is checked is above; the interpreter's teardown of gloo and DeepSpeed is not
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_two_deepspeed_ranks_name_every_device(small_shards, tmp_path, stage):
    code = RANK.format(root=str(Path(__file__).resolve().parents[1]), port=free_port(), stage=stage,
                       run=str(tmp_path / "run"), data=small_shards)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "LOCAL_RANK": str(rank), "RANK": str(rank),
                                              "WORLD_SIZE": "2", "PYTHONFAULTHANDLER": "1"}) for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    # a crash shows every thread's Python stack (faulthandler); seen once in CI, ZeRO-3, as a bare
    # "terminate called without an active exception" (SIGABRT); once more (stage 1) where the other rank
    # removed, as stale, the lock of the DeepSpeed op this one was rebuilding (builds.building_in since).
    # Every failed rank's output is shown: the one that died first is the one to read.
    failed = [f"rank {rank} exited with {proc.returncode}:\n{err[-6000:]}\n{out[-2000:]}"
              for rank, (proc, (out, err)) in enumerate(zip(procs, outs)) if proc.returncode != 0]
    assert not failed, "\n".join(failed)
    for out, _ in outs:
        line = next(line for line in out.splitlines() if line.startswith("VIOLATIONS "))
        assert line == "VIOLATIONS []", line
    assert (tmp_path / "run" / "crosscoder" / "model.safetensors").is_file()


def test_a_harvest_batch_names_every_device(tmp_path):
    from crosscoder.config import RunConfig, to_dict
    from crosscoder.harvest import ShardHarvester
    from crosscoder.random_pair import make_pair

    base, chat = make_pair(tmp_path / "models", hidden=32, layers=3)
    cfg = RunConfig()
    cfg.harvest.models = [{"name": "base", "path": base}, {"name": "chat", "path": chat}]
    cfg.harvest.hooks = ["model.layers.1"]
    cfg.harvest.output = str(tmp_path / "shards")
    harvester = ShardHarvester(to_dict(cfg))
    mode = ExplicitDevices()
    with mode:
        acts, ids, norms = harvester.activations([[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15]])
    assert acts.shape[0] == 3 and len(ids[1]) == 3
    assert not mode.violations, sorted(mode.violations)


def test_cuda_asked_for_on_a_machine_without_it_is_one_line_and_auto_falls_back(small_shards, tmp_path, capsys):
    from crosscoder.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    args = ["train", "--run", str(tmp_path / "run"), "--data", small_shards, "--quiet", "--train.latents", "64",
            "--train.batch_size", "256", "--train.steps", "2", "--train.k", "4"]
    assert main([*args, "--train.device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"crosscoder: config error: train.device = 'cuda', but this machine has no CUDA device (torch "
        f"{torch.__version__}); use auto or cpu"]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main([*args, "--train.device", "auto"]) == 0
    captured = capsys.readouterr()
    assert "train.device: auto -> cpu (no CUDA device in this process)" in captured.err
    assert "step 2:" in captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is DeepSpeed's on a machine without a GPU")
def test_a_command_on_a_cpu_machine_prints_no_deepspeed_gpu_warning(tmp_path):
    """Saving a transformers model (the demo pair, the organism) imports DeepSpeed through accelerate,
    and DeepSpeed's accelerator probe warns that it 'was unable to detect' a GPU; a command
    (pipeline.plan) settles the accelerator first. Without plan the warning shows, so the test sees
    DeepSpeed's current wording."""
    save = ("from transformers import LlamaConfig, LlamaForCausalLM; LlamaForCausalLM(LlamaConfig(hidden_size=8, "
            "intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, "
            f"vocab_size=32)).save_pretrained({str(tmp_path / 'model')!r})")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    said = {}
    for name, first in (("bare", ""), ("plan", "from crosscoder.config import RunConfig; "
                                                "from crosscoder.pipeline import plan; plan(RunConfig()); ")):
        done = subprocess.run([sys.executable, "-c", first + save], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        said[name] = done.stdout + done.stderr
    assert "unable to detect" in said["bare"]
    assert "unable to detect" not in said["plan"], said["plan"]


def test_crosscoder_tiny_on_a_cpu_machine_prints_where_it_wrote_and_what_to_run_next(tmp_path):
    """`tiny` saves two models without a config or a plan: DeepSpeed's GPU warning (the test above)
    and transformers' "Writing model shards" bars (random_pair.save) are not what it says."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-m", "crosscoder.cli", "tiny", "--output", "made",
                           "--documents", "8"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    *wrote, next_ = done.stdout.splitlines()
    assert wrote == ["tiny base model: made/base", "tiny chat model: made/chat", "documents: made/documents.jsonl"]
    # the command it suggests reads these models and documents at a block the models have
    from crosscoder.cli import build_parser, resolve
    from crosscoder.harvest import model_specs, model_widths

    command = shlex.split(next_.split(": ", 1)[1])
    assert command[:2] == ["crosscoder", "run"]
    args, rest = build_parser().parse_known_args(command[1:])
    cfg, run_dir = resolve(args, rest)
    assert [m["path"] for m in cfg.harvest.models] == ["made/base", "made/chat"] and run_dir == Path("runs/tiny")
    assert cfg.harvest.data == "made/documents.jsonl" and cfg.harvest.hooks == ["model.layers.1"]  # of 4
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert model_widths(model_specs(cfg)) == [64, 64]  # each hook checked on its model
