import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# every server a test starts listens on 127.0.0.1 only (Ray keeps its listeners there with this flag);
# the S3 credentials are moto's dummies, set before any Ray worker inherits the environment
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def _threads_per_test_worker() -> int | None:
    """This xdist worker's share of the cores, or None outside a parallel run.

    Each of torch, OpenMP and OpenBLAS starts a thread per core in every process; two workers on 2
    cores then run 4 compute threads on 2 cores, and a worker's threads wait on each other's
    preempted ones: the planted BatchTopK run trained in 119 s with another at once where one
    thread each took 32 s (24 s alone with 2). Set before numpy or torch is imported, here and in
    every process a test starts (Ray's workers set their own, from their CPU count)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // workers)


if (_threads := _threads_per_test_worker()) is not None:
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_variable] = str(_threads)

from crosscoder.config import RunConfig, SyntheticConfig  # noqa: E402
from crosscoder.synthetic import write_synthetic  # noqa: E402

# `python -m pytest -n auto` (what CI runs) runs the suite on parallel workers (pytest-xdist): most of
# a test's time is spent starting processes (Ray, Ray Train's worker groups, commands), which leaves
# cores idle in one process (measured on 2 cores: 22-26 minutes, 25 in a fresh-clone CI run, instead
# of 26-37; 18.6 once each worker kept to its share of threads, above). Each worker starts its own
# local Ray (ray_cluster) and builds its own session fixtures (the shards, the demo pair), so "auto"
# means a worker per usable core and per MEMORY_PER_WORKER of available memory (a parallel run on 2
# cores peaked at 8 GiB in use), at most MAX_TEST_WORKERS. Without -n (or with -n 0) the suite runs
# in one process.
MAX_TEST_WORKERS = 4
MEMORY_PER_WORKER = 4 * 2**30


def pytest_xdist_auto_num_workers(config) -> int:
    import psutil

    cores = len(os.sched_getaffinity(0))  # the cores this process may run on (a container's share)
    memory = psutil.virtual_memory().available // MEMORY_PER_WORKER
    return max(1, min(cores, memory, MAX_TEST_WORKERS))


# Fixtures that take long to build (a trained model pair, a trained crosscoder, a harvest, a second Ray
# node): the tests that use one run on one xdist worker, which builds it once; split over two workers,
# each built its own (the demo pair: 110 s and 87 s in one run on 2 cores). A group is xdist's
# `--dist loadgroup` (set in pyproject.toml), whose scheduler keeps the tests whose node ids end in
# the same "@group" together; xdist 3.8 appends that to the ids of the tests marked xdist_group, but
# through an attribute pytest 9.2 no longer reads the id from, so the id is set here (pinned pytest).
BUILT_ONCE_PER_WORKER = ("demo_pair", "batchtopk_run", "uninterrupted", "two_nodes")


@pytest.hookimpl(trylast=True)  # after -k and -m deselect: the groups' ids are what the workers report
def pytest_collection_modifyitems(config, items) -> None:
    if not config.getoption("loadgroup", False):  # set in the workers of `--dist loadgroup` alone
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        groups = [name for name in BUILT_ONCE_PER_WORKER if name in item.fixturenames]
        if groups:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")


def small_synthetic(**overrides) -> SyntheticConfig:
    cfg = SyntheticConfig(widths=[16, 24], features=64, tokens=8192, seq_len=64, samples_per_shard=16,
                          active_per_token=3.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """A small planted dataset: 2 sources of widths 16 and 24, 8 shards of 16 samples × 64 tokens."""
    root = tmp_path_factory.mktemp("small") / "shards"
    write_synthetic(small_synthetic(), str(root), progress=False)
    return str(root)


def small_run_config(**train) -> RunConfig:
    cfg = RunConfig(name="test")
    cfg.train.latents = 96
    cfg.train.k = 4
    cfg.train.batch_size = 256
    cfg.train.steps = 30
    cfg.train.lr = 3e-3
    cfg.train.lr_warmup_steps = 5
    cfg.train.dead_tokens = 2000
    cfg.train.shuffle_samples = 8
    cfg.train.checkpoint_every = 10
    cfg.train.log_every = 5
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def put_in_hub_cache(cache, repo_id: str, revision: str, folder, repo_type: str = "model") -> str:
    """``folder``'s files (sub-folders kept) as huggingface_hub caches a downloaded revision:
    content-addressed blobs, a snapshot of symlinks per commit, and ``refs/<revision>`` naming the
    commit, which is returned."""
    import hashlib

    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_consecutive_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that are all free on 127.0.0.1 now (bound together,
    then released): a port after a free one may be another process's (a CI run failed so)."""
    for _ in range(200):
        base, sockets = free_port(), []
        try:
            for port in range(base, base + count):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1 in 200 tries")


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def said(capsys, text: str, timeout: float = 30.0) -> str:
    """What is printed to stderr until ``text`` is (a thread's message comes later on a busy machine)."""
    err, deadline = "", time.monotonic() + timeout
    while text not in err and time.monotonic() < deadline:
        time.sleep(0.2)
        err += capsys.readouterr().err
    return err


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto) on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server: (endpoint, bucket name)."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    return s3_server, name


