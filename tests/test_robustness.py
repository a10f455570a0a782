"""Robust on busy shared machines and at real data sizes, through the real components: a worker killed
by Ray's memory monitor, two commands on one host, bad shards found before work, resumes that
download nothing, bounded manifest writes, group-readable files, the installed package on workers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from crosscoder.shards import ShardError, read_manifest, shard_name
from crosscoder.storage import Root

from .conftest import small_run_config, train_workers_started
from .test_harvest import HOOKS, harvest_config, start_flaky_proxy

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from crosscoder.random_pair import make_pair, write_documents

    d = tmp_path_factory.mktemp("tiny")
    base, chat = make_pair(d / "models", hidden=32, layers=3)
    docs = write_documents(d / "docs.jsonl", n_docs=40)
    return {"base": base, "chat": chat, "docs": docs, "dir": d}


def harvest_toml(tiny, output: Path | str, **harvest) -> str:
    keys = {"hooks": ["model.layers.1"], "data": tiny["docs"], "output": str(output), "actors": 1, "tokens": 400,
            "seq_len": 16, "samples_per_shard": 6, "batch_size": 4} | harvest
    lines = ["name = \"robust\"", "[harvest]",
             f'models = [{{name = "base", path = "{tiny["base"]}"}}, {{name = "chat", path = "{tiny["chat"]}"}}]']
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    return subprocess.run([sys.executable, "-m", "crosscoder.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def test_an_actor_killed_by_rays_memory_monitor_is_retried_and_the_harvest_completes(tiny, tmp_path):
    """Ray's memory monitor kills a worker that pushes the node past its threshold; the driver then
    gets ray.exceptions.OutOfMemoryError, a RayError that is neither an actor nor a task error.
    The threshold is set above what the machine uses now by half of what is available (3 to 12 GiB),
    and the actor writing shard 1 takes memory until it is killed (crosscoder/faults.py, up to
    16 GiB). The monitor counts every process on the node: with a margin of 3 GiB, another process
    taking 4 GiB meanwhile (another test worker, say) had the actor writing shard 0 killed 4 times
    and the harvest stopped."""
    memory = psutil.virtual_memory()
    margin = min(max(3 * 2**30, memory.available // 2), 12 * 2**30)
    threshold = (memory.total - memory.available + margin) / memory.total
    config = tmp_path / "harvest.toml"
    config.write_text(harvest_toml(tiny, tmp_path / "acts"))
    env = {"RAY_memory_usage_threshold": f"{threshold:.4f}", "RAY_memory_monitor_refresh_ms": "100",
           "CROSSCODER_FAULT": "harvest: shard 1 half", "CROSSCODER_FAULT_MARKER": str(tmp_path / "hog"),
           "CROSSCODER_FAULT_KIND": "memory"}
    proc = cli(["harvest", "--config", str(config), "--run", str(tmp_path / "run"), "--quiet"], tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "hog").exists()
    assert "shard-000001.tar will be redone (OutOfMemoryError" in proc.stdout + proc.stderr
    manifest = read_manifest(Root(str(tmp_path / "acts")))
    assert manifest.extra["harvest"]["complete"] and len(manifest.shards) == manifest.extra["harvest"]["planned_shards"]


def test_a_sigterm_stops_a_harvest_keeping_its_shards_and_saying_how_it_resumes(tiny, tmp_path):
    """SIGTERM is how a machine stops a process (docker stop, a deleted Kubernetes pod, Slurm's time
    limit). ray.init() makes a driver exit at once on it, after a C stack dump and no word of what
    was kept; it is taken as a Ctrl-C instead: the committed shards kept, one line on how to resume,
    and the re-run writes only the rest."""
    import signal

    out = tmp_path / "acts"
    config = tmp_path / "harvest.toml"
    config.write_text(harvest_toml(tiny, out, tokens=1600, samples_per_shard=2))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = subprocess.Popen([sys.executable, "-m", "crosscoder.cli", "harvest", "--config", str(config), "--quiet"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        # one actor is given shard n + 1 once the driver has shard n: with two files, shard 0 is the driver's
        while len(list(out.glob("shard-*.tar"))) < 2:
            assert command.poll() is None and time.time() < deadline, "the harvest ended before two shards were written"
            time.sleep(0.1)
        command.send_signal(signal.SIGTERM)
        _, stderr = command.communicate(timeout=120)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 130, stderr[-3000:]
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert ("crosscoder: interrupted; re-run the same command to resume from the shards already committed"
            in stderr.splitlines()), stderr[-3000:]
    # the shards the driver had are in the manifest written at the stop; one in flight is redone
    kept = {info.name: (out / info.name).stat().st_mtime_ns for info in read_manifest(Root(str(out))).shards}
    again = cli(["harvest", "--config", str(config)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    # its progress: the harvest's bar, without the actors' transformers bars cutting into it
    assert "harvest: 100%" in again.stderr and "Loading weights" not in again.stdout + again.stderr
    manifest = read_manifest(Root(str(out)))
    planned = manifest.extra["harvest"]["planned_shards"]
    assert manifest.extra["harvest"]["complete"] and len(manifest.shards) == planned and 0 < len(kept) < planned
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not written again


def test_two_commands_at_once_on_one_host_each_use_their_own_ray(tmp_path):
    """Each command starts a local Ray reached by its own address; with two on one host, Ray
    Train's placement-group cleaner otherwise fails with "Found multiple active Ray instances"."""
    args = ["run", "--config", str(REPO / "launch" / "configs" / "synthetic.toml"), "--quiet",
            "--synthetic.tokens", "4096", "--synthetic.seq_len", "64", "--synthetic.samples_per_shard", "16",
            "--train.latents", "64", "--train.batch_size", "256", "--train.steps", "4", "--train.workers", "2",
            "--analyze.tokens", "512"]
    procs = [subprocess.Popen([sys.executable, "-m", "crosscoder.cli", *args, "--run", str(tmp_path / name)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}) for name in "ab"]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
        assert "Found multiple active Ray instances" not in out
        assert "step 4:" in out


