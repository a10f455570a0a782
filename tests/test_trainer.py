"""The single-process trainer: exact resume, export round trip, errors."""

import json
import math

import numpy as np
import pytest
import torch

from crosscoder import CrossCoder
from crosscoder.shards import read_manifest
from crosscoder.storage import Root
from crosscoder.trainer import RunDirError, TrainingDiverged, learning_rate, local_checkpoints, spec_from, train

from .conftest import shards_with_an_inf, small_run_config


@pytest.mark.parametrize("arch,act", [("acausal", "batchtopk"), ("aligned", "topk"), ("acausal", "relu"),
                                      ("aligned", "jumprelu")])
def test_resume_reproduces_the_uninterrupted_trajectory(tmp_path, small_shards, arch, act, capsys, monkeypatch):
    cfg = small_run_config(arch=arch, activation=act, steps=24, checkpoint_every=0, dead_tokens=600)
    full = train(cfg, tmp_path / "full", data=small_shards, progress=False)
    first = train(cfg, tmp_path / "cut", data=small_shards, progress=False, stop_after=9)
    assert first.export_dir is None and [p.name for p in local_checkpoints(tmp_path / "cut")] == ["step-9"]
    # 24 steps at lr 3e-3: too few for JumpReLU's thresholds to travel, which the run says
    assert ("jumprelu learns log θ" in capsys.readouterr().out) == (act == "jumprelu")

    def drawn(*args, **kwargs):
        raise AssertionError("a resume drew the initial dictionary, which its checkpoint replaces")

    monkeypatch.setattr("crosscoder.model.init_parameters", drawn)  # the weights must all come from step-9
    second = train(cfg, tmp_path / "cut", data=small_shards, progress=False)
    out = capsys.readouterr().out
    assert f"train: resuming {(tmp_path / 'cut').absolute()} from step 9 of 24" in out
    assert "learning-rate schedule" not in out  # the same schedule, resumed where it was
    resumed = first.losses + second.losses
    assert len(resumed) == len(full.losses) == 24
    assert np.allclose(resumed, full.losses, rtol=0, atol=1e-6), (resumed, full.losses)
    a = CrossCoder.from_pretrained(tmp_path / "full" / "crosscoder")
    b = CrossCoder.from_pretrained(tmp_path / "cut" / "crosscoder")
    for name, p in a.state_dict().items():
        assert torch.allclose(p, b.state_dict()[name], atol=1e-6), name


def test_export_reloads_to_identical_encodings_on_raw_activations(tmp_path, small_shards):
    cfg = small_run_config(steps=20)
    result = train(cfg, tmp_path / "run", data=small_shards, progress=False)
    manifest = read_manifest(Root(small_shards))
    export = result.export_dir
    assert (export / "model.safetensors").is_file()
    config = json.loads((export / "config.json").read_text())
    assert config["sources"] == ["base", "chat"] and config["widths"] == [16, 24]
    assert config["norm_scale"] == manifest.norm_scale and config["k"] == 4

    # the trained model, on normalised inputs, vs the export, on raw inputs
    state = torch.load(local_checkpoints(tmp_path / "run")[-1] / "state.pt", weights_only=False)
    trained = CrossCoder(spec_from(cfg.train, manifest))
    trained.load_state_dict(state["model"])
    trained.eval()
    loaded = CrossCoder.from_pretrained(export)
    raw = torch.randn(64, 40) * 3
    scale = torch.cat([torch.full((16,), manifest.norm_scale[0]), torch.full((24,), manifest.norm_scale[1])])
    f_trained = trained.encode(raw * scale)
    f_loaded = loaded.encode(raw)
    assert torch.allclose(f_trained, f_loaded, atol=1e-5)
    assert (f_loaded != 0).any()
    assert torch.allclose(loaded.reconstruct(raw), trained.reconstruct(raw * scale) / scale, atol=1e-4)
    again = CrossCoder.from_pretrained(export)
    assert torch.equal(again.encode(raw), f_loaded)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        CrossCoder.from_pretrained(tmp_path)


