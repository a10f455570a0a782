"""`crosscoder run` on its embedded default, as a new user runs it (shortened by overrides)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from crosscoder.analysis import read_latents_csv
from crosscoder.model import CrossCoder
from crosscoder.ray_connect import LOCAL_RAY_ENV
from crosscoder.shards import read_manifest
from crosscoder.storage import Root

from .conftest import DEMO_STEPS

pytestmark = pytest.mark.slow


def crosscoder(*args, cwd, check: bool = True) -> subprocess.CompletedProcess:
    """The command in ``cwd``, with its own temporary directory there (``cwd/tmp``); Ray's stays in /tmp,
    as its socket paths must be short."""
    env = dict(os.environ, TMPDIR=str(cwd / "tmp"), RAY_TMPDIR="/tmp")
    for name in ("RAY_ADDRESS", *LOCAL_RAY_ENV):  # as a user's shell has it: the command sets these itself
        env.pop(name, None)
    (cwd / "tmp").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "crosscoder.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 or not check, proc.stdout + proc.stderr
    return proc


def test_embedded_default_makes_tiny_models_harvests_trains_on_two_workers_and_reruns_quickly(tmp_path, demo_pair):
    # the demo pair trained once per session (test_demo_pair.py checks its behaviour) is placed where
    # the run makes it, so the run re-uses it and writes only the documents
    made, *_ = demo_pair
    run = tmp_path / "runs" / "default"
    shutil.copytree(made, run / "tiny")
    # --train.workers 2: the distributed path (Ray Train + DeepSpeed) through the whole command; the
    # default's one-process training is run by test_pipeline.py
    short = ["--train.workers", "2", "--train.steps", "40", "--train.checkpoint_every", "20", "--harvest.tokens", "12000",
             "--harvest.demo_steps", str(DEMO_STEPS), "--quiet"]
    first = crosscoder("run", *short, cwd=tmp_path)
    assert f"run directory: {run}" in first.stdout
    # Ray Train's controller monitor reached the state API (the local Ray has its dashboard), so the
    # log is not filled with its warning every few seconds
    assert "Failed to query Ray Train Controller" not in first.stdout + first.stderr
    # nor DeepSpeed's print from every rank that its CPU comm op was "built" (it was loaded)
    assert "built successfully" not in first.stdout + first.stderr
    # nor Ray's error line for the preemption watcher a local Ray does without (ray_connect.LOCAL_RAY_ENV)
    assert "PreemptionWatcher" not in first.stdout + first.stderr
    # nor, with --quiet, Ray Train's lines on starting its worker group
    assert "Started training worker group" not in first.stdout + first.stderr
    # nor Ray's warning that it turned token authentication on (it is on: ray_connect.py)
    assert "Token authentication is enabled" not in first.stdout + first.stderr
    assert "tiny models: writing demo documents" in first.stdout and "tiny models: training" not in first.stdout
    manifest = read_manifest(Root(str(run / "shards")))
    assert [s.name for s in manifest.sources] == ["base", "chat"] and manifest.extra["harvest"]["complete"]
    assert manifest.norm_scale and all(s > 0 for s in manifest.norm_scale)
    model = CrossCoder.from_pretrained(run / "crosscoder")
    assert model.spec.latents == 1024 and model.spec.activation == "batchtopk"
    assert (run / "checkpoints" / "latest").is_file()  # trained by the DeepSpeed workers
    # the analysis: latents.csv, summary and report, with CE loss recovered through the tiny models
    report = run / "analysis" / "report.html"
    assert f"report: {report}" in first.stdout
    table = read_latents_csv(run / "analysis" / "latents.csv")
    assert len(table["index"]) == 1024 and set(table["class"]) <= {"shared", "base_only", "chat_only", "dead"}
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert summary["tokens"] > 0 and set(summary["ce_loss_recovered"]) == {"base", "chat"}
    for ce in summary["ce_loss_recovered"].values():
        assert ce["zero_ablated"] > ce["clean"] and ce["recovered"] < 1.0001
    assert report.read_text().count("data:image/png;base64,") == 5
    # the shards name the demo tokenizer, so latents on its chat-template tokens are counted per class
    assert {c: v["latents"] for c, v in summary["special_tokens"].items()} == \
        {c: summary["classes"][c] for c in ("chat_only", "base_only", "shared")}
    assert "mostly on special tokens" in report.read_text()
    started = time.time()
    again = crosscoder("run", *short, cwd=tmp_path)
    assert "already trained to step 40, skipping" in again.stdout
    assert "tiny models:" not in again.stdout
    assert "analyze: " in again.stdout and "skipping" in again.stdout
    assert time.time() - started < 60
    # nothing of ours left in the temporary directory: the local Ray's empty working directory, the
    # part files of commits
    assert not list((tmp_path / "tmp").glob("crosscoder-*")), list((tmp_path / "tmp").iterdir())
    # moved elsewhere (archived, fetched from a cluster): analysed there with nothing named, the shards its
    # config.toml names and the models and tokenizer its manifest names (all in the run directory) read
    # where they are now (relocation.py); the models were looked for where they were, and the analysis failed
    moved = tmp_path / "archive" / "default"
    moved.parent.mkdir()
    run.rename(moved)
    crosscoder("analyze", str(moved), "--quiet", cwd=tmp_path)
    there = json.loads((moved / "analysis" / "summary.json").read_text())
    assert there["ce_loss_recovered"] == summary["ce_loss_recovered"] and there["tokens"] == summary["tokens"]
    assert there["special_tokens"] == summary["special_tokens"]  # the tokenizer loaded: its special tokens counted
    # `crosscoder run` there goes on: its harvest takes the models and documents its shards recorded under the old
    # directory as moved with it (it was refused as another harvest), and the run trains further where it is now
    further = list(short)
    further[further.index("--train.steps") + 1] = "44"
    further[further.index("--train.workers") + 1] = "0"  # one process resumes the workers' checkpoint
    crosscoder("run", "--run", str(moved), *further, "--train.data_partitions", "2", cwd=tmp_path)  # its analysis, after the training, too
    assert json.loads((moved / "train_result.json").read_text())["steps"] == 44
    # trained again here, the run no longer records where it was first; its manifest, still naming the models
    # there, is read by the root it was written to (CE loss recovered failed with "model directory ... does not
    # exist"); the same again once moved a second time
    archived = tmp_path / "archive" / "again"
    shutil.copytree(moved, archived)
    shutil.rmtree(moved)
    again = crosscoder("run", "--run", str(archived), "--quiet", cwd=tmp_path)
    assert "already trained to step 44, skipping" in again.stdout, again.stdout
    assert "describes the export (step 44), skipping" in again.stdout, again.stdout
    crosscoder("analyze", str(archived), "--quiet", cwd=tmp_path)
    there = json.loads((archived / "analysis" / "summary.json").read_text())
    assert there["trained_steps"] == 44 and set(there["ce_loss_recovered"]) == {"base", "chat"}
    assert set(there["special_tokens"]) == set(summary["special_tokens"])  # the tokenizer loaded there too
    # and its Neuronpedia dashboards: the analysed shards its config.toml names, and their tokenizer, where they
    # are now (the export read the shards where they were: "no manifest.json")
    crosscoder("export", str(archived), "--format", "neuronpedia", "--quiet", cwd=tmp_path)
    batch = json.loads((archived / "exports" / "neuronpedia" / "batch-0.json").read_text())
    tokens = [t for f in batch["features"] for a in f["activations"] for t in a["tokens"]]
    assert tokens and not any(t.startswith("#") for t in tokens), tokens[:20]  # text, not "#id" (no tokenizer)
