"""`crosscoder run` on its embedded default, as a new user runs it (shortened by overrides)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crosscoder.model import CrossCoder
from crosscoder.shards import read_manifest
from crosscoder.storage import Root

pytestmark = pytest.mark.slow


def crosscoder(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "crosscoder.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_embedded_default_makes_tiny_models_harvests_trains_on_two_workers_and_reruns_quickly(tmp_path):
    short = ["--train.steps", "40", "--train.checkpoint_every", "20", "--harvest.tokens", "12000", "--quiet"]
    first = crosscoder("run", *short, cwd=tmp_path)
    run = tmp_path / "runs" / "default"
    assert f"run directory: {run}" in first.stdout
    assert "tiny models: making a base/chat pair" in first.stdout
    manifest = read_manifest(Root(str(run / "shards")))
    assert [s.name for s in manifest.sources] == ["base", "chat"] and manifest.extra["harvest"]["complete"]
    assert manifest.norm_scale and all(s > 0 for s in manifest.norm_scale)
    model = CrossCoder.from_pretrained(run / "crosscoder")
    assert model.spec.latents == 1024 and model.spec.activation == "batchtopk"
    assert (run / "checkpoints" / "latest").is_file()  # trained by the DeepSpeed workers
    started = time.time()
    again = crosscoder("run", *short, cwd=tmp_path)
    assert "already trained to step 40, skipping" in again.stdout
    assert "tiny models: making" not in again.stdout
    assert time.time() - started < 60
