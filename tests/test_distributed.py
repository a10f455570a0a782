"""The distributed trainer through its real components: a local Ray cluster, Ray Train starting two
workers with a gloo process group, DeepSpeed engines (ZeRO 1/2/3) and latent/data parallelism."""

import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from crosscoder import CrossCoder
from crosscoder.config import ConfigError
from crosscoder.ray_train import train_distributed
from crosscoder.trainer import RunDirError, TrainingDiverged, TrainingFailed, local_checkpoints, train

from .conftest import free_port, small_run_config, small_synthetic, train_workers_started

pytestmark = pytest.mark.slow


def log_by_step(run_dir) -> dict[int, dict]:
    """Last logged metrics of every step (a restarted run logs some steps twice)."""
    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row
    return out


def read_resharding_checkpoint(folder, tmp_path) -> dict:
    """A distributed checkpoint's tensors, whole (torch's own converter: no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder / "dcp", tmp_path / "whole.pt")
    return torch.load(tmp_path / "whole.pt", weights_only=False)


def config(**kw):
    # the sparse kernels (auto-enabled only from 4096 latents) on this small dictionary too
    base = dict(steps=12, log_every=1, checkpoint_every=4, dead_tokens=768, latents=96, sparse_kernels="on")
    return small_run_config(**(base | kw))


# Runs compared here are fp32 on different process counts: 1 process with 2 threads against ranks of 1
# thread each, so the same sums run in other orders (threads, ranks, the CPU's vector width). That
# differs by a few fp32 roundings per step (~1e-7 relative); after 12 steps the losses agree to
# ~1e-6, hence rtol 1e-4, and a step that went differently (one latent selected or dead
# differently) moves the loss by more than 1e-3. The same holds on AVX2 and AVX-512 kernels.
def assert_same_exports(a, b, atol=1e-5):
    ma, mb = CrossCoder.from_pretrained(a), CrossCoder.from_pretrained(b)
    for name, value in ma.state_dict().items():
        assert torch.allclose(value, mb.state_dict()[name], atol=atol, rtol=1e-4), name


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory, small_shards):
    run = tmp_path_factory.mktemp("single") / "run"
    train(config(), run, data=small_shards, progress=False)
    return run


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_latent_parallel_matches_single_process_step_by_step(ray_cluster, single_reference, small_shards, tmp_path,
                                                             kernels):
    """Latent-parallel with the sparse kernels or the dense path vs one process with the sparse kernels."""
    cfg = config(workers=2, latent_parallel=2, sparse_kernels=kernels)
    out = train_distributed(cfg, tmp_path / "run", small_shards, progress=False)
    single, lp = log_by_step(single_reference), log_by_step(tmp_path / "run")
    assert sorted(lp) == list(range(1, 13))
    for step in range(1, 13):
        for term in ("mse", "auxk", "total"):
            assert np.isclose(lp[step]["loss"][term], single[step]["loss"][term], rtol=1e-4, atol=1e-5), (step, term)
        assert round(lp[step]["dead_fraction"] * 96) == round(single[step]["dead_fraction"] * 96), step
        assert np.isclose(lp[step]["l0"], single[step]["l0"])
    assert any(single[s]["loss"]["auxk"] > 0 for s in single)  # latents died and AuxK was exercised
    assert_same_exports(single_reference / "crosscoder", tmp_path / "run" / "crosscoder")
    export = json.loads((tmp_path / "run" / "crosscoder" / "config.json").read_text())
    assert export["latents"] == 96 and export["latent_parallel"] == 2
    # bytes the ranks sent in the steps this call ran: none if Ray Train restarted the group after
    # the last step (Ray's placement-group cleaner took a live run for dead once, on a loaded machine)
    assert out.comm_bytes > 0 or not out.losses


@pytest.mark.parametrize("stage", [1, 3])
def test_jumprelu_on_two_latent_ranks_matches_one_process_through_a_resume(ray_cluster, small_shards, tmp_path, stage):
    """The learned thresholds are latent-sharded like the encoder bias and learn at their own rate (a
    second parameter group): in the gradient norm, in the checkpoint (a stop at step 6, resumed;
    ZeRO-1's resharding one, ZeRO-3's DeepSpeed one) and in the export assembled from slices. The
    sparse path runs both ways: through the entries while the code holds under 1/8 of [B, L] (the
    first 5 steps of these settings, 4-10% of it), then through the dense math (12-23%)."""
    settings = dict(activation="jumprelu", jumprelu_threshold=0.3, jumprelu_bandwidth=0.1, l0_warmup_steps=0)
    train(config(**settings), tmp_path / "single", data=small_shards, progress=False)
    cfg = config(workers=2, latent_parallel=2, zero_stage=stage, **settings)
    assert train_distributed(cfg, tmp_path / "lp", small_shards, progress=False, stop_after=6).steps == 6
    assert train_distributed(cfg, tmp_path / "lp", small_shards, progress=False).steps == 12
    single, lp = log_by_step(tmp_path / "single"), log_by_step(tmp_path / "lp")
    assert single[1]["l0"] < 96 / 8 < single[12]["l0"]  # both ways (the fired latents alone pass 1/8)
    for step in range(1, 13):
        for term in ("mse", "l0", "auxk", "total"):
            assert np.isclose(lp[step]["loss"][term], single[step]["loss"][term], rtol=1e-4, atol=1e-5), (step, term)
    assert_same_exports(tmp_path / "single" / "crosscoder", tmp_path / "lp" / "crosscoder", atol=1e-6)
    thresholds = CrossCoder.from_pretrained(tmp_path / "lp" / "crosscoder").inference_threshold()
    assert not torch.allclose(thresholds, torch.full_like(thresholds, 0.3))  # they learned
    # continued in one process: ZeRO-1's resharding checkpoint, thresholds and their Adam state (a
    # second parameter group) included, is handed over (checkpoint_handoff.py); ZeRO-3's own is not
    longer = config(steps=14, **settings)
    if stage == 3:
        with pytest.raises(RunDirError, match="step-12: DeepSpeed's own ZeRO-3 checkpoint, which only"):
            train(longer, tmp_path / "lp", data=small_shards, progress=False)
        return
    assert len(train(longer, tmp_path / "lp", data=small_shards, progress=False).losses) == 2
    train(longer, tmp_path / "single", data=small_shards, progress=False)
    assert_same_exports(tmp_path / "single" / "crosscoder", tmp_path / "lp" / "crosscoder", atol=1e-6)


FIGURES_RANK = """
import json, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from crosscoder.parallel import DistributedCollectives, ParallelLayout
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=4)
layout = ParallelLayout.create(latent_parallel=2)
collectives = DistributedCollectives(layout, None, "cpu")
f64 = dict(dtype=torch.float64)
sums = collectives.sum_figures(torch.tensor([10.0 ** layout.dp_rank, 0.0], **f64),  # alike on a data rank's shards
                               torch.tensor([100.0 * (layout.lp_rank + 1)], **f64),  # alike on a shard's data ranks
                               torch.tensor([1000.0 * 2 ** rank], **f64))  # every rank's own