def test_nan_loss_stops_with_a_clear_message_and_keeps_last_checkpoint(tmp_path, small_shards):
    cfg = small_run_config(steps=40, checkpoint_every=5)
    with pytest.raises(TrainingDiverged, match=r"loss is not finite at step \d+ .* no checkpoint was written yet; "):
        train(small_run_config(steps=40, lr=1e30), tmp_path / "fresh", data=small_shards, progress=False)
    assert not local_checkpoints(tmp_path / "fresh")
    train(cfg, tmp_path / "run", data=small_shards, progress=False, stop_after=10)
    good = local_checkpoints(tmp_path / "run")[-1]
    before = (good / "state.pt").read_bytes()
    cfg.train.lr = 1e30  # diverges at once
    with pytest.raises(TrainingDiverged, match=r"loss is not finite at step \d+ .* the last checkpoint is intact; "
                                               r"lower train.lr, or raise train.grad_clip\.$"):
        train(cfg, tmp_path / "run", data=small_shards, progress=False)
    last = local_checkpoints(tmp_path / "run")[-1]
    assert last == good and (good / "state.pt").read_bytes() == before
    state = torch.load(last / "state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_inf_in_the_data_is_named_by_the_nan_stop_and_found_by_validate_full(tmp_path, capsys):
    """Shards holding an inf (harvested by another tool, or before the harvest checked) make the loss
    NaN: the stop says the batch is at fault, not the learning rate, and `validate --full` names the
    shard, sample and source."""
    from crosscoder.shards import ShardError, validate

    root = shards_with_an_inf(tmp_path / "data", bad_shard=2)
    cfg = small_run_config(steps=40, data_partitions=4)  # partition 2 reads shard 2: every batch meets an inf
    with pytest.raises(TrainingDiverged, match=r"loss is not finite at step \d+ .* a batch of this step holds inf or NaN "
                                               r"activations: `crosscoder validate DATA --full` names the shards\.$"):
        train(cfg, tmp_path / "run", data=str(tmp_path / "data"), progress=False)
    with pytest.raises(ShardError, match=r"shard-000002.tar: sample '0002-0000' holds inf or NaN activations "
                                         r"\(source 'chat'\); delete the shard and re-run the harvest"):
        validate(root, full=True, progress=False)
    from crosscoder.cli import main

    capsys.readouterr()
    assert main(["validate", str(tmp_path / "data")]) == 0  # sizes only: the listing cannot see values
    assert main(["validate", str(tmp_path / "data"), "--full", "--quiet"]) == 1
    assert "sample '0002-0000' holds inf or NaN activations" in capsys.readouterr().err
    # a second bad shard (a flipped byte, same size): one error names both, so one harvest redoes them
    shard = tmp_path / "data" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"data: 2 of 4 shards are bad: shard-000000.tar: sha256 \w+… does not match "
                                         r"the manifest's \w+…; shard-000002.tar: sample '0002-0000' holds inf or NaN "
                                         r"activations \(source 'chat'\); delete them and re-run the harvest"):
        validate(root, full=True, progress=False)


def test_incompatible_run_directory_is_refused(tmp_path, small_shards):
    """Refused, and the run's config.toml (what `train --run`, `analyze` and the Hub card read back)
    still the one it trained with: the refused command wrote its own there before the check."""
    cfg = small_run_config(steps=5)
    train(cfg, tmp_path / "run", data=small_shards, progress=False)
    saved = (tmp_path / "run" / "config.toml").read_text()
    cfg.train.latents = 128
    with pytest.raises(RunDirError, match=r"trained with latents=\d+; this config asks for latents=128; use another"):
        train(cfg, tmp_path / "run", data=small_shards, progress=False)
    assert (tmp_path / "run" / "config.toml").read_text() == saved


def test_workers_on_a_run_directory_of_other_sources_are_refused_before_ray_and_keep_its_record(tmp_path,
                                                                                               small_shards):
    """The same dictionary on data of other sources (a finished run continued with the wrong --data):
    each worker refused the checkpoint, Ray Train retried them train.max_failures times (2 minutes
    of tracebacks), the line said to re-run to resume, and the driver had deleted the finished
    run's train_result.json on the way. The driver refuses it now from the checkpoint's spec."""
    from crosscoder.ray_train import train_distributed
    from crosscoder.synthetic import write_synthetic

    from .conftest import small_synthetic

    cfg = small_run_config(steps=4, checkpoint_every=4)
    train(cfg, tmp_path / "run", data=small_shards, progress=False)
    record = (tmp_path / "run" / "train_result.json").read_text()
    other = str(tmp_path / "other")
    write_synthetic(small_synthetic(widths=[16, 32], tokens=2048), other, progress=False)
    cfg.train.workers, cfg.train.latent_parallel, cfg.train.steps = 2, 2, 8
    with pytest.raises(RunDirError, match=r"its checkpoint was trained with widths=\[16, 24\], norm_scale=.*; its "
                                          r"data has widths=\[16, 32\], norm_scale=.*; use another --run"):
        train_distributed(cfg, tmp_path / "run", other, progress=False)
    assert (tmp_path / "run" / "train_result.json").read_text() == record
    assert not (tmp_path / "run" / "ray").exists()  # Ray Train never started


