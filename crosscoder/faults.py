"""Test-only fault injection: a process dies hard, once, at a named point of a production loop.

Fault tests must kill a harvest actor mid-shard or a training rank mid-run the way a lost machine
would, without a signal the code could handle. Set ``CROSSCODER_FAULT`` to ``"<site>: <where>"``,
e.g. ``"train: rank 1 step 6"`` or ``"harvest: shard 1 half"``, and ``CROSSCODER_FAULT_MARKER`` to a
file path: the process that reaches that point while the marker does not exist creates it and exits
at once with status 17, so the retried or restarted work passes the point. With
``CROSSCODER_FAULT_KIND=memory`` it instead takes memory until something kills it (Ray's memory
monitor, in the tests that set its threshold), as a worker that outgrows its node is killed; with
``CROSSCODER_FAULT_KIND=disk`` it raises the error a full disk raises (ENOSPC) where a write comes.
Both variables unset (as in any real run) make :func:`point` a dictionary lookup. The Ray processes
the harvest and the trainer start receive every ``CROSSCODER_*`` variable of the driver.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

EXIT_STATUS = 17


def point(site: str, where: str) -> None:
    """Die here if the test switch names this point and its marker does not exist yet."""
    if os.environ.get("CROSSCODER_FAULT") != f"{site}: {where}":
        return
    marker = Path(os.environ["CROSSCODER_FAULT_MARKER"])
    if marker.exists():
        return
    marker.write_text(f"{os.getpid()}\n")  # which process died, for the test's checks
    kind = os.environ.get("CROSSCODER_FAULT_KIND", "exit")
    if kind == "disk":  # the write that was to come fails as on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{where} (injected)")
    if kind == "memory":
        held = []
        for _ in range(64):  # up to 16 GiB, a page at a time, until the process is killed
            block = bytearray(256 * 2**20)
            block[::4096] = b"\1" * len(block[::4096])
            held.append(block)
            time.sleep(0.05)
        time.sleep(60)
    os._exit(EXIT_STATUS)
