"""A local path that another node of the Ray cluster does not see is refused before any work.

The cluster here has two real nodes on this host: a head, and a second node started in its own
mount namespace, where an empty tmpfs covers one directory (``hidden``), as a node of a real cluster
has its own disk: a path under ``hidden`` that the driver (on the head's view) sees is not there on
the second node, and a path elsewhere is the same file on both, as on a shared file system."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from crosscoder.random_pair import make_pair, write_documents
from crosscoder.shared_paths import _differences, _digest

from .conftest import BIN, free_port, ray_cli, small_synthetic, stop_cluster

pytestmark = pytest.mark.slow

TRAIN = ["--train.latents", "96", "--train.k", "4", "--train.batch_size", "256", "--train.steps", "12",
         "--train.workers", "2", "--train.checkpoint_every", "6", "--quiet"]  # 12 steps: overridden by a later one


def test_a_node_reads_a_differing_or_missing_file_as_such(tmp_path):
    """What a node's task answers: nothing for the same file, and why for a missing or another one."""
    same, other = tmp_path / "same.bin", tmp_path / "other.bin"
    same.write_bytes(b"x" * 3_000_000)
    other.write_bytes(b"y" * 10)
    expected = {"a": (str(same), _digest(str(same))), "b": (str(other), _digest(str(same))),
                "c": (str(tmp_path / "gone.bin"), _digest(str(same)))}
    assert _differences(expected) == {"b": "another file there", "c": "missing there"}
    longer = tmp_path / "longer.bin"  # the same first MiB, another size
    longer.write_bytes(b"x" * 3_000_001)
    assert _differences({"a": (str(longer), _digest(str(same)))}) == {"a": "another file there"}


SECOND_NODE = """
import sys
from ray._private.node import Node
from ray._private.parameter import RayParams

gcs, agent, runtime_env_agent, metrics = sys.argv[1], *map(int, sys.argv[2:])
Node(RayParams(gcs_address=gcs, node_ip_address="127.0.0.1", num_cpus=1, num_gpus=1, node_manager_port=0,
               min_worker_port=0, max_worker_port=0, dashboard_agent_listen_port=agent,
               runtime_env_agent_port=runtime_env_agent, metrics_export_port=metrics),
     head=False, shutdown_at_exit=False, spawn_reaper=False)
"""


@pytest.fixture(scope="module")
def two_nodes():
    """(address, env, hidden): a Ray of two nodes with one CPU each; the second also declares one
    GPU (no CUDA behind it) and has its own empty ``hidden`` directory."""
    temp = Path(tempfile.mkdtemp(prefix="raytwo-"))  # short: Ray's socket paths must fit AF_UNIX's 107 bytes
    hidden = temp / "hidden"
    hidden.mkdir()
    # a mount namespace of its own: as root, or else inside a user namespace where this user is root
    for unshare in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        unshare += ["--propagation", "private"]
        own_view = subprocess.run([*unshare, "mount", "-t", "tmpfs", "none", str(hidden)], capture_output=True,
                                  text=True)
        if own_view.returncode == 0:
            break
    else:  # e.g. a container whose seccomp profile refuses unshare: no second view of a directory
        shutil.rmtree(temp, ignore_errors=True)
        pytest.skip(f"this machine allows no mount namespace (unshare: {own_view.stderr.strip()})")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    gcs = free_port()
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"  # in Ray's processes too: this host runs other Rays (ray_connect)
    try:
        # every port chosen free: Ray's defaults are taken by the other Rays of the session
        ray_cli("start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", f"--temp-dir={temp}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--ray-client-server-port={free_port()}", "--disable-usage-stats", env=env, timeout=180)
        # the second node as `ray start --address` starts one, less its refusal of a second node while
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every listener on 127.0.0.1 (set to 1, Ray would
        # bind them to every interface)
        joined = subprocess.run(
            [*unshare, "sh", "-c", f'mount -t tmpfs none "{hidden}" && exec "$@"',
             "sh", sys.executable, "-c", SECOND_NODE, env["RAY_ADDRESS"], *(str(free_port()) for _ in range(3))],
            env=env, capture_output=True, text=True, timeout=180)
        assert joined.returncode == 0, f"the second node did not start:\n{joined.stdout}\n{joined.stderr}"
        deadline = time.time() + 120
        while time.time() < deadline:
            status = ray_cli("status", env=env, check=False, timeout=60).stdout
            if status.count(" node_") >= 2:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"the second node did not join in 120 s:\n{status}")
        yield f"127.0.0.1:{gcs}", env, hidden
    finally:
        stop_cluster(temp)
        subprocess.run(["umount", "-l", str(hidden)], capture_output=True)  # only mounted in the node's namespace
        shutil.rmtree(temp, ignore_errors=True)