print("SUMS " + json.dumps([layout.lp_rank, layout.dp_rank, sums.tolist()]), flush=True)
dist.destroy_process_group()
"""


def test_a_steps_figures_are_summed_in_one_collective_over_two_latent_by_two_data_ranks(tmp_path):
    """Collectives.sum_figures on 4 real gloo ranks (2 latent shards × 2 data ranks): a figure the
    latent shards hold alike is counted once per data rank, one the data ranks hold alike once per
    shard, and every rank's own figure once; every rank reads the same sums. (The resharding test
    trains on 2 × 2 ranks and compares its losses and dead counts; this checks the rule itself, for
    each kind of figure, in seconds.)"""
    import subprocess
    import sys
    from pathlib import Path

    code = FIGURES_RANK.format(root=str(Path(__file__).resolve().parents[1]), port=free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    said = []
    for rank, (proc, (out, err)) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0, f"rank {rank}: {err[-3000:]}"
        said.append(json.loads(next(line for line in out.splitlines() if line.startswith("SUMS "))[5:]))
    assert [(lp, dp) for lp, dp, _ in said] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(sums == [1.0 + 10.0, 0.0, 100.0 + 200.0, 1000.0 * (1 + 2 + 4 + 8)] for _, _, sums in said), said


def test_data_parallel_matches_single_process_at_the_same_global_batch(ray_cluster, small_shards, tmp_path):
    # the single process reads the same two data partitions the two data-parallel ranks read
    single_run = tmp_path / "single"
    train(config(data_partitions=2), single_run, data=small_shards, progress=False)
    train_distributed(config(workers=2, latent_parallel=1), tmp_path / "dp", small_shards, progress=False)
    single, dp = log_by_step(single_run), log_by_step(tmp_path / "dp")
    for step in range(1, 13):
        for term in ("mse", "auxk", "total"):
            assert np.isclose(dp[step]["loss"][term], single[step]["loss"][term], rtol=1e-4, atol=1e-5), (step, term)
        assert round(dp[step]["dead_fraction"] * 96) == round(single[step]["dead_fraction"] * 96), step
    assert any(single[s]["dead_fraction"] > 0 for s in single)
    # which latents count as dead: the counters agree latent by latent
    single_state = torch.load(local_checkpoints(single_run)[-1] / "state.pt", weights_only=False)
    assert single_state["step"] == 12
    saved = read_resharding_checkpoint(tmp_path / "dp" / "checkpoints" / "step-12", tmp_path)
    assert torch.equal(saved["dead"], single_state["dead"]["tokens_since_fired"])
    assert_same_exports(single_run / "crosscoder", tmp_path / "dp" / "crosscoder")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_checkpoint_and_resume(ray_cluster, single_reference, small_shards, tmp_path, stage,
                                                monkeypatch):
    cfg = config(workers=2, latent_parallel=2, zero_stage=stage)
    first = train_distributed(cfg, tmp_path / "run", small_shards, progress=False, stop_after=6)
    assert first.steps == 6 and first.export_dir is None
    assert (tmp_path / "run" / "checkpoints" / "step-4").is_dir()
    second = train_distributed(cfg, tmp_path / "run", small_shards, progress=False)
    assert second.steps == 12
    resumed, single = log_by_step(tmp_path / "run"), log_by_step(single_reference)
    losses = [resumed[s]["loss"]["total"] for s in range(1, 13)]
    assert losses[-1] < losses[0]
    assert np.allclose(losses, [single[s]["loss"]["total"] for s in range(1, 13)], rtol=1e-4, atol=1e-5)
    assert_same_exports(single_reference / "crosscoder", tmp_path / "run" / "crosscoder")
    if stage == 3:  # another dictionary on DeepSpeed's own checkpoint: DeepSpeed failed on the shapes before
        # the loop compared them, Ray Train retried that train.max_failures times, and the line said to re-run
        other = config(workers=2, latent_parallel=2, zero_stage=3, latents=48, steps=14)
        refused = r"trained with latents=96; this config asks for latents=48; use another --run directory"
        record = (tmp_path / "run" / "train_result.json").read_text()
        with pytest.raises(RunDirError, match=refused):  # the driver's, before Ray Train starts
            train_distributed(other, tmp_path / "run", small_shards, progress=False)
        assert (tmp_path / "run" / "train_result.json").read_text() == record  # the finished run's record kept
        monkeypatch.setattr("crosscoder.ray_train.saved_spec", lambda folder: None)  # as if the driver could not
        with pytest.raises(RunDirError, match=refused):  # read it: the workers' own refusal, once, no retries
            train_distributed(other, tmp_path / "run", small_shards, progress=False)


BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits: one rounding errs by at most this, relatively


@pytest.mark.precision
@pytest.mark.parametrize("products", ["upcast", "native"])
def test_bf16_precision_trains_and_tracks_the_fp32_trajectory(ray_cluster, single_reference, small_shards, tmp_path,
                                                              monkeypatch, products):
    """train.precision = "bf16": DeepSpeed's bf16 engines (parameters cast to bf16, fp32 master
    weights) on two latent-parallel gloo ranks, under both paths precision.py can take, forced
    whatever this CPU has: dense products upcast to fp32 (a CPU without bf16 units) or run in bf16
    (one with them). The loss follows the fp32 single-process run step by step, and the export is
    an fp32 crosscoder that went where the fp32 run went.

    Why the bounds: u = 2⁻⁸ is one bf16 rounding. The logged loss is itself rounded to bf16 (u) and
    its trajectory drifts by about as much (measured: 0.42% upcast, 0.29% native), so the loss gets
    4u. The weights are compared by how far the fp32 run moved them from their initialisation: a
    step's update passes through one bf16 rounding when the products are upcast (the bf16 copy of
    the weights) and through four natively (that copy, the encoder product that selects the
    latents, the decoder product and the weight gradients); twelve Adam steps keep the difference
    within 8u per rounding of the distance trained (measured: 1.6% upcast, 4.8% native; bounds 3.1%
    and 12.5%). A run that trained wrongly in bf16 goes elsewhere: its difference is of the order
    of the distance itself."""
    from crosscoder import precision
    from crosscoder.shards import read_manifest
    from crosscoder.storage import Root
    from crosscoder.trainer import spec_from

    monkeypatch.setenv(precision.FORCE_VARIABLE, products)  # reaches the workers (ray_train.py)
    assert precision.upcasts(torch.zeros(1, dtype=torch.bfloat16)) == (products == "upcast")
    cfg = config(workers=2, latent_parallel=2, precision="bf16")
    train_distributed(cfg, tmp_path / "run", small_shards, progress=False)
    bf16, single = log_by_step(tmp_path / "run"), log_by_step(single_reference)
    losses = [bf16[s]["loss"]["total"] for s in range(1, 13)]
    assert all(np.isfinite(losses)) and min(losses[-3:]) < losses[0]
    assert all(float(torch.tensor(v).bfloat16()) == v for v in losses)  # computed in bf16, not fp32
    u = BF16_UNIT_ROUNDOFF
    assert np.allclose(losses, [single[s]["loss"]["total"] for s in range(1, 13)], rtol=4 * u)
    exported = CrossCoder.from_pretrained(tmp_path / "run" / "crosscoder")
    assert exported.W_enc.dtype == torch.float32
    reference = CrossCoder.from_pretrained(single_reference / "crosscoder")
    norm_scale = read_manifest(Root(small_shards)).norm_scale
    start = CrossCoder(spec_from(cfg.train, read_manifest(Root(small_shards))), seed=cfg.train.seed,
                       dec_init_norm=cfg.train.dec_init_norm).export_tensors(norm_scale)
    ours, theirs = exported.export_tensors(), reference.export_tensors()
    roundings = 1 if products == "upcast" else 4
    for name in (n for n in theirs if n.startswith(("W_enc", "W_dec", "b_enc"))):
        travelled = float((theirs[name] - start[name]).norm())
        assert travelled > 0.1 * float(theirs[name].norm()), name  # the weights did move
        assert float((ours[name] - theirs[name]).norm()) < 8 * roundings * u * travelled, name


@pytest.mark.parametrize("setting, value, message", [
    ("precision", "fp8", "train.precision must be fp32 or bf16, got 'fp8'"),
    ("zero_stage", 5, "train.zero_stage must be 0, 1, 2 or 3, got 5"),
    ("latent_parallel", 3, r"train.latent_parallel=3 must divide the number of workers \(2\)"),
    ("batch_size", 511, r"train.batch_size \(511\) must be divisible by the 2 data-parallel ranks"),
])
def test_bad_distributed_settings_fail_on_the_driver_before_any_worker_starts(small_shards, tmp_path, setting,
                                                                               value, message):
    cfg = config(**({"workers": 2, "latent_parallel": 1} | {setting: value}))
    with pytest.raises(ConfigError, match=message):
        train_distributed(cfg, tmp_path / "run", small_shards, progress=False)
    assert not (tmp_path / "run").exists()  # stopped before the run directory and Ray Train


def test_a_workers_host_memory_leaves_out_what_its_gpu_holds(small_shards):
    """On the CPU a worker's host memory holds its dictionary slice with gradient and Adam state and
    the encoder product; on a GPU those live on the device, and asking the node's RAM for them could
    leave a GPU worker unscheduled. Figures from the formula: 2 sources of 16 + 24, 96 latents."""
    from crosscoder.ray_train import estimated_worker_memory
    from crosscoder.shards import read_manifest
    from crosscoder.storage import Root

    manifest = read_manifest(Root(small_shards))
    cfg = config(workers=2, latent_parallel=2)
    params = (2 * 40 + 1) * 96 / 2  # W_enc, W_dec, b_enc of one latent slice
    window = 3 * cfg.train.shuffle_samples * manifest.seq_len * 40 * 4
    product = 2 * 4 * cfg.train.batch_size * 96 / 2
    base = 1.5 * 2**30
    assert estimated_worker_memory(cfg, manifest) == params * 16 + product + window + base
    cfg.train.device = "cuda"
    assert estimated_worker_memory(cfg, manifest) == params * 4 + window + base


def test_killed_worker_is_restarted_and_resumes_the_same_trajectory(ray_cluster, single_reference, small_shards,
                                                                     tmp_path, monkeypatch):
    # rank 1 dies hard at step 6 (crosscoder/faults.py); Ray Train restarts both workers, which
    # resume from step-4
    monkeypatch.setenv("CROSSCODER_FAULT", "train: rank 1 step 6")
    monkeypatch.setenv("CROSSCODER_FAULT_MARKER", str(tmp_path / "killed"))
    cfg = config(workers=2, latent_parallel=1, max_failures=1, data_partitions=2)
    train_distributed(cfg, tmp_path / "run", small_shards, progress=False)
    assert (tmp_path / "killed").exists()
    resumed = log_by_step(tmp_path / "run")
    reference = tmp_path / "reference"
    train(config(data_partitions=2), reference, data=small_shards, progress=False)
    expected = log_by_step(reference)
    for s in range(1, 13):
        assert np.isclose(resumed[s]["loss"]["total"], expected[s]["loss"]["total"], rtol=1e-4, atol=1e-5), s


def test_nan_loss_stops_every_rank_without_retries(ray_cluster, small_shards, tmp_path):
    cfg = config(workers=2, latent_parallel=2, max_failures=2)
    train_distributed(cfg, tmp_path / "run", small_shards, progress=False, stop_after=5)
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert latest == "step-5"
    cfg.train.lr = 1e30  # the resumed run diverges at once
    before = train_workers_started()
    with pytest.raises(TrainingDiverged, match="not finite at step"):
        train_distributed(cfg, tmp_path / "run", small_shards, progress=False)
    assert train_workers_started() - before == 2  # one group: stopped at once, not retried by Ray Train
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == latest  # last good checkpoint kept
    assert not (tmp_path / "run" / "crosscoder").exists()


def test_the_end_of_the_data_checkpoints_every_rank_and_stops_without_retries(ray_cluster, small_shards, tmp_path):
    """Both ranks run out at step 32 (4 shards of 16 samples each, 128 tokens a step): the collective
    checkpoint is taken by both, then the stop; Ray Train does not restart them."""
    from crosscoder.stream import DataExhausted

    cfg = config(workers=2, latent_parallel=1, steps=40, max_epochs=1, checkpoint_every=25, max_failures=2)
    before = train_workers_started()
    with pytest.raises(DataExhausted, match=r"the data ran out after .*\(stopped at step 32 with a checkpoint"):
        train_distributed(cfg, tmp_path / "run", small_shards, progress=False)
    assert train_workers_started() - before == 2  # one group: not retried
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-32"


def test_a_shard_error_met_before_the_first_step_is_said_by_name_without_retries(ray_cluster, small_shards,
                                                                                 tmp_path):
    """A manifest that lists no shards stops every rank in the stream's set-up, before the loop that
    records a stop: the driver said only "the workers finished without writing train_result.json"."""
    import shutil

    from crosscoder.shards import ShardError

    data = tmp_path / "shards"
    shutil.copytree(small_shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps(manifest | {"shards": []}))
    before = train_workers_started()
    with pytest.raises(ShardError, match=f"^{re.escape(str(data))}: the manifest lists no shards$"):
        train_distributed(config(workers=2, latent_parallel=1, max_failures=2), tmp_path / "run", str(data),
                          progress=False)
    assert train_workers_started() - before == 2  # one group: not retried
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_save_killed_midway_leaves_no_folder_that_displaces_the_next_checkpoint(ray_cluster, small_shards,
                                                                                   tmp_path, monkeypatch):
    """Rank 0 dies while saving step-4 (the tensors written, the loop state not) and the run is not
    restarted: step-4 stays, half-written, and `latest` names step-2. The re-run saves step-3 with
    train.keep_checkpoints = 1: the leftover counted as the newest folder and step-3, the one
    `latest` names, was removed in its place, so the next re-run had nothing to resume from."""
    monkeypatch.setenv("CROSSCODER_FAULT", "checkpoint: rank 0 step 4")
    monkeypatch.setenv("CROSSCODER_FAULT_MARKER", str(tmp_path / "killed"))
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    cfg = config(workers=2, latent_parallel=2, checkpoint_every=2, keep_checkpoints=1, max_failures=0)
    with pytest.raises(TrainingFailed, match=r"the workers failed after train.max_failures = 0 restarts \((the process "
                                              r"of rank 0|rank 1 lost its connection to rank 0, whose process most "
                                              r"likely) died: killed, out of memory or crashed\); re-run the same "
                                              r"command to resume from step-2$"):
        train_distributed(cfg, run, small_shards, progress=False)
    assert (checkpoints / "step-4" / "dcp").is_dir() and not (checkpoints / "step-4" / "loop.pt").exists()
    assert (checkpoints / "latest").read_text() == "step-2"
    train_distributed(cfg, run, small_shards, progress=False, stop_after=1)  # step 3, with a checkpoint
    assert (checkpoints / "latest").read_text() == "step-3"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step-3"]
    assert train_distributed(cfg, run, small_shards, progress=False).steps == 12  # resumed from step-3


def test_a_rank_ray_ended_with_its_group_is_not_said_to_have_died():
    """Ray Train's report as a busy host made it (in the test above, under parallel tests): rank 0's
    process died, and rank 1, ended by Ray when Ray Train removed the group's placement group, was
    already gone at the poll. Only rank 0 died; both were named."""
    from ray._raylet import ActorID
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from crosscoder.ray_train import workers_failed

    def gone(rank: int, exit_type: str, detail: str) -> WorkerHealthCheckFailedError:
        context = ActorDiedErrorContext(
            class_name="RayTrainWorker", actor_id=ActorID.from_random().binary(), pid=1000 + rank,
            error_message=f"The actor is dead because its worker process has died. Worker exit type: {exit_type} "
                          f"Worker exit detail: {detail}")
        return WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError(context))

    crashed = gone(0, "SYSTEM_ERROR", "Worker unexpectedly exits with a connection error code 2. End of file.")
    ended = gone(1, "INTENDED_SYSTEM_EXIT", "Destroying worker since its placement group was removed.")
    said = "the workers failed after train.max_failures = 0 restarts ({}); no checkpoint was complete yet"
    assert str(workers_failed(WorkerGroupError("", {0: crashed, 1: ended}), 0, None, 2)) == said.format(
        "the process of rank 0 died: killed, out of memory or crashed")
    assert "died: killed" not in str(workers_failed(WorkerGroupError("", {1: ended}), 0, None, 2))


def test_a_death_ray_had_not_noticed_is_inferred_from_the_survivors_lost_connections():
    """Ray Train's report as a busy host made it (CI, the test above): rank 0's process died, but its
    poll was still pending, and Ray Train reported only rank 1's broken collective, so the message
    named gloo's error and not the death that caused it."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from crosscoder.ray_train import workers_failed

    def reset(port: int) -> RuntimeError:
        return RuntimeError(f"[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                            f"[127.0.0.1]:{port}: Connection reset by peer. This is typically caused by a remote "
                            "worker hanging or bugs in the application")

    said = "the workers failed after train.max_failures = 0 restarts ({}); no checkpoint was complete yet"
    assert str(workers_failed(WorkerGroupError("", {1: reset(48042)}), 0, None, 2)) == said.format(
        "rank 1 lost its connection to rank 0, whose process most likely died: killed, out of memory or crashed")
    assert str(workers_failed(WorkerGroupError("", {1: reset(1), 2: reset(2)}), 0, None, 4)) == said.format(
        "ranks 1, 2 lost their connection to ranks 0, 3, a process of which most likely died: killed, out of "
        "memory or crashed")
    # an error of the rank's own is its cause, and with every rank reported nobody is left to blame
    own = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert str(workers_failed(WorkerGroupError("", {0: own, 1: reset(3)}), 0, None, 2)) == said.format(
        f"rank 0: {own}; rank 1: {str(reset(3))[:200]}")
    assert "most likely died" not in str(workers_failed(WorkerGroupError("", {0: reset(4), 1: reset(5)}), 0, None, 2))


