"""`ray job submit` against a real Ray head with token authentication, as a production head runs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from crosscoder.model import CrossCoder
from crosscoder.random_pair import make_pair, write_documents
from crosscoder.shards import read_manifest
from crosscoder.storage import Root

from .conftest import BIN, free_port, ray_cli, stop_cluster, wait_for_port

pytestmark = pytest.mark.slow


# credentials in the head's environment, as a pod's Secrets put them there, and a plain setting
SECRETS = {"HF_TOKEN": "hf_" + os.urandom(8).hex(), "AWS_SESSION_TOKEN": "session-" + os.urandom(8).hex()}
SETTING = "region-" + os.urandom(4).hex()


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started with `ray start --head` on 127.0.0.1, token auth on; yields (address, env)."""
    # its own temp dir, short: Ray's socket paths under it must fit AF_UNIX's 107 bytes, which pytest's
    # base temp dir (deeper under parallel workers: .../popen-gw0/) can leave too little room for
    temp = Path(tempfile.mkdtemp(prefix="rayhead-"))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=f"{BIN}:{os.environ.get('PATH', '')}",
               **SECRETS, AWS_REGION=SETTING)
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    # every port this head opens is chosen free: the defaults (e.g. the dashboard agent's 52365) are
    # taken by the local Ray other tests of the session run, and a head whose job agent cannot bind
    # answers every submission with "No available agent"
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--ray-client-server-port={free_port()}"]
    ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true", *agent_ports,
            f"--temp-dir={temp}", "--disable-usage-stats", env=env, timeout=180)
    try:
        wait_for_port(dashboard, timeout=60)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submission_needs_the_token(ray_head, tmp_path):
    address, env = ray_head
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN"] = "wrong-" + env["RAY_AUTH_TOKEN"]
    proc = ray_cli("job", "submit", "--address", address, "--no-wait", "--", "echo", "hi", env=no_token,
                   check=False, timeout=60)
    assert proc.returncode != 0


def test_submitted_config_harvests_trains_and_exports(ray_head, tmp_path):
    address, env = ray_head
    base, chat = make_pair(tmp_path / "models")
    docs = write_documents(tmp_path / "docs.jsonl", n_docs=60)
    work = tmp_path / "job"
    work.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "launch" / "configs" / "harvest.toml", work / "config.toml")
    run = tmp_path / "run"
    overrides = [f"--harvest.models=[{{name='base', path='{base}'}}, {{name='chat', path='{chat}'}}]",
                 f"--harvest.data={docs}", f"--harvest.output={tmp_path / 'shards'}", "--harvest.tokens=3000",
                 "--harvest.actors=1", "--train.steps=30", "--train.checkpoint_every=10", "--quiet"]
    job_id = f"crosscoder-test-{os.urandom(4).hex()}"
    submit = ["job", "submit", "--address", address, "--working-dir", str(work), "--submission-id", job_id,
              "--no-wait", "--", "crosscoder", "run", "--config", "config.toml", "--run", str(run), *overrides]
    deadline = time.time() + 120
    while True:  # a head whose dashboard listens may not have its job agent yet ("No available agent")
        proc = ray_cli(*submit, env=env, check=False)
        if proc.returncode == 0 or "No available agent" not in proc.stderr + proc.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deadline, status = time.time() + 300, ""
    while time.time() < deadline:
        status = ray_cli("job", "status", "--address", address, job_id, env=env).stdout.upper()
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(2)
    logs = ray_cli("job", "logs", "--address", address, job_id, env=env).stdout
    assert "SUCCEEDED" in status, f"{status}\n{logs}"
    assert f"run directory: {run}" in logs and "crosscoder exported to" in logs
    assert "analyze: CE loss recovered" in logs and "Loading weights" not in logs  # --quiet: no bar, actors' or driver's
    manifest = read_manifest(Root(str(tmp_path / "shards")))
    assert [s.name for s in manifest.sources] == ["base", "chat"] and manifest.extra["harvest"]["complete"]
    model = CrossCoder.from_pretrained(run / "crosscoder")
    assert model.spec.sources == ["base", "chat"] and model.spec.latents == 1024
    assert json.loads((run / "crosscoder" / "config.json").read_text())["normalization_folded"]
    # no credential in a runtime environment Ray shows (its state API: the dashboard's actor table),
    # in the job's log or in the run directory; a plain setting does travel to the actors
    actors = ray_cli("list", "actors", "--detail", "--format=json", "--limit=1000", "--address", address, env=env).stdout
    harvesters = [a for a in json.loads(actors) if a["class_name"] == "ShardHarvester"]
    assert harvesters and all(SETTING in a["serialized_runtime_env"] for a in harvesters)
    written = "".join(p.read_text(errors="replace") for p in run.rglob("*") if p.is_file() and p.suffix in
                      (".toml", ".json", ".jsonl", ".txt", ".csv", ".html"))
    for secret in SECRETS.values():
        assert secret not in actors and secret not in logs and secret not in written