def test_a_resume_on_a_grown_harvest_keeps_the_scales_it_was_trained_with(tmp_path, small_shards, capsys):
    """A harvest grown since (a larger harvest.tokens, documents appended) estimates norm_scale again
    from more tokens, a little apart (0.14% on the demo pair): the resume was refused as another
    dictionary, saying "this config asks for norm_scale=..." of a setting no config has. Within 5%
    the run goes on in the units it was trained in, a finished one is still finished, and it says
    so; further apart it is other data, refused naming the data's scale."""
    import shutil
    from dataclasses import replace

    from crosscoder import pipeline
    from crosscoder.shards import write_manifest

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(small_shards, data)
    cfg = small_run_config(steps=6, checkpoint_every=6)
    train(cfg, run, data=str(data), progress=False)
    trained = json.loads((run / "crosscoder" / "config.json").read_text())["norm_scale"]
    manifest = read_manifest(Root(str(data)))
    write_manifest(Root(str(data)), replace(manifest, norm_scale=[s * 1.01 for s in manifest.norm_scale]))
    capsys.readouterr()
    again = pipeline.train(pipeline.plan(cfg, run, str(data)), progress=False)  # as `crosscoder run` re-runs it
    assert again.steps == 6 and "already trained to step 6, skipping" in capsys.readouterr().out
    cfg.train.steps = 8
    result = train(cfg, run, data=str(data), progress=False)
    assert result.steps == 8 and len(result.losses) == 2
    assert "the data's norm_scale is 1.00% from the checkpoint's" in capsys.readouterr().out
    assert json.loads((run / "crosscoder" / "config.json").read_text())["norm_scale"] == trained
    write_manifest(Root(str(data)), replace(manifest, norm_scale=[s * 1.5 for s in manifest.norm_scale]))
    cfg.train.steps = 10
    with pytest.raises(RunDirError, match=r"trained with norm_scale=\[.*\]; its data has norm_scale=\[.*\]; use another"):
        train(cfg, run, data=str(data), progress=False)