@pytest.mark.parametrize("stage", [1, 3])
def test_a_checkpoint_the_disk_refuses_stops_the_run_once_with_the_last_one_kept(ray_cluster, small_shards, tmp_path,
                                                                                 monkeypatch, stage):
    """Rank 0's write of the step-3 checkpoint fails as on a full disk (ENOSPC, from
    crosscoder/faults.py; tests/test_robustness.py fails a rank's own file with a real file-size
    limit): the driver raises the CheckpointError. ZeRO 1: every rank stops with it. ZeRO-3: rank 0
    records it and exits (the others wait in DeepSpeed's barrier), and Ray Train's restart stops on
    the record. Not retried to the end either way: a restart (the fault is applied once) would have
    trained to the end, and at ZeRO-3 one did, before the record was read on restart."""
    from crosscoder.trainer import CheckpointError

    monkeypatch.setenv("CROSSCODER_FAULT", "checkpoint: rank 0 step 3")
    monkeypatch.setenv("CROSSCODER_FAULT_KIND", "disk")
    monkeypatch.setenv("CROSSCODER_FAULT_MARKER", str(tmp_path / "full"))
    cfg = config(workers=2, latent_parallel=2, steps=6, checkpoint_every=1, max_failures=2, zero_stage=stage)
    with pytest.raises(CheckpointError, match=r"step-3: the checkpoint could not be written \(OSError: \[Errno 28\] "
                                              r"No space left on device: .* step-2 is kept: free space"):
        train_distributed(cfg, tmp_path / "run", small_shards, progress=False)
    assert (tmp_path / "full").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-2"
    assert not (tmp_path / "run" / "checkpoints" / "step-3").exists()


