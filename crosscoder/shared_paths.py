"""Refuse, before any work, a local path that another node of the Ray cluster does not see.

On one machine every Ray worker sees the driver's files. On a cluster of several nodes a local path
(the run directory, a dataset or a harvest's output on disk, a model's directory) must be on a file
system every node mounts (NFS, a ReadWriteMany volume): a path on one node's own disk exists on the
others as another directory or not at all, and nothing fails at once. Measured on a Ray of two
nodes whose second had its own view of the run directory's parent: a 2-worker run trained and
exported, each node keeping its own part of every checkpoint, and its re-run (the resume) hung
until it was killed 300 s later.

So before the workers or actors start, one task per other node that could run them (no CPU asked,
so a busy node answers too) reads one file of each place and compares its size and the hash of its
first MiB with what the driver read: a token the driver writes into a directory the work writes to
(removed afterwards), or an immutable file of a place the work only reads (a committed shard, a
model's ``config.json``, the export). What it costs: a cluster of one node, every local run, starts
no task; a cluster of N nodes pays N small tasks once per command, a second or two; a node that
does not answer within :data:`PROBE_TIMEOUT_S` is not waited for, and a node an autoscaler adds
later is not checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import CrosscoderError

PROBE_TIMEOUT_S = 60.0  # how long the driver waits for the nodes' answers before going on
_HEAD_BYTES = 1 << 20  # what is hashed of each file: its size and first MiB tell two files apart


class NotShared(CrosscoderError, RuntimeError):
    """A local path the work needs is missing, or another file, on a node that may run the work."""


def _digest(path: str) -> tuple[int, str] | None:
    """(size, sha256 of the first MiB) of the file at ``path``, or None where there is none."""
    try:
        with open(path, "rb") as fh:
            return os.fstat(fh.fileno()).st_size, hashlib.sha256(fh.read(_HEAD_BYTES)).hexdigest()
    except OSError:
        return None


def _differences(expected: dict[str, tuple[str, tuple[int, str]]]) -> dict[str, str]:
    """On a node: for each place whose file differs from the driver's, why (run as a Ray task)."""
    found = {}
    for label, (path, digest) in expected.items():
        here = _digest(path)
        if here != tuple(digest):
            found[label] = "missing there" if here is None else "another file there"
    return found


@contextlib.contextmanager
def _token_in(directory: Path) -> Iterator[Path]:
    """A file of random bytes in ``directory`` while the context lasts: what a node that sees the
    same directory reads back."""
    path = directory / f".node-check-{os.urandom(6).hex()}"
    path.write_bytes(os.urandom(32))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def check_nodes_see(ray, resource: str, work: str, files: dict[str, Path] | None = None,
                    directories: dict[str, Path] | None = None) -> None:
    """Raise :class:`NotShared` when a node other than this one, with ``resource`` (``"CPU"``,
    ``"GPU"``) to run ``work``, does not see one of ``files`` (places the work reads) or of
    ``directories`` (places it writes to) as this process does. Each key names its place in the
    error, e.g. ``"the run directory /runs/x"``."""
    own = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != own and n["Resources"].get(resource, 0) > 0]
    if not nodes or not (files or directories):
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    with contextlib.ExitStack() as tokens:
        places = dict(files or {}) | {label: tokens.enter_context(_token_in(Path(directory)))
                                      for label, directory in (directories or {}).items()}
        expected = {label: (str(path), _digest(str(path))) for label, path in places.items()}
        probe = ray.remote(num_cpus=0, max_retries=0)(_differences)
        asked = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                 .remote(expected): n for n in nodes}
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=PROBE_TIMEOUT_S)
        for ref in answered:
            try:
                differing = ray.get(ref)
            except Exception:  # noqa: BLE001 - a node gone meanwhile, or older code there (refused later, by name)
                continue
            if differing:
                label, why = next(iter(differing.items()))
                node = asked[ref]
                raise NotShared(
                    f"{label} is not the same on the Ray node at {node['NodeManagerAddress']} (node "
                    f"{node['NodeID'][:12]}: {why}), which may run {work}: on a cluster of several nodes a "
                    "local path must be on a file system every node mounts (NFS, a ReadWriteMany volume; data "
                    "may also be on S3)")