def test_a_local_ray_that_fails_to_start_leaves_no_address_behind():
    """A failed start leaves RAY_ADDRESS unset, so a later connect() in the process starts a local
    Ray again instead of joining the address of one that never came up (in a fresh process: this
    one has the session's Ray)."""
    code = ("import os, ray\nfrom crosscoder.ray_connect import start_local_ray\n"
            "try:\n    start_local_ray(ray, num_cpus=-1)\nexcept ValueError as error:\n    print('refused:', error)\n"
            "print('left:', os.environ.get('RAY_ADDRESS'), os.environ.get('RAY_GCS_SERVER_PORT'), ray.is_initialized())")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "refused: Resource quantities must be nonnegative" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "left: None None False" in out.stdout, out.stdout


def hold_the_raylet(proc: subprocess.Popen, seconds: float, held: list[float], kill: bool = False) -> None:
    """Stop the raylet of ``proc``'s local Ray as soon as it exists, as a starved process on a busy
    machine stands still, and let it go on after ``seconds`` (or when ``proc`` has ended); appends
    the time it was stopped to ``held``. ``kill``: SIGKILL it instead, as a raylet that dies."""
    import signal

    raylet = None
    while proc.poll() is None and raylet is None:
        with contextlib.suppress(psutil.Error):
            raylet = next((child for child in psutil.Process(proc.pid).children(recursive=True)
                           if child.name() == "raylet"), None)
            if raylet is not None:
                raylet.send_signal(signal.SIGKILL if kill else signal.SIGSTOP)
                held.append(time.monotonic())
        time.sleep(0.005)
    while held and proc.poll() is None and time.monotonic() - held[0] < seconds:
        time.sleep(0.1)
    if raylet is not None:
        with contextlib.suppress(psutil.Error):
            raylet.send_signal(signal.SIGCONT)


