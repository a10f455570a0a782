"""One crosscoder process at a time in a run directory, and in an output runs share.

Two drivers on one run directory (a job submitted twice, a second terminal) would both write
checkpoints ``step-N`` over each other, interleave ``train_log.jsonl``, remove each other's stop
file and leave an export that neither run made. :func:`hold` takes an exclusive ``flock`` on
``<run>/.lock`` for a command's whole life and writes who holds it there, so the second command
is refused at once with a line naming the first (pid, host, command, start time).

Why ``flock``: the kernel releases it when the holder exits, however it exits (``kill -9``, a
node's OOM killer), so there is never a stale lock to clean up; the file stays, harmless. Its cost
and limit: it protects the run directory only as far as the filesystem honours ``flock``. Local
disks do, and so do NFSv4 and CephFS across clients; a filesystem that refuses locks is said once
and the command runs without one.

Outputs that several runs share (a shard root that a sweep of training configs reads, the
organism's models that two configs use) are held the same way, on ``<dir>/.output.lock`` (its own
name: a shard root may be the run directory itself), by :func:`shared_output`, which waits
instead of refusing: the second run then finds the work done and keeps it, so a sweep started
all at once harvests its dataset once. A shard root on S3 has no such lock (S3 has no lock that
a killed holder releases): two harvests into one bucket prefix are the user's to avoid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import CrosscoderError

LOCK_FILE = ".lock"
OUTPUT_LOCK_FILE = ".output.lock"


class RunDirBusy(CrosscoderError, RuntimeError):
    """Another crosscoder process holds the run directory."""


@contextlib.contextmanager
def hold(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``run_dir`` for the ``with`` block (created if needed); :class:`RunDirBusy` if taken."""
    with _locked(run_dir / LOCK_FILE, command) as (_, free):
        if not free:
            raise RunDirBusy(f"{run_dir} is in use by another crosscoder process ({_holder(run_dir / LOCK_FILE)}); "
                             "wait for it to finish, stop it, or use another --run")
        yield


@contextlib.contextmanager
def shared_output(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory``, an output several runs may share, for the ``with`` block; while another
    process holds it, say who (one line, ``what`` first) and wait for it (Ctrl-C stops waiting)."""
    command = " ".join(["crosscoder", *sys.argv[1:]])
    with _locked(directory / OUTPUT_LOCK_FILE, command) as (fd, free):
        if not free:
            print(f"{what}: waiting for another crosscoder process writing {directory} "
                  f"({_holder(directory / OUTPUT_LOCK_FILE)}); its work will be kept", file=sys.stderr, flush=True)
            _wait_for(fd, what, directory)
            _write_holder(fd, command)
        yield


REMIND_EVERY_S = 300.0  # a wait for a shared output (an organism takes half an hour) is said again this often


def _wait_for(fd: int, what: str, directory: Path) -> None:
    """Take the lock on ``fd``, polling, and say every REMIND_EVERY_S that the wait goes on."""
    started = said = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.5)
        if time.monotonic() - said >= REMIND_EVERY_S:
            said = time.monotonic()
            print(f"{what}: still waiting for {directory} ({(said - started) / 60:.0f} min)", file=sys.stderr,
                  flush=True)


@contextlib.contextmanager
def _locked(path: Path, command: str) -> Iterator[tuple[int, bool]]:
    """Try the lock on ``path`` (its folder created) once: (its descriptor, whether it was free);
    released when the block ends (the descriptor closes). A filesystem that refuses locks is said,
    and counts as free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                yield fd, False
                return
            print(f"{path}: this filesystem refuses file locks ({e.strerror}); running without one (do not start "
                  "a second command on this directory)", file=sys.stderr)
        else:
            _write_holder(fd, command)
        yield fd, True
    finally:
        os.close(fd)  # releases the lock


def _write_holder(fd: int, command: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode(), 0)


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, `{h['command']}`, since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are not written yet"