def shards_with_an_inf(path, bad_shard: int):
    """4 shards of 8 samples × 64 tokens, sources base (16) and chat (24), every value finite but an
    inf in the chat columns of each sample of ``bad_shard``; returns the Root."""
    import numpy as np

    from crosscoder.shards import Manifest, ShardWriter, SourceInfo, shard_name, write_manifest
    from crosscoder.storage import Root

    root, rng, infos = Root(str(path)), np.random.default_rng(0), []
    for n in range(4):
        writer = ShardWriter(root, shard_name(n), width=40, dtype="float16")
        for i in range(8):
            acts = rng.standard_normal((64, 40)).astype(np.float16)
            if n == bad_shard:
                acts[5, 30] = np.inf  # the chat source's columns: 16..39
            writer.add(f"{n:04d}-{i:04d}", np.arange(64, dtype=np.int32), acts)
        infos.append(writer.commit())
    write_manifest(root, Manifest(sources=[SourceInfo("base", 16), SourceInfo("chat", 24)], seq_len=64,
                                  norm_scale=[1.0, 1.0], shards=infos))
    return root


def _shut_down_a_commands_ray() -> None:
    """A command run in this process by an earlier test (crosscoder run) leaves its local Ray up, and
    RAY_ADDRESS naming it (ray_connect.connect): stop it, so a session fixture starts its own
    whatever order the test files run in."""
    import ray

    from crosscoder import ray_connect

    if ray.is_initialized():
        ray.shutdown()
    if ray_connect._started is not None and os.environ.get("RAY_ADDRESS") == ray_connect._started:
        del os.environ["RAY_ADDRESS"]


BIN = Path(sys.executable).parent  # the installed commands: ray, crosscoder


def ray_cli(*args, env, timeout=120, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"ray {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def stop_cluster(temp_dir: Path, timeout: float = 3.0) -> None:
    """Stop the processes of the cluster whose session lives under ``temp_dir``, and no other: a
    SIGTERM, then a SIGKILL to those alive ``timeout`` s later (the raylet, the GCS, the autoscaler
    monitor and the runtime-env agent of a `ray start` catch SIGTERM and were still alive 10 s later,
    so a 30-s wait cost each test cluster 30 s).

    (`ray stop` would also kill the session's local Ray of the other tests, and a driver whose
    cluster vanished exits its process, here pytest itself.)"""
    import psutil

    def ours():
        # gcs_server, raylet, the monitors name the session dir; workers and agents are their children
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(temp_dir) in arg for arg in (p.info["cmdline"] or [])):
                    for q in [p, *p.children(recursive=True)]:
                        found[q.pid] = q
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    procs = ours()
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive + ours():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance for the whole session (started once: it takes seconds). 4 logical CPUs on
    this 2-core machine: Ray Train asks one per worker, and the resharding test runs 4 workers."""
    import ray

    from crosscoder.ray_connect import use_local_ray_env

    _shut_down_a_commands_ray()
    use_local_ray_env()  # Ray Train as on the local Ray a command starts
    _start_own_ray(num_cpus=4)
    yield
    ray.shutdown()


def _start_own_ray(include_dashboard: bool | None = True, **init_kwargs) -> None:
    """A local Ray reached by its own address and with its own dashboard, as a command's local Ray
    (ray_connect.connect). Ray Train's placement-group cleaner asks the dashboard at RAY_ADDRESS
    whether the controller lives: without RAY_ADDRESS in Ray's processes it finds several instances
    on the host (a command's, a parallel test worker's), and without a dashboard of its own it asks
    127.0.0.1:8265, which a command's Ray may hold, whose answer (no such actor) made it remove a
    live run's placement group, ending its workers. RAY_ADDRESS is then taken out of this process's
    environment, so that the commands the tests start start their own Ray. ``include_dashboard=None``:
    the dashboard only where Ray has its packages (the GPU suite)."""
    import ray

    from crosscoder.ray_connect import start_local_ray

    try:
        start_local_ray(ray, include_dashboard=include_dashboard, dashboard_host="127.0.0.1", dashboard_port=free_port(),
                        log_to_driver=False, configure_logging=False, **init_kwargs)
    finally:
        os.environ.pop("RAY_ADDRESS", None)


def train_workers_started() -> int:
    """How many Ray Train workers the session's Ray has started so far, live or ended: a fit Ray Train
    retried starts its workers again, one more group per retry. Counted by Ray's state API (the
    session's Ray has its dashboard), so a test checks "not retried" without timing the fit. Asked at
    the address this process is connected to: a parallel test worker's Ray runs beside it."""
    import ray
    from ray.util.state import list_actors

    return len(list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000,
                           filters=[("class_name", "=", "RayTrainWorker")], raise_on_missing_output=False))


DEMO_STEPS = 400  # the demo pair's training steps in tests (as in the embedded default)


@pytest.fixture(scope="session")
def demo_pair(tmp_path_factory):
    """The trained demo base/chat pair (demo_pair.py), made once per session: (dir, base, chat)."""
    from crosscoder.demo_pair import make_demo_pair

    where = tmp_path_factory.mktemp("demo")
    base, chat = make_demo_pair(where, steps=DEMO_STEPS, progress=False)
    return where, base, chat


@pytest.fixture(scope="session")
def ray_cluster_gpu():
    """A local Ray instance with this machine's GPUs (the GPU suite)."""
    import ray
    import torch

    _shut_down_a_commands_ray()
    # the dashboard where Ray has its packages: the GPU check's wheelhouse leaves ray[default] out
    # (scripts/gpu-wheels.sh), and Ray refuses include_dashboard=True without them
    _start_own_ray(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=None)
    yield
    ray.shutdown()


class WaitingForGpus(Exception):
    """Raised by :func:`stop_at_the_gpu_note` where Ray would start waiting for GPUs."""


def stop_at_the_gpu_note(monkeypatch, module) -> None:
    """``module``'s driver says its GPU request waits (ray_connect.note_gpu_wait), then stops there
    instead of waiting: for tests on a cluster without GPUs."""
    original = module.note_gpu_wait

    def say_then_stop(*args):
        original(*args)
        raise WaitingForGpus

    monkeypatch.setattr(module, "note_gpu_wait", say_then_stop)