def command(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosscoder.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def refused(proc: subprocess.CompletedProcess, label: str, work: str) -> None:
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last.startswith(f"crosscoder: NotShared: {label} is not the same on the Ray node at 127.0.0.1 (node "), last
    assert f": missing there), which may run {work}: on a cluster of several nodes a local path must be on a " \
           "file system every node mounts" in last, last
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory, two_nodes):
    """The same small dataset where both nodes see it and where only the driver's node does."""
    from crosscoder.synthetic import write_synthetic

    seen = tmp_path_factory.mktemp("seen") / "shards"
    write_synthetic(small_synthetic(), str(seen), progress=False)
    unseen = two_nodes[2] / "shards"
    shutil.copytree(seen, unseen)
    return seen, unseen


def test_training_refuses_a_run_directory_or_data_another_node_does_not_see(two_nodes, shards, tmp_path):
    """Before: the workers trained, each node keeping its own part of every checkpoint, and the
    re-run hung (killed after 300 s). Now: one line naming the place, before any worker starts."""
    address, env, hidden = two_nodes
    seen, unseen = shards
    run = hidden / "run"
    refused(command(env, "train", "--run", str(run), "--data", str(seen), *TRAIN), f"the run directory {run}",
            "training workers")
    assert not run.exists()  # nothing written: the command removes the folder it made (no token is left)
    run = tmp_path / "run"
    refused(command(env, "train", "--run", str(run), "--data", str(unseen), *TRAIN), f"the training data {unseen}",
            "training workers")
    assert not run.exists()
    # where both nodes see both, the two workers (one CPU per node: one on each) train, and resume
    done = command(env, "train", "--run", str(run), "--data", str(seen), *TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "crosscoder" / "model.safetensors").is_file()
    assert not list(run.glob(".node-check-*"))
    more = command(env, "train", "--run", str(run), "--data", str(seen), *TRAIN, "--train.steps", "14")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming" in more.stdout + more.stderr and "from step 12 of 14" in more.stdout + more.stderr
    # the analysis goes to the second node's GPU: a run directory that node does not see is refused
    hidden_run = hidden / "trained"
    shutil.copytree(run, hidden_run, ignore=shutil.ignore_patterns(".lock", "ray"))
    refused(command(env, "analyze", "--run", str(hidden_run)), f"the run directory {hidden_run}", "the analysis")


def test_a_harvest_refuses_models_or_an_output_another_node_does_not_see(two_nodes, tmp_path):
    address, env, hidden = two_nodes
    base, chat = make_pair(tmp_path / "models")
    docs = write_documents(tmp_path / "docs.jsonl", n_docs=10)

    def harvest(models: tuple[str, str], output: Path) -> subprocess.CompletedProcess:
        config = tmp_path / "harvest.toml"
        config.write_text(f'[harvest]\nmodels = [{{name = "base", path = "{models[0]}"}}, '
                          f'{{name = "chat", path = "{models[1]}"}}]\nhooks = ["model.layers.1"]\n'
                          f'data = "{docs}"\noutput = "{output}"\nactors = 1\ntokens = 200\nseq_len = 16\n')
        return command(env, "harvest", "--config", str(config), "--run", str(tmp_path / "run"))

    refused(harvest((base, chat), hidden / "shards-out"), f"the harvest output {hidden / 'shards-out'}",
            "harvest actors")
    assert not (hidden / "shards-out" / "manifest.json").exists()
    moved = shutil.copytree(Path(chat), hidden / "chat")
    refused(harvest((base, str(moved)), tmp_path / "shards"), f"the model {moved}", "harvest actors")