@pytest.mark.parametrize("cut", ["train_result.json", "crosscoder/config.json", "crosscoder/model.safetensors"])
def test_a_training_record_or_export_config_cut_short_is_written_again_from_the_checkpoint(tmp_path, small_shards,
                                                                                          capsys, cut):
    """A finished run whose train_result.json or export config.json is not JSON, or whose export
    weights are cut short (a write cut short, an edit): `crosscoder run` and `train` ended in a
    JSONDecodeError or SafetensorError traceback. Each is derived from the last checkpoint: reading
    it names the file and the command, and the re-run resumes at the checkpoint's step and writes it
    again, the weights unchanged."""
    from crosscoder import pipeline
    from crosscoder.analysis import trained_steps_of
    from crosscoder.errors import AnalysisError, ExportUnreadable
    from crosscoder.trainer import TrainResult

    cfg, run = small_run_config(steps=6, checkpoint_every=6), tmp_path / "run"
    train(cfg, run, data=small_shards, progress=False)
    before = CrossCoder.from_pretrained(run / "crosscoder").state_dict()
    path = run / cut
    path.write_bytes(path.read_bytes()[:40 if path.suffix == ".json" else 1000])
    if cut == "crosscoder/model.safetensors":
        with pytest.raises(ExportUnreadable, match=rf"{path}: not readable weights \(.*\); a run's own export is "
                                                   r"written again from its last checkpoint by `crosscoder train RUN`"):
            CrossCoder.from_pretrained(run / "crosscoder")
    elif cut == "train_result.json":
        with pytest.raises(RunDirError, match=rf"{path}: not a readable training record \(.*\); `crosscoder train "
                                              rf"{run}` writes it again from the last checkpoint"):
            TrainResult.read(run)
    else:
        with pytest.raises(AnalysisError, match=rf"{path}: not a readable export config \(.*\); `crosscoder train "
                                                rf"{run}` writes the export again from the last checkpoint"):
            trained_steps_of(run / "crosscoder")
    capsys.readouterr()
    again = pipeline.train(pipeline.plan(cfg, run, small_shards), progress=False)  # as `crosscoder run` re-runs it
    assert again.steps == 6 and not again.losses
    assert f"resuming {run.absolute()} from step 6 of 6" in capsys.readouterr().out
    assert trained_steps_of(run / "crosscoder") == 6 and TrainResult.read(run) is not None
    after = CrossCoder.from_pretrained(run / "crosscoder").state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_the_end_of_the_data_keeps_the_steps_done_and_a_rerun_continues(tmp_path, small_shards):
    """train.max_epochs = 1 on 32 batches' worth of tokens: the stop at step 32 names the fix and
    checkpoints first (it lost every step since the last checkpoint); a re-run that allows more
    epochs resumes at step 32."""
    from crosscoder.stream import DataExhausted

    cfg = small_run_config(steps=40, max_epochs=1, checkpoint_every=25, keep_checkpoints=0)
    with pytest.raises(DataExhausted, match=r"the data ran out after train.max_epochs = 1 epoch\(s\) of 128 samples.*"
                                            r"raise train.max_epochs .*stopped at step 32 with a checkpoint"):
        train(cfg, tmp_path / "run", data=small_shards, progress=False)
    assert [p.name for p in local_checkpoints(tmp_path / "run")] == ["step-25", "step-32"]
    cfg.train.max_epochs = 0
    from crosscoder import pipeline

    # as `crosscoder train` re-runs it: the stop recorded in train_result.json is not a finished run
    again = pipeline.train(pipeline.plan(cfg, tmp_path / "run", small_shards), progress=False)
    assert len(again.losses) == 8 and again.steps == 40 and again.export_dir is not None


def test_training_on_an_unfinished_harvest_says_so(tmp_path, small_shards, capsys):
    """A root whose harvest stopped part way (or is still written by another run) is trained on, as
    `--data` asks, but not silently: one line says how many of the planned shards it holds."""
    import shutil

    from crosscoder.shards import write_manifest

    partial = tmp_path / "partial"
    shutil.copytree(small_shards, partial)
    manifest = read_manifest(Root(str(partial)))
    manifest.extra["harvest"] = {"complete": False, "planned_shards": len(manifest.shards) + 5}
    write_manifest(Root(str(partial)), manifest)
    train(small_run_config(steps=2), tmp_path / "run", data=str(partial), progress=False)
    out = capsys.readouterr().out
    assert (f"train: {partial} holds {len(manifest.shards)} of the harvest's {len(manifest.shards) + 5} shards "
            "(the harvest has not finished; running it again completes it); training on those") in out, out
    train(small_run_config(steps=2), tmp_path / "whole", data=small_shards, progress=False)
    assert "has not finished" not in capsys.readouterr().out


def test_learning_rate_schedule():
    cfg = small_run_config(steps=100, lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.2).train
    assert math.isclose(learning_rate(cfg, 0), 0.1)
    assert learning_rate(cfg, 50) == 1.0
    assert math.isclose(learning_rate(cfg, 90), 0.5)
    assert learning_rate(cfg, 99) > 0


def test_l1_coefficient_warms_up(tmp_path, small_shards):
    from crosscoder.trainer import loss_weights

    cfg = small_run_config(activation="relu", l1_coeff=4.0, l1_warmup_steps=4)
    spec = spec_from(cfg.train, read_manifest(Root(small_shards)))
    assert [loss_weights(cfg.train, spec, s).l1 for s in range(5)] == [1.0, 2.0, 3.0, 4.0, 4.0]


def test_training_log_and_progress_metrics(tmp_path, small_shards):
    cfg = small_run_config(steps=10, log_every=5)
    train(cfg, tmp_path / "run", data=small_shards, progress=False)
    lines = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [5, 10]
    assert set(lines[-1]["fve"]) == {"base", "chat"}
    assert {"mse", "auxk", "total"} <= set(lines[-1]["loss"])
    assert 0 <= lines[-1]["dead_fraction"] <= 1 and lines[-1]["l0"] > 0
    assert (tmp_path / "run" / "config.toml").is_file()
