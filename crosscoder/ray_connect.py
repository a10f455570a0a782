"""One way to reach Ray for every command: the cluster at ``RAY_ADDRESS``, or a local one of our own.

The harvest, the trainer and the analysis all start Ray when it is not running, and a ``crosscoder
run`` starts it in one and re-uses it in the others, so they must start the same thing. A local
Ray started here:

- is reached by its own address: its GCS port is chosen first and ``RAY_ADDRESS`` names it in this
  process and in every Ray process it starts, so two commands on one host (or two users) each talk
  to their own Ray; without it, Ray Train's placement-group cleaner finds several instances and
  fails with "Found multiple active Ray instances" on every distributed run;
- runs the installed package: its workers get an empty working directory, so Ray does not put the
  driver's working directory first on their ``sys.path`` (run from another checkout, the workers
  would import that checkout's ``crosscoder``; the directory is removed when the process exits);
  :func:`code_fingerprint` is compared on each worker besides (a cluster whose image differs from
  the driver's code is refused with a message);
- has its dashboard on 127.0.0.1 only: Ray Train's controller monitor reads actor states through
  the dashboard's state API and, without it, logs "Failed to query Ray Train Controller actor
  state" every few seconds. The cost is the dashboard's process, ~100 MiB and a second or two;
- takes a SIGTERM or SIGHUP to the driver as a Ctrl-C again (interrupts.stop_signals_as_ctrl_c, as the CLI set
  it): ray.init() makes the driver exit at once on it, after a C stack dump, saying nothing of
  what was kept;
- starts its processes with SIGTERM and SIGHUP blocked, as Ray blocks SIGINT in them (they inherit
  the mask, and so do the workers the raylet starts): a SIGTERM sent to every process of the command
  (``timeout``, ``kill -- -PGID``, systemd or a batch scheduler signalling a whole job), or the
  SIGHUP a shell sends its jobs when its terminal closes, then
  reaches the driver alone, which stops the workers at a step boundary with a checkpoint; before,
  the raylet and GCS died with it, the workers with them, and the driver waited 60 s for the GCS
  before failing. The dashboard's module processes, which multiprocessing starts afresh, still
  end (Ray Train's cleaner then logs that the state API is unavailable while the stop finishes).
  Ray's shutdown sends each of its processes SIGTERM and SIGKILLs it after a 1-s grace: four of
  them (raylet, GCS, the two monitors) cannot hear that SIGTERM, so :func:`_no_grace_for_the_deaf`
  SIGKILLs those at once (read from ``/proc``; the dashboard, which unblocks it, still gets its
  grace). The end is the same; ``ray.shutdown()`` took 4.3 s with Ray's kill and takes 0.4 s
  (``tests/bench/bench_ray_overheads.py``);
- runs Ray Train without its preemption watcher (:data:`LOCAL_RAY_ENV`): the watcher is an actor
  started with every worker group to hear of nodes a cluster drains (spot instances) and to keep
  such deaths out of ``train.max_failures``; a Ray of one machine that this command started and
  stops is never drained, and the actor's start cost about 3 s of a 2-worker start of 17-20 s on
  2 cores (measured side by side), besides an error line Ray's core worker logs for it on every
  run. A cluster (``RAY_ADDRESS``, ``ray job submit``, KubeRay) keeps it;
- polls Ray Train's workers every 0.25 s instead of 2 s (:data:`LOCAL_RAY_ENV`): the controller
  learns that the workers finished (or stopped at a Ctrl-C) only at its next poll, so every fit
  ended 0–2 s late; measured, the time from the last worker's end to ``fit()`` returning fell from
  2.0 s to 0.7 s on average (``tests/bench/bench_ray_overheads.py``; the rest is Ray Train's
  placement-group cleaner, which checks once a second). A poll is one small actor call per worker;
  a cluster keeps Ray's 2 s;
- waits up to :data:`RAYLET_REGISTER_WAIT_S` (180 s) for its raylet to register with its GCS, where
  Ray's start gives up after a fixed 30 s with a traceback ("The current node timed out during
  startup"): on a busy machine (a 2-core host running three test workers, each starting its own
  Ray) a raylet took longer. The wait reaches into Ray's start (its node lookup, pinned in
  requirements.txt); past it the start ends with one line naming the machine's load, and the
  processes it had started are ended. A raylet that died is not waited for (Ray's 30 s decide), and
  is said in one line naming its logs;
- keeps Ray's token authentication, which Ray turns on for a local start (the token in
  ``~/.ray/auth_token``, made on the first start; ``RAY_AUTH_MODE=disabled`` turns it off), without
  the warning line Ray logs about it on every start: the mode cannot be named in the environment
  instead, since the driver reads it when ``ray`` is imported (named later, the driver then lacks
  the token the GCS asks for).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import CrosscoderError, type_and_message
from .interrupts import stop_signals_as_ctrl_c

PACKAGE = Path(__file__).resolve().parent
_started: str | None = None  # the address of the local Ray this process started


# Ray Train settings for a local Ray this process starts (read by Ray Train in the driver at each
# fit and passed to its controller); a value already in the environment is left alone
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# how long a local Ray's raylet may take to register with its GCS before the start is given up (Ray
# allows 30 s, which a busy 2-core machine exceeded)
RAYLET_REGISTER_WAIT_S = 180.0
# the logger of Ray's "Token authentication is enabled for this Ray cluster" warning at a local start
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def use_local_ray_env() -> None:
    """Put :data:`LOCAL_RAY_ENV` in this process's environment, keeping a value already there."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


