"""The GPU acceptance suite (marker ``gpu``; ``scripts/gpu-check.sh`` runs it with the GPU benchmark).

Skipped, with one line saying why, where CUDA is absent: the same code paths run on the CPU in the
normal suite (tests/test_device.py checks on the CPU that nothing is created off the model's
device). What only a GPU shows: NCCL collectives, pinned-memory copies on a side stream, the
PyTorch sparse path on CUDA (the compiled kernels are CPU-only), bf16 products with fp32
pre-activations, and models placed or split over GPUs by ``device_map``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ..conftest import small_run_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU suite needs one")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def log(run) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())}


def exports_close(a, b, rtol: float, atol: float) -> None:
    from crosscoder import CrossCoder

    ta, tb = CrossCoder.from_pretrained(a).export_tensors(), CrossCoder.from_pretrained(b).export_tensors()
    for name in ta:
        assert torch.allclose(ta[name], tb[name], rtol=rtol, atol=atol), name


def config(**kw):
    return small_run_config(**({"steps": 8, "log_every": 1, "checkpoint_every": 4, "dead_tokens": 768,
                                "latents": 96, "sparse_kernels": "on"} | kw))


def test_training_on_cuda_follows_the_cpu_step_by_step(small_shards, tmp_path):
    """fp32, one process: the same steps on the GPU (the PyTorch sparse path) and on the CPU (the
    compiled kernels) agree within fp32 reduction order (TF32 is off for matmuls by default)."""
    from crosscoder.trainer import train

    train(config(device="cpu"), tmp_path / "cpu", data=small_shards, progress=False)
    train(config(device="cuda"), tmp_path / "cuda", data=small_shards, progress=False)
    cpu, cuda = log(tmp_path / "cpu"), log(tmp_path / "cuda")
    for step in cpu:
        assert np.isclose(cuda[step]["loss"]["total"], cpu[step]["loss"]["total"], rtol=1e-4), step
        assert cuda[step]["l0"] == pytest.approx(cpu[step]["l0"], rel=1e-3), step
    exports_close(tmp_path / "cpu" / "crosscoder", tmp_path / "cuda" / "crosscoder", rtol=1e-3, atol=1e-5)
    from crosscoder import CrossCoder

    on_gpu = CrossCoder.from_pretrained(tmp_path / "cuda" / "crosscoder", device="cuda")
    assert on_gpu.W_dec.is_cuda and on_gpu.threshold.is_cuda
    on_cpu = CrossCoder.from_pretrained(tmp_path / "cuda" / "crosscoder")
    for name, tensor in on_cpu.state_dict().items():
        assert torch.equal(on_gpu.state_dict()[name].cpu(), tensor), name


@two_gpus
def test_two_gpus_latent_parallel_zero3_over_nccl_equal_one_gpu(ray_cluster_gpu, small_shards, tmp_path):
    from crosscoder.ray_train import train_distributed
    from crosscoder.trainer import train

    train(config(device="cuda"), tmp_path / "one", data=small_shards, progress=False)
    result = train_distributed(config(device="cuda", workers=2, latent_parallel=2, zero_stage=3), tmp_path / "two",
                               small_shards, progress=False)
    assert result.comm_bytes > 0
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    for step in one:
        assert np.isclose(two[step]["loss"]["total"], one[step]["loss"]["total"], rtol=1e-4), step
    exports_close(tmp_path / "one" / "crosscoder", tmp_path / "two" / "crosscoder", rtol=1e-3, atol=1e-5)


def test_bf16_trains_200_steps_with_a_finite_falling_loss(ray_cluster_gpu, small_shards, tmp_path):
    from crosscoder.ray_train import train_distributed

    cfg = config(device="cuda", workers=1, precision="bf16", steps=200, checkpoint_every=100, log_every=10)
    train_distributed(cfg, tmp_path / "run", small_shards, progress=False)
    losses = [row["loss"]["total"] for row in log(tmp_path / "run").values()]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.5 * losses[0]


@two_gpus
def test_a_model_split_over_two_gpus_harvests_the_cpu_activations(tmp_path):
    from crosscoder.config import RunConfig, to_dict
    from crosscoder.documents import Chunk
    from crosscoder.harvest import ShardHarvester
    from crosscoder.random_pair import make_pair

    base, chat = make_pair(tmp_path / "models", hidden=64, layers=4)
    chunks = [Chunk(doc, 0, 0, list(range(10 + doc, 10 + doc + 5 + doc)), True) for doc in range(6)]
    acts = {}
    for name, gpus, extra in (("cpu", 0, {}), ("split", 2, {"device_map": "balanced"})):
        cfg = RunConfig()
        cfg.harvest.models = [{"name": "base", "path": base} | extra, {"name": "chat", "path": chat} | extra]
        cfg.harvest.hooks, cfg.harvest.output, cfg.harvest.gpus_per_actor = ["model.layers.2"], str(tmp_path / name), gpus
        harvester = ShardHarvester(to_dict(cfg))
        if gpus:
            devices = {p.device for p in harvester.readers["base"].model.parameters()}
            assert len(devices) == 2, devices  # really split over the two GPUs
        out, _, _ = harvester.activations([c.tokens for c in chunks])
        acts[name] = out.float().cpu()
    assert torch.allclose(acts["split"], acts["cpu"], atol=2e-3, rtol=2e-3)


def test_a_shard_written_from_the_gpu_holds_the_cpu_activations_and_stops_on_an_inf(tmp_path):
    """One GPU per actor: each batch goes to pinned memory without blocking and is written after the
    next forward, its finite flag with it. The shard holds what the CPU actor writes (within the
    float16 rounding of different kernels), and an inf from the model stops it by name."""
    import io
    import tarfile

    from crosscoder.config import RunConfig, to_dict
    from crosscoder.documents import Chunk
    from crosscoder.harvest import ShardHarvester
    from crosscoder.language_models import ModelError
    from crosscoder.random_pair import make_pair

    base, chat = make_pair(tmp_path / "models", hidden=64, layers=4)
    chunks = [Chunk(doc, 0, 0, np.arange(10 + doc, 20 + 2 * doc, dtype=np.int32), False) for doc in range(11)]
    arrays = {}
    for name, gpus in (("cpu", 0), ("gpu", 1)):
        cfg = RunConfig()
        cfg.harvest.models = [{"name": "base", "path": base}, {"name": "chat", "path": chat}]
        cfg.harvest.hooks, cfg.harvest.output, cfg.harvest.gpus_per_actor = ["model.layers.2"], str(tmp_path / name), gpus
        cfg.harvest.batch_size = 4  # three batches: two of them pipelined behind a forward
        harvester = ShardHarvester(to_dict(cfg))
        assert harvester.device == ("cuda" if gpus else "cpu")
        harvester.write(0, chunks)
        with tarfile.open(tmp_path / name / "shard-000000.tar") as tar:
            arrays[name] = {m.name: np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar if m.name.endswith(".npy")}
    assert arrays["gpu"].keys() == arrays["cpu"].keys() and len(arrays["gpu"]) == 2 * len(chunks)
    for key, array in arrays["cpu"].items():
        assert np.allclose(arrays["gpu"][key].astype(np.float32), array.astype(np.float32), atol=2e-3, rtol=2e-3), key
    reader = harvester.readers["chat"]
    original = reader.read
    reader.read = lambda ids, mask=None: [p.index_fill_(0, torch.tensor([1], device=p.device), float("inf"))
                                          for p in original(ids, mask)]
    with pytest.raises(ModelError, match=r"shard-000001.tar, source 'chat', document 1 of the plan: the model produced"):
        harvester.write(1, chunks)


def test_the_main_job_trains_and_analyses_on_cuda(tmp_path):
    """The README's first command (`crosscoder run` on its embedded default, devices left at auto),
    as a user runs it on a GPU machine: training and the analysis take the GPU (neither says it fell
    back to the CPU) and the crosscoder is as good as the CPU's (README: FVE 0.996 / 0.993, CE loss
    recovered 1.00). First run on an H200: 400 steps in 7.4 s, the whole job in about 100 s."""
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", "import sys; from crosscoder.cli import main; sys.exit(main())",
                           "run", "--run", str(run)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "auto -> cpu" not in proc.stderr, proc.stderr[-3000:]
    last = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 400 and min(last["fve"].values()) > 0.98, last
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert {name: ce["recovered"] > 0.95 for name, ce in summary["ce_loss_recovered"].items()} == {
        "base": True, "chat": True}, summary["ce_loss_recovered"]
