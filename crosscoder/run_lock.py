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
all at once harvests its dataset once. A shard root on an object store has no ``flock``: there
:func:`shared_root` holds a lease instead (a lock object written only if absent and renewed while
held), which a killed holder's successor takes once it is stale; its limits are in its docstring.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import CrosscoderError
from .storage import Root, StorageError

LOCK_FILE = ".lock"
OUTPUT_LOCK_FILE = ".output.lock"
REMIND_EVERY_S = 300.0  # a wait for a shared output (an organism takes half an hour) is said again this often


class RunDirBusy(CrosscoderError, RuntimeError):
    """Another crosscoder process holds the run directory."""


@contextlib.contextmanager
def hold(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``run_dir`` for the ``with`` block (created if needed); :class:`RunDirBusy` if taken. A
    block that fails before anything but the lock is in a run directory it created (``crosscoder
    train`` with no shards) removes that directory again, and the parents it created."""
    made = []  # the folders this call creates, deepest first
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    with _locked(run_dir / LOCK_FILE, command) as (_, free):
        if not free:
            raise RunDirBusy(f"{run_dir} is in use by another crosscoder process ({_holder(run_dir / LOCK_FILE)}); "
                             "wait for it to finish, stop it, or use another --run")
        try:
            yield
        except BaseException:
            if made and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:  # still held: no one else is in it
                (run_dir / LOCK_FILE).unlink()
                for folder in made:
                    with contextlib.suppress(OSError):  # another process wrote into it meanwhile
                        folder.rmdir()
            raise


@contextlib.contextmanager
def shared_output(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory``, an output several runs may share, for the ``with`` block; while another
    process holds it, say who (one line, ``what`` first) and wait for it (Ctrl-C stops waiting)."""
    command = " ".join(["crosscoder", *sys.argv[1:]])
    with _locked(directory / OUTPUT_LOCK_FILE, command) as (fd, free):
        if not free:
            wait = _Wait(what, str(directory), _holder(directory / OUTPUT_LOCK_FILE))
            while not _try_flock(fd):
                time.sleep(0.5)
                wait.remind()
            _write_holder(fd, command)
        yield


class _Wait:
    """A wait for a shared output: said once with its holder, then every REMIND_EVERY_S."""

    def __init__(self, what: str, where: str, holder: str):
        self.what, self.where = what, where
        self.started = self.said = time.monotonic()
        print(f"{what}: waiting for another crosscoder process writing {where} ({holder}); its work will be kept",
              file=sys.stderr, flush=True)

    def remind(self) -> None:
        now = time.monotonic()
        if now - self.said >= REMIND_EVERY_S:
            self.said = now
            print(f"{self.what}: still waiting for {self.where} ({(now - self.started) / 60:.0f} min)",
                  file=sys.stderr, flush=True)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


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


def _record(command: str) -> bytes:
    """Who holds a lock: what a lock file or lock object holds."""
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode()


def _write_holder(fd: int, command: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _record(command), 0)


def _holder(path: Path) -> str:
    try:
        return _described(path.read_bytes())
    except OSError:
        return "its details are not written yet"


def _described(record: bytes) -> str:
    try:
        h = json.loads(record)
        return f"pid {h['pid']} on {h['host']}, `{h['command']}`, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "its details are not written yet"


# ---------------------------------------------------------------------------------------------
# a shard root on an object store: a lease

LEASE_RENEW_S = 60.0  # the holder rewrites its lock object this often
LEASE_STALE_S = 600.0  # a lock object not rewritten for this long is a dead holder's (clocks may differ a little)
LEASE_POLL_S = 5.0  # a waiter looks again this often


@contextlib.contextmanager
def shared_root(root: Root, what: str) -> Iterator[None]:
    """:func:`shared_output` for a storage root: a ``flock`` on a local one; on an object store a
    lease, the object ``.output.lock`` created only if absent (a conditional write) and rewritten
    every LEASE_RENEW_S by a thread while held. A killed holder cannot release it: a waiter takes
    it once it has not been rewritten for LEASE_STALE_S, or at once when the holder ran on the
    waiter's host and its process is gone, saying so. Its limits: two waiters that
    find one stale lock at the same moment may both take it (as if there were no lock), and a store
    that refuses conditional writes gets no lock (said once)."""
    if root.is_local:
        with shared_output(Path(root.path), what):
            yield
        return
    command = " ".join(["crosscoder", *sys.argv[1:]])
    mine = _record(command)
    if not _take_lease(root, what, mine):
        yield
        return
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(root, what, mine, stop), name="crosscoder-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=LEASE_RENEW_S)  # a rewrite in flight ends first, so it cannot follow the delete
        with contextlib.suppress(StorageError, OSError):
            if root.read_bytes(OUTPUT_LOCK_FILE) == mine:
                root.delete(OUTPUT_LOCK_FILE)


def _take_lease(root: Root, what: str, mine: bytes) -> bool:
    """Wait for the lease and take it (True), or find that the store gives none (False)."""
    lock, wait = root.url_of(OUTPUT_LOCK_FILE), None
    while True:
        try:
            if root.create(OUTPUT_LOCK_FILE, mine):
                if root.read_bytes(OUTPUT_LOCK_FILE) == mine:
                    return True
                # another process's write won after ours was created: the store ignores the condition
                raise StorageError("the store does not honour conditional writes (If-None-Match)")
            try:
                modified, record = root.modified(OUTPUT_LOCK_FILE), root.read_bytes(OUTPUT_LOCK_FILE)
            except FileNotFoundError:
                continue  # released between the two requests
            if modified is None:
                continue
            holder, age = _described(record), time.time() - modified
            if age > LEASE_STALE_S or _dead_here(record):
                why = f"not renewed for {age / 60:.0f} min" if age > LEASE_STALE_S else "its process is not running"
                print(f"{what}: removing {lock} ({why}): its holder ({holder}) is gone", file=sys.stderr, flush=True)
                root.delete(OUTPUT_LOCK_FILE)
                continue
        except (StorageError, OSError) as e:  # e.g. the bucket is gone, or the lock may not be deleted
            cause = (str(e).splitlines() or [type(e).__name__])[0]
            print(f"{what}: {lock}: no lock can be taken there ({cause}); going on without one (do not start a "
                  "second harvest into this root)", file=sys.stderr, flush=True)
            return False
        if wait is None:
            wait = _Wait(what, root.url, holder)
        wait.remind()
        time.sleep(LEASE_POLL_S)


def _dead_here(record: bytes) -> bool:
    """The holder ran on this host and its process is gone (a killed command re-run on one machine
    need not wait for the lease to go stale)."""
    try:
        h = json.loads(record)
        if h["host"] != socket.gethostname():
            return False
        os.kill(int(h["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, OSError):  # unreadable, or alive under another user
        pass
    return False


def _renew(root: Root, what: str, mine: bytes, stop: threading.Event) -> None:
    """Rewrite the lease until ``stop``; a failed rewrite is retried at the next turn (the lease
    outlives ten of them), a lease another process took is said and left to it."""
    while not stop.wait(LEASE_RENEW_S):
        try:
            if root.read_bytes(OUTPUT_LOCK_FILE) != mine:
                print(f"{what}: {root.url_of(OUTPUT_LOCK_FILE)} was taken by another process (it found it stale); "
                      "two harvests may now write this root", file=sys.stderr, flush=True)
                return
            root.write_bytes(OUTPUT_LOCK_FILE, mine)
        except (StorageError, OSError):
            continue