class CodeMismatch(CrosscoderError, RuntimeError):
    """A Ray worker imported other crosscoder code than the driver runs."""


class RayStartError(CrosscoderError, RuntimeError):
    """The local Ray a command starts did not come up in time (a busy machine)."""


def connect(num_cpus: int | None = None):
    """``ray``, initialised: at ``RAY_ADDRESS`` if set (and not a local Ray this process started
    earlier), else a local Ray with at least ``num_cpus`` CPUs. Does nothing if Ray is initialised."""
    global _started
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"dashboard_host": "127.0.0.1", "log_to_driver": True, "configure_logging": False}
    if address and address != _started:
        ray.init(address=address, **kwargs)
        stop_signals_as_ctrl_c()
        return ray
    use_local_ray_env()
    empty = tempfile.mkdtemp(prefix="crosscoder-ray-")
    atexit.register(_remove_if_empty, empty)  # Ray packs it at the start; nothing needs it later
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})  # inherited by Ray's processes
    try:
        _started = start_local_ray(ray, num_cpus=max(num_cpus or 0, os.cpu_count() or 1),
                                   runtime_env={"working_dir": empty}, **kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    stop_signals_as_ctrl_c()
    return ray


def start_local_ray(ray, **init_kwargs) -> str:
    """``ray.init`` of a local Ray reached by its own address (returned): its GCS port is chosen
    first and ``RAY_ADDRESS`` names it, in this process (left set; removed if the start fails) and in
    every process it starts; Ray's warning that token authentication is on is not logged."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    auth_logger = logging.getLogger(_AUTH_LOGGER)
    level = auth_logger.level
    auth_logger.setLevel(logging.ERROR)
    import psutil

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    lookup = _PatientNodeLookup(RAYLET_REGISTER_WAIT_S, before)
    try:
        with lookup:
            ray.init(address="local", **init_kwargs)
    except BaseException as error:
        os.environ.pop("RAY_ADDRESS", None)
        _end_children_not_in(before)  # Ray leaves what it started running when its start fails
        if lookup.ran_out and not isinstance(error, KeyboardInterrupt):
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            raise RayStartError(
                f"the local Ray did not start: its raylet had not registered with its GCS {lookup.wait_s:.0f} s "
                f"after it started (load average {os.getloadavg()[0]:.1f} on {cores} cores: this machine is busy); "
                "re-run when it is less busy, or start Ray once (`ray start --head`) and set RAY_ADDRESS to its "
                "address") from None
        if lookup.raylet_ended and not isinstance(error, KeyboardInterrupt):
            raise RayStartError(f"the local Ray did not start: its raylet ended while starting (Ray's logs: "
                                f"{lookup.log_dir or _newest_session_logs(init_kwargs)}, raylet.out and raylet.err)"
                                ) from None
        raise
    finally:
        auth_logger.setLevel(level)
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    _no_grace_for_the_deaf(ray._private.worker._global_node)
    return address


class _PatientNodeLookup:
    """Within ``with``, Ray's start looks its new node up in the GCS for up to ``wait_s`` instead of
    its own 30 s: Ray's start loop calls ``ray._private.services.get_node`` until the raylet has
    registered, and gives up once 30 s have passed; this lookup retries inside that call until
    ``wait_s`` has passed since the first one, while a raylet this start began (a descendant whose
    pid is not in ``before``) is alive: one that has died, e.g. on a bad setting, leaves Ray's own
    30 s to decide, so its error is not delayed. ``ran_out`` says whether the wait ran out,
    ``raylet_ended`` whether the raylet had ended (``log_dir``: its logs, where it was seen). Where
    Ray has no such function, nothing changes."""

    def __init__(self, wait_s: float, before: set[int]) -> None:
        self.wait_s, self.ran_out, self.raylet_ended, self._before = wait_s, False, False, before
        self._give_up_at: float | None = None
        self.log_dir: str | None = None

    def __enter__(self) -> _PatientNodeLookup:
        from ray._private import services

        self._services, self._look_up = services, getattr(services, "get_node", None)
        if self._look_up is not None:
            services.get_node = self._look_up_patiently
        return self

    def __exit__(self, *exc) -> None:
        if self._look_up is not None:
            self._services.get_node = self._look_up

    def _look_up_patiently(self, gcs_address, node_id):
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + self.wait_s
        while True:
            try:
                return self._look_up(gcs_address, node_id)
            except RuntimeError:  # not registered yet
                if not self._raylet_alive():
                    self.raylet_ended = True
                    raise
                if time.monotonic() >= self._give_up_at:
                    self.ran_out = True
                    raise
                time.sleep(0.5)

    def _raylet_alive(self) -> bool:
        import psutil

        for process, command in _started_since(self._before):
            with contextlib.suppress(psutil.Error):
                if process.name() == "raylet" and process.status() != psutil.STATUS_ZOMBIE:
                    self.log_dir = self.log_dir or next(
                        (arg.split("=", 1)[1] for arg in command if arg.startswith("--log_dir=")), None)
                    return True
        return False


def _started_since(before: set[int]) -> list[tuple[Any, list[str]]]:
    """(process, command line) of each descendant of this process whose pid is not in ``before``
    (an empty command line for a zombie); those that end while read are left out."""
    import psutil

    started = []
    for child in psutil.Process().children(recursive=True):
        if child.pid not in before:
            with contextlib.suppress(psutil.Error):
                started.append((child, child.cmdline()))
    return started


def _newest_session_logs(init_kwargs: dict) -> str:
    """Where the newest local Ray session keeps its logs (``<temp>/session_latest/logs``)."""
    temp = init_kwargs.get("_temp_dir")
    if not temp:
        try:
            from ray._common.utils import get_default_ray_temp_dir

            temp = get_default_ray_temp_dir()
        except ImportError:
            temp = os.path.join(tempfile.gettempdir(), "ray")
    return os.path.join(temp, "session_latest", "logs")


def _end_children_not_in(before: set[int]) -> None:
    """SIGKILL this process's descendants that run Ray's code or binaries and whose pid is not in
    ``before`` (what a failed start began), and reap those that are its children."""
    import psutil

    started = [process for process, command in _started_since(before) if "/ray/" in " ".join(command)]
    for process in started:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(started, timeout=5)


def _no_grace_for_the_deaf(node) -> None:
    """Make ``ray.shutdown()`` SIGKILL at once those of ``node``'s processes that block SIGTERM in
    every thread, instead of sending them a SIGTERM they cannot hear and waiting Ray's 1-s grace
    before the SIGKILL they get anyway. Ray's other processes keep the grace. (A program could
    still take a blocked signal with ``sigwait``; Ray's do not: each such process outlived the
    whole grace and ended by the SIGKILL, measured.) This reaches into Ray's ``Node`` (pinned in
    requirements.txt); where that method is gone, nothing changes."""
    kill = getattr(node, "_kill_process_impl", None)
    if kill is None:
        return

    def kill_without_a_grace_it_cannot_use(process_type, allow_graceful=False, **kwargs):
        processes = [info.process for info in node.all_processes.get(process_type, [])]
        if processes and all(_deaf_to_sigterm(p.pid) for p in processes):
            allow_graceful = False
        kill(process_type, allow_graceful=allow_graceful, **kwargs)

    node._kill_process_impl = kill_without_a_grace_it_cannot_use


def _deaf_to_sigterm(pid: int) -> bool:
    """Whether every thread of process ``pid`` blocks SIGTERM, so that a SIGTERM stays pending for
    ever (Linux's ``/proc``; False where that cannot be read: another OS, a process gone)."""
    bit = 1 << (signal.SIGTERM - 1)
    try:
        threads = os.listdir(f"/proc/{pid}/task")
        if not threads:
            return False
        for thread in threads:
            with open(f"/proc/{pid}/task/{thread}/status") as status:
                blocked = next(line for line in status if line.startswith("SigBlk:"))
            if not int(blocked.split()[1], 16) & bit:
                return False
    except (OSError, StopIteration, ValueError):
        return False
    return True


# Settings a Ray worker started elsewhere needs to see as the driver does: where the object store and
# the hub are, whether to stay offline, test-only switches. Never credentials (AWS keys, session
# tokens, HF_TOKEN): Ray shows a runtime environment in its dashboard, its state API and its logs, so
# workers take credentials from their own environment (a Kubernetes Secret in every pod; a local Ray
# inherits the shell's).
WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_ENDPOINT",
              "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _remove_if_empty(directory: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def worker_env() -> dict[str, str]:
    """The driver's variables that go into the runtime environment of the Ray workers it starts."""
    return {k: v for k, v in os.environ.items() if k in WORKER_ENV or k.startswith("CROSSCODER_")}


def code_fingerprint() -> str:
    """A hash of this process's crosscoder sources (Python and C++), to compare driver and workers."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".cpp", ".toml") and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def check_code(driver: str | None, where: str) -> None:
    """Refuse to work when this process's crosscoder differs from the driver's (``driver``: its
    :func:`code_fingerprint`, or None when the caller did not say)."""
    if driver is not None and driver != code_fingerprint():
        raise CodeMismatch(
            f"{where} on {socket.gethostname()} runs crosscoder from {PACKAGE} (code {code_fingerprint()}), not the "
            f"driver's (code {driver}): install the same crosscoder on every node and run from a directory that "
            "holds no other crosscoder checkout")


def first_line(error: BaseException) -> str:
    """The line that says what went wrong: a Ray error's cause, without its traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return type_and_message(cause)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if ": " in line and not line.startswith("File ")]
    line = said[-1] if said else (lines[0] if lines else "")
    return re.sub(r"^(?:\w+\.)+(?=\w+: )", "", line)  # crosscoder.shards.ShardError: … → ShardError: …


def process_died(error: BaseException) -> bool:
    """Whether a Ray error says a worker's process ended (killed, the kernel's OOM killer, a crash)
    rather than raised an exception; Ray's text for it is a paragraph of guesses. A process Ray ended
    on purpose did not die: Ray Train removes a failed group's placement group, which ends the other
    ranks, and on a busy host its poll can find them gone before it reports the rank that died."""
    from ray.exceptions import ActorDiedError, WorkerCrashedError

    text = str(error)
    if "Worker exit type: INTENDED_" in text:  # INTENDED_SYSTEM_EXIT, INTENDED_USER_EXIT
        return False
    return isinstance(error, (ActorDiedError, WorkerCrashedError)) or "health check failed" in text


# what gloo and NCCL raise in a collective whose peer's process ended: a consequence, not a cause
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
             "remote process exited or there was a network error")