def test_a_local_ray_whose_raylet_is_slow_to_register_is_waited_for_or_refused_in_one_line(small_shards, tmp_path):
    """Ray's start gives up on a raylet that has not registered with its GCS after 30 s, with a
    traceback ("The current node timed out during startup"); on a busy 2-core machine a command's
    raylet took longer. Here the raylet stands still for 40 s: the start waits for it. With the
    wait cut to 1 s (so Ray's own 30 s decide), the command stops with one line naming the machine's
    load, and ends the processes the start began. A raylet that dies is not waited for past Ray's 30 s,
    and is said in one line too."""
    import threading

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    waits = ("import ray\nfrom crosscoder.ray_connect import connect\nray = connect(1)\n"
             "print('alive nodes:', sum(node['Alive'] for node in ray.nodes()), flush=True)\nray.shutdown()\n")
    gives_up = ("import os, sys, psutil\nfrom crosscoder import ray_connect\nfrom crosscoder.cli import main\n"
                "ray_connect.RAYLET_REGISTER_WAIT_S = 1.0\ncode = main(sys.argv[1:])\n"
                "running = [p.name() for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]\n"
                "print('left running:', len(running), os.environ.get('RAY_ADDRESS'), running)\n"
                "sys.exit(code)\n")
    train = ["train", "--data", small_shards, "--train.workers", "2", "--train.latents", "64", "--train.steps", "2",
             "--quiet"]
    procs = {"waits": subprocess.Popen([sys.executable, "-c", waits], env=env, cwd=tmp_path, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             "gives up": subprocess.Popen([sys.executable, "-c", gives_up, *train, "--run", "run"], env=env, cwd=tmp_path, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             "dies": subprocess.Popen([sys.executable, "-c", gives_up.replace("= 1.0", "= 180.0"), *train,
                                       "--run", "dies"],
                                      env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)}
    held: dict[str, list[float]] = {name: [] for name in procs}
    holders = [threading.Thread(target=hold_the_raylet, args=(proc, 40, held[name], name == "dies"), daemon=True)
               for name, proc in procs.items()]
    for holder in holders:
        holder.start()
    outs, ended = {}, {}
    for name, proc in reversed(procs.items()):  # the one that ends first, first
        outs[name] = proc.communicate(timeout=300)
        ended[name] = time.monotonic()
    for holder in holders:
        holder.join(timeout=60)
    assert all(held.values()), ("a raylet was never seen", held)
    out, err = outs["dies"]
    assert procs["dies"].returncode == 1 and ended["dies"] - held["dies"][0] < 90, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("crosscoder: ")]
    assert len(said) == 1 and "Traceback" not in err, err[-3000:]
    assert said[0].startswith("crosscoder: RayStartError: the local Ray did not start: its raylet ended while "
                              "starting (Ray's logs: ") and said[0].endswith("raylet.out and raylet.err)"), said
    assert "left running: 0 None []" in out, out
    out, err = outs["waits"]
    assert procs["waits"].returncode == 0, err[-3000:]
    assert "alive nodes: 1" in out
    assert ended["waits"] - held["waits"][0] > 35  # it stood still past Ray's own 30 s, and the start waited
    out, err = outs["gives up"]
    assert procs["gives up"].returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("crosscoder: ")]
    assert len(said) == 1 and said[0].startswith(
        "crosscoder: RayStartError: the local Ray did not start: its raylet had not registered with its GCS"), err
    assert " cores: this machine is busy); re-run when it is less busy" in said[0]
    assert "left running: 0 None []" in out, out  # the GCS, raylet and the rest it had started are ended
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_process_is_deaf_to_sigterm_only_when_every_thread_blocks_it():
    """Ray's shutdown waits 1 s for each process that got its SIGTERM; one that blocks it in every
    thread never acts on it, so that wait is skipped (ray_connect._no_grace_for_the_deaf)."""
    from crosscoder.ray_connect import _deaf_to_sigterm

    block = "import signal, sys, threading, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
    unblock_in_a_thread = ("def listen():\n    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})\n"
                           "    time.sleep(60)\nthreading.Thread(target=listen, daemon=True).start()\n")
    in_a_thread = "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    cases = {"blocked in both threads": (block + in_a_thread, True),
             "unblocked by one thread": (block + unblock_in_a_thread, False),
             "not blocked": ("import sys, threading, time\n" + in_a_thread, False)}
    for name, (code, deaf) in cases.items():
        proc = subprocess.Popen([sys.executable, "-c", code + "print('ready', flush=True)\ntime.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready", name
            assert _deaf_to_sigterm(proc.pid) is deaf, name
        finally:
            proc.kill()
            proc.wait()
    assert _deaf_to_sigterm(proc.pid) is False  # gone: the shutdown keeps Ray's own handling


def test_a_commands_local_ray_ends_every_process_at_its_shutdown(tmp_path):
    """The local Ray a command starts blocks SIGTERM in its processes, and its shutdown SIGKILLs those
    at once instead of after Ray's 1-s grace each: its raylet, GCS and workers still all end."""
    code = ("import os, ray\nfrom crosscoder import ray_connect\nfrom crosscoder.ray_connect import _deaf_to_sigterm\n"
            "ray_connect.connect(2)\n"
            "@ray.remote\nclass Worker:\n    def pid(self):\n        return os.getpid()\n"
            "worker = Worker.remote()\nprint('worker', ray.get(worker.pid.remote()), False, flush=True)\n"
            "for kind, infos in ray._private.worker._global_node.all_processes.items():\n"
            "    for info in infos:\n        print(kind, info.process.pid, _deaf_to_sigterm(info.process.pid), flush=True)\n"
            "ray.shutdown()\nprint('shut down', flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0 and "shut down" in out.stdout, out.stdout + out.stderr[-3000:]
    started = {line.split()[0]: (int(line.split()[1]), line.split()[2] == "True")
               for line in out.stdout.splitlines() if len(line.split()) == 3}
    assert started["raylet"][1] and started["gcs_server"][1], started  # both get no grace
    assert not started["dashboard"][1], started  # it unblocks SIGTERM and keeps its grace
    processes = []
    for pid, _ in started.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            processes.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(processes, timeout=30)
    running = []
    for process in alive:  # a zombie has ended: init reaps it
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.status() != psutil.STATUS_ZOMBIE:
                running.append((process.pid, process.name()))
    assert not running, running


def test_a_truncated_shard_is_refused_before_the_first_step(small_shards, tmp_path, ray_cluster):
    from crosscoder.ray_train import train_distributed
    from crosscoder.trainer import train

    data = tmp_path / "shards"
    shutil.copytree(small_shards, data)
    target = data / shard_name(3)
    target.write_bytes(target.read_bytes()[:-1000])
    message = rf"{data}: 1 of 8 shards are missing or truncated: {shard_name(3)} \(\d+ bytes, manifest says \d+\)"
    with pytest.raises(ShardError, match=message):
        train(small_run_config(steps=4), tmp_path / "one", data=str(data), progress=False)
    assert not (tmp_path / "one" / "checkpoints").exists()
    with pytest.raises(ShardError, match=message):
        train_distributed(small_run_config(steps=4, workers=2), tmp_path / "two", str(data), progress=False)
    assert not (tmp_path / "two" / "ray").exists()  # Ray Train never started
    from crosscoder.cli import main

    assert main(["validate", str(data)]) == 1


def test_a_corrupt_shard_met_in_training_stops_every_rank_at_once_without_retries(small_shards, tmp_path,
                                                                                 ray_cluster, capsys):
    from crosscoder.cli import main
    from crosscoder.ray_train import train_distributed

    data = tmp_path / "shards"
    shutil.copytree(small_shards, data)
    for n in range(8):  # every shard: whichever a rank reads first is bad
        blob = bytearray((data / shard_name(n)).read_bytes())
        blob[len(blob) // 2] ^= 0xFF  # same size, other bytes
        (data / shard_name(n)).write_bytes(bytes(blob))
    before = train_workers_started()
    with pytest.raises(ShardError, match=r"shard-00000\d\.tar: sha256 .* does not match"):
        train_distributed(small_run_config(steps=4, workers=2, max_failures=2), tmp_path / "run", str(data),
                          progress=False)
    assert train_workers_started() - before == 2  # one group: stopped at once, not retried twice by Ray Train
    assert main(["validate", str(data), "--full", "--quiet"]) == 1
    assert "does not match the manifest" in capsys.readouterr().err


def test_a_resume_on_s3_downloads_no_committed_shard_and_the_manifest_is_written_a_bounded_number_of_times(
        ray_cluster, tiny, s3_bucket, monkeypatch):
    import crosscoder.harvest as harvest_module

    endpoint, bucket = s3_bucket
    writes = []
    original = harvest_module.write_manifest
    monkeypatch.setattr(harvest_module, "write_manifest", lambda root, m: writes.append(len(m.shards)) or original(root, m))
    cfg = harvest_config(tiny, f"s3://{bucket}/resume", tokens=600, samples_per_shard=3)
    cfg.storage.endpoint_url = endpoint
    first = harvest_module.harvest(cfg, progress=False)
    assert len(first.shards) >= 8 and writes == [len(first.shards)]  # once, at the end (the run took < 60 s)
    assert all(info.etag for info in first.shards)
    server, state = start_flaky_proxy(endpoint, failures=0)
    try:
        cfg.storage.endpoint_url = f"http://127.0.0.1:{server.server_address[1]}"
        again = harvest_module.harvest(cfg, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    shard_reads = [path for method, path in state["log"] if method == "GET" and ".tar" in path]
    assert shard_reads == [] and [s.name for s in again.shards] == [s.name for s in first.shards]
    # a shard changed behind the harvest's back (another tag): read, checked and redone
    root = Root(f"s3://{bucket}/resume", endpoint_url=endpoint)
    root.write_bytes(shard_name(2), b"not a shard")
    cfg.storage.endpoint_url = endpoint
    redone = harvest_module.harvest(cfg, progress=False)
    assert hashlib.sha256(root.read_bytes(shard_name(2))).hexdigest() == redone.shards[2].sha256


def test_shards_and_the_manifest_are_readable_by_the_group(tmp_path):
    """Files are committed with the mode a plain write gets under the process's umask (0644 under the
    usual 022), not the 0600 of a temporary file, so others on a shared volume can read them."""
    from crosscoder.config import SyntheticConfig
    from crosscoder.storage import FILE_MODE
    from crosscoder.synthetic import write_synthetic

    umask = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("Umask:")), 8)
    write_synthetic(SyntheticConfig(widths=[8, 8], features=16, tokens=512, seq_len=32, samples_per_shard=8),
                    str(tmp_path / "shards"), progress=False)
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert "manifest.json" in names and shard_name(0) in names
    for name in names:
        mode = stat.S_IMODE((tmp_path / "shards" / name).stat().st_mode)
        assert mode == FILE_MODE == 0o666 & ~umask, (name, oct(mode))
        assert umask & 0o040 or mode & 0o040, (name, oct(mode))  # the group reads it unless the umask says no


IMPOSTOR = 'raise ImportError("the crosscoder package of the working directory was imported")\n'


def test_ray_workers_import_the_installed_package_and_refuse_other_code(tiny, tmp_path, ray_cluster):
    """Run from a directory holding another crosscoder checkout, the actors still import the
    installed package (a local Ray started by the command gives its workers an empty working
    directory); an actor whose code differs from the driver's refuses to work, saying so."""
    (tmp_path / "crosscoder").mkdir()
    (tmp_path / "crosscoder" / "__init__.py").write_text(IMPOSTOR)
    config = tmp_path / "harvest.toml"
    config.write_text(harvest_toml(tiny, tmp_path / "acts"))
    proc = subprocess.run([str(Path(sys.executable).parent / "crosscoder"), "harvest", "--config", str(config),
                           "--run", str(tmp_path / "run"), "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "working directory was imported" not in proc.stdout + proc.stderr
    import crosscoder.harvest as harvest_module
    from crosscoder.harvest import HarvestError

    cfg = harvest_config(tiny, str(tmp_path / "mismatch"), tokens=100)
    cfg.harvest.hooks = list(HOOKS[:1])
    original = harvest_module.code_fingerprint
    harvest_module.code_fingerprint = lambda: "0123456789abcdef"  # the driver's code, as another install has it
    try:
        with pytest.raises(HarvestError, match=r"could not start \(CodeMismatch: harvest actor \d on .* runs crosscoder "
                                                r"from .* not the driver's \(code 0123456789abcdef\)"):
            harvest_module.harvest(cfg, progress=False)
    finally:
        harvest_module.code_fingerprint = original


def test_an_object_store_restarted_empty_mid_harvest_stops_with_one_line(tiny, tmp_path):
    """moto killed and restarted empty on its port while a `crosscoder harvest` writes to it (the
    bucket and every committed shard gone, as after a store without persistence restarts): the
    command stops with one `crosscoder:` line naming the store, not a traceback."""
    import boto3

    from .conftest import free_port, wait_for_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"

    def start_store() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, proc=proc)
        return proc

    store = start_store()
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="runs")
    (tmp_path / "h.toml").write_text(
        harvest_toml(tiny, "s3://runs/acts", tokens=4000, samples_per_shard=2)
        + f'[storage]\nendpoint_url = "{endpoint}"\n')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = subprocess.Popen([sys.executable, "-m", "crosscoder.cli", "harvest", "--config", str(tmp_path / "h.toml"),
                                "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.time() + 300
        while not client.list_objects_v2(Bucket="runs", Prefix="acts/shard-").get("KeyCount", 0):
            assert command.poll() is None and time.time() < deadline, "the harvest ended before a shard was committed"
            time.sleep(0.2)
        store.kill()
        store.wait()
        store = start_store()  # empty: no bucket
        _, stderr = command.communicate(timeout=300)
    finally:
        if command.poll() is None:
            command.kill()
        store.kill()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert command.returncode not in (0, None), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("crosscoder: ") and "s3://runs/acts" in lines[-1], lines[-3:]
    # the bucket gone (or, had the restart outlasted the store's retries, the store unreachable): no
    # shard retried, as no retry mends either
    assert ("bucket 'runs' does not exist any more" in lines[-1] or "attempts" in lines[-1]) \
        and "failed 4 times" not in lines[-1], lines[-1]


def test_a_dropped_connection_s_orphaned_request_task_prints_no_traceback(caplog):
    """When the store drops a connection, aiohttp's request-body task fails beside the request, and
    nobody awaits it: asyncio printed "Task exception was never retrieved" with a traceback (seen from
    a harvest actor in the test above) next to the one-line StorageError. On fsspec's loop, such an
    orphaned connection error is dropped; any other unretrieved error is still reported."""
    import asyncio
    import gc
    import logging

    from fsspec.asyn import sync

    root = Root("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9")  # nothing is sent

    async def orphan(error: Exception) -> None:
        async def fail() -> None:
            raise error
        task = asyncio.ensure_future(fail())
        while not task.done():
            await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        sync(root.fs.loop, orphan, ConnectionResetError("Cannot write to closing transport"))
        gc.collect()
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text
        sync(root.fs.loop, orphan, ValueError("a bug, not a dropped connection"))
        gc.collect()
    reported = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert len(reported) == 1 and "ValueError" in caplog.text, caplog.text


def files_of_at_most(size: int):
    """A preexec_fn: the child's writes past ``size`` bytes fail (EFBIG), as a full disk fails them."""
    def limit() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error to handle, not a signal that kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_checkpoint_the_disk_refuses_is_one_line_and_the_last_one_is_kept(small_shards, tmp_path):
    """A write that fails mid-checkpoint (here the file-size limit, as a full disk or a quota fails it)
    stops training with one line naming the checkpoint and the one kept; nothing half-written stays,
    and a re-run with room resumes from the kept checkpoint, each step logged once."""
    import json

    run = tmp_path / "run"
    args = [sys.executable, "-m", "crosscoder.cli", "train", "--run", str(run), "--data", small_shards, "--quiet",
            "--train.latents", "96", "--train.k", "4", "--train.batch_size", "256", "--train.log_every", "1",
            "--train.checkpoint_every", "10"]

    limited = files_of_at_most(64 << 10)  # the first checkpoint's state.pt is ~100 KiB

    first = subprocess.run([*args, "--train.steps", "10"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (run / "checkpoints" / "step-10" / "state.pt").stat().st_size > 64 << 10
    full = subprocess.run([*args, "--train.steps", "30"], capture_output=True, text=True, timeout=300,
                          preexec_fn=limited)
    assert full.returncode == 1, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crosscoder: CheckpointError: {run / 'checkpoints' / 'step-20'}: the checkpoint could "
                           "not be written (") and "step-10 is kept" in last, full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10"]  # no half-written one
    again = subprocess.run([*args, "--train.steps", "30"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))


def test_a_shard_the_disk_refuses_is_one_line_and_leaves_no_temporary_file(tmp_path):
    limited = files_of_at_most(1 << 20)  # planted.npz (0.5 MiB) fits, a shard not

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = subprocess.run([sys.executable, "-m", "crosscoder.cli", "synthetic", "--run", str(tmp_path / "run"),
                          "--quiet", "--synthetic.tokens", "100000"], capture_output=True, text=True, timeout=300,
                         preexec_fn=limited, env=os.environ | {"TMPDIR": str(tmp)})
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crosscoder: cannot write {tmp}/shard-000000.tar.") and "File too large" in last, last
    assert "Traceback" not in out.stderr
    assert not list(tmp.iterdir())  # the writer removed its temporary shard


DISK_RANK = """
import os, resource, signal, sys
os.environ["DS_ACCELERATOR"] = "cpu"
sys.path.insert(0, {root!r})
import torch.distributed as dist
from tests.conftest import small_run_config
from crosscoder.deepspeed_backend import DeepSpeedBackend
from crosscoder.trainer import train
rank, steps, limited = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if limited and rank == 1:  # this rank's part of a checkpoint (~90 KiB) no longer fits, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
cfg = small_run_config(steps=steps, checkpoint_every=1, sparse_kernels="off", workers=2, latent_parallel=2,
                       zero_stage={stage}, device="cpu")
train(cfg, {run!r}, data={data!r}, progress=False, backend=DeepSpeedBackend(cfg))
"""


@pytest.mark.parametrize("stage", [1, 3])
def test_a_distributed_checkpoint_one_rank_cannot_write_keeps_the_last_one_for_the_resume(small_shards, tmp_path,
                                                                                        stage):
    """Rank 1's file of the step-3 checkpoint fails (the file-size limit, as a full disk). ZeRO ≤ 2:
    both ranks stop with one CheckpointError naming the checkpoint kept, instead of one rank raising
    while the other waits in the next collective. ZeRO-3: DeepSpeed wrote its `latest` (naming the
    broken step-3) whatever the other ranks' files; ours names step-2. Either way the half-written
    folder is removed and a re-run with room resumes from step 2."""
    from .conftest import free_port

    run = tmp_path / "run"

    def ranks(steps: int, limited: bool) -> list[tuple[int, str]]:
        code = DISK_RANK.format(root=str(REPO), port=free_port(), run=str(run), data=small_shards, stage=stage)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(steps), "1" if limited else "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": "2"})
                 for rank in (0, 1)]
        outs = []
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            outs.append((proc.returncode, err))
        return outs

    assert [code for code, _ in ranks(2, limited=False)] == [0, 0]  # step-1 and step-2; builds cached
    for code, err in ranks(4, limited=True):
        assert code != 0
        last = err.strip().splitlines()[-1]
        assert f"{run / 'checkpoints' / 'step-3'}: the checkpoint could not be written (" in last, err[-3000:]
        assert "step-2 is kept" in last, err[-3000:]
        if stage == 1:  # every rank learns the cause from DCP
            assert "CheckpointError" in last and "(rank 1: OSError: [Errno 27] File too large;" in last
    assert (run / "checkpoints" / "latest").read_text() == "step-2"
    assert not (run / "checkpoints" / "step-3").exists()
    assert [code for code, _ in ranks(4, limited=False)] == [0, 0]
    assert (run / "checkpoints" / "latest").read_text() == "step-4"
