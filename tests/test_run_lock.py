"""One crosscoder process per run directory (run_lock.py): a second is refused by name, and a holder
that dies, however it dies, leaves no stale lock."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from crosscoder.run_lock import LOCK_FILE, RunDirBusy, hold

HOLDER = """
import sys, time
from pathlib import Path
from crosscoder.run_lock import hold
with hold(Path(sys.argv[1]), "crosscoder train --run elsewhere"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_holder_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"{run} is in use by another crosscoder process \(pid {proc.pid} on "
                                             r".*`crosscoder train --run elsewhere`, since .*use another --run"):
            with hold(run, "crosscoder run"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with hold(run, "crosscoder run"):  # the kernel released the dead holder's lock
        assert '"command": "crosscoder run"' in (run / LOCK_FILE).read_text()
    with hold(run, "crosscoder analyze"):  # and the block's end released ours
        pass
    with pytest.raises(ValueError, match="inside"), hold(run, "crosscoder train"):
        raise ValueError("inside")  # an error in the block is the block's, and releases the lock too
    with hold(run, "crosscoder train"):
        pass