def test_workers_asking_for_gpus_the_cluster_lacks_say_that_they_wait(ray_cluster, small_shards, tmp_path,
                                                                      monkeypatch, capsys):
    """train.device = cuda on a cluster without the GPUs waits (an autoscaler may add them): Ray Train
    said nothing for a minute, then logged a startup timeout and tried again, for ever. The driver
    now says so first; the test stops it there, where Ray Train would start waiting."""
    import crosscoder.ray_train as ray_train_module

    from .conftest import WaitingForGpus, stop_at_the_gpu_note

    stop_at_the_gpu_note(monkeypatch, ray_train_module)
    with pytest.raises(WaitingForGpus):
        train_distributed(config(workers=2, device="cuda"), tmp_path / "run", small_shards, progress=False)
    assert ("train.device = cuda: 2 × 1 GPUs asked for, the Ray cluster has 0 now; waiting for them (an autoscaler "
            "may add GPU nodes; Ctrl-C stops)") in capsys.readouterr().err


def test_an_inf_on_another_rank_is_named_in_the_stop_rank_0_records(ray_cluster, tmp_path):
    """Rank 1's partition reads the shard holding an inf; rank 0's batch is finite. The stop rank 0
    records, which the driver raises, says a batch held an inf (it said: lower the learning rate)."""
    from .conftest import shards_with_an_inf

    shards_with_an_inf(tmp_path / "data", bad_shard=1)
    cfg = config(workers=2, latent_parallel=1, data_partitions=4, max_failures=0)  # partition 1 → rank 1
    with pytest.raises(TrainingDiverged, match=r"not finite at step \d+ \(rank 0: .* a batch of this step holds inf "
                                               r"or NaN activations: `crosscoder validate DATA --full` names the shards"):
        train_distributed(cfg, tmp_path / "run", str(tmp_path / "data"), progress=False)