def lost_a_peer(error: BaseException) -> bool:
    """Whether a rank's error is its collective losing the connection to another rank's process."""
    return any(marker in str(error) for marker in LOST_PEER)


def memory_request(ray, wanted: float, count: int, key: str) -> float:
    """What each of ``count`` actors or workers asks Ray for: ``wanted`` bytes, or the cluster's share
    when it has less (said once), so the request schedules within a node instead of waiting forever."""
    if wanted <= 0:
        return 0
    available = ray.cluster_resources().get("memory", 0)
    if available and wanted * count > available:
        print(f"{key}: {wanted / 2**30:.1f} GiB each does not fit the cluster's {available / 2**30:.1f} GiB for "
              f"{count}; asking for {available / count / 2**30:.1f} GiB each", file=sys.stderr)
        return available / count
    return wanted


def note_gpu_wait(ray, wanted: float, count: int, key: str) -> None:
    """A GPU request the cluster cannot meet now waits (an autoscaler may add GPU nodes), silently
    in Ray, for ever on a fixed cluster: say so once, up front."""
    have = ray.cluster_resources().get("GPU", 0)
    if wanted * count > have:
        print(f"{key}: {count} × {wanted:g} GPUs asked for, the Ray cluster has {have:g} now; waiting for them "
              "(an autoscaler may add GPU nodes; Ctrl-C stops)", file=sys.stderr, flush=True)
