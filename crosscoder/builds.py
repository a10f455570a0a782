"""Compiled code: built once per install, loaded by every process, never waited on forever.

Two things are compiled with ``torch.utils.cpp_extension``: our CPU kernels (native.py) and
DeepSpeed's shared-memory all-reduce op (``deepspeed_shm_comm``, built by DeepSpeed's CPU accelerator
when a process group starts). By default torch builds both into one cache per user
(``~/.cache/torch_extensions``), shared by every checkout and virtual environment: a load from
another venv rebuilds in place while every other process waits, and a build killed midway leaves a
``lock`` file that every later build waits on, silently, forever.

Here every build goes into a directory owned by the install (``<venv>/var/crosscoder-extensions/
<python>-<torch>``; ``CROSSCODER_EXTENSIONS_DIR`` overrides it), and our module's name carries a hash
of its source, flags and torch version, so two installs never share or rebuild each other's code.
``scripts/install.sh`` builds both (``python -m crosscoder.builds``), so Ray workers only load them.
Before any load, a lock is examined: one older than a build can take (``STALE_AFTER_S``) is
removed with a warning naming it; a younger one is waited on with a message every 30 s, and
treated as stale once it is older than that bound. A lock whose directory a live process works in
(torch runs ninja and the compiler there) is a build in progress whatever its age, and is waited
on: removing it broke that build (a rebuild on a loaded machine outlasted the bound once, and the
builder died when its lock was gone). The cost: one more directory per venv (~10 MB).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch

STALE_AFTER_S = 600.0  # a build takes under a minute here; ten leave room for a loaded machine
STALE_LOAD_AFTER_S = 60.0  # where the build is done, a lock is a load's no-op check (a second), or a leftover
REPORT_EVERY_S = 30.0


def extensions_dir() -> Path:
    """This install's build directory for compiled extensions (created), with this install's ninja
    first on PATH (:func:`pin_ninja`)."""
    override = os.environ.get("CROSSCODER_EXTENSIONS_DIR")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = Path(override) if override else Path(sys.prefix) / "var" / "crosscoder-extensions"
    where = root / f"{python}-torch{torch.__version__}"
    where.mkdir(parents=True, exist_ok=True)
    pin_ninja(where)
    return where


def pin_ninja(where: Path) -> None:
    """Put the pinned ``ninja`` of this install (the pip package's) first on PATH, alone in
    ``<where>/bin``. torch runs whichever ``ninja`` PATH finds, and the processes of one install
    did not all find the same one (a CI run's build log shows the op built by the pinned 1.13, then
    rebuilt by the system's 1.11 during the suite): the two write build logs of different versions,
    each reads the other's as no log at all, so every switch rebuilt DeepSpeed's op from scratch (a
    minute on a busy machine, with every other process waiting on its lock). Without the pip
    package, the system's ninja serves every process alike."""
    try:
        import ninja
    except ImportError:
        return
    binary = Path(ninja.BIN_DIR) / "ninja"
    pinned = where / "bin"
    if not binary.is_file() or os.environ.get("PATH", "").split(os.pathsep)[0] == str(pinned):
        return
    pinned.mkdir(exist_ok=True)
    link = pinned / "ninja"
    if not link.exists():
        try:
            link.symlink_to(binary)
        except FileExistsError:  # another process made it meanwhile
            pass
    os.environ["PATH"] = os.pathsep.join([str(pinned), os.environ.get("PATH", "")])


def source_key(*parts: str | bytes) -> str:
    """A short hash of what a build depends on: sources, flags, torch version."""
    digest = hashlib.sha256(torch.__version__.encode())
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
    return digest.hexdigest()[:12]


def clear_stale_locks(directory: Path, stale_after_s: float = STALE_AFTER_S, sleep=time.sleep) -> None:
    """Wait for (with a message) or remove the build locks under ``directory``; returns when none is left.

    A lock is a build (or a load: torch takes the lock to check a build is current) in progress in
    another process, or the leftover of one that was killed: a lock older than ``stale_after_s`` (or
    STALE_LOAD_AFTER_S where the build already produced its library) is the latter and is removed
    with a warning; a younger one is waited on until it goes or grows that old.
    """
    waited = 0.0
    while True:
        locks = [p for p in Path(directory).glob("**/lock") if p.is_file()]
        if not locks:
            return
        now = time.time()
        young = []
        for lock in locks:
            try:
                age = now - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # the build finished meanwhile
            built = any(lock.parent.glob("*.so"))
            old = age >= (min(stale_after_s, STALE_LOAD_AFTER_S) if built else stale_after_s)
            if old and not building_in(lock.parent):
                print(f"crosscoder: removing the stale build lock {lock} ({age:.0f} s old: left by a build that "
                      "was killed)", file=sys.stderr)
                lock.unlink(missing_ok=True)
            else:
                young.append((lock, age))
        if not young:
            return
        if waited % REPORT_EVERY_S == 0:
            lock, age = young[0]
            print(f"crosscoder: waiting for a build in progress ({lock}, {age:.0f} s old; taken as stale at "
                  f"{stale_after_s:.0f} s)", file=sys.stderr)
        sleep(1.0)
        waited += 1.0


def building_in(directory: Path) -> bool:
    """A live process has ``directory`` as its working directory: torch runs ninja, and ninja the
    compiler, in the build directory, so a build (or a load's up-to-date check) is in progress there.
    Read from /proc (Linux); elsewhere, False, and the lock's age alone decides."""
    target = os.path.realpath(directory)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd") == target:
                return True
        except OSError:  # gone meanwhile, or another user's
            continue
    return False


def use_for_torch_extensions() -> Path:
    """Point torch's JIT builds in this process (DeepSpeed's ops) at this install's directory,
    after clearing stale locks there; returns the directory."""
    where = extensions_dir() / "torch"
    where.mkdir(exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(where)
    clear_stale_locks(where)
    return where


def build_all() -> None:
    """What scripts/install.sh runs: our kernels for this CPU and DeepSpeed's CPU comm op."""
    from . import native

    status = "built" if native.module() is not None else "NOT built (no C++ compiler?), the PyTorch path will run"
    print(f"compiled CPU kernels: {status} in {extensions_dir()}")
    use_for_torch_extensions()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.comm.torch import build_shm_op

        op = build_shm_op()
        print(f"DeepSpeed's CPU comm op: {'built' if op is not None else 'not needed here'} in "
              f"{os.environ['TORCH_EXTENSIONS_DIR']}")
    except Exception as error:  # noqa: BLE001 - DeepSpeed then builds it at its first process group
        print(f"DeepSpeed's CPU comm op not built ({type(error).__name__}: {error}); DeepSpeed builds it on first use")


if __name__ == "__main__":
    build_all()