def test_running_trainer_serves_every_metric(small_shards, tmp_path):
    cfg = config(steps=400, checkpoint_every=0)
    cfg.metrics.port, cfg.metrics.host = free_port(), "127.0.0.1"
    thread = threading.Thread(target=train, args=(cfg, tmp_path / "run"), kwargs={"data": small_shards, "progress": False})
    thread.start()
    text, deadline = "", time.time() + 60
    try:
        while time.time() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics.port}/metrics", timeout=2).read().decode()
                # the metrics are served (at 0) before the first step: wait for a step's values
                if "crosscoder_train_l0" in text and re.search(r"^crosscoder_train_tokens_total(\{[^}]*\})? [1-9]", text, re.M):
                    break
            except OSError:
                pass
            time.sleep(0.2)
    finally:
        thread.join(timeout=120)
    samples = {}
    for line in text.splitlines():
        if line.startswith("crosscoder_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    def value(prefix):
        return [v for k, v in samples.items() if k.startswith(prefix)]
    assert value("crosscoder_train_tokens_total")[0] >= 256
    assert value("crosscoder_train_step_seconds_count")[0] >= 1
    assert value("crosscoder_train_data_wait_seconds_total")[0] >= 0
    assert {k.split('term="')[1].split('"')[0] for k in samples if k.startswith("crosscoder_train_loss{")} >= {"mse", "total"}
    assert sorted(k.split('source="')[1].split('"')[0] for k in samples if k.startswith("crosscoder_train_fve{")) == ["base", "chat"]
    assert all(-5 < v <= 1 for v in value("crosscoder_train_fve"))
    assert 0 < value("crosscoder_train_l0")[0] <= 96
    assert 0 <= value("crosscoder_train_dead_latents_ratio")[0] <= 1


def test_training_streams_shards_from_s3(ray_cluster, s3_bucket, small_shards, tmp_path):
    """Two data-parallel ranks read their shards from a real S3 protocol server, and see exactly the
    tokens the same shards give from local disk."""
    from crosscoder.storage import Root
    from crosscoder.synthetic import write_synthetic

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/shards"
    write_synthetic(small_synthetic(), url, progress=False, root=Root(url, endpoint_url=endpoint))
    cfg = config(workers=2, latent_parallel=1, steps=6)
    cfg.storage.endpoint_url = endpoint
    train_distributed(cfg, tmp_path / "s3", url, progress=False)
    local = tmp_path / "local"
    train(config(steps=6, data_partitions=2), local, data=small_shards, progress=False)
    from_s3, from_disk = log_by_step(tmp_path / "s3"), log_by_step(local)
    for s in range(1, 7):
        assert np.isclose(from_s3[s]["loss"]["total"], from_disk[s]["loss"]["total"], rtol=1e-4, atol=1e-5)


def test_checkpoints_reshard_to_other_worker_and_latent_parallel_counts(ray_cluster, small_shards, tmp_path):
    """Saved on 2 latent × 2 data ranks, resumed on 1 × 2 and on 4 × 1: each continues the trajectory
    of an uninterrupted single process reading the same 4 data partitions."""
    import shutil

    reference = tmp_path / "reference"
    train(config(data_partitions=4), reference, data=small_shards, progress=False)
    first = train_distributed(config(workers=4, latent_parallel=2, data_partitions=4), tmp_path / "saved",
                              small_shards, progress=False, stop_after=6)
    assert first.steps == 6
    saved = read_resharding_checkpoint(tmp_path / "saved" / "checkpoints" / "step-6", tmp_path)
    assert saved["weight.W_dec"].shape == (96, 40) and saved["exp_avg_sq.W_enc"].shape == (40, 96)
    assert saved["exp_avg_sq.W_enc"].abs().sum() > 0  # Adam's moments are in it, whole
    expected = log_by_step(reference)
    for latent_parallel, workers in ((1, 2), (4, 4)):
        run = tmp_path / f"resumed-{latent_parallel}x{workers // latent_parallel}"
        shutil.copytree(tmp_path / "saved", run, ignore=shutil.ignore_patterns("ray"))
        cfg = config(workers=workers, latent_parallel=latent_parallel, data_partitions=4)
        assert train_distributed(cfg, run, small_shards, progress=False).steps == 12
        resumed = log_by_step(run)
        for step in range(1, 13):
            for term in ("mse", "auxk", "total"):
                assert np.isclose(resumed[step]["loss"][term], expected[step]["loss"][term], rtol=1e-4, atol=1e-5), (
                    latent_parallel, step, term)
            assert round(resumed[step]["dead_fraction"] * 96) == round(expected[step]["dead_fraction"] * 96), step
        assert_same_exports(reference / "crosscoder", run / "crosscoder")
    # another partition count would read other global batches: refused with the setting to use
    with pytest.raises(RunDirError, match="data_partitions = 4"):
        train_distributed(config(workers=2, latent_parallel=2, data_partitions=2, steps=14), tmp_path / "saved",
                          small_shards, progress=False)


def test_a_run_trained_in_one_process_continues_on_workers_on_the_same_trajectory(ray_cluster, single_reference,
                                                                                 small_shards, tmp_path):
    """train.workers 0 → 2 on one run directory: the workers resume one process's checkpoint at step 6
    (checkpoint_handoff.py) and end where one uninterrupted process does, each step logged once.
    Before, they saw no checkpoint of their own, started again at step 0 and pruned the other's. (The
    other way, workers → one process, is in the JumpReLU test above.)"""
    import shutil

    run = tmp_path / "run"
    assert train(config(), run, data=small_shards, progress=False, stop_after=6).steps == 6
    shutil.copytree(run, tmp_path / "one")
    assert train_distributed(config(workers=2, latent_parallel=2), run, small_shards, progress=False).steps == 12
    lines = (run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))
    expected, resumed = log_by_step(single_reference), log_by_step(run)
    for step in range(1, 13):
        for term in ("mse", "auxk", "total"):
            assert np.isclose(resumed[step]["loss"][term], expected[step]["loss"][term], rtol=1e-4, atol=1e-5), (
                step, term)
        assert round(resumed[step]["dead_fraction"] * 96) == round(expected[step]["dead_fraction"] * 96), step
    assert_same_exports(single_reference / "crosscoder", run / "crosscoder")
    # refused on the driver, before any worker starts, with what would resume it
    with pytest.raises(RunDirError, match=r"written by one process .* ZeRO-3 cannot load; resume with train.zero_stage"):
        train_distributed(config(workers=2, latent_parallel=2, zero_stage=3), tmp_path / "one", small_shards,
                          progress=False)
    with pytest.raises(RunDirError, match=r"as 1 partitions, this run as 2; resume it with data-parallel ranks that "
                                          r"divide 1 .* raise train.latent_parallel"):
        train_distributed(config(workers=2), tmp_path / "one", small_shards, progress=False)


def test_workers_go_on_on_a_grown_harvest_with_the_scales_the_run_was_trained_with(ray_cluster, small_shards,
                                                                                 tmp_path):
    """The Ray Train driver's check before its workers start, and every worker's, keep the checkpoint's
    norm_scale where the data's moved by 1% (a grown harvest's estimate): they refused the run as
    another dictionary (trainer.with_saved_scale)."""
    import shutil
    from dataclasses import replace

    from crosscoder.shards import read_manifest, write_manifest
    from crosscoder.storage import Root

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(small_shards, data)
    manifest = read_manifest(Root(str(data)))
    assert train(config(), run, data=str(data), progress=False, stop_after=6).steps == 6
    write_manifest(Root(str(data)), replace(manifest, norm_scale=[s * 1.01 for s in manifest.norm_scale]))
    assert train_distributed(config(workers=2, latent_parallel=2), run, str(data), progress=False).steps == 12
    assert json.loads((run / "crosscoder" / "config.json").read_text())["norm_scale"] == manifest.norm_scale
